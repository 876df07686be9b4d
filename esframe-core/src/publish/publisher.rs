//! The [`Publisher`]: the global log, followed and sent to a broker, with a checkpoint that
//! never passes a message the broker has not acknowledged.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures_util::{StreamExt, stream};
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
    /// the publisher has work; 0 once caught up). `None` if the store cannot count.
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
        let mut attempt = 0;
        loop {
            match self.step().await {
                Ok(Step::Published { position, .. }) | Ok(Step::Idle { position })
                    if position >= head =>
                {
                    return Ok(position);
                }
                Ok(Step::Idle { position }) => {
                    // The head is not readable yet (an older transaction is still open).
                    self.store
                        .wait_for_events(position)
                        .await
                        .map_err(|source| self.store_error(source))?;
                }
                Ok(Step::Published { complete, .. }) => {
                    if complete {
                        attempt = 0;
                    } else {
                        attempt += 1;
                        tokio::time::sleep(self.backoff.wait(attempt)).await;
                    }
                }
                Err(err @ PublishError::Refused { .. }) => return Err(err),
                Err(err) => return Err(err),
            }
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
                let wait = match self.step().await {
                    Ok(Step::Published { complete: true, .. }) => {
                        attempt = 0;
                        None
                    }
                    Ok(Step::Published {
                        complete: false, ..
                    }) => {
                        attempt += 1;
                        Some(self.backoff.wait(attempt))
                    }
                    Ok(Step::Idle { position }) => {
                        attempt = 0;
                        let woken = self.store.wait_for_events(position);
                        tokio::select! {
                            _ = woken => {}
                            _ = stopped.changed() => {}
                        }
                        None
                    }
                    Err(err) => {
                        attempt += 1;
                        tracing::warn!(publisher = %name, error = %err, "publisher step failed; retrying");
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

    /// Reads one batch after the checkpoint, sends it, and moves the checkpoint to the highest
    /// position up to which every message was acknowledged.
    async fn step(&self) -> Result<Step, PublishError> {
        let from = self
            .checkpoints
            .load(&self.key)
            .await
            .map_err(|source| self.checkpoint_error(source))?;
        let after = from.map_or(Position::START, |c| c.position);
        let batch = self
            .store
            .read_all_batch(after, self.batch_size)
            .await
            .map_err(|source| self.store_error(source))?;
        if batch.scanned_to == after {
            self.update(|s| {
                s.position = after;
                s.head = s.head.max(after);
                s.pending = 0;
                s.lag = None;
            });
            // Nothing readable after the checkpoint: nothing is behind.
            self.update(|s| s.behind = Some(0));
            return Ok(Step::Idle { position: after });
        }
        let oldest = batch.events.first().map(|e| e.recorded_at);
        self.update(|s| {
            s.position = after;
            s.head = s.head.max(batch.scanned_to);
            s.pending = batch.events.len();
            s.lag = oldest.map(age);
        });
        let messages: Vec<Vec<OutgoingMessage>> =
            batch.events.iter().map(|e| self.messages(e)).collect();
        let acked = self.send(&batch.events, &messages).await;
        // The checkpoint moves to just before the first event not fully acknowledged.
        let first_missing = acked.iter().position(|result| result.is_err());
        let reached = match first_missing {
            None => batch.scanned_to,
            Some(0) => after,
            Some(i) => batch.events[i - 1].global_position,
        };
        if reached > after {
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
                .commit(tx, CheckpointCommit::advance(&self.key, from, to))
                .await
                .map_err(|source| self.checkpoint_error(source))?;
        }
        let pending = first_missing.map_or(0, |i| batch.events.len() - i);
        self.sample(reached).await;
        self.update(|s| {
            s.position = reached;
            s.pending = pending;
            if pending == 0 {
                s.lag = None;
                s.last_error = None;
                s.broker_reachable = true;
            }
        });
        match first_missing.map(|i| (i, &acked[i])) {
            Some((i, Err(error))) if !error.is_transient() => {
                let event = &batch.events[i];
                Err(PublishError::Refused {
                    name: self.key.name().to_owned(),
                    stream: event.stream_id.clone(),
                    stream_version: event.stream_version,
                    position: event.global_position,
                    source: error.take(),
                })
            }
            other => Ok(Step::Published {
                position: reached,
                complete: other.is_none(),
            }),
        }
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

    /// Sends the batch, one message per stream at a time; per event, whether all its messages
    /// were acknowledged.
    async fn send(
        &self,
        events: &[RecordedEvent],
        messages: &[Vec<OutgoingMessage>],
    ) -> Vec<Result<(), Failure>> {
        let mut by_stream: HashMap<&StreamId, Vec<usize>> = HashMap::new();
        let mut streams = Vec::new();
        for (i, event) in events.iter().enumerate() {
            if messages[i].is_empty() {
                continue;
            }
            by_stream
                .entry(&event.stream_id)
                .or_insert_with(|| {
                    streams.push(&event.stream_id);
                    Vec::new()
                })
                .push(i);
        }
        let mut acked: Vec<Result<(), Failure>> = (0..events.len()).map(|_| Ok(())).collect();
        // A `Vec` of futures, not a lazy `map`: the closure's higher-ranked signature would
        // keep the spawned publisher's future from being `Send`.
        let mut runs = Vec::with_capacity(streams.len());
        for stream in streams {
            let indexes = by_stream.remove(stream).unwrap_or_default();
            runs.push(async move {
                let mut results = Vec::with_capacity(indexes.len());
                let mut failed = None;
                for i in indexes {
                    if failed.is_some() {
                        // Never past a failure within a stream: order first.
                        results.push((i, Err(Failure::Skipped)));
                        continue;
                    }
                    match self.send_event(&messages[i]).await {
                        Ok(()) => results.push((i, Ok(()))),
                        Err(err) => {
                            failed = Some(());
                            results.push((i, Err(Failure::Sink(Arc::new(Mutex::new(Some(err)))))));
                        }
                    }
                }
                results
            });
        }
        let mut runs = stream::iter(runs).buffer_unordered(self.streams_in_flight);
        while let Some(results) = runs.next().await {
            for (i, result) in results {
                acked[i] = result;
            }
        }
        acked
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

/// What one step did.
enum Step {
    /// Nothing after the checkpoint is readable yet.
    Idle { position: Position },
    /// A batch was sent; `complete` unless a message failed.
    Published { position: Position, complete: bool },
}

/// Why an event was not acknowledged.
enum Failure {
    /// An earlier message of its stream failed, so it was not sent.
    Skipped,
    /// Its message failed (kept once, to be reported).
    Sink(Arc<Mutex<Option<SinkError>>>),
}

impl Failure {
    fn is_transient(&self) -> bool {
        match self {
            Self::Skipped => true,
            Self::Sink(error) => error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .is_none_or(SinkError::is_transient),
        }
    }

    fn take(&self) -> SinkError {
        let taken = match self {
            Self::Skipped => None,
            Self::Sink(error) => error.lock().unwrap_or_else(PoisonError::into_inner).take(),
        };
        taken.unwrap_or_else(|| SinkError::Unreachable {
            message: "an earlier message of the stream failed".to_owned(),
            source: None,
        })
    }
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
