//! [`JetStreamInbox`]: a durable pull consumer on a JetStream stream that applies each event
//! once, through a [`PgInbox`], in the consumer's own PostgreSQL transaction.

use std::{
    collections::{HashMap, hash_map::Entry},
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use esframe_core::{
    StreamId,
    publish::{Backoff, CloudEvent, IncomingEvent},
};
use esframe_postgres::{InboxError, InboxHandler, InboxOutcome, PgInbox};
use futures_util::{FutureExt, StreamExt, stream};
use tokio::{sync::watch, task::JoinHandle};
use uuid::Uuid;

use crate::headers::{self, CE_PREFIX, STREAM_HEADER};

/// The default number of failed attempts of the handler before a message is parked.
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;

/// The default `max_ack_pending` of the consumer.
pub const DEFAULT_MAX_ACK_PENDING: i64 = 1_000;

/// A consumer's counters, for operators.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InboxStatus {
    /// Messages received (redeliveries included).
    pub delivered: u64,
    /// Events applied: the handler ran and committed with the inbox's record.
    pub applied: u64,
    /// Messages the inbox had applied before (acknowledged, nothing ran).
    pub duplicates: u64,
    /// Messages that came before their stream's previous event (sent back with a delay).
    pub early: u64,
    /// Messages parked in the inbox's dead letters.
    pub parked: u64,
    /// Failed attempts: the handler or the database failed, or the broker did not take an
    /// acknowledgement.
    pub failures: u64,
    /// The last failure.
    pub last_error: Option<String>,
    /// Whether the consumer exists and messages are being pulled.
    pub consuming: bool,
}

/// What the adapter does once a message is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    Nak(Duration),
    Term,
}

type OnApplied = Arc<dyn Fn(&IncomingEvent) + Send + Sync>;

/// Runs a durable pull consumer on a JetStream stream and applies each message, an event sent
/// by an esframe [`Publisher`](esframe_core::publish::Publisher) through
/// [`JetStreamSink`](crate::JetStreamSink), once with the user's [`InboxHandler`].
///
/// For each message: the CloudEvent is read from the headers (binary content mode, `ce-`
/// headers) and the body, or from the body alone when the `content-type` is
/// `application/cloudevents+json` (structured content mode, the JSON format; both may come
/// mixed on one stream), then [`PgInbox::apply`] runs the handler and records the event in one
/// transaction:
///
/// | outcome | the adapter |
/// | --- | --- |
/// | `Applied`, `Duplicate` | acknowledges the message |
/// | `Early` (its stream's previous event is not applied yet) | `nak`s it with a short delay ([`JetStreamInbox::early_delay`]) |
/// | the handler fails | `nak`s it with backoff; after [`JetStreamInbox::max_deliveries`] failed attempts, parks it in the inbox's dead letters and terminates it (`term`) |
/// | the database fails | `nak`s it with backoff (not counted as an attempt) |
/// | not a CloudEvent, not an esframe event | parks it and acknowledges it |
///
/// **Order per stream.** JetStream delivers a stream's messages in the order the publisher
/// stored them (one per stream in flight, so in version order), but a message sent back
/// (`nak`) comes again after later ones. The adapter processes the messages of one producer
/// stream one at a time, in delivery order (different streams concurrently), and the inbox
/// refuses a version whose predecessor is not applied yet ([`InboxOutcome::Early`]), so an event
/// is never applied before the one before it, whatever the redeliveries.
///
/// **`max_ack_pending`.** The consumer is created, or updated, with the settings of this
/// adapter: explicit acknowledgements, no `max_deliver` (the adapter decides when to park),
/// the [`ack_wait`](JetStreamInbox::ack_wait) and the
/// [`max_ack_pending`](JetStreamInbox::max_ack_pending) set here. Every process that runs the
/// same durable consumer must use the same settings, or the last one to start changes them for
/// all. Order does not depend on `max_ack_pending`: `Early` protects it. `max_ack_pending`
/// bounds the messages delivered and not yet acknowledged, those sent back with a delay
/// included: 1 delivers strictly in stream order (an `Early` never happens, but one failing
/// stream holds up every other); a larger value lets the other streams go on past a failing
/// one, whose later messages come back `Early` until it passes.
///
/// **A parked event blocks its stream.** The inbox never applies a version beyond one that is
/// not applied: once an event is parked, the later events of its stream are parked behind it
/// (with an error that names it), in order, so that they do not circle for ever and take the
/// consumer's `max_ack_pending`. They are in [`PgInbox::dead_letters`], oldest first.
pub struct JetStreamInbox<H> {
    context: jetstream::Context,
    stream: String,
    durable: String,
    inbox: PgInbox,
    handler: Arc<H>,
    filter_subject: Option<String>,
    max_deliveries: u32,
    early_delay: Duration,
    backoff: Backoff,
    max_ack_pending: i64,
    ack_wait: Duration,
    batch_size: usize,
    streams_in_flight: usize,
    on_applied: Option<OnApplied>,
    status: Arc<Mutex<InboxStatus>>,
    /// Per producer stream, the version parked, which its later versions wait for.
    blocked: Mutex<HashMap<StreamId, u64>>,
    /// Failed attempts of the handler, per message id, until it succeeds or is parked.
    attempts: Mutex<HashMap<Uuid, u32>>,
}

impl<H> std::fmt::Debug for JetStreamInbox<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamInbox")
            .field("stream", &self.stream)
            .field("durable", &self.durable)
            .field("inbox", &self.inbox.consumer())
            .field("filter_subject", &self.filter_subject)
            .field("max_deliveries", &self.max_deliveries)
            .field("early_delay", &self.early_delay)
            .field("backoff", &self.backoff)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("ack_wait", &self.ack_wait)
            .field("batch_size", &self.batch_size)
            .field("streams_in_flight", &self.streams_in_flight)
            .finish_non_exhaustive()
    }
}

/// Why the consumer could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("JetStream consumer `{durable}` on stream `{stream}`: {message}")]
pub struct ConsumerError {
    /// The stream.
    pub stream: String,
    /// The durable consumer.
    pub durable: String,
    /// What happened.
    pub message: String,
    /// The client's error.
    #[source]
    pub source: Option<async_nats::Error>,
}

impl<H: InboxHandler + 'static> JetStreamInbox<H> {
    /// Consumes the JetStream stream `stream` as the durable consumer `durable` (created if
    /// missing) and applies each event through `inbox` with `handler`.
    pub fn new(
        context: jetstream::Context,
        stream: &str,
        durable: &str,
        inbox: PgInbox,
        handler: H,
    ) -> Self {
        Self {
            context,
            stream: stream.to_owned(),
            durable: durable.to_owned(),
            inbox,
            handler: Arc::new(handler),
            filter_subject: None,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            early_delay: Duration::from_millis(200),
            backoff: Backoff {
                min: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
            max_ack_pending: DEFAULT_MAX_ACK_PENDING,
            ack_wait: Duration::from_secs(30),
            batch_size: 100,
            streams_in_flight: 16,
            on_applied: None,
            status: Arc::default(),
            blocked: Mutex::default(),
            attempts: Mutex::default(),
        }
    }

    /// Only the stream's messages on subjects matching `filter` (`bank.account.>`).
    #[must_use]
    pub fn filter_subject(mut self, filter: impl Into<String>) -> Self {
        self.filter_subject = Some(filter.into());
        self
    }

    /// Failed attempts of the handler before a message is parked (default
    /// [`DEFAULT_MAX_DELIVERIES`]). Deliveries that are `Early`, duplicates, or fail on the
    /// database do not count.
    #[must_use]
    pub fn max_deliveries(mut self, attempts: u32) -> Self {
        self.max_deliveries = attempts.max(1);
        self
    }

    /// The delay before an `Early` message comes again (default 200 ms; it grows with each
    /// delivery of the message, up to the backoff's maximum).
    #[must_use]
    pub fn early_delay(mut self, delay: Duration) -> Self {
        self.early_delay = delay;
        self
    }

    /// The delay before a message whose handler failed comes again, by attempt (default
    /// 500 ms doubling to 30 s).
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The consumer's `max_ack_pending` (default [`DEFAULT_MAX_ACK_PENDING`]); see the type's
    /// documentation.
    #[must_use]
    pub fn max_ack_pending(mut self, pending: i64) -> Self {
        self.max_ack_pending = pending.max(1);
        self
    }

    /// How long JetStream waits for an acknowledgement before it delivers a message again
    /// (default 30 s): longer than the handler takes.
    #[must_use]
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// Messages pulled and processed together (default 100).
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// Producer streams whose messages are processed at once (default 16); a stream's own
    /// messages are processed one at a time.
    #[must_use]
    pub fn streams_in_flight(mut self, streams: usize) -> Self {
        self.streams_in_flight = streams.max(1);
        self
    }

    /// Calls `observe` after each event is applied (committed), before the message is
    /// acknowledged: for metrics such as the end-to-end latency.
    #[must_use]
    pub fn on_applied(mut self, observe: impl Fn(&IncomingEvent) + Send + Sync + 'static) -> Self {
        self.on_applied = Some(Arc::new(observe));
        self
    }

    /// The consumer's counters.
    pub fn status(&self) -> InboxStatus {
        lock(&self.status).clone()
    }

    /// The JetStream consumer configuration this adapter runs.
    pub fn consumer_config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.durable.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: -1,
            max_ack_pending: self.max_ack_pending,
            filter_subject: self.filter_subject.clone().unwrap_or_default(),
            ..pull::Config::default()
        }
    }

    /// Creates the durable consumer, or updates it to this adapter's configuration.
    pub async fn consumer(&self) -> Result<PullConsumer, ConsumerError> {
        let fail = |message: &str, source: async_nats::Error| ConsumerError {
            stream: self.stream.clone(),
            durable: self.durable.clone(),
            message: format!("{message}: {source}"),
            source: Some(source),
        };
        let stream = self
            .context
            .get_stream(&self.stream)
            .await
            .map_err(|err| fail("cannot read the stream", err.into()))?;
        stream
            .create_consumer(self.consumer_config())
            .await
            .map_err(|err| fail("cannot create or update the consumer", err.into()))
    }

    /// Consumes until `shutdown` completes; the message in progress is finished first. Setup
    /// failures (no stream, broker unreachable) are retried with backoff and reported in the
    /// status.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) {
        let mut shutdown = std::pin::pin!(shutdown.fuse());
        let mut attempt = 0u32;
        loop {
            let messages = match self.consumer().await {
                Ok(consumer) => {
                    consumer
                        .stream()
                        .max_messages_per_batch(self.batch_size)
                        .heartbeat(Duration::from_secs(5))
                        .expires(Duration::from_secs(30))
                        .messages()
                        .await
                }
                Err(err) => Err(async_nats::jetstream::consumer::StreamError::with_source(
                    async_nats::jetstream::consumer::StreamErrorKind::Other,
                    err,
                )),
            };
            let mut messages = match messages {
                Ok(messages) => {
                    attempt = 0;
                    self.update(|s| s.consuming = true);
                    messages
                }
                Err(err) => {
                    attempt += 1;
                    tracing::warn!(stream = %self.stream, durable = %self.durable, error = %err, "cannot consume; retrying");
                    self.note_failure(err.to_string());
                    let wait = self.backoff.wait(attempt);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => continue,
                        () = &mut shutdown => return,
                    }
                }
            };
            loop {
                let first = tokio::select! {
                    next = messages.next() => next,
                    () = &mut shutdown => {
                        self.update(|s| s.consuming = false);
                        return;
                    }
                };
                let first = match first {
                    Some(Ok(message)) => message,
                    Some(Err(err)) => {
                        use async_nats::jetstream::consumer::pull::MessagesErrorKind as Kind;
                        let fatal = matches!(
                            err.kind(),
                            Kind::ConsumerDeleted
                                | Kind::RequestLimitExceeded
                                | Kind::PushBasedConsumer
                        );
                        tracing::warn!(stream = %self.stream, durable = %self.durable, error = %err, "pulling messages failed");
                        self.note_failure(err.to_string());
                        if fatal {
                            break;
                        }
                        continue;
                    }
                    None => break,
                };
                let mut batch = vec![first];
                while batch.len() < self.batch_size {
                    match messages.next().now_or_never() {
                        Some(Some(Ok(message))) => batch.push(message),
                        _ => break,
                    }
                }
                self.process(batch).await;
            }
            self.update(|s| s.consuming = false);
        }
    }

    /// Runs the consumer on a Tokio task until [`RunningInbox::shutdown`].
    pub fn spawn(self) -> RunningInbox {
        let (stop, mut stopped) = watch::channel(false);
        let status = Arc::clone(&self.status);
        let task = tokio::spawn(self.run_until(async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }));
        RunningInbox { stop, task, status }
    }

    /// Processes a batch: the messages of each producer stream in order, streams concurrently.
    async fn process(&self, batch: Vec<jetstream::Message>) {
        let mut groups: Vec<Vec<jetstream::Message>> = Vec::new();
        let mut by_stream: HashMap<String, usize> = HashMap::new();
        for message in batch {
            let key = message
                .headers
                .as_ref()
                .and_then(|h| h.get(STREAM_HEADER))
                .map(|v| v.as_str().to_owned());
            match key.map(|key| by_stream.entry(key)) {
                Some(Entry::Occupied(group)) => groups[*group.get()].push(message),
                Some(Entry::Vacant(slot)) => {
                    slot.insert(groups.len());
                    groups.push(vec![message]);
                }
                // No stream named: alone (it will most likely be parked).
                None => groups.push(vec![message]),
            }
        }
        let runs: Vec<_> = groups
            .into_iter()
            .map(|group| async move {
                for message in group {
                    let settle = self.handle(&message).await;
                    self.settle(&message, settle).await;
                }
            })
            .collect();
        stream::iter(runs)
            .buffer_unordered(self.streams_in_flight)
            .for_each(|()| async {})
            .await;
    }

    async fn settle(&self, message: &jetstream::Message, settle: Settle) {
        let kind = match settle {
            Settle::Ack => AckKind::Ack,
            Settle::Nak(delay) => AckKind::Nak(Some(delay)),
            Settle::Term => AckKind::Term,
        };
        if let Err(err) = message.ack_with(kind).await {
            tracing::warn!(stream = %self.stream, durable = %self.durable, error = %err, "acknowledgement not sent");
            self.note_failure(format!("acknowledgement not sent: {err}"));
        }
    }

    /// What to do with one message.
    async fn handle(&self, message: &jetstream::Message) -> Settle {
        self.update(|s| s.delivered += 1);
        let delivered = message
            .info()
            .map_or(1, |info| u32::try_from(info.delivered).unwrap_or(u32::MAX));
        let body = match std::str::from_utf8(&message.payload) {
            Ok(body) => body.to_owned(),
            Err(err) => {
                return self
                    .park(
                        message,
                        None,
                        None,
                        &format!("the body is not UTF-8: {err}"),
                    )
                    .await;
            }
        };
        let attributes = headers::incoming(message.headers.as_ref());
        let cloud = if headers::is_structured(&attributes) {
            CloudEvent::from_structured(&body).map_err(|err| {
                format!("not a CloudEvent in structured mode (the JSON format): {err}")
            })
        } else {
            CloudEvent::from_binary(attributes, CE_PREFIX, body)
                .map_err(|err| format!("not a CloudEvent in binary mode: {err}"))
        };
        let event = cloud.map_err(|err| (None, err)).and_then(|cloud| {
            let id = cloud.id;
            IncomingEvent::from_cloud_event(cloud).map_err(|err| (Some(id), err.to_string()))
        });
        let event = match event {
            Ok(event) => event,
            Err((id, error)) => return self.park(message, id, None, &error).await,
        };
        match self.inbox.apply(&event, self.handler.as_ref()).await {
            Ok(InboxOutcome::Applied) => {
                lock(&self.attempts).remove(&event.message_id);
                self.update(|s| s.applied += 1);
                if let Some(observe) = &self.on_applied {
                    observe(&event);
                }
                Settle::Ack
            }
            Ok(InboxOutcome::Duplicate) => {
                lock(&self.attempts).remove(&event.message_id);
                self.update(|s| s.duplicates += 1);
                Settle::Ack
            }
            Ok(InboxOutcome::Early { expected }) => {
                self.update(|s| s.early += 1);
                let blocked = self.blocked_at(&event.stream_id) == Some(expected)
                    || (delivered >= self.max_deliveries
                        && self.is_parked(&event.stream_id, expected).await);
                if blocked {
                    lock(&self.blocked).insert(event.stream_id.clone(), expected);
                    return self
                        .park(message, None, Some(&event), &blocked_error(expected))
                        .await;
                }
                let delay = self
                    .early_delay
                    .saturating_mul(delivered)
                    .min(self.backoff.max.max(self.early_delay));
                Settle::Nak(delay)
            }
            Err(err @ InboxError::Handler { .. }) => {
                let error = err.to_string();
                tracing::warn!(stream = %self.stream, durable = %self.durable, error = %error, "inbox handler failed");
                self.note_failure(error.clone());
                let attempts = {
                    let mut attempts = lock(&self.attempts);
                    let n = attempts.entry(event.message_id).or_insert(0);
                    *n += 1;
                    *n
                };
                if attempts >= self.max_deliveries {
                    lock(&self.attempts).remove(&event.message_id);
                    let error = format!("failed {attempts} times, last: {error}");
                    return match self.park(message, None, Some(&event), &error).await {
                        Settle::Ack => {
                            lock(&self.blocked)
                                .insert(event.stream_id.clone(), event.stream_version);
                            Settle::Term
                        }
                        other => other,
                    };
                }
                Settle::Nak(self.backoff.wait(attempts))
            }
            Err(err) => {
                let error = err.to_string();
                tracing::warn!(stream = %self.stream, durable = %self.durable, error = %error, "inbox unavailable");
                self.note_failure(error);
                Settle::Nak(self.backoff.wait(delivered))
            }
        }
    }

    /// Parks the message; acknowledges it once it is parked, or sends it back if the database
    /// fails.
    async fn park(
        &self,
        message: &jetstream::Message,
        message_id: Option<Uuid>,
        event: Option<&IncomingEvent>,
        error: &str,
    ) -> Settle {
        let headers = headers::to_json(message.headers.as_ref());
        let body = String::from_utf8_lossy(&message.payload);
        match self
            .inbox
            .park(message_id, event, error, headers, &body)
            .await
        {
            Ok(()) => {
                tracing::warn!(stream = %self.stream, durable = %self.durable, error, "message parked");
                self.update(|s| {
                    s.parked += 1;
                    s.last_error = Some(format!("parked: {error}"));
                });
                Settle::Ack
            }
            Err(err) => {
                self.note_failure(err.to_string());
                Settle::Nak(self.backoff.max.min(Duration::from_secs(5)))
            }
        }
    }

    fn blocked_at(&self, stream: &StreamId) -> Option<u64> {
        lock(&self.blocked).get(stream).copied()
    }

    /// Whether `version` of `stream` is in the inbox's dead letters (parked by an earlier run).
    async fn is_parked(&self, stream: &StreamId, version: u64) -> bool {
        self.inbox.is_parked(stream, version).await.unwrap_or(false)
    }

    fn note_failure(&self, error: String) {
        self.update(|s| {
            s.failures += 1;
            s.last_error = Some(error);
        });
    }

    fn update(&self, change: impl FnOnce(&mut InboxStatus)) {
        change(&mut lock(&self.status));
    }
}

fn blocked_error(parked: u64) -> String {
    format!("blocked: version {parked} of the stream is parked, and later versions wait for it")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A [`JetStreamInbox`] running on its own task.
#[derive(Debug)]
pub struct RunningInbox {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    status: Arc<Mutex<InboxStatus>>,
}

impl RunningInbox {
    /// The consumer's counters.
    pub fn status(&self) -> InboxStatus {
        lock(&self.status).clone()
    }

    /// Finishes the batch in progress and stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops at once, as a crash would: what was not acknowledged is delivered again.
    pub fn abort(self) {
        self.task.abort();
    }
}
