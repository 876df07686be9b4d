use esframe_core::{Aggregate, Command, Event};
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

#[derive(Debug, Default, Aggregate)]
#[aggregate(command = Open, event = AccountEvent, error = AccountError)]
struct Account<'a> {
    owner: &'a str,
}

fn main() {}
