use esframe_core::{Aggregate, Command, Decision, Event};
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

#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
struct Account {
    balance: i64,
}

impl Account {
    async fn handle(
        _decision: &mut Decision<'_, Self>,
        _command: &Open,
        _services: &(),
    ) -> Result<(), AccountError> {
        Ok(())
    }

    fn apply(&mut self, _event: &AccountEvent) {}
}

fn main() {}
