use esframe_core::Command;

#[derive(Command)]
struct Deposit {
    #[command(aggregate)]
    account_id: String,
}

#[derive(Command)]
#[command(id = account_id)]
enum AccountCommand {
    Open {
        #[command(aggregate_id)]
        account_id: String,
    },
}

fn main() {}
