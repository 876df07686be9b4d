// One mistake per derive, and code that uses all three types: only the mistakes are reported,
// the fallback impls keep every use of the types quiet.
use esframe_core::{Aggregate, Command, Decision, Event};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = 0)]
    Opened,
}

#[derive(Command)]
struct Open {
    #[command(aggregate_id, colour = "red")]
    id: String,
}

#[derive(Debug, thiserror::Error)]
#[error("rejected")]
struct AccountError;

#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
#[aggregate(command = Open, event = AccountEvent, error = AccountError, snapshot_version = -1)]
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

fn uses<A: Aggregate>() -> &'static str {
    A::TYPE
}

fn main() {
    let _ = uses::<Account>();
    let _ = AccountEvent::Opened.event_type();
    let _ = Open { id: String::new() }.aggregate_id();
}
