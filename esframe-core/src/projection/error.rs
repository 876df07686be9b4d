//! Errors of projections and checkpoint stores.

use std::time::Duration;

use crate::{BackendError, Position, StoreError, StreamId};

use super::{InvalidProjectionKey, ProjectionKey};

/// An error from a checkpoint, lease or dead-letter store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The checkpoint was not where the commit expected it: another runner moved it. Nothing of
    /// the transaction was kept.
    #[error(
        "checkpoint of projection `{key}` moved: expected {expected}, found {found}; another runner is active"
    )]
    Moved {
        /// The projection partition.
        key: ProjectionKey,
        /// Where the commit expected it.
        expected: String,
        /// Where it was.
        found: String,
    },
    /// The commit's fencing token is not the partition's lease's any more: another runner took
    /// the lease. Nothing of the transaction was kept.
    #[error(
        "commit to projection `{key}` refused by the lease's fence: this runner's token is {token}, the lease is now {current}; another runner took it over"
    )]
    Fenced {
        /// The projection partition.
        key: ProjectionKey,
        /// The committing runner's token.
        token: u64,
        /// The lease's token now (or "free" when no one holds it).
        current: String,
    },
    /// The dead letter being resolved was retried or discarded by someone else meanwhile;
    /// nothing of the transaction was kept.
    #[error("dead letter {id} of projection `{key}` was retried or discarded meanwhile")]
    DeadLetterGone {
        /// The projection partition.
        key: ProjectionKey,
        /// The dead letter.
        id: u64,
    },
    /// The database refused to commit the transaction (a constraint, a serialization failure,
    /// or a transaction a handler left aborted): nothing of it was kept. The runner treats it
    /// as a failure of the events in it.
    #[error("checkpoint store refused the commit: {0}")]
    Rejected(#[source] BackendError),
    /// The backend failed (connection lost, I/O error, ...); nothing was changed. Transient:
    /// the runner retries from its checkpoint.
    #[error("checkpoint store unavailable: {0}")]
    Unavailable(#[source] BackendError),
}

impl CheckpointError {
    /// A backend failure (nothing was changed).
    pub fn unavailable(err: impl Into<BackendError>) -> Self {
        Self::Unavailable(err.into())
    }

    /// Whether the same request may succeed later: the backend was unavailable.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
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
        /// The projection partition.
        projection: ProjectionKey,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The checkpoint store failed.
    #[error("projection `{projection}`: checkpoint store failed: {source}")]
    Checkpoint {
        /// The projection partition.
        projection: ProjectionKey,
        /// The checkpoint store's error.
        #[source]
        source: CheckpointError,
    },
    /// The handler failed on an event after every retry, and the runner is configured to stop
    /// ([`OnFailure::Stop`](super::OnFailure::Stop)). The checkpoint is just before the event.
    #[error(
        "projection `{projection}` failed on event `{event_type}` at version {stream_version} of stream `{stream}` (global position {global_position}) after {attempts} attempts: {source}"
    )]
    Handler {
        /// The projection partition.
        projection: ProjectionKey,
        /// The event's stream.
        stream: StreamId,
        /// The event's version.
        stream_version: u64,
        /// The event's type.
        event_type: String,
        /// The event's global position.
        global_position: Position,
        /// How many times it was tried.
        attempts: u32,
        /// The last error.
        #[source]
        source: super::HandlerError,
    },
    /// Resetting the read model for a rebuild failed.
    #[error("projection `{projection}` cannot be reset for a rebuild: {source}")]
    Reset {
        /// The projection partition.
        projection: ProjectionKey,
        /// The handler's error.
        #[source]
        source: super::HandlerError,
    },
    /// The checkpoint was written by a newer version of the projection than this code's.
    #[error(
        "projection `{projection}` is at version {stored} in the checkpoint store, newer than this code's version {code}; refusing to roll it back"
    )]
    VersionTooNew {
        /// The projection partition.
        projection: ProjectionKey,
        /// The stored version.
        stored: u32,
        /// This code's version.
        code: u32,
    },
    /// Another runner holds the projection's lease, so it cannot be rebuilt now.
    #[error("projection `{projection}` is being run by another runner; stop it first")]
    Busy {
        /// The projection partition.
        projection: ProjectionKey,
    },
    /// The projection is stored split into a different number of partitions than the runner
    /// asks for. Changing the count is a rebuild: run [`ProjectionRunner::rebuild`] with the
    /// new count (with every runner of the projection stopped), or let the runner do it with
    /// [`ProjectionRunner::repartition`].
    ///
    /// [`ProjectionRunner::rebuild`]: super::ProjectionRunner::rebuild
    /// [`ProjectionRunner::repartition`]: super::ProjectionRunner::repartition
    #[error(
        "projection `{projection}` is stored in {stored} partition(s), but this runner asks for {requested}; changing the number of partitions is a rebuild: stop the projection's runners and call `rebuild`, or start them with `repartition(true)`"
    )]
    PartitionCountChanged {
        /// The projection's name.
        projection: String,
        /// The stored count.
        stored: u16,
        /// The runner's count.
        requested: u16,
    },
    /// The projection's name cannot be kept by any checkpoint store.
    #[error(transparent)]
    InvalidKey(#[from] InvalidProjectionKey),
    /// The runner's number of partitions is out of range
    /// ([`ProjectionRunner::partitions`](super::ProjectionRunner::partitions)).
    #[error("invalid number of partitions: {0}")]
    InvalidPartitions(#[from] crate::InvalidPartition),
    /// A partition's checkpoint is of an older projection version than this code's while the
    /// projection runs: another runner wrote it with older code. A partitioned projection's
    /// version change rebuilds every partition at once, when a runner starts.
    #[error(
        "partition `{projection}` is at projection version {stored}, older than this code's {code}, while running; restart the runner to rebuild every partition at the new version"
    )]
    PartitionVersionBehind {
        /// The partition.
        projection: ProjectionKey,
        /// The stored version.
        stored: u32,
        /// This code's version.
        code: u32,
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
        /// The projection partition asked to retry it.
        projection: ProjectionKey,
        /// The projection partition it belongs to.
        owner: ProjectionKey,
    },
    /// Retrying a dead letter failed again; it stays parked.
    #[error("dead letter {id} of projection `{projection}` failed again: {source}")]
    RetryFailed {
        /// The dead letter.
        id: u64,
        /// The projection partition.
        projection: ProjectionKey,
        /// The handler's error.
        #[source]
        source: super::HandlerError,
    },
    /// [`wait_for_projections`](super::wait_for_projections) ran out of time.
    #[error(
        "projection `{projection}` did not reach global position {target} within {waited:?} (it is at {reached})"
    )]
    Timeout {
        /// The first projection that was behind.
        projection: ProjectionKey,
        /// The position waited for.
        target: Position,
        /// Where that projection was.
        reached: Position,
        /// How long it waited.
        waited: Duration,
    },
}

impl ProjectionError {
    /// Whether the error is a backend failure worth retrying (a lost connection, a database
    /// restart), as opposed to stored data the runner cannot get past or a decision to stop.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Store { source, .. } => source.is_transient(),
            Self::Checkpoint { source, .. } => source.is_transient(),
            _ => false,
        }
    }
}

impl super::balance::SessionError for ProjectionError {
    fn is_transient(&self) -> bool {
        ProjectionError::is_transient(self)
    }
}
