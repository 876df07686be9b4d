use esframe_core::Command;

#[derive(Command)]
struct Deposit<'a> {
    #[command(aggregate_id)]
    account_id: &'a str,
}

fn main() {}
