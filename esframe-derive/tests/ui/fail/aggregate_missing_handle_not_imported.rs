// The trait is not imported: the derive is named by its path.
use esframe_core::{Command, Event};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Event)]
enum AccountEvent {
    Opened,
}

#[derive(Command)]
struct Open {
    #[command(aggregate_id)]
    id: String,
}

#[derive(Debug, thiserror::Error)]
#[error("rejected")]
struct AccountError;

#[derive(Debug, Default, Serialize, Deserialize, esframe_core::Aggregate)]
#[aggregate(command = Open, event = AccountEvent, error = AccountError)]
struct Account {
    balance: i64,
}

impl Account {
    fn apply(&mut self, _event: &AccountEvent) {}
}

fn main() {}
