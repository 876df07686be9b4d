//! Error types. Domain errors ([`CommandError::Rejected`]) stay apart from store errors, and a
//! store error says what happened to the data: [`StoreError::kind`].

mod command;
mod input;
mod store;

use std::fmt;

pub use command::CommandError;
pub use input::{InputLocation, InputProblem, InvalidInput};
pub use store::{BackendError, CorruptData, StoreError, StoreErrorKind};

use crate::{DecodeErrorKind, ExpectedVersion, StreamId};

/// An append was refused because the stream was not at the expected version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("concurrency conflict on stream `{stream}`: expected {expected}, but the stream {}", ActualVersion(*.actual))]
pub struct Conflict {
    /// The stream appended to.
    pub stream: StreamId,
    /// What the writer expected.
    pub expected: ExpectedVersion,
    /// The stream's version when the append was tried; `None` if the stream does not exist.
    pub actual: Option<u64>,
}

struct ActualVersion(Option<u64>);

impl fmt::Display for ActualVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("does not exist"),
            Some(v) => write!(f, "is at version {v}"),
        }
    }
}

/// A stored event that cannot be read as the application's event type.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot decode event `{event_type}` (schema v{schema_version}) at version {stream_version} of stream `{stream}`: {kind}"
)]
pub struct EventDecodeError {
    /// Stream of the event.
    pub stream: StreamId,
    /// Version of the event within its stream.
    pub stream_version: u64,
    /// Stored event type name.
    pub event_type: String,
    /// Stored schema version.
    pub schema_version: u32,
    /// What went wrong.
    #[source]
    pub kind: DecodeErrorKind,
}
