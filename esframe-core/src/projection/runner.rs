//! [`ProjectionRunner`]: catches a projection up from its checkpoint, then follows the log.

use std::{
    fmt,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::FutureExt;

use tokio::{sync::watch, task::JoinHandle};
use tracing::Instrument;

use crate::{EventStore, RecordedEvent};

use super::{
    Checkpoint, CheckpointCommit, CheckpointError, CheckpointStore, DeadLetter, Delivery,
    HandlerError, NewDeadLetter, Projection, ProjectionContext, ProjectionError, RebuildProgress,
    RebuildReport,
};

/// Default number of stored events a runner reads and commits per batch.
pub const DEFAULT_PROJECTION_BATCH_SIZE: usize = 1000;

/// Longest accepted projection name.
const MAX_NAME_LEN: usize = 200;

/// How a failing event is retried before it is given up on ([`OnFailure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerRetry {
    /// Tries in all, the first included (default 10; at least 1). With the default waits an
    /// event is parked about 30 s after its first failure, which rides out a database failover
    /// or a read model's migration lock.
    pub attempts: u32,
    /// Wait before the second try (default 100 ms); doubled before each further try.
    pub initial_backoff: Duration,
    /// The longest wait between tries (default 10 s).
    pub max_backoff: Duration,
}

impl Default for HandlerRetry {
    fn default() -> Self {
        Self {
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl HandlerRetry {
    /// The wait after failed try number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// What the runner does with an event that still fails after every retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// Park it as a dead letter, in the transaction that moves the checkpoint past it, and go on
    /// (default). Parked events can be listed, retried and discarded.
    #[default]
    Park,
    /// Stop the runner with [`ProjectionError::Handler`]; the checkpoint stays just before the
    /// event, so a restart tries it again.
    Stop,
}

type ProgressCallback = Arc<dyn Fn(&RebuildProgress) + Send + Sync>;

/// Runs one [`Projection`] over an [`EventStore`]'s global log, with checkpoints, lease and dead
/// letters in a [`CheckpointStore`].
///
/// - **Catch-up, then live:** reads the log in batches from the checkpoint; when caught up, waits
///   for the store to signal new events (LISTEN/NOTIFY on PostgreSQL, a notification in
///   memory) and goes on.
/// - **One transaction per batch:** the batch's writes and the checkpoint move commit together
///   (exactly once with an exactly-once checkpoint store; see [`super::Delivery`]).
/// - **Failures:** a failing batch is gone through event by event; the failing event is retried
///   alone with exponential backoff ([`HandlerRetry`]), then parked or the runner stops
///   ([`OnFailure`]). The events before it are committed first, the ones after it go on.
/// - **One active runner per projection:** [`ProjectionRunner::run`] waits for the projection's
///   lease and processes only while it holds it; when the holder dies, a waiting runner takes
///   over within [`ProjectionRunner::standby_poll`].
/// - **Versioned read models:** when [`Projection::version`] is newer than the stored
///   checkpoint's, the read model is reset and replayed from the start.
pub struct ProjectionRunner<S, C, P> {
    store: S,
    checkpoints: C,
    projection: Arc<P>,
    batch_size: usize,
    retry: HandlerRetry,
    on_failure: OnFailure,
    standby_poll: Duration,
    lease_wait: Duration,
    progress: Option<ProgressCallback>,
}

impl<S, C, P> fmt::Debug for ProjectionRunner<S, C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("batch_size", &self.batch_size)
            .field("retry", &self.retry)
            .field("on_failure", &self.on_failure)
            .field("standby_poll", &self.standby_poll)
            .finish_non_exhaustive()
    }
}

impl<S: Clone, C: Clone, P> Clone for ProjectionRunner<S, C, P> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            checkpoints: self.checkpoints.clone(),
            projection: Arc::clone(&self.projection),
            batch_size: self.batch_size,
            retry: self.retry,
            on_failure: self.on_failure,
            standby_poll: self.standby_poll,
            lease_wait: self.lease_wait,
            progress: self.progress.clone(),
        }
    }
}

/// A runner started with [`ProjectionRunner::spawn`]. Dropping it asks the runner to stop the
/// next time it is idle; [`RunningProjection::shutdown`] also waits for it.
#[derive(Debug)]
pub struct RunningProjection {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), ProjectionError>>,
}

impl RunningProjection {
    /// Asks the runner to stop after the batch in progress, waits for it, and gives the lease
    /// up. Returns the error that stopped it, if it stopped on its own.
    pub async fn shutdown(self) -> Result<(), ProjectionError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(result) => result,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(_) => Ok(()),
        }
    }

    /// Stops the runner at once, wherever it is; an uncommitted batch is rolled back.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Whether the runner has ended (an error, or after [`RunningProjection::shutdown`]).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Runs a handler's future, turning a panic into a handler error, so that an event whose
/// handler panics is retried and parked like one whose handler fails, instead of killing the
/// runner (and, restarted, killing it again: a crash loop on one poison event).
async fn guarded(
    handler: impl Future<Output = Result<(), HandlerError>>,
) -> Result<(), HandlerError> {
    match AssertUnwindSafe(handler).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-text panic payload".to_owned());
            Err(format!("the handler panicked: {message}").into())
        }
    }
}

/// Whether `err` is a backend failure worth retrying (a lost connection, say), as opposed to
/// stored data the runner cannot get past or a decision to stop.
fn is_transient(err: &ProjectionError) -> bool {
    matches!(
        err,
        ProjectionError::Store {
            source: crate::StoreError::Backend(_),
            ..
        } | ProjectionError::Checkpoint {
            source: CheckpointError::Backend(_),
            ..
        }
    )
}

/// Why a session with the lease ended.
enum SessionEnd {
    Stopped,
    LeaseLost,
}

/// Internal failure of a step: the lease was lost (go back to standby), or a real error.
enum StepError {
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

/// What a session knows: the checkpoint (which says whether it replays history).
struct Cursor {
    checkpoint: Option<Checkpoint>,
    version: u32,
}

impl Cursor {
    fn position(&self) -> u64 {
        self.checkpoint.map_or(0, |c| c.position)
    }

    /// Whether the events after the checkpoint are replays.
    fn replaying(&self) -> bool {
        self.checkpoint
            .is_some_and(|c| c.replay_until.is_some_and(|until| c.position < until))
    }

    /// The checkpoint at `position`, still replaying if that is below the replay's end.
    fn at(&self, position: u64) -> Checkpoint {
        let replay_until = self
            .checkpoint
            .and_then(|c| c.replay_until)
            .filter(|&until| position < until);
        Checkpoint {
            position,
            version: self.version,
            replay_until,
        }
    }
}

/// Where the cursor's replay ends (0 if it is not replaying).
fn replay_end(cursor: &Cursor) -> u64 {
    cursor.checkpoint.and_then(|c| c.replay_until).unwrap_or(0)
}

/// Tracks a replay for progress reports.
struct Replay {
    started: Instant,
    done: u64,
    total: Option<u64>,
}

impl<S, C, P> ProjectionRunner<S, C, P>
where
    S: EventStore,
    C: CheckpointStore,
    P: Projection<C::Tx>,
{
    /// A runner for `projection`, reading `store`'s log and keeping its checkpoint in
    /// `checkpoints`.
    pub fn new(store: S, checkpoints: C, projection: P) -> Self {
        Self {
            store,
            checkpoints,
            projection: Arc::new(projection),
            batch_size: DEFAULT_PROJECTION_BATCH_SIZE,
            retry: HandlerRetry::default(),
            on_failure: OnFailure::default(),
            standby_poll: Duration::from_secs(1),
            lease_wait: Duration::from_secs(5),
            progress: None,
        }
    }

    /// Stored events read and committed per batch (default
    /// [`DEFAULT_PROJECTION_BATCH_SIZE`]).
    #[must_use]
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How failing events are retried (default [`HandlerRetry::default`]).
    #[must_use]
    pub fn retry(mut self, retry: HandlerRetry) -> Self {
        self.retry = retry;
        self
    }

    /// What happens to an event that fails every retry (default [`OnFailure::Park`]).
    #[must_use]
    pub fn on_failure(mut self, on_failure: OnFailure) -> Self {
        self.on_failure = on_failure;
        self
    }

    /// How often a runner without the lease checks whether it is free (default 1 s): the
    /// longest a failover waits after the active runner's lease is given up.
    #[must_use]
    pub fn standby_poll(mut self, interval: Duration) -> Self {
        self.standby_poll = interval;
        self
    }

    /// How long [`catch_up`](Self::catch_up) and [`rebuild`](Self::rebuild) wait for the
    /// projection's lease before failing with [`ProjectionError::Busy`] (default 5 s).
    #[must_use]
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.lease_wait = wait;
        self
    }

    /// Called after every batch of a replay (a rebuild, or the replay after a version change).
    #[must_use]
    pub fn on_progress(
        mut self,
        callback: impl Fn(&RebuildProgress) + Send + Sync + 'static,
    ) -> Self {
        self.progress = Some(Arc::new(callback));
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The checkpoint store.
    pub fn checkpoints(&self) -> &C {
        &self.checkpoints
    }

    /// Runs until `shutdown` resolves (then finishes the batch in progress, gives the lease up
    /// and returns `Ok`), or until an error it cannot get past: stored data it cannot read
    /// ([`StoreError::Corrupt`](crate::StoreError::Corrupt), a failing upcaster), a checkpoint
    /// written by a newer version, or a failing event with [`OnFailure::Stop`]. Backend failures
    /// (a lost connection, a database restart) are logged and retried every
    /// [`standby_poll`](Self::standby_poll), from the checkpoint.
    ///
    /// Waits for the projection's lease first; while another runner holds it, this one stands
    /// by and checks every [`ProjectionRunner::standby_poll`].
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProjectionError> {
        let (stop_tx, stop) = watch::channel(false);
        let main = self.run_until_stopped(stop);
        tokio::pin!(main);
        tokio::select! {
            result = &mut main => return result,
            () = shutdown => {
                let _ = stop_tx.send(true);
            }
        }
        main.await
    }

    /// Runs on a new tokio task; see [`ProjectionRunner::run`].
    pub fn spawn(self) -> RunningProjection
    where
        S: EventStore,
    {
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(async move { self.run_until_stopped(stop).await });
        RunningProjection {
            stop: stop_tx,
            task,
        }
    }

    /// Processes every event committed before the call (waiting, if need be, for transactions
    /// that hold the global log back to end), then returns the position reached. Fails with
    /// [`ProjectionError::Busy`] if another runner holds the lease longer than
    /// [`lease_wait`](Self::lease_wait).
    pub async fn catch_up(&self) -> Result<u64, ProjectionError> {
        self.check_name()?;
        let lease = self.lease_or_busy().await?;
        let result = async {
            let head = self.head().await?;
            let mut cursor = self.open_cursor(None).await?;
            let target = replay_end(&cursor).max(head);
            let (_keep_open, never_stop) = watch::channel(false);
            let mut replay = self.replay_in_progress(&cursor).await;
            self.run_to(&mut cursor, &lease, target, &never_stop, &mut replay)
                .await?;
            Ok(cursor.position())
        }
        .await;
        self.checkpoints.release(lease).await;
        result.map_err(|err| self.step_error(err))
    }

    /// Resets the read model ([`Projection::reset`]) and replays the log from after `from` (0:
    /// from the start) up to the events stored by the end, with [`ProjectionContext::is_replay`]
    /// set, reporting progress to [`ProjectionRunner::on_progress`].
    ///
    /// With an exactly-once store the reset and the checkpoint move commit together, and every
    /// batch after them commits with its checkpoint, so a rebuild that is interrupted resumes
    /// where it stopped when the projection runs again, still as a replay
    /// ([`Checkpoint::replay_until`](super::Checkpoint::replay_until)). The reset also drops the
    /// projection's dead letters above `from`. Fails with [`ProjectionError::Busy`] if another
    /// runner holds the lease longer than [`lease_wait`](Self::lease_wait).
    ///
    /// For a projection updated inline by the PostgreSQL store, the held lease pauses the
    /// appends that update it until the rebuild ends, so the rebuilt read model misses nothing
    /// and repeats nothing; after an interrupted rebuild those appends are refused until it is
    /// run again.
    pub async fn rebuild(&self, from: u64) -> Result<RebuildReport, ProjectionError> {
        self.check_name()?;
        let lease = self.lease_or_busy().await?;
        let result = async {
            let head = self.head().await?;
            let mut cursor = self.open_cursor(Some(from)).await?;
            let target = replay_end(&cursor).max(head);
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
        self.checkpoints.release(lease).await;
        result.map_err(|err| self.step_error(err))
    }

    /// The projection's parked events.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, ProjectionError> {
        self.checkpoints
            .dead_letters(self.name())
            .await
            .map_err(|err| self.checkpoint_error(err))
    }

    /// Deletes a parked event of this projection without handling it; `false` if there was
    /// none with this id. A dead letter of another projection is refused
    /// ([`ProjectionError::WrongDeadLetter`]).
    pub async fn discard_dead_letter(&self, id: u64) -> Result<bool, ProjectionError> {
        match self
            .checkpoints
            .dead_letter(id)
            .await
            .map_err(|err| self.checkpoint_error(err))?
        {
            None => return Ok(false),
            Some(letter) if letter.projection != self.name() => {
                return Err(ProjectionError::WrongDeadLetter {
                    id,
                    projection: self.name().to_owned(),
                    owner: letter.projection,
                });
            }
            Some(_) => {}
        }
        self.checkpoints
            .discard_dead_letter(id)
            .await
            .map_err(|err| self.checkpoint_error(err))
    }

    /// Handles a parked event again (after a fix), reading it from the store as it is now. On
    /// success its writes and the dead letter's removal commit together; on failure it stays
    /// parked with the new error. The event is applied after events that came later in the log,
    /// which the projection must tolerate (as with any dead letter).
    pub async fn retry_dead_letter(&self, id: u64) -> Result<(), ProjectionError> {
        let name = self.name();
        let Some(letter) = self
            .checkpoints
            .dead_letter(id)
            .await
            .map_err(|err| self.checkpoint_error(err))?
        else {
            return Err(ProjectionError::NoSuchDeadLetter { id });
        };
        if letter.projection != name {
            return Err(ProjectionError::WrongDeadLetter {
                id,
                projection: name.to_owned(),
                owner: letter.projection,
            });
        }
        let position = letter.event.global_position;
        let interest = self.projection.interest();
        let events: Vec<RecordedEvent> = self
            .store
            .read_all_batch(position.saturating_sub(1), 1)
            .await
            .map_err(|err| self.store_error(err))?
            .events
            .into_iter()
            .filter(|e| e.global_position == position && interest.matches(e))
            .collect();
        let mut tx = self
            .checkpoints
            .begin()
            .await
            .map_err(|err| self.checkpoint_error(err))?;
        let mut ctx = ProjectionContext::new(&mut tx, false, letter.event.attempts + 1);
        let mut outcome = Ok(());
        for event in &events {
            if let Err(err) = guarded(self.projection.handle(event, &mut ctx)).await {
                outcome = Err(err);
                break;
            }
        }
        match outcome {
            Ok(()) => self
                .checkpoints
                .commit(
                    tx,
                    CheckpointCommit {
                        projection: name.to_owned(),
                        advance: None,
                        park: None,
                        resolve: Some(id),
                        clear_dead_letters_after: None,
                    },
                )
                .await
                .map_err(|err| self.checkpoint_error(err)),
            Err(err) => {
                self.checkpoints.rollback(tx).await;
                let message = err.to_string();
                self.checkpoints
                    .note_retry_failure(id, &message)
                    .await
                    .map_err(|err| self.checkpoint_error(err))?;
                Err(ProjectionError::RetryFailed {
                    id,
                    projection: name.to_owned(),
                    message,
                })
            }
        }
    }

    fn name(&self) -> &str {
        self.projection.name()
    }

    /// A step error where the caller holds the lease for a one-off job (catch-up, rebuild).
    fn step_error(&self, err: StepError) -> ProjectionError {
        match err {
            StepError::Fatal(err) => err,
            StepError::LeaseLost | StepError::Stopped => ProjectionError::Busy {
                projection: self.name().to_owned(),
            },
        }
    }

    fn check_name(&self) -> Result<(), ProjectionError> {
        let name = self.name();
        if name.is_empty() || name.chars().count() > MAX_NAME_LEN {
            return Err(ProjectionError::InvalidName {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn store_error(&self, source: crate::StoreError) -> ProjectionError {
        ProjectionError::Store {
            projection: self.name().to_owned(),
            source,
        }
    }

    fn checkpoint_error(&self, source: CheckpointError) -> ProjectionError {
        ProjectionError::Checkpoint {
            projection: self.name().to_owned(),
            source,
        }
    }

    /// A commit failure: a moved checkpoint means another runner took over.
    fn commit_failed(&self, err: CheckpointError) -> StepError {
        match err {
            CheckpointError::Moved { .. } => {
                tracing::warn!(projection = self.name(), error = %err, "checkpoint moved under this runner; giving the lease up");
                StepError::LeaseLost
            }
            err => StepError::Fatal(self.checkpoint_error(err)),
        }
    }

    async fn lease_or_busy(&self) -> Result<C::Lease, ProjectionError> {
        self.checkpoints
            .wait_lease(self.name(), self.lease_wait)
            .await
            .map_err(|err| self.checkpoint_error(err))?
            .ok_or_else(|| ProjectionError::Busy {
                projection: self.name().to_owned(),
            })
    }

    async fn run_until_stopped(
        &self,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), ProjectionError> {
        self.check_name()?;
        loop {
            // Stand by until the lease is ours.
            let lease = loop {
                if *stop.borrow() {
                    return Ok(());
                }
                match self.checkpoints.try_lease(self.name()).await {
                    Ok(Some(lease)) => break lease,
                    Ok(None) => {}
                    Err(err) => {
                        tracing::warn!(projection = self.name(), error = %err, "cannot take the projection lease; retrying");
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(self.standby_poll) => {}
                    _ = stop.wait_for(|stop| *stop) => return Ok(()),
                }
            };
            tracing::info!(projection = self.name(), "projection lease taken; running");
            let end = self.session(&lease, &mut stop).await;
            self.checkpoints.release(lease).await;
            match end {
                Ok(SessionEnd::Stopped) => return Ok(()),
                Ok(SessionEnd::LeaseLost) => {
                    tracing::warn!(
                        projection = self.name(),
                        "projection lease lost; standing by"
                    );
                }
                Err(err) if is_transient(&err) => {
                    // The database went away (restart, failover, network): nothing was
                    // committed past the checkpoint, so stand by and start again from it.
                    tracing::warn!(projection = self.name(), error = %err, retry_in_ms = self.standby_poll.as_millis() as u64, "projection interrupted by a backend error; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(self.standby_poll) => {}
                        _ = stop.wait_for(|stop| *stop) => return Ok(()),
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Processes while the lease is held: catch up, then follow.
    async fn session(
        &self,
        lease: &C::Lease,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, ProjectionError> {
        let mut cursor = match self.open_cursor(None).await {
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
                            projection = self.name(),
                            "replay finished; following live events"
                        );
                    }
                    let position = cursor.position();
                    tokio::select! {
                        waited = self.store.wait_for_events(position) => {
                            waited.map_err(|err| self.store_error(err))?;
                        }
                        _ = stop.wait_for(|stop| *stop) => return Ok(SessionEnd::Stopped),
                    }
                }
                Err(StepError::LeaseLost) => return Ok(SessionEnd::LeaseLost),
                Err(StepError::Stopped) => return Ok(SessionEnd::Stopped),
                Err(StepError::Fatal(err)) => return Err(err),
            }
        }
    }

    /// The store's head position now (0 if it cannot tell).
    async fn head(&self) -> Result<u64, StepError> {
        Ok(self
            .store
            .head_position()
            .await
            .map_err(|err| self.store_error(err))?
            .unwrap_or(0))
    }

    /// Processes batches until the checkpoint has reached `target` and nothing more is readable.
    /// Events committed below `target` but still held back by an open transaction are waited
    /// for.
    async fn run_to(
        &self,
        cursor: &mut Cursor,
        lease: &C::Lease,
        target: u64,
        stop: &watch::Receiver<bool>,
        replay: &mut Option<Replay>,
    ) -> Result<(), StepError> {
        loop {
            if self.step(cursor, lease, stop, replay).await? {
                continue;
            }
            if cursor.position() >= target {
                return Ok(());
            }
            self.store
                .wait_for_events(cursor.position())
                .await
                .map_err(|err| self.store_error(err))?;
        }
    }

    /// Loads the checkpoint; resets the read model if `rebuild_from` is given or the
    /// projection's version is newer than the checkpoint's.
    async fn open_cursor(&self, rebuild_from: Option<u64>) -> Result<Cursor, StepError> {
        let version = self.projection.version();
        let stored = self
            .checkpoints
            .load(self.name())
            .await
            .map_err(|err| self.checkpoint_error(err))?;
        let mut cursor = Cursor {
            checkpoint: stored,
            version,
        };
        let reset_to = match (stored, rebuild_from) {
            (Some(stored), _) if stored.version > version => {
                return Err(StepError::Fatal(ProjectionError::VersionTooNew {
                    projection: self.name().to_owned(),
                    stored: stored.version,
                    code: version,
                }));
            }
            (_, Some(from)) => Some(from),
            (Some(stored), None) if stored.version < version => {
                tracing::info!(
                    projection = self.name(),
                    from = stored.version,
                    to = version,
                    "projection version changed; rebuilding the read model"
                );
                Some(0)
            }
            _ => None,
        };
        if let Some(from) = reset_to {
            let mut tx = self
                .checkpoints
                .begin()
                .await
                .map_err(|err| self.checkpoint_error(err))?;
            let reset = {
                let mut ctx = ProjectionContext::new(&mut tx, true, 1);
                guarded(self.projection.reset(&mut ctx)).await
            };
            if let Err(err) = reset {
                self.checkpoints.rollback(tx).await;
                return Err(StepError::Fatal(ProjectionError::Reset {
                    projection: self.name().to_owned(),
                    message: err.to_string(),
                }));
            }
            // Replay up to what is stored now; later events are live again.
            let head = self.head().await?;
            let target = Checkpoint {
                position: from,
                version,
                replay_until: (from < head).then_some(head),
            };
            let mut commit = CheckpointCommit::advance(self.name(), stored, target);
            // Parked events the replay reaches are handled (or parked) again.
            commit.clear_dead_letters_after = Some(from);
            self.checkpoints
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

    async fn start_replay(&self, from: u64) -> Replay {
        let total = match self.store.count_events_after(from).await {
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
        lease: &C::Lease,
        stop: &watch::Receiver<bool>,
        replay: &mut Option<Replay>,
    ) -> Result<bool, StepError> {
        if !self.checkpoints.lease_held(lease) {
            return Err(StepError::LeaseLost);
        }
        let from = cursor.position();
        let batch = self
            .store
            .read_all_batch(from, self.batch_size)
            .await
            .map_err(|err| self.store_error(err))?;
        if batch.scanned_to <= from && batch.events.is_empty() {
            return Ok(false);
        }
        let read = batch.events.len() as u64;
        let to = batch.scanned_to.max(from);
        let span = tracing::debug_span!(
            "esframe.projection.batch",
            projection = self.name(),
            from,
            to,
            events = read
        );
        self.apply(cursor, batch.events, to, stop)
            .instrument(span)
            .await?;
        if let Some(replay) = replay {
            replay.done += read;
            if let Some(progress) = &self.progress {
                progress(&RebuildProgress {
                    projection: self.name().to_owned(),
                    events_done: replay.done,
                    events_total: replay.total.map(|t| t.max(replay.done)),
                    position: cursor.position(),
                    elapsed: replay.started.elapsed(),
                });
            }
        }
        Ok(true)
    }

    /// Applies a batch and moves the checkpoint to `to`.
    async fn apply(
        &self,
        cursor: &mut Cursor,
        events: Vec<RecordedEvent>,
        to: u64,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), StepError> {
        let interest = self.projection.interest();
        let wanted: Vec<RecordedEvent> =
            events.into_iter().filter(|e| interest.matches(e)).collect();
        // The common case: the whole batch in one go.
        let failed = self.attempt(cursor, &wanted, to, 1, true).await?;
        let Some((mut index, mut error)) = failed else {
            return Ok(());
        };
        let mut rest: &[RecordedEvent] = &wanted;
        loop {
            // The failing "unit": every part of the stored event that failed (an upcaster may
            // have split it); they commit together or not at all.
            let position = rest[index].global_position;
            let start = rest[..index]
                .iter()
                .rposition(|e| e.global_position != position)
                .map_or(0, |i| i + 1);
            let end = rest[index..]
                .iter()
                .position(|e| e.global_position != position)
                .map_or(rest.len(), |i| index + i);
            if start > 0 {
                // Commit what came before it. Exactly once, the failed transaction took their
                // writes with it, so they are handled again; at least once, they took effect
                // already and only the checkpoint moves.
                let before: &[RecordedEvent] = match self.checkpoints.delivery() {
                    Delivery::ExactlyOnce => &rest[..start],
                    Delivery::AtLeastOnce => &[],
                };
                if let Some((i, err)) = self.attempt(cursor, before, position - 1, 1, false).await?
                {
                    // Failed before the unit this time (a flaky handler): start over there.
                    index = i;
                    error = err;
                    continue;
                }
            }
            let unit = &rest[start..end];
            let failing = rest[index].clone();
            let mut attempts = 1;
            let mut handled = false;
            while attempts < self.retry.attempts.max(1) {
                let wait = self.retry.backoff(attempts);
                tracing::warn!(projection = self.name(), stream = %failing.stream_id, version = failing.stream_version, attempt = attempts, error = %error, retry_in_ms = wait.as_millis() as u64, "projection handler failed; retrying");
                let mut stop = stop.clone();
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|stop| *stop) => return Err(StepError::Stopped),
                }
                attempts += 1;
                match self
                    .attempt(cursor, unit, position, attempts, false)
                    .await?
                {
                    None => {
                        handled = true;
                        break;
                    }
                    Some((_, err)) => error = err,
                }
            }
            if !handled {
                self.give_up(cursor, &failing, attempts, &error).await?;
            }
            rest = &rest[end..];
            if rest.is_empty() {
                if cursor.position() < to {
                    self.attempt(cursor, &[], to, 1, false).await?;
                }
                return Ok(());
            }
            match self.attempt(cursor, rest, to, 1, false).await? {
                None => return Ok(()),
                Some((i, err)) => {
                    index = i;
                    error = err;
                }
            }
        }
    }

    fn handler_error(
        &self,
        event: &RecordedEvent,
        attempts: u32,
        error: &HandlerError,
    ) -> ProjectionError {
        ProjectionError::Handler {
            projection: self.name().to_owned(),
            stream: event.stream_id.clone(),
            stream_version: event.stream_version,
            event_type: event.event_type.to_string(),
            global_position: event.global_position,
            attempts,
            message: error.to_string(),
        }
    }

    /// Parks `event` (moving the checkpoint past it) or stops, per [`OnFailure`].
    async fn give_up(
        &self,
        cursor: &mut Cursor,
        event: &RecordedEvent,
        attempts: u32,
        error: &HandlerError,
    ) -> Result<(), StepError> {
        if self.on_failure == OnFailure::Stop {
            return Err(StepError::Fatal(self.handler_error(event, attempts, error)));
        }
        tracing::error!(projection = self.name(), stream = %event.stream_id, version = event.stream_version, attempts, error = %error, "projection handler failed every retry; event parked as a dead letter");
        let tx = self
            .checkpoints
            .begin()
            .await
            .map_err(|err| self.checkpoint_error(err))?;
        let target = cursor.at(event.global_position);
        let mut commit = CheckpointCommit::advance(self.name(), cursor.checkpoint, target);
        commit.park = Some(NewDeadLetter {
            global_position: event.global_position,
            event_id: event.event_id,
            stream_id: event.stream_id.clone(),
            stream_version: event.stream_version,
            event_type: event.event_type.to_string(),
            error: error.to_string(),
            attempts,
        });
        self.checkpoints
            .commit(tx, commit)
            .await
            .map_err(|err| self.commit_failed(err))?;
        cursor.checkpoint = Some(target);
        Ok(())
    }

    /// Handles `events` in one transaction and, if all succeed, commits it with the checkpoint
    /// moved to `to`. Returns the index and error of the first failing event (the transaction
    /// is then rolled back); a commit the database refuses counts as a failure of the first
    /// event, so that the caller narrows it down to the unit at fault. `as_batch` uses [`Projection::handle_batch`] if the store is
    /// exactly-once; at least once, a rollback cannot undo the writes of the events before a
    /// failure, so they go one by one to learn which event failed.
    async fn attempt(
        &self,
        cursor: &mut Cursor,
        events: &[RecordedEvent],
        to: u64,
        attempt: u32,
        as_batch: bool,
    ) -> Result<Option<(usize, HandlerError)>, StepError> {
        let mut tx = self
            .checkpoints
            .begin()
            .await
            .map_err(|err| self.checkpoint_error(err))?;
        let as_batch = as_batch && self.checkpoints.delivery() == Delivery::ExactlyOnce;
        let failed = {
            let mut ctx = ProjectionContext::new(&mut tx, cursor.replaying(), attempt);
            if as_batch {
                if events.is_empty() {
                    None
                } else {
                    guarded(self.projection.handle_batch(events, &mut ctx))
                        .await
                        .err()
                        .map(|err| (0, err))
                }
            } else {
                let mut failed = None;
                for (i, event) in events.iter().enumerate() {
                    if let Err(err) = guarded(self.projection.handle(event, &mut ctx)).await {
                        failed = Some((i, err));
                        break;
                    }
                }
                failed
            }
        };
        if let Some((index, err)) = failed {
            self.checkpoints.rollback(tx).await;
            if as_batch {
                // Which event failed is unknown: go through the batch one by one.
                tracing::debug!(projection = self.name(), error = %err, "batch failed; handling its events one by one");
                return match Box::pin(self.attempt(cursor, events, to, attempt, false)).await? {
                    None => Ok(None),
                    Some(found) => Ok(Some(found)),
                };
            }
            return Ok(Some((index, err)));
        }
        let target = cursor.at(to);
        match self
            .checkpoints
            .commit(
                tx,
                CheckpointCommit::advance(self.name(), cursor.checkpoint, target),
            )
            .await
        {
            Ok(()) => {
                cursor.checkpoint = Some(target);
                Ok(None)
            }
            // The database refused what the handlers wrote (a deferred constraint, or a handler
            // that swallowed an error and left the transaction aborted): a failure of these
            // events, found event by event like a failing handler.
            Err(CheckpointError::Rejected(err)) if as_batch && events.len() > 1 => {
                tracing::debug!(projection = self.name(), error = %err, "batch commit refused; handling its events one by one");
                Box::pin(self.attempt(cursor, events, to, attempt, false)).await
            }
            Err(CheckpointError::Rejected(err)) if !events.is_empty() => Ok(Some((
                0,
                format!("the database refused the commit of the handler's writes: {err}").into(),
            ))),
            Err(err) => Err(self.commit_failed(err)),
        }
    }
}
