//! The [`Publisher`]: the global log, followed and sent to a broker, with a checkpoint that
//! never passes a message the broker has not acknowledged.

use std::{sync::Arc, time::Duration};

use futures_util::future::join_all;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    GlobalLog, InvalidPartition, LogPartition, Position, RecordedEvent, StoreError, StreamId,
    projection::{
        CheckpointError, CheckpointStore, Interest, InvalidProjectionKey, LeaseStore,
        ProjectionKey, ProjectionStatus,
        balance::{Balancer, Resumed, Session, SessionError, resume_in_count},
        runner::{StatusError, partition_status},
    },
};

use super::{
    Backoff, CloudEvent, MessageSink, SinkError, Transform,
    pump::{Cursor, Go, Lane, SCAN_COMMIT_INTERVAL},
    status::{Board, PublisherStatus},
};

/// The default number of events a publisher reads per batch.
pub const DEFAULT_PUBLISH_BATCH_SIZE: usize = 500;

/// The default number of streams with a message in flight at once.
pub const DEFAULT_STREAMS_IN_FLIGHT: usize = 64;

/// Why a publisher stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The event store failed.
    #[error("publisher `{name}`: reading the log failed: {source}")]
    Store {
        /// The publisher.
        name: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The checkpoint store failed.
    #[error("publisher `{name}`: its checkpoint failed: {source}")]
    Checkpoint {
        /// The publisher.
        name: String,
        /// The checkpoint store's error.
        #[source]
        source: CheckpointError,
    },
    /// The broker refused a message; the checkpoint stays before it.
    #[error(
        "publisher `{name}`: the broker refused the message of version {stream_version} of stream `{stream}` (position {position}): {source}"
    )]
    Refused {
        /// The publisher.
        name: String,
        /// The event's stream.
        stream: StreamId,
        /// The event's version.
        stream_version: u64,
        /// The event's position.
        position: Position,
        /// The sink's error.
        #[source]
        source: SinkError,
    },
    /// Another publisher of the same name holds the lease.
    #[error("publisher `{name}` is already running elsewhere (its lease is held)")]
    LeaseHeld {
        /// The publisher.
        name: String,
    },
    /// The name is not a valid projection key name.
    #[error(transparent)]
    InvalidName(#[from] InvalidProjectionKey),
    /// The number of partitions is out of range.
    #[error("publisher: {0}")]
    InvalidPartitions(#[from] InvalidPartition),
}

impl PublishError {
    /// Whether another runner took the lease of the partition this runner was publishing
    /// (its commit was refused by the lease's fence).
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            Self::Checkpoint {
                source: CheckpointError::Fenced { .. },
                ..
            }
        )
    }
}

impl SessionError for PublishError {
    fn is_transient(&self) -> bool {
        match self {
            Self::Store { source, .. } => source.is_transient(),
            Self::Checkpoint { source, .. } => source.is_transient(),
            _ => false,
        }
    }
}

/// Follows the global log and sends every event it is interested in to a [`MessageSink`] as a
/// CloudEvent, checkpointed under its own name.
///
/// Guarantees:
/// - **Nothing skipped.** It reads the never-skip global log, and moves its checkpoint only to
///   the highest position up to which every message was acknowledged by the broker. A crash or
///   a kill at any point sends again at most what came after the checkpoint.
/// - **Order per stream.** At most one message per stream is in flight; a stream's next message
///   is sent only once the previous one was acknowledged, so a stream's events reach the broker
///   in version order. Different streams are sent concurrently.
/// - **Stable ids.** Every message's id is the event id (the n-th extra message of a fanned-out
///   event: UUIDv5 of the event id and n), so brokers and consumers can deduplicate resends.
/// - **One active publisher per partition**, by the checkpoint store's lease, and **fenced**:
///   every checkpoint commit carries the lease's fencing token, so a publisher that lost its
///   lease without noticing (paused, cut off) can never move the checkpoint again.
/// - **An unreachable broker** is retried with exponential backoff ([`Backoff`]), without a
///   busy loop; the publisher resumes from its checkpoint.
/// - **Partitions** ([`Publisher::partitions`]): split by stream, spread over every runner of
///   the publisher in any process, each partition reading only its own events. Order per
///   stream holds across hand-overs: a partition changes hands only at a commit, and its new
///   holder starts from that checkpoint.
pub struct Publisher<S, C, K> {
    pub(super) store: S,
    pub(super) checkpoints: C,
    pub(super) sink: K,
    pub(super) key: ProjectionKey,
    pub(super) source: String,
    pub(super) subject_prefix: String,
    pub(super) subject: Option<SubjectFn>,
    pub(super) interest: Interest,
    pub(super) transform: Option<Transform>,
    pub(super) batch_size: usize,
    pub(super) streams_in_flight: usize,
    pub(super) backoff: Backoff,
    partitions: u16,
    member: Arc<str>,
    rebalance_interval: Duration,
    pub(super) board: Arc<Board>,
}

/// Chooses an event's subject (NATS) or routing key (AMQP).
pub type SubjectFn = Arc<dyn Fn(&RecordedEvent) -> String + Send + Sync>;

impl<S, C, K> std::fmt::Debug for Publisher<S, C, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("key", &self.key)
            .field("source", &self.source)
            .field("subject_prefix", &self.subject_prefix)
            .field("interest", &self.interest)
            .field("batch_size", &self.batch_size)
            .field("streams_in_flight", &self.streams_in_flight)
            .field("partitions", &self.partitions)
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl<S, C, K> Publisher<S, C, K>
where
    S: GlobalLog,
    C: CheckpointStore + LeaseStore,
    K: MessageSink,
{
    /// A publisher named `name` (its checkpoint and lease are kept under it) whose messages say
    /// they come from `source` (the CloudEvents `source`, a URI reference such as `/bank`).
    /// Subjects are `esframe.{aggregate type}.{event type}` until [`Publisher::subject_prefix`]
    /// says otherwise.
    pub fn new(
        store: S,
        checkpoints: C,
        sink: K,
        name: &str,
        source: &str,
    ) -> Result<Self, PublishError> {
        Ok(Self {
            store,
            checkpoints,
            sink,
            key: ProjectionKey::single(name)?,
            source: source.to_owned(),
            subject_prefix: "esframe".to_owned(),
            subject: None,
            interest: Interest::all(),
            transform: None,
            batch_size: DEFAULT_PUBLISH_BATCH_SIZE,
            streams_in_flight: DEFAULT_STREAMS_IN_FLIGHT,
            backoff: Backoff::default(),
            partitions: 1,
            member: crate::projection::balance::new_member_name(),
            rebalance_interval: Duration::from_secs(1),
            board: Arc::default(),
        })
    }

    /// Splits the publisher into `count` partitions by stream (default 1: unsplit), 1 to
    /// [`MAX_PARTITIONS`](crate::MAX_PARTITIONS), each with its own checkpoint, fenced lease
    /// and read of the log (only its own events). Every runner of the publisher, in this
    /// process or others, takes a fair share of them, hands extras back at a batch boundary
    /// and takes over the partitions of a runner that died once their leases expire.
    ///
    /// The count is stored with the publisher. A runner with another count waits until it can
    /// hold every partition of both counts (the runners with the old count stopped), then
    /// starts every new partition from the lowest old checkpoint: nothing is skipped, and
    /// what is sent again carries the same message ids, for brokers and inboxes to drop.
    #[must_use]
    pub fn partitions(mut self, count: u16) -> Self {
        self.partitions = count;
        self
    }

    /// This runner's name among the runners of a partitioned publisher (default: the host
    /// name, the process id and a random suffix).
    #[must_use]
    pub fn member_name(mut self, name: impl Into<String>) -> Self {
        self.member = Arc::from(name.into());
        self
    }

    /// How often a runner of a partitioned publisher renews its membership and rebalances
    /// (default 1 s). A lease about to lapse is looked at again as it lapses, so a runner that
    /// dies is replaced within the lease store's lease time. Rounds come at least three times
    /// per membership lifetime of the lease store, whatever the interval (PostgreSQL: two
    /// thirds of the lease time).
    #[must_use]
    pub fn rebalance_interval(mut self, interval: Duration) -> Self {
        self.rebalance_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Only the events this interest lets through leave (by aggregate type, event type).
    #[must_use]
    pub fn interest(mut self, interest: Interest) -> Self {
        self.interest = interest;
        self
    }

    /// Subjects become `{prefix}.{aggregate type}.{event type}`.
    #[must_use]
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subject_prefix = prefix.into();
        self
    }

    /// Chooses each event's subject (routing key) instead of
    /// `{prefix}.{aggregate type}.{event type}`. Every message of one event goes to its subject.
    #[must_use]
    pub fn subject(
        mut self,
        subject: impl Fn(&RecordedEvent) -> String + Send + Sync + 'static,
    ) -> Self {
        self.subject = Some(Arc::new(subject));
        self
    }

    /// Maps each event's CloudEvent to the messages that leave: none drops the event, one
    /// changes it (hide internal fields in `data`), several fan it out. Fanned-out messages
    /// share the event's stream and version, and an inbox applies one message per stream and
    /// version: send them to different consumers, not several to one.
    #[must_use]
    pub fn transform(
        mut self,
        transform: impl Fn(&RecordedEvent, CloudEvent) -> Vec<CloudEvent> + Send + Sync + 'static,
    ) -> Self {
        self.transform = Some(Arc::new(transform));
        self
    }

    /// Events read per batch (default [`DEFAULT_PUBLISH_BATCH_SIZE`]).
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// Streams with a message in flight at once (default [`DEFAULT_STREAMS_IN_FLIGHT`]).
    #[must_use]
    pub fn streams_in_flight(mut self, streams: usize) -> Self {
        self.streams_in_flight = streams.max(1);
        self
    }

    /// How long to wait before sending a failed message again.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The publisher's checkpoint key.
    pub fn key(&self) -> &ProjectionKey {
        &self.key
    }

    /// The publisher's state (this runner's view of the partitions it holds).
    pub fn status(&self) -> PublisherStatus {
        self.board.snapshot()
    }

    /// The state of every partition of the publisher, read from the stores (any process can
    /// ask; no lease is taken): its holder and lease time left, checkpoint, lag in events
    /// (counted in the partition) and in time (the age of the oldest event it has not sent),
    /// and the last error its runners recorded. `dead_letters` is always 0: a publisher parks
    /// nothing.
    pub async fn partition_status(&self) -> Result<ProjectionStatus, PublishError> {
        let leases = self
            .checkpoints
            .leases(self.key.name())
            .await
            .map_err(|source| self.checkpoint_error(source))?;
        let mut partitions = Vec::new();
        for lane in self.lanes()? {
            let status = partition_status(
                &self.store,
                &self.checkpoints,
                lane.key.clone(),
                lane.partition,
                &leases,
            )
            .await
            .map_err(|err| match err {
                StatusError::Checkpoint(source) => self.checkpoint_error(source),
                StatusError::Store(source) => self.store_error(source),
            })?;
            partitions.push(status);
        }
        Ok(ProjectionStatus { partitions })
    }

    /// Publishes everything stored so far, in every partition at once, retrying an
    /// unreachable broker with backoff, and returns the lowest checkpoint reached. Fails at
    /// once if another runner of the publisher holds a lease, and on a message the broker
    /// refuses.
    pub async fn catch_up(&self) -> Result<Position, PublishError> {
        self.settle_partition_count(Duration::ZERO).await?;
        let lanes = self.lanes()?;
        let mut leases = Vec::new();
        for lane in &lanes {
            match self.lease_now(lane).await {
                Ok(lease) => leases.push(lease),
                Err(err) => {
                    self.release_all(leases).await;
                    return Err(err);
                }
            }
        }
        let reached = join_all(
            lanes
                .iter()
                .zip(&leases)
                .map(|(lane, lease)| self.publish_until_head(lane, lease)),
        )
        .await;
        self.release_all(leases).await;
        let mut lowest: Option<Position> = None;
        for position in reached {
            let position = position?;
            lowest = Some(lowest.map_or(position, |l| l.min(position)));
        }
        Ok(lowest.unwrap_or(Position::START))
    }

    /// Runs the publisher on a Tokio task until [`RunningPublisher::shutdown`] (or the
    /// [`RunningPublisher`] is dropped): it waits for
    /// the lease, then publishes and follows the log; an unreachable broker or a refused message
    /// is retried with backoff (a refusal is reported in the status until it passes). A
    /// partitioned publisher runs this runner's share of the partitions, rebalancing as other
    /// runners come and go.
    pub fn spawn(self) -> RunningPublisher {
        let (stop, stopped) = watch::channel(false);
        let board = Arc::clone(&self.board);
        let this = Arc::new(self);
        let task = tokio::spawn(async move { this.run(stopped).await });
        RunningPublisher { stop, task, board }
    }

    /// Every partition, by index.
    fn lanes(&self) -> Result<Vec<Lane>, PublishError> {
        LogPartition::new(0, self.partitions)?;
        (0..self.partitions)
            .map(|index| {
                Ok(Lane {
                    key: ProjectionKey::new(self.key.name(), index)?,
                    partition: LogPartition::new(index, self.partitions)?,
                })
            })
            .collect()
    }

    async fn lease_now(&self, lane: &Lane) -> Result<C::Lease, PublishError> {
        match self.checkpoints.try_lease(&lane.key).await {
            Ok(Some(lease)) => Ok(lease),
            Ok(None) => Err(PublishError::LeaseHeld {
                name: self.key.name().to_owned(),
            }),
            Err(source) => Err(self.checkpoint_error(source)),
        }
    }

    async fn release_all(&self, leases: Vec<C::Lease>) {
        join_all(leases.into_iter().map(|l| self.checkpoints.release(l))).await;
    }

    /// Makes the stored partition count this runner's ([`resume_in_count`]): when another
    /// count is stored, waits up to `wait` for every lease of both counts, and starts every new
    /// partition from the lowest old checkpoint, in one commit. Fails with
    /// [`PublishError::LeaseHeld`] when a lease stays held.
    async fn settle_partition_count(&self, wait: Duration) -> Result<(), PublishError> {
        let count = self.lanes()?.len() as u16;
        match resume_in_count(&self.checkpoints, &self.key, count, wait).await {
            Ok(Resumed::Unchanged) => Ok(()),
            Ok(Resumed::Changed { from, at }) => {
                tracing::info!(
                    publisher = self.key.name(),
                    from,
                    to = count,
                    position = %at,
                    "the number of partitions changed; every partition starts from the lowest old checkpoint"
                );
                Ok(())
            }
            Ok(Resumed::Busy) => Err(PublishError::LeaseHeld {
                name: self.key.name().to_owned(),
            }),
            Err(source) => Err(self.checkpoint_error(source)),
        }
    }

    async fn publish_until_head(
        &self,
        lane: &Lane,
        lease: &C::Lease,
    ) -> Result<Position, PublishError> {
        let head = self
            .store
            .head_position()
            .await
            .map_err(|source| self.store_error(source))?;
        let mut cursor = Cursor::new(self.checkpoints.fence(lease), Duration::ZERO);
        loop {
            self.pump(lane, &mut cursor, &|| Go::On).await?;
            if cursor.committed() >= head {
                return Ok(cursor.committed());
            }
            // The head is not readable yet (an older transaction is still open).
            self.store
                .wait_for_events(cursor.scanned())
                .await
                .map_err(|source| self.store_error(source))?;
        }
    }

    async fn run(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let name = self.key.name().to_owned();
        // The partition count first: a changed one needs every lease, so wait for the
        // runners with the old count to stop.
        let mut attempt = 0u32;
        loop {
            if stopping(&stopped) {
                return;
            }
            match self
                .settle_partition_count(Duration::from_millis(500))
                .await
            {
                Ok(()) => break,
                Err(PublishError::LeaseHeld { .. }) => {
                    tracing::info!(publisher = %name, "the number of partitions changed, but another runner holds a partition; waiting for it to stop");
                    wait_or_stop(&mut stopped, self.rebalance_interval).await;
                }
                Err(err) => {
                    attempt += 1;
                    tracing::warn!(publisher = %name, error = %err, "cannot check the publisher's partitions; retrying");
                    self.note_failure(err.to_string(), false);
                    wait_or_stop(&mut stopped, self.backoff.wait(attempt)).await;
                }
            }
        }
        let lanes = match self.lanes() {
            Ok(lanes) => lanes,
            Err(err) => {
                tracing::error!(publisher = %name, error = %err, "publisher cannot start");
                self.note_failure(err.to_string(), false);
                return;
            }
        };
        if lanes.len() == 1 {
            return self.run_unsplit(&lanes[0], stopped).await;
        }
        let mut attempt = 0u32;
        while !stopping(&stopped) {
            let balancer = Balancer {
                leases: &self.checkpoints,
                group: &name,
                partitions: &lanes.iter().map(|l| l.key.clone()).collect::<Vec<_>>(),
                member: &self.member,
                interval: self.rebalance_interval,
            };
            let started = balancer
                .run(
                    stopped.clone(),
                    |index, lease| self.start_session(lanes[usize::from(index)].clone(), lease),
                    |source| self.checkpoint_error(source),
                )
                .await;
            if let Err(err) = started {
                attempt += 1;
                tracing::warn!(publisher = %name, error = %err, "publisher's partitions stopped; starting again");
                self.note_failure(err.to_string(), false);
                wait_or_stop(&mut stopped, self.backoff.wait(attempt)).await;
            }
        }
    }

    /// An unsplit publisher: one lease, waited for as a standby.
    async fn run_unsplit(&self, lane: &Lane, mut stopped: watch::Receiver<bool>) {
        let name = self.key.name().to_owned();
        loop {
            let lease = loop {
                if stopping(&stopped) {
                    return;
                }
                match self
                    .checkpoints
                    .wait_lease(&lane.key, Duration::from_millis(500))
                    .await
                {
                    Ok(Some(lease)) => break lease,
                    Ok(None) => {}
                    Err(err) => {
                        tracing::warn!(publisher = %name, error = %err, "cannot take the publisher's lease");
                        // The checkpoint store failed, not the broker.
                        self.note_failure(err.to_string(), false);
                        wait_or_stop(&mut stopped, self.backoff.max).await;
                    }
                }
            };
            let stopped_on_request = self.session(lane, &lease, &mut stopped).await;
            self.checkpoints.release(lease).await;
            if stopped_on_request {
                return;
            }
        }
    }

    /// Starts partition `lane`'s session on a task of its own, with its lease.
    fn start_session(self: &Arc<Self>, lane: Lane, lease: C::Lease) -> Session<PublishError> {
        let (stop, mut stopped) = watch::channel(false);
        let this = Arc::clone(self);
        let task = tokio::spawn(async move {
            this.session(&lane, &lease, &mut stopped).await;
            this.checkpoints.release(lease).await;
            Ok(())
        });
        Session { stop, task }
    }

    /// Publishes `lane` while holding `lease`: until asked to stop (`true`) or the lease is
    /// lost (`false`; a fenced commit says so too). Failures are retried with backoff.
    async fn session(
        &self,
        lane: &Lane,
        lease: &C::Lease,
        stopped: &mut watch::Receiver<bool>,
    ) -> bool {
        let name = self.key.name().to_owned();
        let index = lane.index();
        self.board.lane(index, |l| l.held = true);
        tracing::info!(publisher = %name, partition = index, "publisher active");
        let mut cursor = Cursor::new(self.checkpoints.fence(lease), SCAN_COMMIT_INTERVAL);
        let mut attempt = 0u32;
        let stopped_on_request = loop {
            if stopping(stopped) {
                break true;
            }
            if !self.checkpoints.lease_held(lease) {
                tracing::warn!(publisher = %name, partition = index, "publisher lost its lease; standing by");
                break false;
            }
            let go = || {
                if !self.checkpoints.lease_held(lease) {
                    Go::Abandon
                } else if stopping(stopped) {
                    Go::HandOver
                } else {
                    Go::On
                }
            };
            let wait = match self.pump(lane, &mut cursor, &go).await {
                Ok(()) => {
                    attempt = 0;
                    if go() == Go::On {
                        let woken = self.store.wait_for_events(cursor.scanned());
                        // Progress past other partitions' events waits for its commit.
                        let commit_due = async {
                            if cursor.uncommitted() {
                                tokio::time::sleep(SCAN_COMMIT_INTERVAL).await;
                            } else {
                                std::future::pending::<()>().await;
                            }
                        };
                        tokio::select! {
                            _ = woken => {}
                            () = commit_due => {}
                            _ = stopped.changed() => {}
                        }
                    }
                    None
                }
                Err(err) if err.is_fenced() => {
                    self.board.counters(|c| c.fenced += 1);
                    tracing::warn!(publisher = %name, partition = index, error = %err, "publisher's commit refused by the lease's fence; standing by");
                    break false;
                }
                Err(err) => {
                    attempt += 1;
                    tracing::warn!(publisher = %name, partition = index, error = %err, "publisher failed; retrying");
                    if matches!(err, PublishError::Refused { .. }) {
                        // `send_event` counted this failure already; keep the fuller text.
                        self.board
                            .counters(|c| c.last_error = Some(err.to_string()));
                    } else {
                        self.note_failure(err.to_string(), false);
                    }
                    // Read again from the stored checkpoint.
                    cursor = Cursor::new(self.checkpoints.fence(lease), SCAN_COMMIT_INTERVAL);
                    Some(self.backoff.wait(attempt))
                }
            };
            if let Some(wait) = wait {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stopped.changed() => {}
                }
            }
        };
        self.board.lane(index, |l| l.held = false);
        stopped_on_request
    }

    pub(super) fn note_failure(&self, error: String, unreachable: bool) {
        self.board.counters(|c| {
            c.failures += 1;
            c.last_error = Some(error);
            if unreachable {
                c.unreachable = true;
            }
        });
    }

    pub(super) fn store_error(&self, source: StoreError) -> PublishError {
        PublishError::Store {
            name: self.key.name().to_owned(),
            source,
        }
    }

    pub(super) fn checkpoint_error(&self, source: CheckpointError) -> PublishError {
        PublishError::Checkpoint {
            name: self.key.name().to_owned(),
            source,
        }
    }
}

/// Whether the publisher is asked to stop: by [`RunningPublisher::shutdown`], or by the
/// [`RunningPublisher`] being dropped. A closed channel must count, or every wait on
/// `stopped.changed()` would return at once and the publisher spin.
fn stopping(stopped: &watch::Receiver<bool>) -> bool {
    *stopped.borrow() || stopped.has_changed().is_err()
}

async fn wait_or_stop(stopped: &mut watch::Receiver<bool>, wait: Duration) {
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        _ = stopped.changed() => {}
    }
}

/// A publisher running on its own task. Dropping it asks the publisher to stop at the next
/// batch boundary, as [`RunningPublisher::shutdown`] does, without waiting for it.
#[derive(Debug)]
pub struct RunningPublisher {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    board: Arc<Board>,
}

impl RunningPublisher {
    /// The publisher's state.
    pub fn status(&self) -> PublisherStatus {
        self.board.snapshot()
    }

    /// Stops at the next batch boundary and releases the lease.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops at once, as a crash would (the task is aborted).
    pub fn abort(self) {
        self.task.abort();
    }
}
