use esframe_core::Command;

#[derive(Command)]
struct Ping;

#[derive(Command)]
enum AccountCommand {
    Open {
        #[command(aggregate_id)]
        account_id: String,
    },
    Ping,
}

fn main() {}
