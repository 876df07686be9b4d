//! The [`ProcessStore`] contract: where instances and timers are kept, and the atomic write of a
//! batch's effects.

use std::future::Future;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    GlobalLog, Position, RecordedEvent, StoreError,
    projection::{CheckpointError, CheckpointStore, ProjectionStore},
};

use super::{InstanceRecord, InstanceStatus, ProcessWrite, TimerRecord};

/// The transaction of a process store's checkpoints.
pub type ProcessTx<S> = <<S as ProcessStore>::Checkpoints as CheckpointStore>::Tx;

/// A failure of a process store operation.
#[derive(Debug, thiserror::Error)]
pub enum ProcessStoreError {
    /// Something the write expected was changed by another writer (an instance written since
    /// it was read, a timer taken by another runner): nothing was written; read again.
    #[error("{what} was changed by another runner")]
    Moved {
        /// What moved.
        what: String,
    },
    /// The event store failed (a conflict on a stream: nothing was written).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store refused what was written, and will refuse it again (a value it cannot hold,
    /// say): nothing was written. The runner finds the instance whose writes it refuses and
    /// quarantines it.
    #[error("the store refused the write: {message}")]
    Refused {
        /// The store's reason.
        message: String,
    },
    /// The checkpoint store failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

impl ProcessStoreError {
    /// Whether the same operation may succeed if tried again (a conflict, a moved instance or
    /// timer, a store that is unavailable for now).
    pub fn is_transient(&self) -> bool {
        use crate::StoreErrorKind::{Conflict, OutcomeUnknown, Unavailable};
        match self {
            Self::Moved { .. } => true,
            Self::Refused { .. } => false,
            Self::Store(e) => matches!(e.kind(), Conflict | Unavailable | OutcomeUnknown),
            Self::Checkpoint(e) => e.is_transient() || matches!(e, CheckpointError::Moved { .. }),
        }
    }
}

/// Where a [`ProcessRunner`](super::ProcessRunner) keeps instances and timers, reads the log,
/// and stores a batch's effects.
///
/// Guarantees every implementation gives: [`write`](Self::write) stores all of a
/// [`ProcessWrite`] or none of it, and with the checkpoint commit of the same transaction as
/// far as the checkpoints' [`Delivery`](crate::projection::Delivery) says (PostgreSQL: one
/// transaction, exactly once; memory: at least once, with deterministic event ids and each
/// instance's last handled position making a repeat a no-op).
pub trait ProcessStore: Clone + Send + Sync + 'static {
    /// The event log the runner follows and appends to.
    type Log: GlobalLog;
    /// Checkpoints, leases and dead letters.
    type Checkpoints: ProjectionStore;

    /// The event log.
    fn log(&self) -> &Self::Log;

    /// The checkpoint store.
    fn checkpoints(&self) -> &Self::Checkpoints;

    /// The stored instances among `ids` of process `process`, read in `tx`.
    fn load_instances(
        &self,
        tx: &mut ProcessTx<Self>,
        process: &str,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<InstanceRecord>, ProcessStoreError>> + Send;

    /// Stores `write` in `tx`: the appends first (all streams in one statement, each expecting
    /// its version), then instances, timers and fired timers, each checked as
    /// [`ProcessWrite`] says. A conflict or a moved record fails the whole write.
    fn write(
        &self,
        tx: &mut ProcessTx<Self>,
        write: ProcessWrite,
    ) -> impl Future<Output = Result<(), ProcessStoreError>> + Send;

    /// Called after a transaction holding a write committed (wake-ups).
    fn committed(&self) {}

    /// One instance, outside any transaction.
    fn instance(
        &self,
        process: &str,
        id: &str,
    ) -> impl Future<Output = Result<Option<InstanceRecord>, ProcessStoreError>> + Send;

    /// The instances with `status`, in id order, at most `limit`.
    fn instances(
        &self,
        process: &str,
        status: InstanceStatus,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<InstanceRecord>, ProcessStoreError>> + Send;

    /// Timers of active instances due at `now`, earliest first, at most `limit`.
    fn due_timers(
        &self,
        process: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<TimerRecord>, ProcessStoreError>> + Send;

    /// When the next timer of an active instance is due.
    fn next_due(
        &self,
        process: &str,
    ) -> impl Future<Output = Result<Option<DateTime<Utc>>, ProcessStoreError>> + Send;

    /// The timers of one instance.
    fn timers(
        &self,
        process: &str,
        instance: &str,
    ) -> impl Future<Output = Result<Vec<TimerRecord>, ProcessStoreError>> + Send;

    /// The global position of the last committed event carrying `correlation_id`, readable
    /// yet or not (PostgreSQL: regardless of the log's horizon).
    fn flow_head(
        &self,
        correlation_id: Uuid,
    ) -> impl Future<Output = Result<Option<Position>, StoreError>> + Send;

    /// Every readable event carrying `correlation_id`, in log order (not upcast).
    fn trace(
        &self,
        correlation_id: Uuid,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send;
}
