//! [`CommandError`]: why a command did not produce events.

use std::sync::Arc;

use crate::{InvalidStreamId, StreamId};

use super::{Conflict, EventDecodeError, StoreError};

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
    /// The store failed; [`StoreError::kind`] says whether anything was stored.
    #[error(transparent)]
    Store(StoreError),
    /// In [`ConcurrencyMode::Pessimistic`](crate::ConcurrencyMode), this command was decided
    /// in a batch of the stream's queued commands whose common append failed. Every command of
    /// the batch gets the same error; if its kind is
    /// [`OutcomeUnknown`](crate::StoreErrorKind::OutcomeUnknown) the batch may be stored: read
    /// the stream (or resend with the same command ids, which is idempotent) before retrying.
    #[error(
        "the batched append to stream `{stream}` that held this command and {others} others failed: {source}"
    )]
    BatchFailed {
        /// The stream.
        stream: StreamId,
        /// How many other commands were in the batch.
        others: usize,
        /// The append's error, shared by the batch's commands.
        #[source]
        source: Arc<StoreError>,
    },
    /// In [`ConcurrencyMode::Pessimistic`](crate::ConcurrencyMode), the task running the
    /// stream's queued commands stopped (a handler panicked) before this command ran; nothing
    /// of it was stored. Later commands on the stream start a new task.
    #[error(
        "the task running queued commands for stream `{stream}` stopped before this command ran (did a handler panic?)"
    )]
    QueueStopped {
        /// The stream.
        stream: StreamId,
    },
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

    /// The store's error, if the store failed (alone or for a batch).
    pub fn as_store_error(&self) -> Option<&StoreError> {
        match self {
            Self::Store(err) => Some(err),
            Self::BatchFailed { source, .. } => Some(source),
            _ => None,
        }
    }
}
