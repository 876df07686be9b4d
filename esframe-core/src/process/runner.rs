//! [`ProcessRunner`]: follows the log, routes events to instances, carries out their effects,
//! fires timers, and quarantines instances that keep failing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};
use uuid::Uuid;

use crate::{
    Aggregate, CommandHandler, EventStore, GlobalLog, InvalidPartition, LogPartition, Position,
    RecordedEvent,
    projection::{
        Checkpoint, CheckpointCommit, CheckpointError, CheckpointStore, LeaseStore, NewDeadLetter,
        ProjectedEvent, ProjectionEvents, ProjectionKey,
        balance::{Balancer, Resumed, Session, SessionError, resume_in_count},
    },
    publish::Backoff,
};

use super::{
    Clock, InstanceRecord, InstanceStatus, ProcessManager, ProcessStore, ProcessStoreError, Route,
    TimerRecord,
    batch::{BatchContext, BatchError, Counts, Pending, describe, read_at},
    dispatch::Handlers,
};

/// Errors of a [`ProcessRunner`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The process manager's name cannot be a checkpoint key.
    #[error("process manager name `{name}` is invalid: {reason}")]
    InvalidName {
        /// The name.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// The store failed and kept failing.
    #[error("process manager `{process}`: {source}")]
    Store {
        /// The process manager.
        process: &'static str,
        /// The failure.
        #[source]
        source: ProcessStoreError,
    },
    /// A batch kept failing for a reason no instance is to blame for.
    #[error("process manager `{process}`: a batch kept failing: {message}")]
    Stuck {
        /// The process manager.
        process: &'static str,
        /// The last failure.
        message: String,
    },
    /// The instance does not exist.
    #[error("process manager `{process}` has no instance `{id}`")]
    NoInstance {
        /// The process manager.
        process: &'static str,
        /// The instance.
        id: String,
    },
    /// The instance is not quarantined, so it cannot be retried or discarded.
    #[error("instance `{id}` of process manager `{process}` is {status:?}, not quarantined")]
    NotQuarantined {
        /// The process manager.
        process: &'static str,
        /// The instance.
        id: String,
        /// Its status.
        status: InstanceStatus,
    },
    /// An operator's retry failed again; the instance stays quarantined.
    #[error("retrying instance `{id}` of process manager `{process}` failed again: {error}")]
    RetryFailed {
        /// The process manager.
        process: &'static str,
        /// The instance.
        id: String,
        /// The failure.
        error: String,
    },
    /// The lease could not be taken in time.
    #[error("process manager `{process}`: another runner holds the lease")]
    LeaseHeld {
        /// The process manager.
        process: &'static str,
    },
    /// The instance's stored state cannot be read (nor rebuilt from its events).
    #[error("instance `{id}` of process manager `{process}`: {error}")]
    UnreadableState {
        /// The process manager.
        process: &'static str,
        /// The instance.
        id: String,
        /// Why.
        error: String,
    },
    /// Another runner took the lease: this runner's commit was refused by the lease's fencing
    /// token (it was paused or cut off past the lease time), and nothing of it was kept. A
    /// spawned runner stands by again.
    #[error(
        "process manager `{process}`: another runner took the lease; this runner's commit was refused by its fence"
    )]
    Fenced {
        /// The process manager.
        process: &'static str,
    },
    /// A wait ran out of time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The number of partitions is out of range.
    #[error("process manager: {0}")]
    InvalidPartitions(#[from] InvalidPartition),
}

impl SessionError for ProcessError {
    fn is_transient(&self) -> bool {
        is_transient(self)
    }
}

/// The partition of `count` that instance `id` belongs to: FNV-1a (64 bits) of the id, modulo
/// the 256 buckets, then modulo `count`, as streams are split ([`LogPartition`]). Stable
/// across versions, platforms and stores.
pub fn partition_of(id: &str, count: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let bucket = (hash % u64::from(crate::PARTITION_BUCKETS)) as u16;
    bucket % count.max(1)
}

/// What a runner has done, and where it stands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStatus {
    /// Whether it holds the lease and is handling events.
    pub active: bool,
    /// Its checkpoint: every event at or below it has been handled (partitioned: the lowest
    /// checkpoint of the partitions this runner has run).
    pub position: Position,
    /// What it did since it started.
    pub counts: Counts,
    /// Batches retried (conflicts, store outages, instance failures before quarantine).
    pub retries: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// Tuning of a [`ProcessRunner`].
#[derive(Debug, Clone)]
struct Config {
    batch_size: usize,
    max_attempts: u32,
    backoff: Backoff,
    timer_poll: Duration,
    standby_poll: Duration,
    clock: Clock,
    max_transient: u32,
    from_now: bool,
    partitions: u16,
    rebalance_interval: Duration,
    member: Arc<str>,
}

/// Builds a [`ProcessRunner`]: the process manager, its store, and a command handler per
/// aggregate type its instances send commands to.
pub struct ProcessRunnerBuilder<P, S> {
    process: P,
    store: S,
    handlers: Handlers,
    config: Config,
}

impl<P: ProcessManager, S: ProcessStore> ProcessRunnerBuilder<P, S> {
    /// Adds the handler of `A`'s commands. Its `load` reads the aggregates' states; the events
    /// are stored by the runner, in the batch's transaction.
    pub fn handler<A: Aggregate, E: EventStore>(mut self, handler: CommandHandler<A, E>) -> Self
    where
        A::Event: Send + Sync,
    {
        self.handlers.add(handler);
        self
    }

    /// The clock timers are due by (default: the system's). Tests use [`Clock::manual`].
    pub fn clock(mut self, clock: Clock) -> Self {
        self.config.clock = clock;
        self
    }

    /// Events read per batch (default 256).
    pub fn batch_size(mut self, events: usize) -> Self {
        self.config.batch_size = events.max(1);
        self
    }

    /// How many times an instance's failing input is tried before the instance is quarantined
    /// (default 3).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.config.max_attempts = attempts.max(1);
        self
    }

    /// The wait between retries (default 10 ms doubling to 1 s).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// How often due timers are looked for while idle (default 100 ms; a manual clock wakes
    /// the runner when it moves).
    pub fn timer_poll(mut self, every: Duration) -> Self {
        self.config.timer_poll = every;
        self
    }

    /// How often a standby runner tries to take the lease (default 500 ms).
    pub fn standby_poll(mut self, every: Duration) -> Self {
        self.config.standby_poll = every;
        self
    }

    /// On its first run (no checkpoint stored under its name), start after the events stored
    /// so far instead of from the beginning of the log. A process manager added to a system
    /// with history would otherwise start an instance for every past event its routing may
    /// start one for, and send their commands. Default: from the beginning, like projections.
    pub fn start_from_now(mut self) -> Self {
        self.config.from_now = true;
        self
    }

    /// Splits the instances into `count` partitions by a hash of their id ([`partition_of`])
    /// (default 1: unsplit), spread over every runner of the process manager in any process
    /// as projections' partitions are: a fair share each, hand-overs at a batch boundary,
    /// orphans taken over once their leases lapse. Each partition has its own checkpoint and
    /// fenced lease and reads the whole log (an instance's events come from many streams, so
    /// the log cannot be split by stream without breaking an instance's order), deciding only
    /// the events routed to its own instances. Timers are fired by the holder of partition 0;
    /// a timer and an event of one instance decided at once in two partitions are ordered by
    /// the instance's compare-and-set (the loser is decided again).
    ///
    /// The count may change between runs: each new partition starts from the lowest stored
    /// checkpoint, and events an instance handled before are skipped as repeats (its last
    /// handled position).
    pub fn partitions(mut self, count: u16) -> Self {
        self.config.partitions = count;
        self
    }

    /// How often a runner of a partitioned process manager renews its membership and
    /// rebalances (default 1 s). A lease about to lapse is looked at again as it lapses, so a
    /// runner that dies is replaced within the lease store's lease time. Rounds come at least
    /// three times per membership lifetime of the lease store, whatever the interval
    /// (PostgreSQL: two thirds of the lease time).
    pub fn rebalance_interval(mut self, every: Duration) -> Self {
        self.config.rebalance_interval = every.max(Duration::from_millis(10));
        self
    }

    /// This runner's name among the runners of a partitioned process manager (default: the
    /// host name, the process id and a random suffix).
    pub fn member_name(mut self, name: impl Into<String>) -> Self {
        self.config.member = Arc::from(name.into());
        self
    }

    /// The runner.
    pub fn build(self) -> Result<ProcessRunner<P, S>, ProcessError> {
        let name = format!("process:{}", P::NAME);
        let invalid = |e: crate::projection::InvalidProjectionKey| ProcessError::InvalidName {
            name: P::NAME,
            reason: e.reason,
        };
        let key = ProjectionKey::single(&name).map_err(invalid)?;
        LogPartition::new(0, self.config.partitions)?;
        let keys = (0..self.config.partitions)
            .map(|index| ProjectionKey::new(&name, index))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let (status, _) = watch::channel(ProcessStatus::default());
        Ok(ProcessRunner {
            inner: Arc::new(Inner {
                process: self.process,
                store: self.store,
                handlers: self.handlers,
                positions: Mutex::new(vec![Position::START; keys.len()]),
                config: self.config,
                key,
                keys,
                status,
                counts: Mutex::new(Counts::default()),
            }),
        })
    }
}

/// Runs a [`ProcessManager`] against a [`ProcessStore`].
///
/// - Follows the global log under its own checkpoint (`process:<NAME>`) and fenced lease:
///   one runner is active per name; others wait and take over when it dies. Split into
///   partitions of its instances ([`ProcessRunnerBuilder::partitions`]), the partitions are
///   shared by every runner of the name, one runner per partition.
/// - Each batch of events is decided in one transaction: the instances are read, each event
///   is routed, folded and reacted to, the commands are decided by the aggregates' handlers
///   on their current state (refusals go back to `react`), and then the commands' events (all
///   streams in one statement, each expecting the version it was decided on), the instances,
///   their timers and the checkpoint are stored together. On PostgreSQL that is exactly once;
///   a conflict with another writer decides the batch again.
/// - Due timers are fired the same way, each taken once (the write deletes it, checked).
/// - An instance that fails (react, its state, a command failing other than by refusal) is
///   retried with backoff, then quarantined: its later events are held in order, and the
///   other instances go on. [`quarantined`](Self::quarantined), [`retry`](Self::retry) and
///   [`discard`](Self::discard) manage them.
/// - An event that cannot be decoded is parked as a dead letter of the runner's key.
pub struct ProcessRunner<P, S> {
    inner: Arc<Inner<P, S>>,
}

impl<P, S> Clone for ProcessRunner<P, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<P, S> {
    process: P,
    store: S,
    handlers: Handlers,
    config: Config,
    key: ProjectionKey,
    /// Every partition's checkpoint and lease key (`[key]` unsplit).
    keys: Vec<ProjectionKey>,
    /// Every partition's checkpoint as this runner last saw it.
    positions: Mutex<Vec<Position>>,
    status: watch::Sender<ProcessStatus>,
    counts: Mutex<Counts>,
}

/// An instance as its process manager sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance<S> {
    /// The stored record (its `state` is the serialized form of `state`).
    pub record: InstanceRecord,
    /// The state.
    pub state: S,
}

/// A runner started with [`ProcessRunner::spawn`].
#[derive(Debug)]
pub struct RunningProcess {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), ProcessError>>,
}

impl RunningProcess {
    /// Stops at the next batch boundary and gives the lease up.
    pub async fn stop(self) -> Result<(), ProcessError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(result) => result,
            Err(join) if join.is_cancelled() => Ok(()),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }

    /// Stops at once (the task is aborted, as a crash would stop it).
    pub fn abort(self) {
        self.task.abort();
    }

    /// Whether the task ended (with an error, or because it was stopped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// What a step did.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Progressed,
    Idle,
}

impl<P: ProcessManager, S: ProcessStore> ProcessRunner<P, S> {
    /// A builder for `process` running on `store`.
    pub fn builder(process: P, store: S) -> ProcessRunnerBuilder<P, S> {
        ProcessRunnerBuilder {
            process,
            store,
            handlers: Handlers::default(),
            config: Config {
                batch_size: 256,
                max_attempts: 3,
                backoff: Backoff {
                    min: Duration::from_millis(10),
                    max: Duration::from_secs(1),
                },
                timer_poll: Duration::from_millis(100),
                standby_poll: Duration::from_millis(500),
                clock: Clock::system(),
                max_transient: 50,
                from_now: false,
                partitions: 1,
                rebalance_interval: Duration::from_secs(1),
                member: crate::projection::balance::new_member_name(),
            },
        }
    }

    /// The process manager.
    pub fn process(&self) -> &P {
        &self.inner.process
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The checkpoint and lease key (`process:<NAME>`; of partition 0 when partitioned).
    pub fn key(&self) -> &ProjectionKey {
        &self.inner.key
    }

    /// The partition instance `id` belongs to ([`partition_of`] with this runner's count).
    pub fn partition(&self, id: &str) -> u16 {
        partition_of(id, self.inner.config.partitions)
    }

    /// The clock timers are due by.
    pub fn clock(&self) -> &Clock {
        &self.inner.config.clock
    }

    /// Where the runner stands and what it did.
    pub fn status(&self) -> ProcessStatus {
        self.inner.status.borrow().clone()
    }

    /// Runs in a task until stopped: takes the lease (waiting as a standby while another
    /// runner holds it), then handles events and timers as they come. Transient failures
    /// (the database gone) are retried with backoff; the task ends only when stopped or on a
    /// failure retrying cannot mend.
    pub fn spawn(&self) -> RunningProcess {
        let (stop, stopped) = watch::channel(false);
        let runner = self.clone();
        let task = tokio::spawn(async move {
            if runner.inner.keys.len() > 1 {
                runner.run_partitioned(stopped).await
            } else {
                runner.run(stopped).await
            }
        });
        RunningProcess { stop, task }
    }

    /// This runner's share of the partitions, rebalanced as other runners come and go.
    async fn run_partitioned(
        &self,
        mut stopped: watch::Receiver<bool>,
    ) -> Result<(), ProcessError> {
        let config = &self.inner.config;
        if !self.settle_or_stop(&mut stopped).await? {
            return Ok(());
        }
        let group = self.inner.key.name().to_owned();
        let checkpoints = self.inner.store.checkpoints();
        let balancer = Balancer {
            leases: checkpoints,
            group: &group,
            partitions: &self.inner.keys,
            member: &config.member,
            interval: config.rebalance_interval,
        };
        let result = balancer
            .run(
                stopped,
                |index, lease| {
                    let (stop, mut stop_rx) = watch::channel(false);
                    let runner = self.clone();
                    let task = tokio::spawn(async move {
                        runner.inner.status.send_modify(|s| s.active = true);
                        let session = runner.session(&lease, &mut stop_rx, index).await;
                        runner.inner.store.checkpoints().release(lease).await;
                        match session {
                            Ok(()) | Err(ProcessError::Fenced { .. }) => Ok(()),
                            Err(err) => {
                                runner.failed(err.to_string());
                                Err(err)
                            }
                        }
                    });
                    Session { stop, task }
                },
                |source| self.store_error(source.into()),
            )
            .await;
        self.inner.status.send_modify(|s| s.active = false);
        result
    }

    /// Waits until the stored partition count is this runner's (see
    /// [`settle_partition_count`](Self::settle_partition_count)); `false` if stopped first.
    async fn settle_or_stop(
        &self,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<bool, ProcessError> {
        let config = &self.inner.config;
        let mut failures = 0u32;
        loop {
            if *stopped.borrow() {
                return Ok(false);
            }
            match self.settle_partition_count().await {
                Ok(true) => return Ok(true),
                Ok(false) => {
                    tracing::info!(
                        process = P::NAME,
                        "the number of partitions changed, but another runner holds a partition; waiting for it to stop"
                    );
                    wait_or_stop(stopped, config.standby_poll).await;
                }
                Err(err) if is_transient(&err) => {
                    failures += 1;
                    self.failed(err.to_string());
                    wait_or_stop(stopped, config.backoff.wait(failures)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Makes the stored partition count this runner's ([`resume_in_count`]): with every
    /// lease of the old and the new count held, each new partition starts from the lowest old
    /// checkpoint (repeats are skipped by the instances). `Ok(false)`: another runner holds a
    /// lease; try later.
    async fn settle_partition_count(&self) -> Result<bool, ProcessError> {
        let count = self.inner.config.partitions;
        let checkpoints = self.inner.store.checkpoints();
        let wait = self.inner.config.standby_poll;
        match resume_in_count(checkpoints, &self.inner.key, count, wait).await {
            Ok(Resumed::Unchanged) => Ok(true),
            Ok(Resumed::Changed { from, at }) => {
                tracing::info!(process = P::NAME, from, to = count, position = %at, "the number of partitions changed; every partition starts from the lowest old checkpoint");
                Ok(true)
            }
            Ok(Resumed::Busy) => Ok(false),
            Err(err) => Err(self.store_error(err.into())),
        }
    }

    async fn run(&self, mut stopped: watch::Receiver<bool>) -> Result<(), ProcessError> {
        let config = &self.inner.config;
        let checkpoints = self.inner.store.checkpoints();
        if !self.settle_or_stop(&mut stopped).await? {
            return Ok(());
        }
        let mut failures = 0u32;
        while !*stopped.borrow() {
            let lease = match checkpoints.try_lease(&self.inner.key).await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    wait_or_stop(&mut stopped, config.standby_poll).await;
                    continue;
                }
                Err(err) => {
                    failures += 1;
                    self.failed(err.to_string());
                    wait_or_stop(&mut stopped, config.backoff.wait(failures)).await;
                    continue;
                }
            };
            self.inner.status.send_modify(|s| s.active = true);
            let session = self.session(&lease, &mut stopped, 0).await;
            self.inner.status.send_modify(|s| s.active = false);
            checkpoints.release(lease).await;
            match session {
                Ok(()) | Err(ProcessError::Fenced { .. }) => failures = 0,
                Err(err) if is_transient(&err) => {
                    failures += 1;
                    self.failed(err.to_string());
                    tracing::warn!(process = P::NAME, error = %err, "process runner restarting");
                    wait_or_stop(&mut stopped, config.backoff.wait(failures)).await;
                }
                Err(err) => {
                    self.failed(err.to_string());
                    tracing::error!(process = P::NAME, error = %err, "process runner stopped");
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Runs partition `index` while holding its lease (partition 0 also fires the timers).
    async fn session(
        &self,
        lease: &<S::Checkpoints as LeaseStore>::Lease,
        stopped: &mut watch::Receiver<bool>,
        index: u16,
    ) -> Result<(), ProcessError> {
        let checkpoints = self.inner.store.checkpoints();
        let log = self.inner.store.log();
        let config = &self.inner.config;
        let mut moved = config.clock.moved();
        loop {
            if *stopped.borrow() || !checkpoints.lease_held(lease) {
                return Ok(());
            }
            let fence = checkpoints.fence(lease);
            let events = self.step_log(fence, index).await?;
            let timers = if index == 0 {
                self.step_timers(fence).await?
            } else {
                Step::Idle
            };
            if events == Step::Progressed || timers == Step::Progressed {
                continue;
            }
            let position = self.position_of(index);
            let next_due = if index == 0 {
                self.inner
                    .store
                    .next_due(P::NAME)
                    .await
                    .map_err(|source| self.store_error(source))?
            } else {
                None
            };
            let mut sleep = config.timer_poll;
            if let Some(due) = next_due
                && !config.clock.is_manual()
            {
                let until = (due - config.clock.now()).to_std().unwrap_or_default();
                sleep = sleep.min(until);
            }
            tokio::select! {
                _ = log.wait_for_events(position) => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = clock_moved(&mut moved) => {}
                _ = stopped.changed() => {}
            }
        }
    }

    /// Handles everything readable now and every timer due now, then returns, holding the
    /// lease while it works (waiting up to 30 s for another runner to give it up). For tests,
    /// tools and one-shot jobs; services use [`spawn`](Self::spawn).
    pub async fn run_until_idle(&self) -> Result<ProcessStatus, ProcessError> {
        if !self.settle_partition_count().await? {
            return Err(ProcessError::LeaseHeld { process: P::NAME });
        }
        for index in 0..self.inner.keys.len() as u16 {
            self.partition_until_idle(index).await?;
        }
        Ok(self.status())
    }

    async fn partition_until_idle(&self, index: u16) -> Result<(), ProcessError> {
        let checkpoints = self.inner.store.checkpoints();
        let lease = checkpoints
            .wait_lease(
                &self.inner.keys[usize::from(index)],
                Duration::from_secs(30),
            )
            .await
            .map_err(|e| self.store_error(e.into()))?
            .ok_or(ProcessError::LeaseHeld { process: P::NAME })?;
        let result = async {
            let head = self
                .inner
                .store
                .log()
                .head_position()
                .await
                .map_err(|e| self.store_error(e.into()))?;
            loop {
                let fence = checkpoints.fence(&lease);
                let events = self.step_log(fence, index).await?;
                let timers = if index == 0 {
                    self.step_timers(fence).await?
                } else {
                    Step::Idle
                };
                let position = self.position_of(index);
                if events == Step::Idle && timers == Step::Idle {
                    if position >= head {
                        return Ok(());
                    }
                    // Events below the head not yet readable (an open transaction).
                    self.inner
                        .store
                        .log()
                        .wait_for_events(position)
                        .await
                        .map_err(|e| self.store_error(e.into()))?;
                }
            }
        }
        .await;
        checkpoints.release(lease).await;
        result
    }

    /// One batch of the log: read, decide, store, commit. Retries conflicts and outages up to a
    /// bound, and an instance's failures up to `max_attempts` before quarantining it. Every
    /// commit carries the lease's fencing token `fence`.
    async fn step_log(&self, fence: Option<u64>, index: u16) -> Result<Step, ProcessError> {
        let store = &self.inner.store;
        let checkpoints = store.checkpoints();
        let key = &self.inner.keys[usize::from(index)];
        let count = self.inner.config.partitions;
        let mut retries = Retries::default();
        loop {
            let from = checkpoints
                .load(key)
                .await
                .map_err(|e| self.store_error(e.into()))?;
            if from.is_none() && self.inner.config.from_now {
                self.start_at_head(key, fence).await?;
                continue;
            }
            let position = from.map_or(Position::START, |c| c.position);
            self.moved(index, position);
            let batch = store
                .log()
                .read_all_batch(position, self.inner.config.batch_size)
                .await
                .map_err(|e| self.store_error(e.into()))?;
            if batch.scanned_to <= position {
                return Ok(Step::Idle);
            }
            let interest = P::Events::interest();
            let mut pending = Vec::new();
            let mut upto = batch.scanned_to;
            let mut park = None;
            for (i, event) in batch.events.iter().enumerate() {
                if !interest.matches(event) {
                    continue;
                }
                match P::Events::decode(event) {
                    Ok(Some(decoded)) => {
                        let projected = ProjectedEvent {
                            event: decoded,
                            envelope: event,
                        };
                        let route = self.inner.process.route(&projected);
                        let elsewhere = match &route {
                            Route::Start(id) | Route::Continue(id) => {
                                count > 1 && partition_of(id, count) != index
                            }
                            Route::Skip => false,
                        };
                        if elsewhere {
                            // Another partition's instance: decided there.
                            continue;
                        }
                        pending.push(Pending::Event {
                            event: projected,
                            route,
                        });
                    }
                    Ok(None) => {}
                    // Undecodable events are parked by partition 0 alone.
                    Err(_) if index != 0 => {}
                    Err(err) if i == 0 || pending.is_empty() => {
                        // The batch starts with it: park it alone and move past it.
                        pending.clear();
                        upto = event.global_position;
                        park = Some(NewDeadLetter {
                            global_position: event.global_position,
                            event_id: event.event_id,
                            stream_id: event.stream_id.clone(),
                            stream_version: event.stream_version,
                            event_type: event.event_type.to_string(),
                            error: err.to_string(),
                            attempts: 1,
                        });
                        tracing::error!(process = P::NAME, event = %describe(event), error = %err, "event cannot be decoded; parked as a dead letter");
                        break;
                    }
                    Err(_) => {
                        // Handle the events before it first; it is parked by the next batch.
                        upto = event.global_position.before();
                        break;
                    }
                }
            }
            let to = Checkpoint {
                position: upto,
                version: 1,
                replay_until: None,
            };
            let mut commit = CheckpointCommit::advance(key, from, to).fenced(fence);
            commit.park = park;
            match self
                .attempt(&pending, &retries.quarantine, None, None, commit)
                .await
            {
                Ok(counts) => {
                    self.record(&counts);
                    self.moved(index, upto);
                    return Ok(Step::Progressed);
                }
                Err(BatchError::Refused(message)) => {
                    let failure = self
                        .refused(&pending, &retries.quarantine, message, key, fence)
                        .await;
                    retries.failed(self, failure).await?;
                }
                Err(failure) => retries.failed(self, failure).await?,
            }
        }
    }

    /// Stores a first checkpoint at the log's head: the events stored so far are not handled.
    async fn start_at_head(
        &self,
        key: &ProjectionKey,
        fence: Option<u64>,
    ) -> Result<(), ProcessError> {
        let store = &self.inner.store;
        let checkpoints = store.checkpoints();
        let head = store
            .log()
            .head_position()
            .await
            .map_err(|e| self.store_error(e.into()))?;
        let tx = checkpoints
            .begin()
            .await
            .map_err(|e| self.store_error(e.into()))?;
        let to = Checkpoint {
            position: head,
            version: 1,
            replay_until: None,
        };
        tracing::info!(process = P::NAME, position = %head, "starting after the events stored so far");
        match checkpoints
            .commit(tx, CheckpointCommit::advance(key, None, to).fenced(fence))
            .await
        {
            // Another runner stored the first checkpoint meanwhile: use it.
            Ok(()) | Err(crate::projection::CheckpointError::Moved { .. }) => Ok(()),
            Err(err) => Err(self.store_error(err.into())),
        }
    }

    /// Fires the timers due now, in one transaction per batch of them, fenced by `fence`.
    async fn step_timers(&self, fence: Option<u64>) -> Result<Step, ProcessError> {
        let store = &self.inner.store;
        let mut retries = Retries::default();
        loop {
            let now = self.inner.config.clock.now();
            let due = store
                .due_timers(P::NAME, now, self.inner.config.batch_size)
                .await
                .map_err(|source| self.store_error(source))?;
            if due.is_empty() {
                return Ok(Step::Idle);
            }
            let pending: Vec<Pending<'_, P::Events>> =
                due.into_iter().map(Pending::Timer).collect();
            let commit = CheckpointCommit::nothing(&self.inner.key).fenced(fence);
            match self
                .attempt(&pending, &retries.quarantine, None, None, commit)
                .await
            {
                Ok(counts) => {
                    self.record(&counts);
                    return Ok(Step::Progressed);
                }
                Err(BatchError::Refused(message)) => {
                    let failure = self
                        .refused(
                            &pending,
                            &retries.quarantine,
                            message,
                            &self.inner.key,
                            fence,
                        )
                        .await;
                    retries.failed(self, failure).await?;
                }
                Err(failure) => retries.failed(self, failure).await?,
            }
        }
    }

    /// Finds the instance whose writes the store refuses: the only one in `pending`, or the
    /// first whose inputs, decided and written alone (checkpoint unmoved), are refused again.
    /// The instances written on the way keep their writes: the batch, decided again, skips
    /// their inputs as repeats. Without a culprit (the store refused them all alone, or
    /// failed otherwise) the refusal is treated as transient.
    async fn refused(
        &self,
        pending: &[Pending<'_, P::Events>],
        quarantine: &HashMap<String, String>,
        message: String,
        key: &ProjectionKey,
        fence: Option<u64>,
    ) -> BatchError {
        let mut ids: Vec<&str> = Vec::new();
        for id in pending.iter().filter_map(Pending::instance) {
            if !ids.contains(&id) && !quarantine.contains_key(id) {
                ids.push(id);
            }
        }
        if let [id] = ids[..] {
            return BatchError::Instance {
                id: id.to_owned(),
                error: message,
            };
        }
        for id in ids {
            let commit = CheckpointCommit::nothing(key).fenced(fence);
            match self
                .attempt(pending, quarantine, None, Some(id), commit)
                .await
            {
                Ok(counts) => {
                    self.record(&counts);
                }
                Err(BatchError::Refused(error)) => {
                    return BatchError::Instance {
                        id: id.to_owned(),
                        error,
                    };
                }
                Err(fenced @ BatchError::Fenced(_)) => return fenced,
                Err(_) => break,
            }
        }
        BatchError::Transient(message)
    }

    /// Decides `pending` in a new transaction and commits it with `commit`.
    async fn attempt(
        &self,
        pending: &[Pending<'_, P::Events>],
        quarantine: &HashMap<String, String>,
        reactivate: Option<&str>,
        only: Option<&str>,
        commit: CheckpointCommit,
    ) -> Result<Counts, BatchError> {
        let store = &self.inner.store;
        let checkpoints = store.checkpoints();
        let transient = |e: String| BatchError::Transient(e);
        let mut tx = checkpoints
            .begin()
            .await
            .map_err(|e| transient(e.to_string()))?;
        let context = BatchContext {
            process: &self.inner.process,
            store,
            handlers: &self.inner.handlers,
            now: self.inner.config.clock.now(),
            quarantine,
            reactivate,
            only,
        };
        let decision = match context.decide(&mut tx, pending).await {
            Ok(decision) => decision,
            Err(err) => {
                checkpoints.rollback(tx).await;
                return Err(err);
            }
        };
        if let Err(err) = store.write(&mut tx, decision.write).await {
            checkpoints.rollback(tx).await;
            return Err(if err.is_transient() {
                transient(err.to_string())
            } else {
                BatchError::Refused(err.to_string())
            });
        }
        checkpoints.commit(tx, commit).await.map_err(|e| match e {
            CheckpointError::Fenced { .. } => BatchError::Fenced(e.to_string()),
            e => transient(e.to_string()),
        })?;
        store.committed();
        Ok(decision.counts)
    }

    fn record(&self, counts: &Counts) {
        let mut total = self
            .inner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        total.add(counts);
        let total = *total;
        self.inner.status.send_modify(|s| s.counts = total);
    }

    /// Partition `index`'s checkpoint moved to `position`; the status shows the lowest.
    fn moved(&self, index: u16, position: Position) {
        let lowest = {
            let mut positions = self
                .inner
                .positions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(at) = positions.get_mut(usize::from(index)) {
                *at = position;
            }
            positions.iter().copied().min().unwrap_or(position)
        };
        self.inner.status.send_modify(|s| s.position = lowest);
    }

    /// Partition `index`'s checkpoint as this runner last saw it.
    fn position_of(&self, index: u16) -> Position {
        self.inner
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(usize::from(index))
            .copied()
            .unwrap_or_default()
    }

    fn retried(&self, error: &str) {
        self.inner.status.send_modify(|s| {
            s.retries += 1;
            s.last_error = Some(error.to_owned());
        });
    }

    fn failed(&self, error: String) {
        self.inner
            .status
            .send_modify(|s| s.last_error = Some(error));
    }

    fn store_error(&self, source: ProcessStoreError) -> ProcessError {
        ProcessError::Store {
            process: P::NAME,
            source,
        }
    }

    /// The instance `id`, with its state.
    pub async fn instance(&self, id: &str) -> Result<Option<Instance<P::State>>, ProcessError> {
        let record = self
            .inner
            .store
            .instance(P::NAME, id)
            .await
            .map_err(|source| self.store_error(source))?;
        let Some(record) = record else {
            return Ok(None);
        };
        // The batch's own reading: deserialized, or rebuilt from the instance's events when
        // it was stored by another state version.
        let none = HashMap::new();
        let context = BatchContext {
            process: &self.inner.process,
            store: &self.inner.store,
            handlers: &self.inner.handlers,
            now: self.inner.config.clock.now(),
            quarantine: &none,
            reactivate: None,
            only: None,
        };
        let state = context.state_of(&record).await.map_err(|err| match err {
            BatchError::Instance { error, .. }
            | BatchError::Transient(error)
            | BatchError::Refused(error)
            | BatchError::Fenced(error) => ProcessError::UnreadableState {
                process: P::NAME,
                id: id.to_owned(),
                error,
            },
        })?;
        Ok(Some(Instance { record, state }))
    }

    /// The timers instance `id` has scheduled.
    pub async fn timers(&self, id: &str) -> Result<Vec<TimerRecord>, ProcessError> {
        self.inner
            .store
            .timers(P::NAME, id)
            .await
            .map_err(|source| self.store_error(source))
    }

    /// The quarantined instances, with their errors and held events.
    pub async fn quarantined(&self) -> Result<Vec<InstanceRecord>, ProcessError> {
        self.inner
            .store
            .instances(P::NAME, InstanceStatus::Quarantined, usize::MAX)
            .await
            .map_err(|source| self.store_error(source))
    }

    /// Brings quarantined instance `id` back: handles its held events in order, in one
    /// transaction. If it fails again, nothing changes and the error is returned.
    pub async fn retry(&self, id: &str) -> Result<InstanceRecord, ProcessError> {
        let record = self.quarantined_record(id).await?;
        let mut stored = Vec::new();
        for &position in &record.held {
            let events = read_at(self.inner.store.log(), position)
                .await
                .map_err(|message| ProcessError::Stuck {
                    process: P::NAME,
                    message,
                })?;
            stored.extend(events);
        }
        let mut pending = Vec::new();
        for event in &stored {
            let decoded = P::Events::decode(event).map_err(|e| ProcessError::RetryFailed {
                process: P::NAME,
                id: id.to_owned(),
                error: e.to_string(),
            })?;
            if let Some(decoded) = decoded {
                pending.push(Pending::Event {
                    event: ProjectedEvent {
                        event: decoded,
                        envelope: event,
                    },
                    route: super::Route::Continue(id.to_owned()),
                });
            }
        }
        let commit = CheckpointCommit::nothing(&self.inner.key);
        let none = HashMap::new();
        let counts = self
            .attempt(&pending, &none, Some(id), None, commit)
            .await
            .map_err(|err| ProcessError::RetryFailed {
                process: P::NAME,
                id: id.to_owned(),
                error: match err {
                    BatchError::Instance { error, .. }
                    | BatchError::Transient(error)
                    | BatchError::Refused(error)
                    | BatchError::Fenced(error) => error,
                },
            })?;
        self.record(&counts);
        self.inner
            .store
            .instance(P::NAME, id)
            .await
            .map_err(|source| self.store_error(source))?
            .ok_or(ProcessError::NoInstance {
                process: P::NAME,
                id: id.to_owned(),
            })
    }

    /// Ends quarantined instance `id` without handling its held events: it becomes a
    /// tombstone (`Discarded`), its timers are cancelled.
    pub async fn discard(&self, id: &str) -> Result<(), ProcessError> {
        let mut record = self.quarantined_record(id).await?;
        let previous = record.version;
        record.status = InstanceStatus::Discarded;
        record.version += 1;
        record.held.clear();
        record.updated_at = self.inner.config.clock.now();
        let write = super::ProcessWrite {
            process: P::NAME.to_owned(),
            instances: vec![(record, Some(previous))],
            cancel_all: vec![id.to_owned()],
            ..Default::default()
        };
        let checkpoints = self.inner.store.checkpoints();
        let mut tx = checkpoints
            .begin()
            .await
            .map_err(|e| self.store_error(e.into()))?;
        if let Err(err) = self.inner.store.write(&mut tx, write).await {
            checkpoints.rollback(tx).await;
            return Err(self.store_error(err));
        }
        checkpoints
            .commit(tx, CheckpointCommit::nothing(&self.inner.key))
            .await
            .map_err(|e| self.store_error(e.into()))
    }

    async fn quarantined_record(&self, id: &str) -> Result<InstanceRecord, ProcessError> {
        let record = self
            .inner
            .store
            .instance(P::NAME, id)
            .await
            .map_err(|source| self.store_error(source))?
            .ok_or(ProcessError::NoInstance {
                process: P::NAME,
                id: id.to_owned(),
            })?;
        if record.status != InstanceStatus::Quarantined {
            return Err(ProcessError::NotQuarantined {
                process: P::NAME,
                id: id.to_owned(),
                status: record.status,
            });
        }
        Ok(record)
    }

    /// Every readable event of the flow `correlation_id`, in log order: what started it, what
    /// the instance's commands stored, and what followed.
    pub async fn trace(&self, correlation_id: Uuid) -> Result<Vec<RecordedEvent>, ProcessError> {
        self.inner
            .store
            .trace(correlation_id)
            .await
            .map_err(|e| self.store_error(e.into()))
    }

    /// Waits until every event of the flow `correlation_id` committed so far has been handled
    /// by this process manager, or `timeout` passes: read-your-writes for a flow. After it,
    /// the instance's state and whatever it sent in reaction are stored, and what those
    /// commands stored has been handled too (it carries the flow's correlation id). Timers
    /// scheduled for later are not waited for.
    pub async fn wait_settled(
        &self,
        correlation_id: Uuid,
        timeout: Duration,
    ) -> Result<(), ProcessError> {
        let checkpoints = self.inner.store.checkpoints();
        let work = async {
            loop {
                let changed = checkpoints.changed();
                // The checkpoints first: what a batch sends commits with its checkpoint, so a
                // head read after them includes the reactions to everything below them.
                let mut position = Position::MAX;
                for key in &self.inner.keys {
                    let at = checkpoints
                        .load(key)
                        .await
                        .map_err(|e| self.store_error(e.into()))?
                        .map_or(Position::START, |c| c.position);
                    position = position.min(at);
                }
                let head = self
                    .inner
                    .store
                    .flow_head(correlation_id)
                    .await
                    .map_err(|e| self.store_error(e.into()))?;
                if head.is_some_and(|head| head <= position) {
                    return Ok(());
                }
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ProcessError::Timeout(timeout))?
    }

    /// Waits until instance `id` exists and `ready` holds for it, or `timeout` passes.
    pub async fn wait_for_instance(
        &self,
        id: &str,
        timeout: Duration,
        mut ready: impl FnMut(&Instance<P::State>) -> bool + Send,
    ) -> Result<Instance<P::State>, ProcessError> {
        let checkpoints = self.inner.store.checkpoints();
        let work = async {
            loop {
                let changed = checkpoints.changed();
                if let Some(instance) = self.instance(id).await?
                    && ready(&instance)
                {
                    return Ok(instance);
                }
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ProcessError::Timeout(timeout))?
    }
}

/// The failures of one step's batch so far: which instances failed how often, which are to be
/// quarantined, how many failures no instance was to blame for.
#[derive(Default)]
struct Retries {
    quarantine: HashMap<String, String>,
    attempts: HashMap<String, u32>,
    transient: u32,
}

impl Retries {
    /// Counts `failure` and waits before the batch is decided again, or quarantines the
    /// instance at fault after its last attempt; a batch failing too often for no instance's
    /// fault is `Stuck`.
    async fn failed<P: ProcessManager, S: ProcessStore>(
        &mut self,
        runner: &ProcessRunner<P, S>,
        failure: BatchError,
    ) -> Result<(), ProcessError> {
        let config = &runner.inner.config;
        match failure {
            BatchError::Instance { id, error } => {
                let tried = self.attempts.entry(id.clone()).or_default();
                *tried += 1;
                tracing::warn!(process = P::NAME, instance = %id, attempt = *tried, %error, "instance failed");
                runner.retried(&error);
                if *tried >= config.max_attempts {
                    tracing::error!(process = P::NAME, instance = %id, %error, "instance quarantined");
                    self.quarantine.insert(id, error);
                } else {
                    tokio::time::sleep(config.backoff.wait(*tried)).await;
                }
            }
            BatchError::Fenced(message) => {
                tracing::warn!(process = P::NAME, %message, "another runner took the lease; standing by");
                return Err(ProcessError::Fenced { process: P::NAME });
            }
            BatchError::Transient(message) | BatchError::Refused(message) => {
                self.transient += 1;
                runner.retried(&message);
                if self.transient >= config.max_transient {
                    return Err(ProcessError::Stuck {
                        process: P::NAME,
                        message,
                    });
                }
                tracing::debug!(process = P::NAME, %message, "batch retried");
                tokio::time::sleep(config.backoff.wait(self.transient.min(6))).await;
            }
        }
        Ok(())
    }
}

fn is_transient(err: &ProcessError) -> bool {
    match err {
        ProcessError::Store { source, .. } => source.is_transient(),
        ProcessError::Stuck { .. } => true,
        _ => false,
    }
}

async fn wait_or_stop(stopped: &mut watch::Receiver<bool>, wait: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = stopped.changed() => {}
    }
}

async fn clock_moved(moved: &mut Option<watch::Receiver<()>>) {
    match moved {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

impl<P, S> std::fmt::Debug for ProcessRunner<P, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRunner")
            .field("key", &self.inner.key)
            .finish_non_exhaustive()
    }
}

impl<P, S> std::fmt::Debug for ProcessRunnerBuilder<P, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRunnerBuilder")
            .field("handlers", &self.handlers.types())
            .finish_non_exhaustive()
    }
}
