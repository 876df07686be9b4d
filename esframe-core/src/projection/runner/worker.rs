//! The runner at work on one projection key: the lease, the session loop, opening the cursor
//! (with resets), reading batches.

use std::{sync::Arc, time::Instant};

use tokio::sync::watch;
use tracing::Instrument;

use crate::{GlobalBatch, GlobalLog, LogPartition, Position, StoreError};

use super::{
    super::{
        CheckpointCommit, CheckpointError, LeaseStore, Projection, ProjectionContext,
        ProjectionError, ProjectionKey, ProjectionStore, RebuildProgress, RebuildReport,
    },
    ProjectionRunner,
    cursor::{Cursor, Replay},
    guarded,
    pool::SharedReplay,
};

/// The runner's configuration with a valid key: everything that processes events.
pub(super) struct Worker<'r, S, C, P> {
    pub(super) runner: &'r ProjectionRunner<S, C, P>,
    pub(super) key: ProjectionKey,
    /// The part of the log the key's partition reads ([`LogPartition::ALL`] unsplit).
    pub(super) partition: LogPartition,
    /// The whole projection's replay, when this worker replays one of its partitions beside
    /// the others (a partitioned rebuild): progress is reported for all of them together.
    pub(super) shared: Option<Arc<SharedReplay>>,
    /// Permits shared by the partition sessions of one runner, when it processes only some of
    /// its partitions at a time ([`ProjectionRunner::concurrency`]): one per batch.
    pub(super) permits: Option<Arc<tokio::sync::Semaphore>>,
}

/// Why a session with the lease ended.
pub(super) enum SessionEnd {
    Stopped,
    LeaseLost,
}

/// Internal failure of a step: the lease was lost (go back to standby), or a real error.
pub(super) enum StepError {
    LeaseLost,
    /// A shutdown arrived while a failing event waited for its next try.
    Stopped,
    Fatal(ProjectionError),
}

impl From<ProjectionError> for StepError {
    fn from(err: ProjectionError) -> Self {
        Self::Fatal(err)
    }
}

impl<S, C, P> Worker<'_, S, C, P>
where
    S: GlobalLog,
    C: ProjectionStore,
    P: Projection<C::Tx>,
{
    pub(super) fn store(&self) -> &S {
        &self.runner.store
    }

    pub(super) fn checkpoints(&self) -> &C {
        &self.runner.checkpoints
    }

    pub(super) fn projection(&self) -> &P {
        &self.runner.projection
    }

    pub(super) async fn catch_up(&self) -> Result<Position, ProjectionError> {
        let lease = self.lease_or_busy().await?;
        let result = self.catch_up_with(&lease).await;
        self.checkpoints().release(lease).await;
        result
    }

    /// [`Self::catch_up`] with the lease held by the caller.
    pub(super) async fn catch_up_with(
        &self,
        lease: &<C as LeaseStore>::Lease,
    ) -> Result<Position, ProjectionError> {
        async {
            let head = self.head().await?;
            let mut cursor = self.open_cursor(None, lease).await?;
            let target = cursor.replay_end().max(head);
            let (_keep_open, never_stop) = watch::channel(false);
            let mut replay = self.replay_in_progress(&cursor).await;
            self.run_to(&mut cursor, lease, target, &never_stop, &mut replay)
                .await?;
            Ok(cursor.read_from())
        }
        .await
        .map_err(|err| self.step_error(err))
    }

    pub(super) async fn rebuild(&self, from: Position) -> Result<RebuildReport, ProjectionError> {
        let lease = self.lease_or_busy().await?;
        let result = async {
            let head = self.head().await?;
            let mut cursor = self.open_cursor(Some(from), &lease).await?;
            let target = cursor.replay_end().max(head);
            let (_keep_open, never_stop) = watch::channel(false);
            let started = Instant::now();
            let mut replay = Some(self.start_replay(from).await);
            self.run_to(&mut cursor, &lease, target, &never_stop, &mut replay)
                .await?;
            Ok(RebuildReport {
                events: replay.map_or(0, |r| r.done),
                position: cursor.position(),
                elapsed: started.elapsed(),
            })
        }
        .await;
        self.checkpoints().release(lease).await;
        result.map_err(|err| self.step_error(err))
    }

    /// A step error where the caller holds the lease for a one-off job (catch-up, rebuild).
    fn step_error(&self, err: StepError) -> ProjectionError {
        match err {
            StepError::Fatal(err) => err,
            StepError::LeaseLost | StepError::Stopped => ProjectionError::Busy {
                projection: self.key.clone(),
            },
        }
    }

    pub(super) fn store_error(&self, source: StoreError) -> ProjectionError {
        ProjectionError::Store {
            projection: self.key.clone(),
            source,
        }
    }

    pub(super) fn checkpoint_error(&self, source: CheckpointError) -> ProjectionError {
        ProjectionError::Checkpoint {
            projection: self.key.clone(),
            source,
        }
    }

    /// A commit failure: a moved checkpoint means another runner took over.
    pub(super) fn commit_failed(&self, err: CheckpointError) -> StepError {
        match err {
            CheckpointError::Moved { .. } | CheckpointError::Fenced { .. } => {
                tracing::warn!(projection = %self.key, error = %err, "checkpoint moved under this runner; giving the lease up");
                StepError::LeaseLost
            }
            err => StepError::Fatal(self.checkpoint_error(err)),
        }
    }

    pub(super) async fn lease_or_busy(&self) -> Result<<C as LeaseStore>::Lease, ProjectionError> {
        self.checkpoints()
            .wait_lease(&self.key, self.runner.lease_wait)
            .await
            .map_err(|err| self.checkpoint_error(err))?
            .ok_or_else(|| ProjectionError::Busy {
                projection: self.key.clone(),
            })
    }

    pub(super) async fn run_until_stopped(
        &self,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), ProjectionError> {
        let standby_poll = self.runner.standby_poll;
        loop {
            // Stand by until the lease is ours.
            let lease = loop {
                if *stop.borrow() {
                    return Ok(());
                }
                match self.checkpoints().try_lease(&self.key).await {
                    Ok(Some(lease)) => break lease,
                    Ok(None) => {}
                    Err(err) if err.is_transient() => {
                        tracing::warn!(projection = %self.key, error = %err, "cannot take the projection lease; retrying");
                    }
                    // A request the store refuses will be refused again: asking for ever
                    // would hide it.
                    Err(err) => return Err(self.checkpoint_error(err)),
                }
                tokio::select! {
                    () = tokio::time::sleep(standby_poll) => {}
                    _ = stop.wait_for(|stop| *stop) => return Ok(()),
                }
            };
            tracing::info!(projection = %self.key, "projection lease taken; running");
            let end = self.session(&lease, &mut stop).await;
            self.checkpoints().release(lease).await;
            match end {
                Ok(SessionEnd::Stopped) => return Ok(()),
                Ok(SessionEnd::LeaseLost) => {
                    tracing::warn!(projection = %self.key, "projection lease lost; standing by");
                }
                Err(err) if err.is_transient() => {
                    // The database went away (restart, failover, network): nothing was
                    // committed past the checkpoint, so stand by and start again from it.
                    tracing::warn!(projection = %self.key, error = %err, retry_in_ms = standby_poll.as_millis() as u64, "projection interrupted by a backend error; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(standby_poll) => {}
                        _ = stop.wait_for(|stop| *stop) => return Ok(()),
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Processes while the lease is held: catch up, then follow.
    pub(super) async fn session(
        &self,
        lease: &<C as LeaseStore>::Lease,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, ProjectionError> {
        let mut cursor = match self.open_cursor(None, lease).await {
            Ok(cursor) => cursor,
            Err(StepError::LeaseLost) => return Ok(SessionEnd::LeaseLost),
            Err(StepError::Stopped) => return Ok(SessionEnd::Stopped),
            Err(StepError::Fatal(err)) => return Err(err),
        };
        let mut replay = self.replay_in_progress(&cursor).await;
        loop {
            if *stop.borrow() {
                return Ok(SessionEnd::Stopped);
            }
            match self.step(&mut cursor, lease, stop, &mut replay).await {
                Ok(true) => {}
                Ok(false) => {
                    if replay.take().is_some() {
                        tracing::info!(
                            projection = %self.key,
                            "replay finished; following live events"
                        );
                    }
                    let position = cursor.read_from();
                    // A partition that has looked past its checkpoint comes back to move it.
                    let idle = if cursor.scanned > cursor.position() {
                        super::cursor::IDLE_CHECKPOINT_EVERY
                    } else {
                        std::time::Duration::MAX
                    };
                    tokio::select! {
                        waited = self.store().wait_for_events(position) => {
                            waited.map_err(|err| self.store_error(err))?;
                        }
                        () = tokio::time::sleep(idle) => {}
                        _ = stop.wait_for(|stop| *stop) => return Ok(SessionEnd::Stopped),
                    }
                }
                Err(StepError::LeaseLost) => return Ok(SessionEnd::LeaseLost),
                Err(StepError::Stopped) => return Ok(SessionEnd::Stopped),
                Err(StepError::Fatal(err)) => return Err(err),
            }
        }
    }

    /// The next batch of this worker's partition after `from`.
    async fn read(&self, from: Position) -> Result<GlobalBatch, StoreError> {
        self.store()
            .read_partition_batch(from, self.runner.batch_size, self.partition)
            .await
    }

    /// The store's head position now.
    async fn head(&self) -> Result<Position, StepError> {
        Ok(self
            .store()
            .head_position()
            .await
            .map_err(|err| self.store_error(err))?)
    }

    /// Processes batches until the checkpoint has reached `target` and nothing more is readable.
    /// Events committed below `target` but still held back by an open transaction are waited
    /// for.
    async fn run_to(
        &self,
        cursor: &mut Cursor,
        lease: &<C as LeaseStore>::Lease,
        target: Position,
        stop: &watch::Receiver<bool>,
        replay: &mut Option<Replay>,
    ) -> Result<(), StepError> {
        loop {
            if self.step(cursor, lease, stop, replay).await? {
                continue;
            }
            if cursor.read_from() >= target {
                return Ok(());
            }
            self.store()
                .wait_for_events(cursor.read_from())
                .await
                .map_err(|err| self.store_error(err))?;
        }
    }

    /// Loads the checkpoint; resets the read model if `rebuild_from` is given or the
    /// projection's version is newer than the checkpoint's.
    async fn open_cursor(
        &self,
        rebuild_from: Option<Position>,
        lease: &<C as LeaseStore>::Lease,
    ) -> Result<Cursor, StepError> {
        let version = self.projection().version();
        let stored = self
            .checkpoints()
            .load(&self.key)
            .await
            .map_err(|err| self.checkpoint_error(err))?;
        let mut cursor = Cursor {
            checkpoint: stored,
            version,
            ahead: None,
            scanned: Position::START,
            fence: self.checkpoints().fence(lease),
            scanned_since: None,
        };
        let reset_to = match (stored, rebuild_from) {
            (Some(stored), _) if stored.version > version => {
                return Err(StepError::Fatal(ProjectionError::VersionTooNew {
                    projection: self.key.clone(),
                    stored: stored.version,
                    code: version,
                }));
            }
            (_, Some(from)) => Some(from),
            // A partitioned projection's version change resets the whole read model once, for
            // every partition (see `pool`); a partition never resets it alone.
            (Some(stored), None) if stored.version < version && !self.partition.is_all() => {
                return Err(StepError::Fatal(ProjectionError::PartitionVersionBehind {
                    projection: self.key.clone(),
                    stored: stored.version,
                    code: version,
                }));
            }
            (Some(stored), None) if stored.version < version => {
                tracing::info!(
                    projection = %self.key,
                    from = stored.version,
                    to = version,
                    "projection version changed; rebuilding the read model"
                );
                Some(Position::START)
            }
            _ => None,
        };
        if let Some(from) = reset_to {
            let mut tx = self
                .checkpoints()
                .begin()
                .await
                .map_err(|err| self.checkpoint_error(err))?;
            let reset = {
                let mut ctx = ProjectionContext::new(&mut tx, true, 1);
                guarded(self.projection().reset(&mut ctx)).await
            };
            if let Err(source) = reset {
                self.checkpoints().rollback(tx).await;
                return Err(StepError::Fatal(ProjectionError::Reset {
                    projection: self.key.clone(),
                    source,
                }));
            }
            // Replay up to what is stored now; later events are live again.
            let head = self.head().await?;
            let target = super::super::Checkpoint {
                position: from,
                version,
                replay_until: (from < head).then_some(head),
            };
            let mut commit =
                CheckpointCommit::advance(&self.key, stored, target).fenced(cursor.fence);
            // Parked events the replay reaches are handled (or parked) again.
            commit.clear_dead_letters_after = Some(from);
            self.checkpoints()
                .commit(tx, commit)
                .await
                .map_err(|err| self.commit_failed(err))?;
            cursor.checkpoint = Some(target);
        }
        Ok(cursor)
    }

    /// Progress tracking for the replay `cursor` is in, if any.
    async fn replay_in_progress(&self, cursor: &Cursor) -> Option<Replay> {
        if cursor.replaying() {
            Some(self.start_replay(cursor.position()).await)
        } else {
            None
        }
    }

    async fn start_replay(&self, from: Position) -> Replay {
        let total = match self
            .store()
            .count_partition_events_after(from, self.partition)
            .await
        {
            Ok(total) => total,
            Err(err) => {
                tracing::debug!(error = %err, "cannot count events for progress");
                None
            }
        };
        Replay {
            started: Instant::now(),
            done: 0,
            total,
        }
    }

    /// Reads and processes one batch. `Ok(false)`: nothing new was stored.
    async fn step(
        &self,
        cursor: &mut Cursor,
        lease: &<C as LeaseStore>::Lease,
        stop: &watch::Receiver<bool>,
        replay: &mut Option<Replay>,
    ) -> Result<bool, StepError> {
        let _permit = match &self.permits {
            Some(permits) => Some(
                Arc::clone(permits)
                    .acquire_owned()
                    .await
                    .map_err(|_| StepError::Stopped)?,
            ),
            None => None,
        };
        if !self.checkpoints().lease_held(lease) {
            return Err(StepError::LeaseLost);
        }
        let from = cursor.read_from();
        let batch = match cursor.ahead.take() {
            Some((after, batch)) if after == from => batch,
            _ => self.read(from).await.map_err(|err| self.store_error(err))?,
        };
        if batch.scanned_to <= from && batch.events.is_empty() {
            return Ok(false);
        }
        if batch.events.is_empty() && !self.partition.is_all() {
            // Nothing of this partition: look further next time; move the checkpoint there
            // only now and then, not on every wake-up.
            cursor.scanned = batch.scanned_to;
            cursor.scanned_since.get_or_insert_with(Instant::now);
            if cursor.idle_checkpoint_due() {
                self.apply(cursor, Vec::new(), batch.scanned_to, stop, lease)
                    .await?;
                cursor.scanned_since = None;
            }
            return Ok(false);
        }
        cursor.scanned_since = None;
        let read = batch.events.len() as u64;
        let to = batch.scanned_to.max(from);
        // A full batch means more is likely stored: read the next one while this one is
        // applied, so that the read and the read model's commit overlap. Reading early skips
        // nothing: a read returns every event below the horizon at its time, and whatever
        // commits later lands above it. The batch is used only if the checkpoint reaches `to`.
        let read_ahead = batch.events.len() >= self.runner.batch_size;
        let span = tracing::debug_span!(
            "esframe.projection.batch",
            projection = %self.key,
            from = from.get(),
            to = to.get(),
            events = read
        );
        let applying = self
            .apply(cursor, batch.events, to, stop, lease)
            .instrument(span);
        if read_ahead {
            // A failed read ahead is only read again by the next step; a failed apply drops the
            // read at once.
            let ahead = async { Ok(self.read(to).await.ok()) };
            let ((), ahead) = futures_util::future::try_join(applying, ahead).await?;
            if let Some(ahead) = ahead
                && !ahead.events.is_empty()
                && cursor.position() == to
            {
                cursor.ahead = Some((to, ahead));
            }
        } else {
            applying.await?;
        }
        if let Some(shared) = &self.shared {
            shared.report(self.partition.index(), read, cursor.read_from());
        } else if let Some(replay) = replay {
            replay.done += read;
            if let Some(progress) = &self.runner.progress {
                progress(&RebuildProgress {
                    projection: self.key.to_string(),
                    events_done: replay.done,
                    events_total: replay.total.map(|t| t.max(replay.done)),
                    position: cursor.position(),
                    elapsed: replay.started.elapsed(),
                });
            }
        }
        Ok(true)
    }
}
