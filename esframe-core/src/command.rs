//! Commands: requests to change one aggregate.

use serde_json::{Map, Value};
use uuid::Uuid;

/// A request to change one aggregate instance, named in the imperative (`Deposit`).
///
/// Usually derived with `#[derive(Command)]`, marking the field that holds the target id.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an esframe command",
    label = "not a `Command`",
    note = "consider adding `#[derive(Command)]` to `{Self}` and marking the target id with `#[command(aggregate_id)]`"
)]
pub trait Command: Send + Sync + 'static {
    /// The id of the aggregate instance (the stream) this command targets.
    fn aggregate_id(&self) -> String;

    /// The command's own id, if it carries one. It becomes the causation id of the events it
    /// produces (and their correlation id unless the context names another), and their ids are
    /// derived from it ([`derived_event_id`](crate::derived_event_id)), so the same command
    /// handled twice is stored once.
    fn command_id(&self) -> Option<Uuid> {
        None
    }

    /// Free-form metadata copied into every event the command produces.
    fn metadata(&self) -> Map<String, Value> {
        Map::new()
    }
}
