// `error` is missing: the fallback impl stands in for it, so the handler (which names the real
// error type) and the rest of the code report nothing more.
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
#[aggregate(command = Open, event = AccountEvent)]
struct Account {
    open: bool,
}

impl Account {
    async fn handle(
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
