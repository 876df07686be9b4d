//! [`ProjectionStatus`]: where every partition of a projection is, who runs it, how far behind
//! it is.

use std::time::Duration;

use chrono::Utc;

use crate::{GlobalLog, LogPartition, Position, StoreError};

use super::{
    super::{
        CheckpointError, CheckpointStore, LeaseInfo, Projection, ProjectionError, ProjectionKey,
        ProjectionStore,
    },
    ProjectionRunner,
};

/// One partition of a projection, as [`ProjectionRunner::status`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionStatus {
    /// The partition.
    pub key: ProjectionKey,
    /// Who holds its lease (`None`: no runner does).
    pub holder: Option<String>,
    /// Time left on the lease before it expires unless renewed.
    pub lease_expires_in: Option<Duration>,
    /// Every event of the partition up to here is handled.
    pub position: Position,
    /// The projection version of the checkpoint (`None`: it never committed one).
    pub version: Option<u32>,
    /// Events of the partition stored after its checkpoint, if the store can count them.
    pub lag_events: Option<u64>,
    /// How long the oldest event it has not handled has been stored (`None`: it is caught up).
    pub lag: Option<Duration>,
    /// The last error its runners recorded (`None` once a session ends cleanly).
    pub last_error: Option<String>,
    /// How many of its events are parked.
    pub dead_letters: usize,
}

/// Every partition of a projection ([`ProjectionRunner::status`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionStatus {
    /// The partitions, by index.
    pub partitions: Vec<PartitionStatus>,
}

impl ProjectionStatus {
    /// The most events any partition is behind by (`None` if a count is unknown).
    pub fn lag_events(&self) -> Option<u64> {
        self.partitions
            .iter()
            .map(|p| p.lag_events)
            .try_fold(0, |max, lag| lag.map(|lag| max.max(lag)))
    }

    /// How many partitions no runner holds.
    pub fn unowned(&self) -> usize {
        self.partitions
            .iter()
            .filter(|p| p.holder.is_none())
            .count()
    }
}

/// Why a partition's status could not be read.
pub(crate) enum StatusError {
    Checkpoint(CheckpointError),
    Store(StoreError),
}

/// Partition `partition`'s status (`key`) from the stores, with `leases` as listed by
/// [`LeaseStore::leases`]; `dead_letters` is left at 0 for the caller to fill.
pub(crate) async fn partition_status<S: GlobalLog, C: CheckpointStore>(
    store: &S,
    checkpoints: &C,
    key: ProjectionKey,
    partition: LogPartition,
    leases: &[LeaseInfo],
) -> Result<PartitionStatus, StatusError> {
    let checkpoint = checkpoints
        .load(&key)
        .await
        .map_err(StatusError::Checkpoint)?;
    let position = checkpoint.map_or(Position::START, |c| c.position);
    let lag_events = store
        .count_partition_events_after(position, partition)
        .await
        .map_err(StatusError::Store)?;
    let next = store
        .read_partition_batch(position, 1, partition)
        .await
        .map_err(StatusError::Store)?;
    let lag = next
        .events
        .first()
        .map(|e| (Utc::now() - e.recorded_at).to_std().unwrap_or_default());
    let lease = leases.iter().find(|l| l.partition == key.partition());
    Ok(PartitionStatus {
        holder: lease.and_then(|l| l.holder.clone()),
        lease_expires_in: lease.and_then(|l| l.expires_in),
        position,
        version: checkpoint.map(|c| c.version),
        lag_events,
        lag,
        last_error: lease.and_then(|l| l.last_error.clone()),
        dead_letters: 0,
        key,
    })
}

impl<S, C, P> ProjectionRunner<S, C, P>
where
    S: GlobalLog,
    C: ProjectionStore,
    P: Projection<C::Tx>,
{
    /// The status of every partition of the projection (one for an unsplit projection): its
    /// holder, checkpoint, lag in events and in time, last error and parked events. Reads
    /// the stores; takes no lease.
    pub async fn status(&self) -> Result<ProjectionStatus, ProjectionError> {
        let name = self.key()?.clone();
        let leases = self
            .checkpoints
            .leases(name.name())
            .await
            .map_err(|source| ProjectionError::Checkpoint {
                projection: name.clone(),
                source,
            })?;
        let mut partitions = Vec::new();
        for index in 0..self.partition_count()? {
            let worker = self.partition_worker(index, None)?;
            let key = worker.key.clone();
            let mut status = partition_status(
                &self.store,
                &self.checkpoints,
                key.clone(),
                worker.partition,
                &leases,
            )
            .await
            .map_err(|err| match err {
                StatusError::Checkpoint(source) => ProjectionError::Checkpoint {
                    projection: key.clone(),
                    source,
                },
                StatusError::Store(source) => ProjectionError::Store {
                    projection: key.clone(),
                    source,
                },
            })?;
            status.dead_letters = worker.dead_letters().await?.len();
            partitions.push(status);
        }
        Ok(ProjectionStatus { partitions })
    }
}
