//! Errors of projections and checkpoint stores.

use std::time::Duration;

use crate::{StoreError, StreamId};

/// An error from a [`CheckpointStore`](super::CheckpointStore).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The checkpoint was not where the commit expected it: another runner moved it. Nothing of
    /// the transaction was kept.
    #[error(
        "checkpoint of projection `{projection}` moved: expected {expected}, found {found}; another runner is active"
    )]
    Moved {
        /// The projection.
        projection: String,
        /// Where the commit expected it.
        expected: String,
        /// Where it was.
        found: String,
    },
    /// The dead letter being resolved was retried or discarded by someone else meanwhile;
    /// nothing of the transaction was kept.
    #[error("dead letter {id} of projection `{projection}` was retried or discarded meanwhile")]
    DeadLetterGone {
        /// The projection.
        projection: String,
        /// The dead letter.
        id: u64,
    },
    /// The database refused to commit the transaction (a constraint, a serialization failure,
    /// or a transaction a handler left aborted): nothing of it was kept. The runner treats it
    /// as a failure of the events in it.
    #[error("checkpoint store refused the commit: {0}")]
    Rejected(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The backend failed (connection lost, I/O error, ...).
    #[error("checkpoint store backend error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl CheckpointError {
    /// Wraps a backend error.
    pub fn backend(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Backend(Box::new(err))
    }
}

/// An error from a [`ProjectionRunner`](super::ProjectionRunner) or
/// [`wait_for_projections`](super::wait_for_projections).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// Reading events failed.
    #[error("projection `{projection}`: reading the event log failed: {source}")]
    Store {
        /// The projection.
        projection: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The checkpoint store failed.
    #[error("projection `{projection}`: checkpoint store failed: {source}")]
    Checkpoint {
        /// The projection.
        projection: String,
        /// The checkpoint store's error.
        #[source]
        source: CheckpointError,
    },
    /// The handler failed on an event after every retry, and the runner is configured to stop
    /// ([`OnFailure::Stop`](super::OnFailure::Stop)). The checkpoint is just before the event.
    #[error(
        "projection `{projection}` failed on event `{event_type}` at version {stream_version} of stream `{stream}` (global position {global_position}) after {attempts} attempts: {message}"
    )]
    Handler {
        /// The projection.
        projection: String,
        /// The event's stream.
        stream: StreamId,
        /// The event's version.
        stream_version: u64,
        /// The event's type.
        event_type: String,
        /// The event's global position.
        global_position: u64,
        /// How many times it was tried.
        attempts: u32,
        /// The last error's message.
        message: String,
    },
    /// Resetting the read model for a rebuild failed.
    #[error("projection `{projection}` cannot be reset for a rebuild: {message}")]
    Reset {
        /// The projection.
        projection: String,
        /// The handler's error message.
        message: String,
    },
    /// The checkpoint was written by a newer version of the projection than this code's.
    #[error(
        "projection `{projection}` is at version {stored} in the checkpoint store, newer than this code's version {code}; refusing to roll it back"
    )]
    VersionTooNew {
        /// The projection.
        projection: String,
        /// The stored version.
        stored: u32,
        /// This code's version.
        code: u32,
    },
    /// Another runner holds the projection's lease, so it cannot be rebuilt now.
    #[error("projection `{projection}` is being run by another runner; stop it first")]
    Busy {
        /// The projection.
        projection: String,
    },
    /// The projection's name is empty or too long.
    #[error("invalid projection name {name:?}: it must have 1 to 200 characters")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// No dead letter has this id.
    #[error("no dead letter with id {id}")]
    NoSuchDeadLetter {
        /// The id.
        id: u64,
    },
    /// The dead letter belongs to another projection.
    #[error("dead letter {id} belongs to projection `{owner}`, not `{projection}`")]
    WrongDeadLetter {
        /// The id.
        id: u64,
        /// The projection asked to retry it.
        projection: String,
        /// The projection it belongs to.
        owner: String,
    },
    /// Retrying a dead letter failed again; it stays parked.
    #[error("dead letter {id} of projection `{projection}` failed again: {message}")]
    RetryFailed {
        /// The dead letter.
        id: u64,
        /// The projection.
        projection: String,
        /// The error's message.
        message: String,
    },
    /// [`wait_for_projections`](super::wait_for_projections) ran out of time.
    #[error(
        "projection `{projection}` did not reach global position {target} within {waited:?} (it is at {reached})"
    )]
    Timeout {
        /// The first projection that was behind.
        projection: String,
        /// The position waited for.
        target: u64,
        /// Where that projection was.
        reached: u64,
        /// How long it waited.
        waited: Duration,
    },
}
