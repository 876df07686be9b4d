use esframe_core::Command;

#[derive(Command)]
#[command(aggregate_id = account_id)]
struct Deposit {
    account_id: String,
}

fn main() {}
