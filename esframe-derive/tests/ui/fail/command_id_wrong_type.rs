use esframe_core::Command;

#[derive(Command)]
struct Deposit {
    #[command(aggregate_id)]
    account_id: String,
    #[command(command_id)]
    request: String,
}

fn main() {}
