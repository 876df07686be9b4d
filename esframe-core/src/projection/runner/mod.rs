//! [`ProjectionRunner`]: catches a projection up from its checkpoint, then follows the log.
//!
//! `mod.rs` holds the configuration and the entry points; `worker` the lease and the session
//! loop; `apply` how a batch is applied, narrowed down and parked; `dead_letters` the retry and
//! discard of parked events; `cursor` where a session is.

mod apply;
mod cursor;
mod dead_letters;
mod pool;
mod status;
mod worker;

use std::{fmt, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures_util::FutureExt;
use tokio::{sync::watch, task::JoinHandle};

use crate::GlobalLog;

pub use dead_letters::DeadLetterRetry;
pub use status::{PartitionStatus, ProjectionStatus};
pub(crate) use status::{StatusError, partition_status};

use super::{
    DeadLetter, HandlerError, InvalidProjectionKey, Projection, ProjectionError, ProjectionKey,
    ProjectionStore, RebuildProgress, RebuildReport,
};

use worker::Worker;

/// Default number of stored events a runner reads and commits per batch.
pub const DEFAULT_PROJECTION_BATCH_SIZE: usize = 1000;

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

pub(super) type ProgressCallback = Arc<dyn Fn(&RebuildProgress) + Send + Sync>;

/// Runs one [`Projection`] over a [`GlobalLog`], with checkpoints, lease and dead letters in a
/// [`ProjectionStore`].
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
///
/// The projection's checkpoint, lease and dead letters are kept under
/// [`ProjectionKey::single`] of its [`name`](Projection::name); a name no store can keep fails
/// every entry point with [`ProjectionError::InvalidKey`] at once.
pub struct ProjectionRunner<S, C, P> {
    store: S,
    checkpoints: C,
    projection: Arc<P>,
    key: Result<ProjectionKey, InvalidProjectionKey>,
    batch_size: usize,
    retry: HandlerRetry,
    on_failure: OnFailure,
    standby_poll: Duration,
    lease_wait: Duration,
    progress: Option<ProgressCallback>,
    partitions: u16,
    repartition: bool,
    rebalance_interval: Duration,
    concurrency: Option<usize>,
    /// This runner's name among the members of a partitioned projection's group.
    member: Arc<str>,
}

impl<S, C, P> fmt::Debug for ProjectionRunner<S, C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("key", &self.key)
            .field("batch_size", &self.batch_size)
            .field("retry", &self.retry)
            .field("on_failure", &self.on_failure)
            .field("standby_poll", &self.standby_poll)
            .field("partitions", &self.partitions)
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl<S: Clone, C: Clone, P> Clone for ProjectionRunner<S, C, P> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            checkpoints: self.checkpoints.clone(),
            projection: Arc::clone(&self.projection),
            key: self.key.clone(),
            batch_size: self.batch_size,
            retry: self.retry,
            on_failure: self.on_failure,
            standby_poll: self.standby_poll,
            lease_wait: self.lease_wait,
            progress: self.progress.clone(),
            partitions: self.partitions,
            repartition: self.repartition,
            rebalance_interval: self.rebalance_interval,
            concurrency: self.concurrency,
            member: Arc::clone(&self.member),
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

impl<S, C, P> ProjectionRunner<S, C, P>
where
    S: GlobalLog,
    C: ProjectionStore,
    P: Projection<C::Tx>,
{
    /// A runner for `projection`, reading `store`'s log and keeping its checkpoint in
    /// `checkpoints`.
    pub fn new(store: S, checkpoints: C, projection: P) -> Self {
        let key = ProjectionKey::single(projection.name());
        Self {
            store,
            checkpoints,
            projection: Arc::new(projection),
            key,
            batch_size: DEFAULT_PROJECTION_BATCH_SIZE,
            retry: HandlerRetry::default(),
            on_failure: OnFailure::default(),
            standby_poll: Duration::from_secs(1),
            lease_wait: Duration::from_secs(5),
            progress: None,
            partitions: 1,
            repartition: false,
            rebalance_interval: Duration::from_secs(1),
            concurrency: None,
            member: super::balance::new_member_name(),
        }
    }

    /// Splits the projection into `count` partitions (default 1: unsplit), 1 to
    /// [`MAX_PARTITIONS`](crate::MAX_PARTITIONS). All events of a stream are in one partition
    /// and reach the projection in order; partitions are handled in parallel, each with its
    /// own checkpoint, lease (with a fencing token) and dead letters, and reading only its own
    /// events. Every runner of the projection, in this process or others, takes a fair share
    /// of the partitions ([`run`](Self::run)); [`catch_up`](Self::catch_up) and
    /// [`rebuild`](Self::rebuild) do all of them at once.
    ///
    /// The count is stored with the projection. A runner whose count differs from the stored
    /// one fails with [`ProjectionError::PartitionCountChanged`], unless
    /// [`repartition`](Self::repartition) lets it rebuild. A partitioned projection's handler
    /// is called concurrently for different partitions: its writes must not depend on the
    /// order of events of different streams.
    #[must_use]
    pub fn partitions(mut self, count: u16) -> Self {
        self.partitions = count;
        self
    }

    /// Lets [`run`](Self::run) change the stored number of partitions (default `false`): when
    /// it differs from [`partitions`](Self::partitions), the runner waits until it can hold
    /// every partition's lease (the runners with the old count stopped), then rebuilds the read
    /// model in the new count.
    #[must_use]
    pub fn repartition(mut self, allowed: bool) -> Self {
        self.repartition = allowed;
        self
    }

    /// How often a runner of a partitioned projection renews its membership and rebalances
    /// (default 1 s): takes free or expired partitions up to its fair share, hands extra ones
    /// back. A lease about to lapse is looked at again as it lapses, so a runner that dies is
    /// replaced within the lease store's lease time. Rounds come at least three times per
    /// membership lifetime of the lease store, whatever the interval (PostgreSQL: two thirds
    /// of the lease time; [`membership_lifetime`](super::LeaseStore::membership_lifetime)),
    /// so live members never drop out of each other's count.
    #[must_use]
    pub fn rebalance_interval(mut self, interval: Duration) -> Self {
        self.rebalance_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How many of its partitions this runner processes at the same time (default: all it
    /// holds). Each partition it holds still has its own session and lease; with a limit they
    /// take turns batch by batch, as Axon's threads or one consumer per process would. A
    /// handler that waits on another service gains from the default; a limit models a worker
    /// of fixed capacity, and keeps one runner from taking a whole database pool.
    #[must_use]
    pub fn concurrency(mut self, partitions_at_once: usize) -> Self {
        self.concurrency = Some(partitions_at_once.max(1));
        self
    }

    /// This runner's name among the runners of a partitioned projection (default: the host
    /// name, the process id and a random suffix).
    #[must_use]
    pub fn member_name(mut self, name: impl Into<String>) -> Self {
        self.member = Arc::from(name.into());
        self
    }

    /// The number of partitions, checked.
    fn partition_count(&self) -> Result<u16, ProjectionError> {
        crate::LogPartition::new(0, self.partitions)?;
        Ok(self.partitions)
    }

    fn is_partitioned(&self) -> Result<bool, ProjectionError> {
        Ok(self.partition_count()? > 1)
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

    /// The key the projection's checkpoint, lease and dead letters are kept under.
    pub fn key(&self) -> Result<&ProjectionKey, ProjectionError> {
        self.key.as_ref().map_err(|err| err.clone().into())
    }

    /// The worker of an unsplit projection.
    fn worker(&self) -> Result<Worker<'_, S, C, P>, ProjectionError> {
        Ok(Worker {
            runner: self,
            key: self.key()?.clone(),
            partition: crate::LogPartition::ALL,
            shared: None,
            permits: None,
        })
    }

    /// Checks that an unsplit runner's projection is stored unsplit.
    async fn check_unsplit(&self) -> Result<(), ProjectionError> {
        self.check_partition_count().await
    }

    async fn run_stoppable(&self, stop: watch::Receiver<bool>) -> Result<(), ProjectionError> {
        if self.is_partitioned()? {
            return self.run_partitioned(stop).await;
        }
        match self.check_unsplit_or_retry(&stop).await {
            // Back to one partition, allowed: the partitioned path rebuilds it.
            Err(ProjectionError::PartitionCountChanged { .. }) if self.repartition => {
                self.run_partitioned(stop).await
            }
            Err(err) => Err(err),
            Ok(()) => self.worker()?.run_until_stopped(stop).await,
        }
    }

    /// [`Self::check_unsplit`], retried while the store is unavailable.
    async fn check_unsplit_or_retry(
        &self,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), ProjectionError> {
        loop {
            match self.check_unsplit().await {
                Err(err) if err.is_transient() && !*stop.borrow() => {
                    tracing::warn!(projection = ?self.key, error = %err, "cannot read the projection's partition count; retrying");
                    tokio::time::sleep(self.standby_poll).await;
                }
                result => return result,
            }
        }
    }

    /// Runs until `shutdown` resolves (then finishes the batch in progress, gives the lease up
    /// and returns `Ok`), or until an error it cannot get past: stored data it cannot read
    /// ([`StoreError::Corrupt`](crate::StoreError::Corrupt), a failing upcaster), a checkpoint
    /// written by a newer version, a lease or checkpoint request the store refuses, or a failing
    /// event with [`OnFailure::Stop`]. Backend failures (a lost connection, a database restart:
    /// [`ProjectionError::is_transient`]) are logged and retried every
    /// [`standby_poll`](Self::standby_poll), from the checkpoint.
    ///
    /// Waits for the projection's lease first; while another runner holds it, this one stands
    /// by and checks every [`ProjectionRunner::standby_poll`].
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProjectionError> {
        let (stop_tx, stop) = watch::channel(false);
        let main = self.run_stoppable(stop);
        tokio::pin!(main);
        tokio::select! {
            result = &mut main => return result,
            () = shutdown => {
                let _ = stop_tx.send(true);
            }
        }
        main.await
    }

    /// Runs on a new tokio task; see [`ProjectionRunner::run`]. A runner that can never run
    /// (an invalid projection name) ends at once with its error, returned by
    /// [`RunningProjection::shutdown`].
    pub fn spawn(self) -> RunningProjection {
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(async move { self.run_stoppable(stop).await });
        RunningProjection {
            stop: stop_tx,
            task,
        }
    }

    /// Processes every event committed before the call (waiting, if need be, for transactions
    /// that hold the global log back to end), then returns the position reached. Fails with
    /// [`ProjectionError::Busy`] if another runner holds the lease longer than
    /// [`lease_wait`](Self::lease_wait).
    pub async fn catch_up(&self) -> Result<crate::Position, ProjectionError> {
        if self.is_partitioned()? {
            return self.catch_up_partitions().await;
        }
        self.check_unsplit().await?;
        self.worker()?.catch_up().await
    }

    /// Resets the read model ([`Projection::reset`]) and replays the log from after `from`
    /// ([`Position::START`](crate::Position::START): from the start) up to the events stored by
    /// the end, with [`ProjectionContext::is_replay`](super::ProjectionContext::is_replay) set,
    /// reporting progress to [`ProjectionRunner::on_progress`].
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
    pub async fn rebuild(&self, from: crate::Position) -> Result<RebuildReport, ProjectionError> {
        if self.is_partitioned()? {
            return self.rebuild_partitions(from).await;
        }
        if self.stored_partition_count().await? != 1 {
            // Back to one partition: a rebuild of all of them into one.
            return self.rebuild_partitions(from).await;
        }
        self.worker()?.rebuild(from).await
    }

    /// The projection's parked events.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, ProjectionError> {
        if !self.is_partitioned()? {
            return self.worker()?.dead_letters().await;
        }
        let mut letters = Vec::new();
        for index in 0..self.partition_count()? {
            letters.extend(self.partition_worker(index, None)?.dead_letters().await?);
        }
        letters.sort_by_key(|letter| letter.id);
        Ok(letters)
    }

    /// The worker of the partition dead letter `id` belongs to (of this projection, or the
    /// unsplit worker, which refuses it).
    async fn dead_letter_worker(&self, id: u64) -> Result<Worker<'_, S, C, P>, ProjectionError> {
        let key = self.key()?;
        if !self.is_partitioned()? {
            return self.worker();
        }
        let letter = self.checkpoints.dead_letter(id).await.map_err(|source| {
            ProjectionError::Checkpoint {
                projection: key.clone(),
                source,
            }
        })?;
        match letter {
            Some(letter)
                if letter.key.name() == key.name()
                    && letter.key.partition() < self.partition_count()? =>
            {
                self.partition_worker(letter.key.partition(), None)
            }
            _ => self.worker(),
        }
    }

    /// Deletes a parked event of this projection without handling it; `false` if there was
    /// none with this id. A dead letter of another projection is refused
    /// ([`ProjectionError::WrongDeadLetter`]).
    pub async fn discard_dead_letter(&self, id: u64) -> Result<bool, ProjectionError> {
        self.dead_letter_worker(id)
            .await?
            .discard_dead_letter(id)
            .await
    }

    /// Handles a parked event again (after a fix), reading it from the store as it is now. On
    /// success its writes and the dead letter's removal commit together; on failure it stays
    /// parked with the new error ([`ProjectionError::RetryFailed`]). The event is applied after
    /// events that came later in the log, which the projection must tolerate (as with any dead
    /// letter).
    ///
    /// If there is nothing to handle any more (the event no longer matches the projection's
    /// interest, or upcasters now retire it), the dead letter is resolved without calling the
    /// handler, and the result says so: [`DeadLetterRetry::NothingToHandle`].
    pub async fn retry_dead_letter(&self, id: u64) -> Result<DeadLetterRetry, ProjectionError> {
        self.dead_letter_worker(id)
            .await?
            .retry_dead_letter(id)
            .await
    }
}
