// A key close to `aggregate_id` on a struct, where the field is marked instead: one error, on
// the key, saying so; the struct is not also reported as having no marked field.
use esframe_core::Command;

#[derive(Command)]
#[command(agregate_id = account_id)]
struct Deposit {
    account_id: String,
    amount: u64,
}

fn main() {}
