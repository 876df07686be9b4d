//! The [`CheckpointStore`] contract: where a projection keeps its position, and the transaction
//! its handlers write through.

use std::{future::Future, time::Duration};

use crate::Position;

use super::{CheckpointError, NewDeadLetter, ProjectionKey};

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
    pub position: Position,
    /// The projection version that wrote it.
    pub version: u32,
    /// While a rebuild (or the replay after a version change) is unfinished, the log position
    /// it replays up to: events below it are handled as replays. Stored with the checkpoint, so
    /// a replay interrupted by a crash or a failover goes on as a replay.
    pub replay_until: Option<Position>,
}

/// One atomic change a runner asks of the checkpoint store, committed together with the
/// handler's transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointCommit {
    /// The projection partition.
    pub key: ProjectionKey,
    /// Move the checkpoint: only if it is still at `from` (`None`: no checkpoint stored yet), to
    /// `to`. A checkpoint elsewhere fails the commit with [`CheckpointError::Moved`] and nothing
    /// of the transaction is kept.
    pub advance: Option<(Option<Checkpoint>, Checkpoint)>,
    /// Park this event as a dead letter.
    pub park: Option<NewDeadLetter>,
    /// Delete this dead letter (it was retried successfully). If it is gone, the commit fails
    /// with [`CheckpointError::DeadLetterGone`] and nothing of the transaction is kept.
    pub resolve: Option<u64>,
    /// Delete the partition's dead letters above this global position: a reset before a replay
    /// that will handle those events again.
    pub clear_dead_letters_after: Option<Position>,
    /// The committing runner's fencing token ([`LeaseStore::fence`](super::LeaseStore::fence)):
    /// if the partition's lease has changed hands since, the commit fails with
    /// [`CheckpointError::Fenced`] and nothing of the transaction is kept.
    pub fence: Option<u64>,
    /// Split the projection anew into this many partitions, atomically with the rest: the
    /// stored count ([`CheckpointStore::partition_count`]) becomes it, every partition of the
    /// new count gets `advance`'s target as its checkpoint (only `key`'s is compared with
    /// `advance`'s `from`), checkpoints of partitions past the count are deleted, and the
    /// projection's dead letters of every partition above `clear_dead_letters_after` are
    /// deleted. A rebuild's reset.
    pub repartition: Option<u16>,
}

impl CheckpointCommit {
    /// A commit that moves `key`'s checkpoint from `from` to `to`.
    pub fn advance(key: &ProjectionKey, from: Option<Checkpoint>, to: Checkpoint) -> Self {
        Self {
            advance: Some((from, to)),
            ..Self::nothing(key)
        }
    }

    /// A commit that changes nothing of the checkpoint (only the handler's writes and the
    /// fields set afterwards).
    pub fn nothing(key: &ProjectionKey) -> Self {
        Self {
            key: key.clone(),
            advance: None,
            park: None,
            resolve: None,
            clear_dead_letters_after: None,
            fence: None,
            repartition: None,
        }
    }

    /// The commit, fenced with `token` ([`CheckpointCommit::fence`]).
    #[must_use]
    pub fn fenced(mut self, token: Option<u64>) -> Self {
        self.fence = token;
        self
    }
}

/// Where projections keep their checkpoints, and the transactions their handlers write
/// through. Leases ([`LeaseStore`](super::LeaseStore)) and dead letters
/// ([`DeadLetterStore`](super::DeadLetterStore)) are their own capabilities; a
/// [`ProjectionRunner`](super::ProjectionRunner) needs all three
/// ([`ProjectionStore`](super::ProjectionStore)).
///
/// Guarantees every implementation gives (checked by the projection suite in
/// [`testing`](crate::testing)): `commit` applies the handler's writes made through the
/// transaction, the checkpoint move (a compare-and-set), the parked dead letter and the
/// resolved one atomically, as far as its [`Delivery`] says.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an esframe checkpoint store",
    label = "not a `CheckpointStore`",
    note = "use `esframe_memory::MemoryCheckpoints`, `store.checkpoints()` of `esframe_postgres::PgEventStore`, or `AtLeastOnce(..)` around one of them"
)]
pub trait CheckpointStore: Clone + Send + Sync + 'static {
    /// The transaction handlers write through.
    type Tx: Send + 'static;

    /// What `commit` guarantees about the handler's writes.
    fn delivery(&self) -> Delivery;

    /// The partition's checkpoint, `None` if it never committed one.
    fn load(
        &self,
        key: &ProjectionKey,
    ) -> impl Future<Output = Result<Option<Checkpoint>, CheckpointError>> + Send;

    /// How many partitions projection `name` is split into. If none is stored yet, stores
    /// `proposed` when the projection has no checkpoint (a new projection), and 1 when it has
    /// (a projection that ran before partitions were recorded ran unsplit); either way,
    /// atomically, so that concurrent callers all get the same answer.
    fn partition_count(
        &self,
        name: &str,
        proposed: u16,
    ) -> impl Future<Output = Result<u16, CheckpointError>> + Send;

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

    /// Resolves when a checkpoint may have moved: at once after a commit in this process,
    /// otherwise after a short poll interval. The future must notice commits made after this
    /// call even before it is first polled (take the subscription in the call, not the
    /// `async` body). The default polls every 5 ms.
    fn changed(&self) -> impl Future<Output = ()> + Send + 'static {
        tokio::time::sleep(Duration::from_millis(5))
    }
}
