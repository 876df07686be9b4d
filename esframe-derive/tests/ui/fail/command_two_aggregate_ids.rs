use esframe_core::Command;

#[derive(Command)]
struct Transfer {
    #[command(aggregate_id)]
    from: String,
    #[command(aggregate_id)]
    to: String,
}

fn main() {}
