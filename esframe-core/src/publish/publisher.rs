//! The [`Publisher`]: the global log, followed and sent to a broker, with a checkpoint that
//! never passes a message the broker has not acknowledged.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::{sync::watch, task::JoinHandle};
use uuid::Uuid;

use crate::{
    GlobalLog, Position, RecordedEvent, StoreError, StreamId,
    projection::{
        Checkpoint, CheckpointCommit, CheckpointError, CheckpointStore, Interest,
        InvalidProjectionKey, LeaseStore, ProjectionKey,
    },
};

use super::{
    Backoff, CloudEvent, MessageSink, OutgoingMessage, SinkError, Transform, sink::subject_for,
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
}

/// A publisher's state, for operators: how far it is, how far behind, and how it is doing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PublisherStatus {
    /// The checkpoint: every event at or before it reached the broker.
    pub position: Position,
    /// The last position the publisher saw in the log.
    pub head: Position,
    /// Events read but not yet acknowledged, in the batch in progress (0 when caught up).
    pub pending: usize,
    /// How long the oldest unpublished event has waited, when there is one.
    pub lag: Option<Duration>,
    /// Messages the broker acknowledged since the publisher started.
    pub published: u64,
    /// Of those, how many the broker recognised as duplicates.
    pub duplicates: u64,
    /// Failed sends since the publisher started.
    pub failures: u64,
    /// The last failure, while it is not resolved.
    pub last_error: Option<String>,
    /// `false` while the broker cannot be reached.
    pub broker_reachable: bool,
    /// Whether the publisher holds its lease (only the running one does).
    pub active: bool,
    /// Events in the log after the checkpoint, as last counted (at most once a second, while
    /// the publisher has work; 0 once caught up). `None` until first known.
    pub behind: Option<u64>,
    /// Messages acknowledged per second, over the last second or more of sending.
    pub rate: f64,
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
/// - **One active publisher per name**, by the checkpoint store's lease.
/// - **An unreachable broker** is retried with exponential backoff ([`Backoff`]), without a
///   busy loop; the publisher resumes from its checkpoint.
pub struct Publisher<S, C, K> {
    store: S,
    checkpoints: C,
    sink: K,
    key: ProjectionKey,
    source: String,
    subject_prefix: String,
    subject: Option<SubjectFn>,
    interest: Interest,
    transform: Option<Transform>,
    batch_size: usize,
    streams_in_flight: usize,
    backoff: Backoff,
    status: Arc<Mutex<PublisherStatus>>,
    sampled: Arc<Mutex<Sample>>,
}

/// Chooses an event's subject (NATS) or routing key (AMQP).
pub type SubjectFn = Arc<dyn Fn(&RecordedEvent) -> String + Send + Sync>;

/// When `behind` and `rate` were last measured.
#[derive(Debug, Default)]
struct Sample {
    at: Option<std::time::Instant>,
    published: u64,
}

impl<S, C, K> std::fmt::Debug for Publisher<S, C, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("key", &self.key)
            .field("source", &self.source)
            .field("subject_prefix", &self.subject_prefix)
            .field("interest", &self.interest)
            .field("batch_size", &self.batch_size)
            .field("streams_in_flight", &self.streams_in_flight)
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
            // Reachable until a send says otherwise: an idle publisher has no reason to report
            // its broker down.
            status: Arc::new(Mutex::new(PublisherStatus {
                broker_reachable: true,
                ..PublisherStatus::default()
            })),
            sampled: Arc::new(Mutex::new(Sample::default())),
        })
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
    /// changes it (hide internal fields in `data`), several fan it out.
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

    /// The publisher's state.
    pub fn status(&self) -> PublisherStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Publishes everything stored so far, retrying an unreachable broker with backoff, and
    /// returns the checkpoint reached. Fails at once if another publisher of the same name
    /// holds the lease, and on a message the broker refuses.
    pub async fn catch_up(&self) -> Result<Position, PublishError> {
        let lease = self.lease_now().await?;
        let result = self.publish_until_head().await;
        self.checkpoints.release(lease).await;
        result
    }

    /// Runs the publisher on a Tokio task until [`RunningPublisher::shutdown`] (or the
    /// [`RunningPublisher`] is dropped): it waits for
    /// the lease, then publishes and follows the log; an unreachable broker or a refused message
    /// is retried with backoff (a refusal is reported in the status until it passes).
    pub fn spawn(self) -> RunningPublisher {
        let (stop, stopped) = watch::channel(false);
        let status = Arc::clone(&self.status);
        let task = tokio::spawn(async move { self.run(stopped).await });
        RunningPublisher { stop, task, status }
    }

    async fn lease_now(&self) -> Result<C::Lease, PublishError> {
        match self.checkpoints.try_lease(&self.key).await {
            Ok(Some(lease)) => Ok(lease),
            Ok(None) => Err(PublishError::LeaseHeld {
                name: self.key.name().to_owned(),
            }),
            Err(source) => Err(self.checkpoint_error(source)),
        }
    }

    async fn publish_until_head(&self) -> Result<Position, PublishError> {
        let head = self
            .store
            .head_position()
            .await
            .map_err(|source| self.store_error(source))?;
        loop {
            let position = self.pump(&|| true).await?;
            if position >= head {
                return Ok(position);
            }
            // The head is not readable yet (an older transaction is still open).
            self.store
                .wait_for_events(position)
                .await
                .map_err(|source| self.store_error(source))?;
        }
    }

    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let name = self.key.name().to_owned();
        'lease: loop {
            let lease = loop {
                if stopping(&stopped) {
                    return;
                }
                match self
                    .checkpoints
                    .wait_lease(&self.key, Duration::from_millis(500))
                    .await
                {
                    Ok(Some(lease)) => break lease,
                    Ok(None) => {}
                    Err(err) => {
                        tracing::warn!(publisher = %name, error = %err, "cannot take the publisher's lease");
                        // The checkpoint store failed, not the broker.
                        self.note_failure(err.to_string(), false);
                        tokio::time::sleep(self.backoff.max).await;
                    }
                }
            };
            self.update(|s| s.active = true);
            tracing::info!(publisher = %name, "publisher active");
            let mut attempt = 0u32;
            loop {
                if stopping(&stopped) {
                    break 'lease self.finish(lease).await;
                }
                if !self.checkpoints.lease_held(&lease) {
                    tracing::warn!(publisher = %name, "publisher lost its lease; waiting for it again");
                    self.update(|s| s.active = false);
                    self.checkpoints.release(lease).await;
                    continue 'lease;
                }
                let keep_going = || !stopping(&stopped) && self.checkpoints.lease_held(&lease);
                let wait = match self.pump(&keep_going).await {
                    Ok(position) => {
                        attempt = 0;
                        if keep_going() {
                            let woken = self.store.wait_for_events(position);
                            tokio::select! {
                                _ = woken => {}
                                _ = stopped.changed() => {}
                            }
                        }
                        None
                    }
                    Err(err) => {
                        attempt += 1;
                        tracing::warn!(publisher = %name, error = %err, "publisher failed; retrying");
                        if matches!(err, PublishError::Refused { .. }) {
                            // `send_event` counted this failure already; keep the fuller text.
                            self.update(|s| s.last_error = Some(err.to_string()));
                        } else {
                            self.note_failure(err.to_string(), false);
                        }
                        Some(self.backoff.wait(attempt))
                    }
                };
                if let Some(wait) = wait {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = stopped.changed() => {}
                    }
                }
            }
        }
    }

    async fn finish(&self, lease: C::Lease) {
        self.update(|s| s.active = false);
        self.checkpoints.release(lease).await;
    }

    /// Sends everything readable after the checkpoint, as a pipeline: batches are read ahead
    /// (up to four batches of events not yet acknowledged), each stream has at most one message
    /// in flight, and the checkpoint follows the highest position up to which every event was
    /// acknowledged, committed every 20 ms or so. An unreachable broker is retried per message
    /// with backoff, holding back only its stream. Returns the checkpoint once nothing readable
    /// is left or `keep_going` says stop; a refusal stops reading, lets the messages in flight
    /// finish, commits what is contiguous and fails.
    async fn pump(&self, keep_going: &(dyn Fn() -> bool + Sync)) -> Result<Position, PublishError> {
        let mut from = self
            .checkpoints
            .load(&self.key)
            .await
            .map_err(|source| self.checkpoint_error(source))?;
        let mut committed = from.map_or(Position::START, |c| c.position);
        let mut read_to = committed;
        let mut exhausted = false;
        // Read and not yet checkpointed, in log order: position → (acknowledged, recorded at).
        let mut pending = Pending::new();
        let mut queues: HashMap<StreamId, VecDeque<Job>> = HashMap::new();
        let mut ready: VecDeque<StreamId> = VecDeque::new();
        let mut busy: HashSet<StreamId> = HashSet::new();
        let mut inflight = FuturesUnordered::new();
        let mut refused: Option<(Job, SinkError)> = None;
        let mut last_commit = std::time::Instant::now();
        let max_pending = self.batch_size.saturating_mul(4);
        self.update(|s| s.position = committed);
        loop {
            if !exhausted && refused.is_none() && pending.len() < max_pending {
                let batch = self
                    .store
                    .read_all_batch(read_to, self.batch_size)
                    .await
                    .map_err(|source| self.store_error(source))?;
                if batch.scanned_to == read_to {
                    exhausted = true;
                } else {
                    exhausted = batch.events.len() < self.batch_size;
                    for event in &batch.events {
                        let messages = self.messages(event);
                        let position = event.global_position;
                        let done = messages.is_empty();
                        pending.insert(position, (done, Some(event.recorded_at)));
                        if done {
                            continue;
                        }
                        let queue = queues.entry(event.stream_id.clone()).or_default();
                        if queue.is_empty() && !busy.contains(&event.stream_id) {
                            ready.push_back(event.stream_id.clone());
                        }
                        queue.push_back(Job {
                            stream: event.stream_id.clone(),
                            position,
                            messages,
                            attempt: 0,
                        });
                    }
                    // Events the upcasters retired: nothing to send, but the checkpoint may
                    // pass them.
                    pending.entry(batch.scanned_to).or_insert((true, None));
                    read_to = batch.scanned_to;
                    self.update(|s| s.head = s.head.max(read_to));
                }
            }
            if refused.is_none() {
                while inflight.len() < self.streams_in_flight {
                    let Some(stream) = ready.pop_front() else {
                        break;
                    };
                    let Some(job) = queues.get_mut(&stream).and_then(VecDeque::pop_front) else {
                        continue;
                    };
                    busy.insert(stream);
                    inflight.push(self.send_job(job));
                }
            }
            if inflight.is_empty() {
                let caught_up = (exhausted && ready.is_empty()) || refused.is_some();
                if caught_up || !keep_going() {
                    committed = self
                        .commit_contiguous(&mut pending, &mut from, committed)
                        .await?;
                    self.report(&pending, committed);
                    if let Some((job, source)) = refused {
                        return Err(PublishError::Refused {
                            name: self.key.name().to_owned(),
                            stream: job.stream,
                            stream_version: job.messages[0].stream_version,
                            position: job.position,
                            source,
                        });
                    }
                    if caught_up {
                        // Everything readable is acknowledged: nothing is behind.
                        self.update(|s| {
                            s.behind = Some(0);
                            s.last_error = None;
                            s.broker_reachable = true;
                        });
                    }
                    return Ok(committed);
                }
                // Nothing in flight and more to read: make room by checkpointing what is
                // acknowledged (or every read event may be done and waiting for a commit).
                committed = self
                    .commit_contiguous(&mut pending, &mut from, committed)
                    .await?;
                self.report(&pending, committed);
                continue;
            }
            let Some((mut job, result)) = inflight.next().await else {
                continue;
            };
            busy.remove(&job.stream);
            let stream = job.stream.clone();
            match result {
                Ok(()) => {
                    if let Some(slot) = pending.get_mut(&job.position) {
                        slot.0 = true;
                    }
                    if queues.get(&stream).is_some_and(|q| !q.is_empty()) {
                        ready.push_back(stream);
                    }
                }
                Err(err) if err.is_transient() => {
                    // The same message again, after a backoff; its stream waits for it.
                    job.attempt += 1;
                    queues.entry(stream.clone()).or_default().push_front(job);
                    ready.push_back(stream);
                }
                Err(err) => {
                    if refused.is_none() {
                        refused = Some((job, err));
                    }
                }
            }
            if last_commit.elapsed() >= Duration::from_millis(20) {
                committed = self
                    .commit_contiguous(&mut pending, &mut from, committed)
                    .await?;
                last_commit = std::time::Instant::now();
                self.report(&pending, committed);
                self.sample(committed).await;
            }
            if !keep_going() {
                committed = self
                    .commit_contiguous(&mut pending, &mut from, committed)
                    .await?;
                self.report(&pending, committed);
                return Ok(committed);
            }
        }
    }

    /// Moves the checkpoint past the acknowledged prefix of `pending`, if it grew.
    async fn commit_contiguous(
        &self,
        pending: &mut Pending,
        from: &mut Option<Checkpoint>,
        committed: Position,
    ) -> Result<Position, PublishError> {
        let mut reached = committed;
        while let Some((&position, &(true, _))) = pending.first_key_value() {
            reached = position;
            pending.pop_first();
        }
        if reached <= committed {
            return Ok(committed);
        }
        let to = Checkpoint {
            position: reached,
            version: 1,
            replay_until: None,
        };
        let tx = self
            .checkpoints
            .begin()
            .await
            .map_err(|source| self.checkpoint_error(source))?;
        self.checkpoints
            .commit(tx, CheckpointCommit::advance(&self.key, *from, to))
            .await
            .map_err(|source| self.checkpoint_error(source))?;
        *from = Some(to);
        Ok(reached)
    }

    /// The status after a commit: position, what is pending, how old its oldest event is.
    fn report(&self, pending: &Pending, position: Position) {
        let waiting = pending.values().filter(|(done, _)| !done).count();
        let oldest = pending
            .values()
            .find_map(|(done, at)| if *done { None } else { *at });
        self.update(|s| {
            s.position = position;
            s.pending = waiting;
            s.lag = oldest.map(age);
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
                Ok(published) => self.update(|s| {
                    s.published += 1;
                    s.duplicates += u64::from(published.duplicate);
                    s.broker_reachable = true;
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

    /// At most once a second: how many events are after `reached`, and the send rate.
    async fn sample(&self, reached: Position) {
        let now = std::time::Instant::now();
        let published = self.status().published;
        let since = {
            let mut sampled = self.sampled.lock().unwrap_or_else(PoisonError::into_inner);
            match sampled.at {
                Some(at) if now.duration_since(at) < Duration::from_secs(1) => return,
                last => {
                    let since = last.map(|at| (now.duration_since(at), sampled.published));
                    *sampled = Sample {
                        at: Some(now),
                        published,
                    };
                    since
                }
            }
        };
        let behind = self.store.count_events_after(reached).await.ok().flatten();
        self.update(|s| {
            s.behind = behind;
            if let Some((elapsed, before)) = since {
                s.rate = (published - before) as f64 / elapsed.as_secs_f64().max(1e-9);
            }
        });
    }

    fn note_failure(&self, error: String, unreachable: bool) {
        self.update(|s| {
            s.failures += 1;
            s.last_error = Some(error);
            if unreachable {
                s.broker_reachable = false;
            }
        });
    }

    fn update(&self, change: impl FnOnce(&mut PublisherStatus)) {
        change(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn store_error(&self, source: StoreError) -> PublishError {
        PublishError::Store {
            name: self.key.name().to_owned(),
            source,
        }
    }

    fn checkpoint_error(&self, source: CheckpointError) -> PublishError {
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

fn age(recorded_at: DateTime<Utc>) -> Duration {
    (Utc::now() - recorded_at).to_std().unwrap_or_default()
}

/// Events read and not yet checkpointed, in log order: position → (acknowledged, recorded at).
type Pending = BTreeMap<Position, (bool, Option<DateTime<Utc>>)>;

/// A job on its way to the broker, handing the job back with the outcome.
type JobFuture<'a> = Pin<Box<dyn Future<Output = (Job, Result<(), SinkError>)> + Send + 'a>>;

/// One event's messages, waiting for (or on) the broker.
struct Job {
    stream: StreamId,
    position: Position,
    messages: Vec<OutgoingMessage>,
    attempt: u32,
}

/// A publisher running on its own task. Dropping it asks the publisher to stop at the next
/// batch boundary, as [`RunningPublisher::shutdown`] does, without waiting for it.
#[derive(Debug)]
pub struct RunningPublisher {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    status: Arc<Mutex<PublisherStatus>>,
}

impl RunningPublisher {
    /// The publisher's state.
    pub fn status(&self) -> PublisherStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
