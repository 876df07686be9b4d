//! [`StoreError`]: what went wrong in a store, classified by what it means for the data.

use uuid::Uuid;

use crate::{StreamId, projection::HandlerError, upcast::UpcastFailure};

use super::{Conflict, InvalidInput};

/// The error of a backend (a database driver's error, an I/O error), kept as the source of a
/// [`StoreError`]. esframe never inspects it: backends classify their failures where they
/// happen.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// What a [`StoreError`] means for the caller, like `sqlx::Error::kind()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The stream was not at the expected version. Nothing was stored: reload, decide again.
    Conflict,
    /// The request breaks the contract (an invalid value, a reused event id, a misuse of a
    /// backend feature). Nothing was stored, and the same request will fail again.
    InvalidInput,
    /// The backend failed (unreachable, timed out, restarting). Nothing was stored; the same
    /// request may succeed later.
    Unavailable,
    /// The backend failed while an append was being committed: it may or may not be stored.
    /// Send the same events again (the same event ids): appends are idempotent by event id.
    OutcomeUnknown,
    /// Stored data cannot be read (a corrupt row, an upcaster that refuses it). Nothing changed.
    CorruptData,
    /// Code running in the append's transaction (an inline projection) refused the events, so
    /// nothing was stored.
    Rejected,
}

/// An error from an event or snapshot store.
///
/// [`StoreError::kind`] says what it means: whether anything was stored and whether to retry.
/// Every variant but [`StoreError::OutcomeUnknown`] guarantees that nothing stored was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stream was not at the expected version; nothing was appended.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// An event id is already stored with different content (or in another stream). With
    /// deterministic ids (a command that carries its id) this means the command was already
    /// handled and decided other events then.
    #[error(
        "event id {event_id} is already stored at version {stored_version} of stream `{stored_stream}` with different content; refusing to append it to `{stream}`"
    )]
    EventIdReused {
        /// The reused id (the first one in the append's order).
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
        /// The first event id (in the append's order) that is already stored.
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
    /// A value the contract refuses (out of range, a NUL character, JSON nested too deep, a
    /// batch too large); see [`InvalidInput`]. Nothing was stored.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// An append in the caller's transaction was not the transaction's first write: an earlier
    /// write gives the transaction an id older than the events it follows, which would reorder
    /// the global log.
    #[error(
        "the append to stream `{stream}` must be the first write of its transaction: an earlier write gives the transaction an id older than the events it follows, which would reorder the global log"
    )]
    AppendNotFirstWrite {
        /// The stream appended to.
        stream: StreamId,
    },
    /// An append in the caller's transaction (PostgreSQL `append_in`) whose snapshot is older
    /// than the stream (`REPEATABLE READ` or `SERIALIZABLE`, with the stream changed after the
    /// transaction's snapshot was taken): it cannot append to the stream even though the
    /// expectation holds. Nothing was stored. Retry in a new transaction.
    #[error(
        "the append to stream `{stream}` ran in a transaction whose snapshot is older than the stream (now {}): it cannot append to it although {expected} holds; retry in a new transaction",
        match .actual { Some(v) => format!("at version {v}"), None => "gone".to_owned() }
    )]
    StaleSnapshot {
        /// The stream appended to.
        stream: StreamId,
        /// What the writer expected.
        expected: crate::ExpectedVersion,
        /// The stream's version outside the transaction.
        actual: Option<u64>,
    },
    /// An append in the caller's transaction on a store that updates inline projections, which
    /// run in the store's own append transaction.
    #[error(
        "the append to stream `{stream}` cannot run in the caller's transaction: this store updates inline projections ({}) in its own; use `append`, or a store without inline projections",
        .projections.join(", ")
    )]
    InlineProjectionsNeedOwnTransaction {
        /// The stream appended to.
        stream: StreamId,
        /// The inline projections' names.
        projections: Vec<String>,
    },
    /// A projection updated in the append's transaction (an inline projection) failed, or
    /// cannot be updated now, so the append was rolled back: nothing was stored.
    #[error(
        "inline projection `{projection}` refused the append to stream `{stream}`, so nothing was appended: {source}"
    )]
    InlineProjection {
        /// The projection.
        projection: String,
        /// The stream appended to.
        stream: StreamId,
        /// The handler's error, or why the projection cannot be updated.
        #[source]
        source: HandlerError,
    },
    /// Stored data cannot be read; see [`CorruptData`].
    #[error(transparent)]
    Corrupt(#[from] CorruptData),
    /// An upcaster failed to convert a stored event (its payload does not have the shape that
    /// version should have), or produced a type it did not declare.
    #[error(
        "cannot upcast event `{event_type}` (schema v{schema_version}) at version {version} of stream `{stream}`: {source}"
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
        #[source]
        source: UpcastFailure,
    },
    /// The backend failed, and nothing was stored (for a read: nothing was read). Usually
    /// transient (a restart, a timeout, a pool exhausted): safe to retry. It also covers
    /// failures that need an operator (a permission the database refuses); the source says
    /// which.
    #[error("event store unavailable{}: {source} (nothing was changed)", OnStream(.stream.as_ref()))]
    Unavailable {
        /// The stream the operation was for, if any.
        stream: Option<StreamId>,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// The backend failed while an append was being committed, and the store could not find
    /// out whether it was: the events may or may not be stored. Appending the same events
    /// again (the same event ids) is safe and tells: it returns the original outcome if they
    /// were stored.
    #[error(
        "the append to stream `{stream}` may or may not be stored (the connection failed around its commit); append the same events again to find out: {source}"
    )]
    OutcomeUnknown {
        /// The stream appended to.
        stream: StreamId,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
}

struct OnStream<'a>(Option<&'a StreamId>);

impl std::fmt::Display for OnStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(stream) => write!(f, " (stream `{stream}`)"),
            None => Ok(()),
        }
    }
}

impl StoreError {
    /// A backend failure before anything was stored.
    pub fn unavailable(stream: Option<&StreamId>, source: impl Into<BackendError>) -> Self {
        Self::Unavailable {
            stream: stream.cloned(),
            source: source.into(),
        }
    }

    /// What the error means for the caller.
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            Self::Conflict(_) | Self::StaleSnapshot { .. } => StoreErrorKind::Conflict,
            Self::EventIdReused { .. }
            | Self::PartialDuplicate { .. }
            | Self::DuplicateIdInBatch { .. }
            | Self::InvalidInput(_)
            | Self::AppendNotFirstWrite { .. }
            | Self::InlineProjectionsNeedOwnTransaction { .. } => StoreErrorKind::InvalidInput,
            Self::InlineProjection { .. } => StoreErrorKind::Rejected,
            Self::Corrupt(_) | Self::Upcast { .. } => StoreErrorKind::CorruptData,
            Self::Unavailable { .. } => StoreErrorKind::Unavailable,
            Self::OutcomeUnknown { .. } => StoreErrorKind::OutcomeUnknown,
        }
    }

    /// Whether the same request may succeed later unchanged: the backend was unavailable, or
    /// an append's outcome is unknown (resend the same events). A [`Conflict`] is not transient:
    /// the expectation must change.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind(),
            StoreErrorKind::Unavailable | StoreErrorKind::OutcomeUnknown
        )
    }

    /// The conflict, if this error is one.
    pub fn as_conflict(&self) -> Option<&Conflict> {
        match self {
            Self::Conflict(c) => Some(c),
            _ => None,
        }
    }
}

/// Stored data that cannot be read: a row edited by hand, a gap in a stream's versions, a value
/// of the wrong type. It names where it is; nothing stored is changed by reporting it.
#[derive(Debug, thiserror::Error)]
#[error(
    "corrupt stored data at version {version} of stream `{stream}`{}: {problem}",
    OfType(.event_type.as_deref())
)]
pub struct CorruptData {
    /// The stream (shown escaped if the stored id itself is invalid).
    pub stream: StreamId,
    /// The stream version of the event (0 if it is unknown, or for a snapshot).
    pub version: u64,
    /// The stored event type, when known.
    pub event_type: Option<String>,
    /// What is wrong.
    pub problem: String,
    /// The error that found it (a driver's decoding error), if any.
    #[source]
    pub source: Option<BackendError>,
}

struct OfType<'a>(Option<&'a str>);

impl std::fmt::Display for OfType<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(event_type) => write!(f, " (event `{event_type}`)"),
            None => Ok(()),
        }
    }
}

impl CorruptData {
    /// Corrupt data at `version` of `stream`, described by `problem`.
    pub fn new(stream: StreamId, version: u64, problem: impl Into<String>) -> Self {
        Self {
            stream,
            version,
            event_type: None,
            problem: problem.into(),
            source: None,
        }
    }

    /// Names the event type.
    #[must_use]
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// Keeps the error that found the problem.
    #[must_use]
    pub fn source(mut self, source: impl Into<BackendError>) -> Self {
        self.source = Some(source.into());
        self
    }
}
