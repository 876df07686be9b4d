// `agregate_id` for `aggregate_id` on the enum: one error, on the key. Its value is still read,
// so no variant is reported as having no aggregate id.
use esframe_core::Command;

#[derive(Command)]
#[command(agregate_id = account_id)]
enum AccountCommand {
    Open { account_id: String, owner: String },
    Deposit { account_id: String, amount: u64 },
}

fn main() {
    let _ = AccountCommand::Deposit { account_id: "a".into(), amount: 1 }.aggregate_id();
}
