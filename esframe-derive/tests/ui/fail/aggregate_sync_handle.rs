// `handle` written without `async`: one error, on the type's name, saying to make it an
// `async fn`.
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
#[aggregate(command = Open, event = AccountEvent, error = AccountError)]
struct Account {
    open: bool,
}

impl Account {
    fn handle(
        decision: &mut Decision<'_, Self>,
        _command: &Open,
        _services: &(),
    ) -> Result<(), AccountError> {
        decision.emit(AccountEvent::Opened);
        Ok(())
    }

    fn apply(&mut self, _event: &AccountEvent) {
        self.open = true;
    }
}

fn main() {
    let _ = Account::TYPE;
}
