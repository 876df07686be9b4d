//! The publisher's pipeline for one partition (the whole log when unsplit): read ahead, send
//! with at most one message in flight per stream, checkpoint the acknowledged prefix.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    future::Future,
    pin::Pin,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use futures_util::{StreamExt, stream::FuturesUnordered};
use uuid::Uuid;

use crate::{
    GlobalBatch, GlobalLog, LogPartition, Position, RecordedEvent, StoreError, StreamId,
    projection::{Checkpoint, CheckpointCommit, CheckpointStore, LeaseStore, ProjectionKey},
};

use super::{
    CloudEvent, MessageSink, OutgoingMessage, PublishError, Publisher, SinkError, sink::subject_for,
};

/// How long a partition that only scanned past other partitions' events waits before it
/// checkpoints that: its read position moves with every append to the log, and a commit per
/// append per partition would cost more than the read.
pub(super) const SCAN_COMMIT_INTERVAL: Duration = Duration::from_millis(200);

/// Whether a pump goes on, and how it ends when not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Go {
    /// Keep reading and sending.
    On,
    /// Asked to stop (a hand-over, a shutdown): read nothing more, but send what was read up
    /// to the last acknowledged message, so the checkpoint passes every message sent and the
    /// next holder sends none of them again.
    HandOver,
    /// The lease is gone: let what is in flight finish, commit what is contiguous (the fence
    /// refuses it if the partition changed hands) and stop.
    Abandon,
}

/// One partition of a publisher: its checkpoint key and the part of the log it reads.
#[derive(Debug, Clone)]
pub(super) struct Lane {
    pub(super) key: ProjectionKey,
    pub(super) partition: LogPartition,
}

impl Lane {
    pub(super) fn index(&self) -> u16 {
        self.key.partition()
    }
}

/// Where a partition's session is: its stored checkpoint and how far it has read.
#[derive(Debug)]
pub(super) struct Cursor {
    /// The stored checkpoint (`None`: never committed); `None` until loaded.
    stored: Option<Option<Checkpoint>>,
    committed: Position,
    /// Read up to here (past other partitions' events); at or after `committed`.
    scanned: Position,
    last_commit: Instant,
    /// How long scan-only progress may wait for its commit (zero: commit at once).
    scan_commit_every: Duration,
    /// The lease's fencing token, carried by every commit.
    fence: Option<u64>,
}

impl Cursor {
    pub(super) fn new(fence: Option<u64>, scan_commit_every: Duration) -> Self {
        Self {
            stored: None,
            committed: Position::START,
            scanned: Position::START,
            last_commit: Instant::now(),
            scan_commit_every,
            fence,
        }
    }

    /// The checkpoint: every event of the partition at or before it reached the broker.
    pub(super) fn committed(&self) -> Position {
        self.committed
    }

    /// How far the partition has read; new events are waited for after it.
    pub(super) fn scanned(&self) -> Position {
        self.scanned
    }

    /// Whether read progress is waiting for a commit (a session wakes up to commit it).
    pub(super) fn uncommitted(&self) -> bool {
        self.scanned > self.committed
    }
}

/// Events read and not yet checkpointed, in log order: position → (acknowledged, recorded at;
/// `None` for a position only scanned past).
type Pending = BTreeMap<Position, (bool, Option<DateTime<Utc>>)>;

/// The next batch of a partition, being read.
type ReadFuture<'a> = Pin<Box<dyn Future<Output = Result<GlobalBatch, StoreError>> + Send + 'a>>;

/// A checkpoint move being committed, handing its plan back once it is.
type CommitFuture<'a> = Pin<Box<dyn Future<Output = Result<CommitPlan, PublishError>> + Send + 'a>>;

/// A checkpoint move past the acknowledged prefix of what is pending.
struct CommitPlan {
    /// The new checkpoint's position: every event of the partition up to it is acknowledged.
    reached: Position,
    from: Option<Checkpoint>,
    to: Checkpoint,
    fence: Option<u64>,
}

impl CommitPlan {
    /// The move past the acknowledged prefix of `pending`, if it grew. A prefix that is only
    /// positions scanned past waits for the cursor's scan interval unless `force`d.
    fn of(pending: &Pending, cursor: &Cursor, force: bool) -> Option<Self> {
        let mut reached = cursor.committed;
        let mut events = false;
        for (&position, &(done, at)) in pending {
            if !done {
                break;
            }
            reached = position;
            events |= at.is_some();
        }
        if reached <= cursor.committed
            || (!events && !force && cursor.last_commit.elapsed() < cursor.scan_commit_every)
        {
            return None;
        }
        Some(Self {
            reached,
            from: cursor.stored.flatten(),
            to: Checkpoint {
                position: reached,
                version: 1,
                replay_until: None,
            },
            fence: cursor.fence,
        })
    }

    /// The move is committed: what it passed is no longer pending (positions read since the
    /// plan was made are all after it).
    fn applied(self, pending: &mut Pending, cursor: &mut Cursor) {
        while pending
            .first_key_value()
            .is_some_and(|(&position, _)| position <= self.reached)
        {
            pending.pop_first();
        }
        cursor.stored = Some(Some(self.to));
        cursor.committed = self.reached;
        cursor.last_commit = Instant::now();
    }
}

/// A job on its way to the broker, handing the job back with the outcome.
type JobFuture<'a> = Pin<Box<dyn Future<Output = (Job, Result<(), SinkError>)> + Send + 'a>>;

/// One event's messages, waiting for (or on) the broker.
struct Job {
    /// Its stream's queue ([`Queues`]).
    queue: usize,
    position: Position,
    messages: Vec<OutgoingMessage>,
    attempt: u32,
}

impl Job {
    fn stream(&self) -> &StreamId {
        &self.messages[0].stream_id
    }
}

/// The events read and not yet sent, a queue per stream; each stream id is copied once per
/// pump, not per event.
#[derive(Default)]
struct Queues {
    index: HashMap<StreamId, usize, foldhash::fast::RandomState>,
    /// Per stream: its jobs in version order, and whether one is with the broker.
    queues: Vec<(VecDeque<Job>, bool)>,
    /// Streams whose next job can go: not busy, not empty (checked again when taken).
    ready: VecDeque<usize>,
}

impl Queues {
    /// Queues `messages` (not empty) of the event at `position` behind its stream's.
    fn push(&mut self, position: Position, messages: Vec<OutgoingMessage>) {
        let stream = &messages[0].stream_id;
        let queue = match self.index.get(stream) {
            Some(&queue) => queue,
            None => {
                self.queues.push((VecDeque::new(), false));
                let queue = self.queues.len() - 1;
                self.index.insert(stream.clone(), queue);
                queue
            }
        };
        let (jobs, busy) = &mut self.queues[queue];
        if jobs.is_empty() && !*busy {
            self.ready.push_back(queue);
        }
        jobs.push_back(Job {
            queue,
            position,
            messages,
            attempt: 0,
        });
    }

    /// The job `job` came back: its stream is free again, with `job` first if it is to be
    /// sent again.
    fn returned(&mut self, job: Option<Job>, queue: usize) {
        let (jobs, busy) = &mut self.queues[queue];
        *busy = false;
        if let Some(job) = job {
            jobs.push_front(job);
        }
        if !jobs.is_empty() {
            self.ready.push_back(queue);
        }
    }
}

impl<S, C, K> Publisher<S, C, K>
where
    S: GlobalLog,
    C: CheckpointStore + LeaseStore,
    K: MessageSink,
{
    /// Sends everything readable in `lane` after the cursor, as a pipeline: batches are read
    /// ahead (up to four batches of events not yet acknowledged) while messages are in flight,
    /// each stream has at most one message in flight, and the checkpoint follows the highest
    /// position up to which every event was acknowledged, committed every 20 ms or so, also
    /// while messages are in flight. An unreachable broker is retried per message with backoff,
    /// holding back only its stream. Returns once nothing readable is left, or once `go` said
    /// stop and the pipeline ended as [`Go`] says; a refusal stops reading, lets the messages
    /// in flight finish, commits what is contiguous and fails.
    pub(super) async fn pump(
        &self,
        lane: &Lane,
        cursor: &mut Cursor,
        go: &(dyn Fn() -> Go + Sync),
    ) -> Result<(), PublishError> {
        if cursor.stored.is_none() {
            let stored = self
                .checkpoints
                .load(&lane.key)
                .await
                .map_err(|source| self.checkpoint_error(source))?;
            let at = stored.map_or(Position::START, |c| c.position);
            cursor.stored = Some(stored);
            cursor.committed = at;
            cursor.scanned = at;
        }
        let mut read_to = cursor.scanned;
        let mut exhausted = false;
        let mut pending = Pending::new();
        if cursor.uncommitted() {
            pending.insert(cursor.scanned, (true, None));
        }
        let mut queues = Queues::default();
        let mut inflight = FuturesUnordered::new();
        // The next batch, read while the messages of the last ones are with the broker.
        let mut reading: Option<ReadFuture<'_>> = None;
        // A checkpoint move, committed while messages are with the broker.
        let mut committing: Option<CommitFuture<'_>> = None;
        let mut refused: Option<(Job, SinkError)> = None;
        // Asked to stop (see `Go`): nothing more is read; what is sent is what `Go` says.
        let mut draining = false;
        let mut abandon = false;
        // The highest position the broker acknowledged: a hand-over sends what is below it.
        let mut highest_acked = Position::START;
        let mut last_commit = Instant::now();
        let max_pending = self.batch_size.saturating_mul(4);
        self.board
            .lane(lane.index(), |l| l.position = cursor.committed);
        loop {
            if reading.is_none()
                && !exhausted
                && !draining
                && !abandon
                && refused.is_none()
                && pending.len() < max_pending
            {
                reading = Some(Box::pin(self.store.read_partition_batch(
                    read_to,
                    self.batch_size,
                    lane.partition,
                )));
            }
            if refused.is_none() && !abandon {
                // Streams a hand-over holds back for now: a later acknowledgement may raise
                // `highest_acked` past their next message.
                let mut held_back = Vec::new();
                while inflight.len() < self.streams_in_flight {
                    let Some(queue) = queues.ready.pop_front() else {
                        break;
                    };
                    let (jobs, busy) = &mut queues.queues[queue];
                    if draining && jobs.front().is_some_and(|job| job.position > highest_acked) {
                        // Not needed (yet) for the checkpoint to pass every message sent.
                        held_back.push(queue);
                        continue;
                    }
                    let Some(job) = jobs.pop_front() else {
                        continue;
                    };
                    *busy = true;
                    inflight.push(self.send_job(job));
                }
                queues.ready.extend(held_back);
            }
            if inflight.is_empty() && reading.is_none() {
                if let Some(commit) = committing.take() {
                    let plan = commit.await?;
                    plan.applied(&mut pending, cursor);
                }
                let caught_up = (exhausted && queues.ready.is_empty()) || refused.is_some();
                let stopping = draining || abandon || go() != Go::On;
                if caught_up || stopping {
                    // A partition given up commits everything it read, for its next holder.
                    self.commit_contiguous(lane, &mut pending, cursor, stopping)
                        .await?;
                    self.report(lane, &pending, cursor.committed);
                    if let Some((job, source)) = refused {
                        return Err(PublishError::Refused {
                            name: self.key.name().to_owned(),
                            stream: job.stream().clone(),
                            stream_version: job.messages[0].stream_version,
                            position: job.position,
                            source,
                        });
                    }
                    if caught_up {
                        // Everything readable is acknowledged: nothing is behind.
                        self.board.lane(lane.index(), |l| l.behind = Some(0));
                        self.board.counters(|c| {
                            c.last_error = None;
                            c.unreachable = false;
                        });
                    }
                    return Ok(());
                }
                // Nothing in flight and more to read: make room by checkpointing what is
                // acknowledged (or every read event may be done and waiting for a commit).
                self.commit_contiguous(lane, &mut pending, cursor, true)
                    .await?;
                self.report(lane, &pending, cursor.committed);
                continue;
            }
            tokio::select! {
                plan = async { committing.as_mut().expect("a commit").await }, if committing.is_some() => {
                    committing = None;
                    plan?.applied(&mut pending, cursor);
                    self.report(lane, &pending, cursor.committed);
                    self.sample(lane, cursor.committed).await;
                }
                batch = async { reading.as_mut().expect("a read").await }, if reading.is_some() => {
                    reading = None;
                    let batch = batch.map_err(|source| self.store_error(source))?;
                    // Read as a stop was asked for: left for the next holder (or run).
                    if !draining && !abandon {
                        self.queue_batch(lane, batch, &mut read_to, cursor, &mut pending, &mut queues, &mut exhausted);
                    }
                }
                Some((mut job, result)) = inflight.next(), if !inflight.is_empty() => {
                    let queue = job.queue;
                    match result {
                        Ok(()) => {
                            highest_acked = highest_acked.max(job.position);
                            if let Some(slot) = pending.get_mut(&job.position) {
                                slot.0 = true;
                            }
                            queues.returned(None, queue);
                        }
                        Err(err) if err.is_transient() => {
                            // The same message again, after a backoff; its stream waits for it.
                            job.attempt += 1;
                            queues.returned(Some(job), queue);
                        }
                        Err(err) => {
                            // Its stream stays busy: nothing more of it is sent.
                            if refused.is_none() {
                                refused = Some((job, err));
                            }
                        }
                    }
                }
            }
            if committing.is_none()
                && last_commit.elapsed() >= Duration::from_millis(20)
                && let Some(plan) = CommitPlan::of(&pending, cursor, true)
            {
                last_commit = Instant::now();
                committing = Some(Box::pin(async move {
                    self.run_commit(lane, &plan).await.map(|()| plan)
                }));
            }
            match go() {
                Go::On => {}
                Go::HandOver => draining = true,
                Go::Abandon => abandon = true,
            }
        }
    }

    /// Queues the events of `batch`, read after `read_to`, and moves the read position past
    /// it; a batch with nothing new marks the partition `exhausted`.
    #[allow(clippy::too_many_arguments)]
    fn queue_batch(
        &self,
        lane: &Lane,
        batch: GlobalBatch,
        read_to: &mut Position,
        cursor: &mut Cursor,
        pending: &mut Pending,
        queues: &mut Queues,
        exhausted: &mut bool,
    ) {
        if batch.scanned_to == *read_to {
            *exhausted = true;
            return;
        }
        *exhausted = batch.events.len() < self.batch_size;
        for event in &batch.events {
            let messages = self.messages(event);
            let position = event.global_position;
            let done = messages.is_empty();
            pending.insert(position, (done, Some(event.recorded_at)));
            if !done {
                queues.push(position, messages);
            }
        }
        // Events the upcasters retired, or of other partitions: nothing to send, but the
        // checkpoint may pass them.
        pending.entry(batch.scanned_to).or_insert((true, None));
        *read_to = batch.scanned_to;
        cursor.scanned = *read_to;
        self.board
            .lane(lane.index(), |l| l.head = l.head.max(*read_to));
    }

    /// Moves the checkpoint past the acknowledged prefix of `pending`, if it grew. A prefix
    /// that is only positions scanned past waits for the cursor's scan interval unless
    /// `force`d.
    async fn commit_contiguous(
        &self,
        lane: &Lane,
        pending: &mut Pending,
        cursor: &mut Cursor,
        force: bool,
    ) -> Result<(), PublishError> {
        if let Some(plan) = CommitPlan::of(pending, cursor, force) {
            self.run_commit(lane, &plan).await?;
            plan.applied(pending, cursor);
        }
        Ok(())
    }

    /// Commits `plan`'s checkpoint move, fenced by the lease.
    async fn run_commit(&self, lane: &Lane, plan: &CommitPlan) -> Result<(), PublishError> {
        let tx = self
            .checkpoints
            .begin()
            .await
            .map_err(|source| self.checkpoint_error(source))?;
        self.checkpoints
            .commit(
                tx,
                CheckpointCommit::advance(&lane.key, plan.from, plan.to).fenced(plan.fence),
            )
            .await
            .map_err(|source| self.checkpoint_error(source))
    }

    /// The status after a commit: position, what is pending, how old its oldest event is.
    fn report(&self, lane: &Lane, pending: &Pending, position: Position) {
        let waiting = pending.values().filter(|(done, _)| !done).count();
        let oldest = pending
            .values()
            .find_map(|(done, at)| if *done { None } else { *at });
        self.board.lane(lane.index(), |l| {
            l.position = position;
            l.pending = waiting;
            l.lag = oldest.map(age);
        });
    }

    /// Sends one event's messages, after a backoff when it is a retry.
    fn send_job(&self, job: Job) -> JobFuture<'_> {
        Box::pin(async move {
            if job.attempt > 0 {
                tokio::time::sleep(self.backoff.wait(job.attempt)).await;
            }
            let result = self.send_event(&job.messages).await;
            (job, result)
        })
    }

    /// The messages an event leaves as: none if the interest or the transform drops it.
    fn messages(&self, event: &RecordedEvent) -> Vec<OutgoingMessage> {
        if !self.interest.matches(event) {
            return Vec::new();
        }
        let cloud = CloudEvent::from_event(event, event.event_id, &self.source);
        let events = match &self.transform {
            None => vec![cloud],
            Some(transform) => transform(event, cloud),
        };
        let subject = match &self.subject {
            Some(choose) => choose(event),
            None => subject_for(&self.subject_prefix, event),
        };
        events
            .into_iter()
            .enumerate()
            .map(|(n, mut cloud)| {
                let id = if n == 0 {
                    event.event_id
                } else {
                    Uuid::new_v5(&event.event_id, n.to_string().as_bytes())
                };
                cloud.id = id;
                OutgoingMessage {
                    id,
                    subject: subject.clone(),
                    stream_id: event.stream_id.clone(),
                    stream_version: event.stream_version,
                    position: event.global_position,
                    event: cloud,
                }
            })
            .collect()
    }

    async fn send_event(&self, messages: &[OutgoingMessage]) -> Result<(), SinkError> {
        for message in messages {
            match self.sink.publish(message).await {
                Ok(published) => self.board.counters(|c| {
                    c.published += 1;
                    c.duplicates += u64::from(published.duplicate);
                    c.unreachable = false;
                }),
                Err(err) => {
                    tracing::warn!(
                        publisher = %self.key.name(),
                        stream = %message.stream_id,
                        version = message.stream_version,
                        error = %err,
                        "message not acknowledged"
                    );
                    self.note_failure(err.to_string(), err.is_transient());
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// At most once a second: the send rate, and how many of the partition's events are after
    /// `reached`.
    async fn sample(&self, lane: &Lane, reached: Position) {
        let now = Instant::now();
        self.board.counters(|c| {
            match c.rate_sampled {
                Some((at, _)) if now.duration_since(at) < Duration::from_secs(1) => {}
                last => {
                    if let Some((at, before)) = last {
                        c.rate = (c.published - before) as f64
                            / now.duration_since(at).as_secs_f64().max(1e-9);
                    }
                    c.rate_sampled = Some((now, c.published));
                }
            };
        });
        let due = self.board.lane(lane.index(), |l| {
            let due = l
                .counted_at
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1));
            if due {
                l.counted_at = Some(now);
            }
            due
        });
        if due {
            let behind = self
                .store
                .count_partition_events_after(reached, lane.partition)
                .await
                .ok()
                .flatten();
            self.board.lane(lane.index(), |l| l.behind = behind);
        }
    }
}

fn age(recorded_at: DateTime<Utc>) -> Duration {
    (Utc::now() - recorded_at).to_std().unwrap_or_default()
}
