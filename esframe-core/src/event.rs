//! Domain events: the [`Event`] trait and how events become stored JSON and back.

use serde_json::Value;

use crate::Payload;

/// One event type an [`Event`] enum can hold, with the schema version the code writes today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventType {
    /// The stable name stored with every event of this type, e.g. `"MoneyDeposited"`.
    pub name: &'static str,
    /// The schema version the current code writes and reads.
    pub version: u32,
}

impl EventType {
    /// Describes an event type.
    pub const fn new(name: &'static str, version: u32) -> Self {
        Self { name, version }
    }
}

/// An immutable fact that happened to an aggregate, named in the past tense.
///
/// Usually derived with `#[derive(Event)]` on an enum with one variant per event type. The stored
/// form is the variant's data as JSON (the payload) together with the event type name and schema
/// version, so stored data does not depend on the Rust names of the enum.
///
/// Implementations must guarantee that `from_payload(e.event_type(), &e.to_payload()?)` gives back
/// an event equal to `e`; the test kit checks this for every event a test emits.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an esframe event",
    label = "not an `Event`",
    note = "consider adding `#[derive(Event)]` to `{Self}`"
)]
pub trait Event: Send + Sync + Sized + 'static {
    /// Every event type this type can hold. Names are unique.
    fn event_types() -> &'static [EventType];

    /// The stable type name of this event.
    fn event_type(&self) -> &'static str;

    /// The schema version this event is written with.
    fn schema_version(&self) -> u32;

    /// The event's data as stored JSON (without the type name).
    fn to_payload(&self) -> Result<Value, serde_json::Error>;

    /// Rebuilds an event from its type name and stored JSON, at the current schema version.
    /// Read the data with [`Payload::deserialize`], which reads straight from stored text.
    fn from_payload(event_type: &str, payload: &Payload) -> Result<Self, DecodeErrorKind>;

    /// The upcasters `#[derive(Event)]` declares with `#[event(upcast(...))]`; none by default.
    /// [`Upcasters`](crate::Upcasters) collects them with `.current::<Self>()`.
    fn upcasters() -> Vec<std::sync::Arc<dyn crate::Upcaster>> {
        Vec::new()
    }

    /// The current schema version of `event_type`, or `None` if this type does not know it.
    fn current_version(event_type: &str) -> Option<u32> {
        Self::event_types()
            .iter()
            .find(|t| t.name == event_type)
            .map(|t| t.version)
    }
}

/// Why a stored event could not be read as the application's event type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeErrorKind {
    /// No variant of the event type has this name.
    #[error("the event type is unknown to this code")]
    UnknownType,
    /// The stored schema version is newer than the code: the event was written by a newer release.
    #[error("schema version {stored} is newer than the version {current} this code knows")]
    VersionTooNew {
        /// Version in the store.
        stored: u32,
        /// Version the code declares.
        current: u32,
    },
    /// The stored schema version is older than the code and nothing converts it.
    #[error(
        "schema version {stored} is older than the current version {current} and no upcaster converts it"
    )]
    VersionTooOld {
        /// Version in the store.
        stored: u32,
        /// Version the code declares.
        current: u32,
    },
    /// The payload JSON does not match the event's fields.
    #[error("the payload does not match the event: {0}")]
    Payload(#[source] serde_json::Error),
}
