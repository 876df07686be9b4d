//! The [`CheckpointStore`] contract: where projections keep their position, lease and dead
//! letters.

use std::{future::Future, time::Duration};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::StreamId;

use super::CheckpointError;

/// How a checkpoint store's commits relate to the handler's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Delivery {
    /// Handler writes and the checkpoint commit in one transaction: every event takes effect
    /// exactly once, whatever crashes.
    ExactlyOnce,
    /// The checkpoint is saved after the handler's writes: a crash in between replays them, so
    /// handlers must be idempotent.
    AtLeastOnce,
}

/// A projection's stored position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Checkpoint {
    /// Every event at or below this global position has been handled (or skipped or parked).
    pub position: u64,
    /// The projection version that wrote it.
    pub version: u32,
    /// While a rebuild (or the replay after a version change) is unfinished, the log position
    /// it replays up to: events below it are handled as replays. Stored with the checkpoint, so
    /// a replay interrupted by a crash or a failover goes on as a replay.
    pub replay_until: Option<u64>,
}

/// One atomic change a runner asks of the checkpoint store, committed together with the
/// handler's transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointCommit {
    /// The projection.
    pub projection: String,
    /// Move the checkpoint: only if it is still at `from` (`None`: no checkpoint stored yet), to
    /// `to`. A checkpoint elsewhere fails the commit with [`CheckpointError::Moved`] and nothing
    /// of the transaction is kept.
    pub advance: Option<(Option<Checkpoint>, Checkpoint)>,
    /// Park this event as a dead letter.
    pub park: Option<NewDeadLetter>,
    /// Delete this dead letter (it was retried successfully).
    pub resolve: Option<u64>,
    /// Delete the projection's dead letters above this global position: a reset before a
    /// replay that will handle those events again.
    pub clear_dead_letters_after: Option<u64>,
}

impl CheckpointCommit {
    /// A commit that moves `projection`'s checkpoint from `from` to `to`.
    pub fn advance(projection: &str, from: Option<Checkpoint>, to: Checkpoint) -> Self {
        Self {
            projection: projection.to_owned(),
            advance: Some((from, to)),
            park: None,
            resolve: None,
            clear_dead_letters_after: None,
        }
    }
}

/// An event a projection failed to handle, to be parked.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeadLetter {
    /// Global position of the stored event (all parts of a split event share it).
    pub global_position: u64,
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

/// A parked event; see [`ProjectionRunner::retry_dead_letter`](super::ProjectionRunner::retry_dead_letter).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Id to retry or discard it by.
    pub id: u64,
    /// The projection that failed on it.
    pub projection: String,
    /// The event and the failure.
    pub event: NewDeadLetter,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

/// Where projections keep checkpoints, leases and dead letters, and the transactions their
/// handlers write through.
///
/// Guarantees every implementation gives:
/// - `commit` applies the handler's writes made through the transaction, the checkpoint move
///   (a compare-and-set), the parked dead letter and the resolved one atomically, as far as its
///   [`Delivery`] says.
/// - At most one live lease per projection name across every process sharing the store; a lease
///   whose holder dies is given up (the holder's connection closes) so another can take it.
pub trait CheckpointStore: Clone + Send + Sync + 'static {
    /// The transaction handlers write through.
    type Tx: Send + 'static;
    /// Proof of being the projection's active runner; dropping it gives the lease up.
    type Lease: Send + Sync + 'static;

    /// What `commit` guarantees about the handler's writes.
    fn delivery(&self) -> Delivery;

    /// Takes the projection's lease if no one holds it.
    fn try_lease(
        &self,
        projection: &str,
    ) -> impl Future<Output = Result<Option<Self::Lease>, CheckpointError>> + Send;

    /// Takes the projection's lease, waiting up to `wait` for its holder (and, where a store
    /// has them, appends updating the projection inline) to let go; `None` if it could not.
    /// The default tries every 10 ms.
    fn wait_lease(
        &self,
        projection: &str,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<Self::Lease>, CheckpointError>> + Send {
        async move {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                if let Some(lease) = self.try_lease(projection).await? {
                    return Ok(Some(lease));
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok(None);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Whether `lease` is still held. Cheap: reads state kept by the lease's keep-alive.
    fn lease_held(&self, lease: &Self::Lease) -> bool;

    /// Gives the lease up at once.
    fn release(&self, lease: Self::Lease) -> impl Future<Output = ()> + Send;

    /// The projection's checkpoint, `None` if it never committed one.
    fn load(
        &self,
        projection: &str,
    ) -> impl Future<Output = Result<Option<Checkpoint>, CheckpointError>> + Send;

    /// Starts a transaction for handlers to write through.
    fn begin(&self) -> impl Future<Output = Result<Self::Tx, CheckpointError>> + Send;

    /// Commits `tx` together with `commit`; see [`CheckpointCommit`].
    fn commit(
        &self,
        tx: Self::Tx,
        commit: CheckpointCommit,
    ) -> impl Future<Output = Result<(), CheckpointError>> + Send;

    /// Abandons `tx` and everything written through it.
    fn rollback(&self, tx: Self::Tx) -> impl Future<Output = ()> + Send;

    /// The projection's parked events, oldest first.
    fn dead_letters(
        &self,
        projection: &str,
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

    /// Resolves when a checkpoint may have moved: at once after a commit in this process,
    /// otherwise after a short poll interval. The future must notice commits made after this
    /// call even before it is first polled (take the subscription in the call, not the
    /// `async` body). The default polls every 5 ms.
    fn changed(&self) -> impl Future<Output = ()> + Send + 'static {
        tokio::time::sleep(Duration::from_millis(5))
    }
}
