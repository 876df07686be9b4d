use esframe_core::Command;

#[derive(Command)]
#[command(aggregate_id = account_id)]
enum AccountCommand {
    Open {
        #[command(aggregate_id)]
        account_id: String,
    },
}

fn main() {}
