use esframe_core::Command;

#[derive(Command)]
#[command(aggregate_id = account_id, aggregate_id = id)]
enum AccountCommand {
    Open { account_id: String },
}

#[derive(Command)]
struct Deposit {
    #[command(aggregate_id, aggregate_id)]
    account_id: String,
}

fn main() {}
