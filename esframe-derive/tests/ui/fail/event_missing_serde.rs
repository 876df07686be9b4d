use esframe_core::Event;

#[derive(Debug, Event)]
enum AccountEvent {
    Opened { owner: String },
    Closed,
}

fn main() {}
