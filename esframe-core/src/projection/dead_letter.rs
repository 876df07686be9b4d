//! Dead letters: events a projection failed on, parked so that it could go on.

use std::future::Future;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Position, StreamId};

use super::{CheckpointError, ProjectionKey};

/// An event a projection failed to handle, to be parked.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeadLetter {
    /// Global position of the stored event (all parts of a split event share it).
    pub global_position: Position,
    /// The event id.
    pub event_id: Uuid,
    /// Its stream.
    pub stream_id: StreamId,
    /// Its version in the stream.
    pub stream_version: u64,
    /// Its type.
    pub event_type: String,
    /// The last error's message.
    pub error: String,
    /// How many times it was tried.
    pub attempts: u32,
}

/// A parked event; see
/// [`ProjectionRunner::retry_dead_letter`](super::ProjectionRunner::retry_dead_letter).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Id to retry or discard it by.
    pub id: u64,
    /// The projection partition that failed on it.
    pub key: ProjectionKey,
    /// The event and the failure.
    pub event: NewDeadLetter,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

/// Where parked events are listed, inspected and discarded. They are parked and resolved by
/// [`CheckpointCommit`](super::CheckpointCommit)s, atomically with the checkpoint.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not keep projection dead letters",
    label = "not a `DeadLetterStore`",
    note = "use `esframe_memory::MemoryCheckpoints` or `store.checkpoints()` of `esframe_postgres::PgEventStore`"
)]
pub trait DeadLetterStore: Clone + Send + Sync + 'static {
    /// The partition's parked events, oldest first.
    fn dead_letters(
        &self,
        key: &ProjectionKey,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, CheckpointError>> + Send;

    /// One parked event.
    fn dead_letter(
        &self,
        id: u64,
    ) -> impl Future<Output = Result<Option<DeadLetter>, CheckpointError>> + Send;

    /// Deletes a parked event without handling it; `false` if there was none with this id.
    fn discard_dead_letter(
        &self,
        id: u64,
    ) -> impl Future<Output = Result<bool, CheckpointError>> + Send;

    /// Records that retrying a parked event failed again.
    fn note_retry_failure(
        &self,
        id: u64,
        error: &str,
    ) -> impl Future<Output = Result<(), CheckpointError>> + Send;
}
