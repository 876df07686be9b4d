use esframe_core::Command;

#[derive(Command)]
union Deposit {
    account_id: u64,
}

fn main() {}
