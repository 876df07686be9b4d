//! Error types. Domain errors ([`CommandError::Rejected`]) stay apart from store errors.

use std::fmt;

use uuid::Uuid;

use crate::{DecodeErrorKind, ExpectedVersion, InvalidStreamId, StreamId};

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

/// An error from an event or snapshot store. Nothing stored is changed when one is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stream was not at the expected version; nothing was appended.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// An event id is already stored with different content (or in another stream).
    #[error(
        "event id {event_id} is already stored at version {stored_version} of stream `{stored_stream}` with different content; refusing to append it to `{stream}`"
    )]
    EventIdReused {
        /// The reused id.
        event_id: Uuid,
        /// The stream the new append targeted.
        stream: StreamId,
        /// The stream where the id is stored.
        stored_stream: StreamId,
        /// The version at which the id is stored.
        stored_version: u64,
    },
    /// Some event ids of one append are stored already and others are not: a partial retry.
    #[error(
        "append to stream `{stream}` mixes already-stored event id {stored_event_id} with new ones; an idempotent retry must resend exactly the original batch"
    )]
    PartialDuplicate {
        /// The stream appended to.
        stream: StreamId,
        /// One event id that is already stored.
        stored_event_id: Uuid,
    },
    /// The same event id appears twice in one append.
    #[error("append to stream `{stream}` contains event id {event_id} twice")]
    DuplicateIdInBatch {
        /// The stream appended to.
        stream: StreamId,
        /// The repeated id.
        event_id: Uuid,
    },
    /// An upcaster failed to convert a stored event (its payload does not have the shape that
    /// version should have).
    #[error(
        "cannot upcast event `{event_type}` (schema v{schema_version}) at version {version} of stream `{stream}`: {reason}"
    )]
    Upcast {
        /// Stream of the event.
        stream: StreamId,
        /// Version of the event within its stream.
        version: u64,
        /// Type being upcast.
        event_type: String,
        /// Schema version being upcast.
        schema_version: u32,
        /// What the upcaster reported.
        reason: String,
    },
    /// A stored row cannot be read (corrupt data).
    #[error("corrupt data at version {version} of stream `{stream}`: {reason}")]
    Corrupt {
        /// Stream of the row.
        stream: StreamId,
        /// Version of the row (0 for a snapshot without a version).
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// A projection updated in the append's transaction (an inline projection) failed, so the
    /// append was rolled back: nothing was stored.
    #[error(
        "inline projection `{projection}` failed on the append to stream `{stream}`, so nothing was appended: {reason}"
    )]
    InlineProjection {
        /// The projection.
        projection: String,
        /// The stream appended to.
        stream: StreamId,
        /// The handler's error message.
        reason: String,
    },
    /// The backend failed (connection lost, I/O error, ...).
    #[error("event store backend error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// Wraps a backend-specific error.
    pub fn backend(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Backend(Box::new(err))
    }

    /// The conflict, if this error is one.
    pub fn as_conflict(&self) -> Option<&Conflict> {
        match self {
            Self::Conflict(c) => Some(c),
            _ => None,
        }
    }
}

/// Why a command did not produce events.
///
/// `E` is the aggregate's domain error: a rejection by business rules is
/// [`CommandError::Rejected`], never mixed up with infrastructure failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E> {
    /// The aggregate rejected the command (a business rule); nothing was stored.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// Other writers kept changing the stream; the retry policy's attempts are used up.
    #[error("{conflict} (gave up after {attempts} attempts)")]
    Conflict {
        /// The last conflict seen.
        #[source]
        conflict: Conflict,
        /// How many times the command was handled.
        attempts: u32,
    },
    /// The command's aggregate id is not a valid stream id.
    #[error("invalid aggregate id: {0}")]
    InvalidAggregateId(#[from] InvalidStreamId),
    /// A stored event could not be decoded while loading the aggregate.
    #[error(transparent)]
    Decode(#[from] EventDecodeError),
    /// The stream holds events of another aggregate type.
    #[error(
        "stream `{stream}` belongs to aggregate type `{found}`, not `{expected}` (event at version {version})"
    )]
    WrongAggregateType {
        /// The stream.
        stream: StreamId,
        /// The aggregate type handling the command.
        expected: &'static str,
        /// The aggregate type recorded on the stream.
        found: String,
        /// Version of the first mismatching event.
        version: u64,
    },
    /// An emitted event could not be serialized.
    #[error("cannot serialize event `{event_type}` for stream `{stream}`: {source}")]
    Encode {
        /// The stream.
        stream: StreamId,
        /// The event type.
        event_type: &'static str,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl<E> From<StoreError> for CommandError<E> {
    fn from(err: StoreError) -> Self {
        Self::Store(err)
    }
}

impl<E> CommandError<E> {
    /// The domain error, if the aggregate rejected the command.
    pub fn as_rejection(&self) -> Option<&E> {
        match self {
            Self::Rejected(e) => Some(e),
            _ => None,
        }
    }
}
