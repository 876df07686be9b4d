use esframe_core::projection::ProjectionEvents;

#[derive(ProjectionEvents)]
struct ShopEvent {
    order: u64,
}

fn main() {}
