use esframe_core::Command;

#[derive(Command)]
#[command(aggregate_id = account_id)]
enum AccountCommand {
    Open { account_id: String, owner: String },
    Deposit { id: String, amount: u64 },
    Close,
}

fn main() {}
