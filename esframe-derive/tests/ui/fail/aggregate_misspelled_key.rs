// `comand` for `command`: one error, on the misspelled key, naming the key it was meant to be.
// Its value is still read as `command`'s, so there is no "missing `command`" error and the code
// that passes an `Open` as the aggregate's command reports nothing.
use esframe_core::testkit::AggregateTest;
use esframe_core::{Aggregate, Command, Decision, Event};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum AccountEvent {
    Opened,
}

#[derive(Debug, Command)]
struct Open {
    #[command(aggregate_id)]
    id: String,
}

#[derive(Debug, thiserror::Error)]
#[error("rejected")]
struct AccountError;

#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
#[aggregate(comand = Open, event = AccountEvent, error = AccountError)]
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
    let _ = AggregateTest::<Account>::given_no_events().when(Open { id: "a".into() });
}
