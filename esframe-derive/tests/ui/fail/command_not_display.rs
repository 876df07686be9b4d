use esframe_core::Command;

struct AccountId(u64);

#[derive(Command)]
struct Deposit {
    #[command(aggregate_id)]
    account_id: AccountId,
}

fn main() {}
