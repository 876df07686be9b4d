//! A partitioned projection: N partitions spread over every runner of the projection, without a
//! leader.
//!
//! The membership, the fair share and the hand-overs are the
//! `Balancer`'s (`projection::balance`, shared with partitioned publishers). What is a
//! projection's own is here: each partition it holds runs as a session (`Worker::session`)
//! with its own lease, checkpoint and fence, reading only its partition of the log; the stored
//! partition count is checked, and a rebuild resets once and replays every partition in
//! parallel.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use futures_util::future::join_all;
use tokio::sync::watch;

use crate::{GlobalLog, LogPartition, Position};

use super::{
    super::{
        Checkpoint, CheckpointCommit, CheckpointError, LeaseStore, Projection, ProjectionContext,
        ProjectionError, ProjectionKey, ProjectionStore, RebuildProgress, RebuildReport,
        balance::{Balancer, Session},
    },
    ProgressCallback, ProjectionRunner, guarded,
    worker::Worker,
};

/// The progress of a rebuild of every partition at once, reported as one.
pub(in crate::projection) struct SharedReplay {
    name: String,
    started: Instant,
    done: AtomicU64,
    total: Option<u64>,
    positions: Mutex<Vec<Position>>,
    callback: Option<ProgressCallback>,
}

impl SharedReplay {
    /// Partition `partition` read `read` more events and reached `position`.
    pub(super) fn report(&self, partition: u16, read: u64, position: Position) {
        let done = self.done.fetch_add(read, Ordering::Relaxed) + read;
        let reached = {
            let mut positions = self
                .positions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(at) = positions.get_mut(usize::from(partition)) {
                *at = position;
            }
            positions.iter().copied().min().unwrap_or(position)
        };
        if let Some(callback) = &self.callback {
            callback(&RebuildProgress {
                projection: self.name.clone(),
                events_done: done,
                events_total: self.total.map(|t| t.max(done)),
                position: reached,
                elapsed: self.started.elapsed(),
            });
        }
    }
}

impl<S, C, P> ProjectionRunner<S, C, P>
where
    S: GlobalLog,
    C: ProjectionStore,
    P: Projection<C::Tx>,
{
    /// The worker for partition `index`.
    pub(super) fn partition_worker(
        &self,
        index: u16,
        shared: Option<Arc<SharedReplay>>,
    ) -> Result<Worker<'_, S, C, P>, ProjectionError> {
        let count = self.partition_count()?;
        let partition = LogPartition::new(index, count)?;
        Ok(Worker {
            runner: self,
            key: ProjectionKey::new(self.key()?.name(), index)?,
            partition,
            shared,
            permits: None,
        })
    }

    fn name_key(&self) -> Result<ProjectionKey, ProjectionError> {
        self.key().cloned()
    }

    /// The stored number of partitions; a new projection gets this runner's.
    pub(super) async fn stored_partition_count(&self) -> Result<u16, ProjectionError> {
        let name = self.name_key()?;
        self.checkpoints
            .partition_count(name.name(), self.partition_count()?)
            .await
            .map_err(|err| checkpoint_error(&name, err))
    }

    /// Fails with [`ProjectionError::PartitionCountChanged`] unless the stored number of
    /// partitions is this runner's.
    pub(super) async fn check_partition_count(&self) -> Result<(), ProjectionError> {
        let (stored, requested) = (
            self.stored_partition_count().await?,
            self.partition_count()?,
        );
        if stored != requested {
            return Err(ProjectionError::PartitionCountChanged {
                projection: self.name_key()?.name().to_owned(),
                stored,
                requested,
            });
        }
        Ok(())
    }

    /// Checks the stored partition count and the partitions' versions; rebuilds every
    /// partition when the count changed (with [`Self::repartition`]) or the projection's
    /// version is newer than theirs. `Ok(false)`: a rebuild is due but another runner holds a
    /// lease it needs; try again later.
    async fn prepare(&self) -> Result<bool, ProjectionError> {
        let name = self.name_key()?;
        let count = self.partition_count()?;
        let stored = self.stored_partition_count().await?;
        let mut rebuild = false;
        if stored != count {
            if !self.repartition {
                return Err(ProjectionError::PartitionCountChanged {
                    projection: name.name().to_owned(),
                    stored,
                    requested: count,
                });
            }
            tracing::info!(
                projection = name.name(),
                from = stored,
                to = count,
                "the number of partitions changed; rebuilding every partition"
            );
            rebuild = true;
        } else {
            let version = self.projection.version();
            for index in 0..count {
                let key = ProjectionKey::new(name.name(), index)?;
                let checkpoint = self
                    .checkpoints
                    .load(&key)
                    .await
                    .map_err(|err| checkpoint_error(&name, err))?;
                match checkpoint {
                    Some(c) if c.version > version => {
                        return Err(ProjectionError::VersionTooNew {
                            projection: key,
                            stored: c.version,
                            code: version,
                        });
                    }
                    Some(c) if c.version < version => {
                        tracing::info!(projection = %key, from = c.version, to = version, "projection version changed; rebuilding every partition");
                        rebuild = true;
                        break;
                    }
                    _ => {}
                }
            }
        }
        if !rebuild {
            return Ok(true);
        }
        match self.rebuild_partitions(Position::START).await {
            Ok(_) => Ok(true),
            Err(ProjectionError::Busy { .. }) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Runs this runner's share of the partitions until `stop`; see
    /// [`ProjectionRunner::run`].
    pub(super) async fn run_partitioned(
        &self,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), ProjectionError> {
        let name = self.name_key()?;
        let count = self.partition_count()?;
        let poll = self.standby_poll;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            match self.prepare().await {
                Ok(true) => break,
                Ok(false) => {
                    tracing::info!(
                        projection = name.name(),
                        "a rebuild of every partition is due, but another runner holds a partition; waiting for it to stop"
                    );
                }
                Err(err) if err.is_transient() => {
                    tracing::warn!(projection = name.name(), error = %err, "cannot prepare the partitioned projection; retrying");
                }
                Err(err) => return Err(err),
            }
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                _ = stop.wait_for(|stop| *stop) => return Ok(()),
            }
        }
        let keys = (0..count)
            .map(|index| ProjectionKey::new(name.name(), index))
            .collect::<Result<Vec<_>, _>>()?;
        let permits = self
            .concurrency
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        let balancer = Balancer {
            leases: &self.checkpoints,
            group: name.name(),
            partitions: &keys,
            member: self.member.as_ref(),
            interval: self.rebalance_interval,
        };
        balancer
            .run(
                stop,
                |index, lease| self.start_session(index, lease, permits.clone()),
                |err| checkpoint_error(&name, err),
            )
            .await
    }

    /// Starts partition `index`'s session on a task of its own, with its lease.
    fn start_session(
        &self,
        index: u16,
        lease: <C as LeaseStore>::Lease,
        permits: Option<Arc<tokio::sync::Semaphore>>,
    ) -> Session<ProjectionError> {
        let (stop, mut stopped) = watch::channel(false);
        let runner = self.clone();
        let task = tokio::spawn(async move {
            let mut worker = runner.partition_worker(index, None)?;
            worker.permits = permits;
            let end = worker.session(&lease, &mut stopped).await;
            runner.checkpoints.release(lease).await;
            if end.is_ok() {
                runner.checkpoints.note_error(&worker.key, None).await;
            }
            end.map(|_| ())
        });
        Session { stop, task }
    }

    /// Catches every partition up, in parallel; returns the lowest position reached.
    pub(super) async fn catch_up_partitions(&self) -> Result<Position, ProjectionError> {
        let count = self.partition_count()?;
        self.check_partition_count().await?;
        let workers = (0..count)
            .map(|index| self.partition_worker(index, None))
            .collect::<Result<Vec<_>, _>>()?;
        let reached = join_all(workers.iter().map(|worker| worker.catch_up())).await;
        let mut lowest: Option<Position> = None;
        for position in reached {
            let position = position?;
            lowest = Some(lowest.map_or(position, |l| l.min(position)));
        }
        Ok(lowest.unwrap_or(Position::START))
    }

    /// Resets the read model once and replays every partition after `from` in parallel, with
    /// one progress report; stores the runner's partition count. Needs every partition's lease
    /// (of the stored count and of the new one), so it is refused
    /// ([`ProjectionError::Busy`]) while another runner holds any of them.
    pub(super) async fn rebuild_partitions(
        &self,
        from: Position,
    ) -> Result<RebuildReport, ProjectionError> {
        let name = self.name_key()?;
        let count = self.partition_count()?;
        let stored = self.stored_partition_count().await?;
        let mut leases = Vec::new();
        for index in 0..count.max(stored) {
            let key = ProjectionKey::new(name.name(), index)?;
            match self.checkpoints.wait_lease(&key, self.lease_wait).await {
                Ok(Some(lease)) => leases.push(lease),
                Ok(None) => {
                    self.release_all(leases).await;
                    return Err(ProjectionError::Busy { projection: key });
                }
                Err(err) => {
                    self.release_all(leases).await;
                    return Err(checkpoint_error(&name, err));
                }
            }
        }
        let result = self.reset_and_replay(from, count, &leases).await;
        self.release_all(leases).await;
        result
    }

    async fn reset_and_replay(
        &self,
        from: Position,
        count: u16,
        leases: &[<C as LeaseStore>::Lease],
    ) -> Result<RebuildReport, ProjectionError> {
        let first = self.partition_worker(0, None)?;
        let key = first.key.clone();
        let started = Instant::now();
        let checkpoint_error = |source| ProjectionError::Checkpoint {
            projection: key.clone(),
            source,
        };
        let stored = self
            .checkpoints
            .load(&key)
            .await
            .map_err(checkpoint_error)?;
        let head = self
            .store
            .head_position()
            .await
            .map_err(|source| ProjectionError::Store {
                projection: key.clone(),
                source,
            })?;
        let mut tx = self.checkpoints.begin().await.map_err(checkpoint_error)?;
        let reset = {
            let mut ctx = ProjectionContext::new(&mut tx, true, 1);
            guarded(self.projection.reset(&mut ctx)).await
        };
        if let Err(source) = reset {
            self.checkpoints.rollback(tx).await;
            return Err(ProjectionError::Reset {
                projection: key,
                source,
            });
        }
        let target = Checkpoint {
            position: from,
            version: self.projection.version(),
            replay_until: (from < head).then_some(head),
        };
        let mut commit = CheckpointCommit::advance(&key, stored, target)
            .fenced(self.checkpoints.fence(&leases[0]));
        commit.repartition = Some(count);
        commit.clear_dead_letters_after = Some(from);
        match self.checkpoints.commit(tx, commit).await {
            Ok(()) => {}
            Err(CheckpointError::Moved { .. } | CheckpointError::Fenced { .. }) => {
                return Err(ProjectionError::Busy { projection: key });
            }
            Err(err) => return Err(checkpoint_error(err)),
        }
        let total = self.store.count_events_after(from).await.ok().flatten();
        let shared = Arc::new(SharedReplay {
            name: key.name().to_owned(),
            started,
            done: AtomicU64::new(0),
            total,
            positions: Mutex::new(vec![from; usize::from(count)]),
            callback: self.progress.clone(),
        });
        let workers = (0..count)
            .map(|index| self.partition_worker(index, Some(Arc::clone(&shared))))
            .collect::<Result<Vec<_>, _>>()?;
        let reached = join_all(
            workers
                .iter()
                .zip(leases)
                .map(|(worker, lease)| worker.catch_up_with(lease)),
        )
        .await;
        let mut lowest: Option<Position> = None;
        for position in reached {
            let position = position?;
            lowest = Some(lowest.map_or(position, |l| l.min(position)));
        }
        Ok(RebuildReport {
            events: shared.done.load(Ordering::Relaxed),
            position: lowest.unwrap_or(from),
            elapsed: started.elapsed(),
        })
    }

    async fn release_all(&self, leases: Vec<<C as LeaseStore>::Lease>) {
        join_all(leases.into_iter().map(|l| self.checkpoints.release(l))).await;
    }
}

fn checkpoint_error(key: &ProjectionKey, source: CheckpointError) -> ProjectionError {
    ProjectionError::Checkpoint {
        projection: key.clone(),
        source,
    }
}
