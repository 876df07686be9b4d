use esframe_core::Command;

#[derive(Command)]
struct Deposit {
    account_id: String,
    amount: u64,
}

#[derive(Command)]
enum AccountCommand {
    Open {
        #[command(aggregate_id)]
        account_id: String,
    },
    Deposit(String, u64),
}

fn main() {}
