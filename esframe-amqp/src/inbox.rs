//! [`AmqpInbox`]: a RabbitMQ consumer that applies every delivered event exactly once through a
//! [`PgInbox`], acknowledging a message only once the inbox has it.

use std::{
    collections::{HashMap, HashSet},
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use esframe_core::publish::{Backoff, IncomingEvent};
use esframe_postgres::{InboxError, InboxHandler, InboxOutcome, PgInbox};
use futures_util::{FutureExt, StreamExt};
use lapin::{
    Channel, Confirmation, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};
use tokio::{sync::watch, task::JoinHandle};
use uuid::Uuid;

use crate::{
    binding,
    connection::{AmqpError, DEFAULT_CONNECT_TIMEOUT, close_in_background, connect_within, within},
};

/// The default prefetch: one unacknowledged message at a time.
pub const DEFAULT_PREFETCH: u16 = 1;
/// The default number of times the handler may fail on a message before it is parked.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The default wait before an early message goes back to the queue.
pub const DEFAULT_EARLY_DELAY: Duration = Duration::from_millis(200);

/// The header a message parked on a dead-letter exchange carries its error in.
pub const ERROR_HEADER: &str = "esframe-error";
/// The header a message parked on a dead-letter exchange carries the handler's attempts in.
pub const ATTEMPTS_HEADER: &str = "esframe-attempts";

/// Where [`AmqpInbox`] puts a message it gives up on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeadLetters {
    /// The inbox's dead letters ([`PgInbox::park`], listed by [`PgInbox::dead_letters`]), with
    /// the message's headers and body; then the message is acknowledged.
    #[default]
    Inbox,
    /// Published (with publisher confirms, `mandatory`) to this exchange with the message's
    /// own properties and body, plus the headers [`ERROR_HEADER`] and [`ATTEMPTS_HEADER`]; the
    /// message is acknowledged once the broker confirmed the copy.
    /// ([`Topology::dead_letters`](crate::Topology::dead_letters) declares such an exchange
    /// with a queue.)
    Exchange(String),
}

/// What an [`AmqpInbox`] has done since it started, for operators.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AmqpInboxStatus {
    /// Whether it is connected and consuming.
    pub connected: bool,
    /// Connections opened (1 when it never lost one).
    pub connections: u64,
    /// Deliveries received (redeliveries included).
    pub delivered: u64,
    /// Events applied: the handler ran and committed with the inbox's record.
    pub applied: u64,
    /// Deliveries of events applied before (acknowledged, nothing ran).
    pub duplicates: u64,
    /// Deliveries that came before an earlier event of their stream (requeued).
    pub early: u64,
    /// Handler failures and database failures after which the message was requeued.
    pub retried: u64,
    /// Messages given up on: unreadable, failing every attempt, or behind a parked event of
    /// their stream.
    pub parked: u64,
    /// The last error (a handler's, the database's, the broker's), until the next event is
    /// applied.
    pub last_error: Option<String>,
}

/// Consumes a queue and applies every event in it exactly once with an [`InboxHandler`],
/// through a [`PgInbox`].
///
/// For each delivery (manual acknowledgement), the CloudEvent is read in either content mode
/// ([`binding::cloud_event`]): binary (`cloudEvents:` headers, the data as the body) or, for a
/// `content-type` of `application/cloudevents+json`, structured (the JSON event format as the
/// body); both may come mixed on one queue.
///
/// | the message | what happens |
/// | --- | --- |
/// | not a CloudEvent of esframe's (no `cloudEvents:` headers or, in structured mode, a body that is not the JSON format; no `esframe…` extensions; a body that is not UTF-8) | parked at once, acknowledged |
/// | applied ([`InboxOutcome::Applied`]) or applied before ([`InboxOutcome::Duplicate`]) | acknowledged |
/// | early ([`InboxOutcome::Early`]): an earlier version of its stream is not applied yet | requeued (`basic.nack`, requeue) after [`AmqpInbox::early_delay`] |
/// | early, and the version the inbox waits for was parked | parked, acknowledged: a stream's later events wait behind its parked one in the dead letters, in order, instead of cycling through the queue for ever |
/// | the handler fails (or panics) | requeued after [`AmqpInbox::backoff`]; on the [`AmqpInbox::max_attempts`]-th failure (counted per message id, in memory) parked and acknowledged |
/// | the database fails | requeued after the backoff, not counted against the message |
///
/// A message is acknowledged only after the inbox's transaction committed (or the dead letter
/// was written), so a crash or a lost connection at any point redelivers at most what the inbox
/// then recognises as a duplicate. A lost connection is reopened with the backoff, for ever,
/// until [`RunningAmqpInbox::shutdown`].
///
/// **Prefetch and order.** The inbox applies a stream's events in version order whatever
/// order they come in (an early one is requeued). The default prefetch of 1 keeps that from
/// costing anything: the consumer holds one unacknowledged message at a time, a requeued
/// message goes back to its place at the head of the queue, and nothing overtakes it. A larger
/// prefetch pipelines deliveries (fewer round trips) but, while a message is retried, lets the
/// stream's next messages arrive early and be requeued; several consumers on one queue are
/// ordered only by the inbox.
///
/// Messages are handled one at a time; while one waits (an early delay, a backoff) the consumer
/// waits with it.
pub struct AmqpInbox<H> {
    uri: String,
    queue: String,
    inbox: PgInbox,
    handler: Arc<H>,
    prefetch: u16,
    max_attempts: u32,
    early_delay: Duration,
    backoff: Backoff,
    dead_letters: DeadLetters,
    connection_name: String,
    connect_timeout: Duration,
    status: Arc<Mutex<AmqpInboxStatus>>,
}

impl<H> std::fmt::Debug for AmqpInbox<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpInbox")
            .field("queue", &self.queue)
            .field("consumer", &self.inbox.consumer())
            .field("prefetch", &self.prefetch)
            .field("max_attempts", &self.max_attempts)
            .field("early_delay", &self.early_delay)
            .field("backoff", &self.backoff)
            .field("dead_letters", &self.dead_letters)
            .field("connection_name", &self.connection_name)
            .finish_non_exhaustive()
    }
}

impl<H: InboxHandler + 'static> AmqpInbox<H> {
    /// A consumer of `queue` on the broker at `uri` that applies each event with `handler`
    /// through `inbox`.
    pub fn new(
        uri: impl Into<String>,
        queue: impl Into<String>,
        inbox: PgInbox,
        handler: H,
    ) -> Self {
        Self {
            uri: uri.into(),
            queue: queue.into(),
            connection_name: format!("esframe-amqp inbox {}", inbox.consumer()),
            inbox,
            handler: Arc::new(handler),
            prefetch: DEFAULT_PREFETCH,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            early_delay: DEFAULT_EARLY_DELAY,
            backoff: Backoff::default(),
            dead_letters: DeadLetters::Inbox,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            status: Arc::default(),
        }
    }

    /// Unacknowledged messages the broker may send ahead (default [`DEFAULT_PREFETCH`]; at
    /// least 1).
    #[must_use]
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// The handler failures after which a message is parked (default
    /// [`DEFAULT_MAX_ATTEMPTS`]; at least 1).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// How long an early message is held before it is requeued (default
    /// [`DEFAULT_EARLY_DELAY`]).
    #[must_use]
    pub fn early_delay(mut self, delay: Duration) -> Self {
        self.early_delay = delay;
        self
    }

    /// The waits before a failed message is requeued, and between reconnections.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Where messages given up on go (default [`DeadLetters::Inbox`]).
    #[must_use]
    pub fn dead_letters(mut self, dead_letters: DeadLetters) -> Self {
        self.dead_letters = dead_letters;
        self
    }

    /// The connection's name in the broker's connection list (default
    /// `esframe-amqp inbox {consumer}`).
    #[must_use]
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// What it has done so far.
    pub fn status(&self) -> AmqpInboxStatus {
        lock(&self.status).clone()
    }

    /// Runs the consumer on a Tokio task until [`RunningAmqpInbox::shutdown`].
    pub fn spawn(self) -> RunningAmqpInbox {
        let (stop, stopped) = watch::channel(false);
        let status = Arc::clone(&self.status);
        let task = tokio::spawn(async move { self.run(stopped).await });
        RunningAmqpInbox { stop, task, status }
    }

    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let mut memory = Memory::default();
        let mut attempt = 0u32;
        loop {
            if *stopped.borrow() {
                return;
            }
            match self.session(&mut memory, &mut stopped, &mut attempt).await {
                Ok(()) => return,
                Err(err) => {
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(queue = %self.queue, error = %err, "AMQP inbox lost its connection; reconnecting");
                    self.update(|s| {
                        s.connected = false;
                        s.last_error = Some(err.to_string());
                    });
                    if pause(self.backoff.wait(attempt), &mut stopped).await {
                        return;
                    }
                }
            }
        }
    }

    /// One connection: consume until stopped (`Ok`) or until the connection fails.
    async fn session(
        &self,
        memory: &mut Memory,
        stopped: &mut watch::Receiver<bool>,
        attempt: &mut u32,
    ) -> Result<(), AmqpError> {
        let connection =
            connect_within(&self.uri, &self.connection_name, self.connect_timeout).await?;
        let session = Session {
            connection: Some(connection),
        };
        let connection = session.connection();
        let channel = within(self.connect_timeout, connection.create_channel()).await?;
        within(
            self.connect_timeout,
            channel.basic_qos(self.prefetch, BasicQosOptions { global: false }),
        )
        .await?;
        let dead_letter_channel = match &self.dead_letters {
            DeadLetters::Inbox => None,
            DeadLetters::Exchange(_) => {
                let channel = within(self.connect_timeout, connection.create_channel()).await?;
                within(
                    self.connect_timeout,
                    channel.confirm_select(ConfirmSelectOptions::default()),
                )
                .await?;
                Some(channel)
            }
        };
        let mut consumer = within(
            self.connect_timeout,
            channel.basic_consume(
                self.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        *attempt = 0;
        self.update(|s| {
            s.connected = true;
            s.connections += 1;
        });
        tracing::info!(queue = %self.queue, consumer = %self.inbox.consumer(), "AMQP inbox consuming");
        loop {
            let next = tokio::select! {
                biased;
                _ = stopped.changed() => None,
                next = consumer.next() => Some(next),
            };
            let delivery = match next {
                None => {
                    // Stopped: cancel, so that the broker sends nothing more, and close; what
                    // it sent ahead and was not acknowledged goes back to the queue.
                    let _ = within(
                        Duration::from_secs(5),
                        channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
                    )
                    .await;
                    session.close().await;
                    self.update(|s| s.connected = false);
                    return Ok(());
                }
                Some(None) => {
                    return Err(AmqpError::Cancelled(self.queue.clone()));
                }
                Some(Some(Err(err))) => return Err(err.into()),
                Some(Some(Ok(delivery))) => delivery,
            };
            self.handle(memory, &delivery, dead_letter_channel.as_ref(), stopped)
                .await?;
        }
    }

    /// Handles one delivery to the end: applied and acknowledged, requeued, or parked.
    async fn handle(
        &self,
        memory: &mut Memory,
        delivery: &Delivery,
        dead_letter_channel: Option<&Channel>,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<(), AmqpError> {
        self.update(|s| s.delivered += 1);
        match self.decide(memory, delivery).await {
            Action::Ack => {
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Action::Requeue(wait) => {
                pause(wait, stopped).await;
                delivery
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await?;
            }
            Action::Park {
                event,
                error,
                attempts,
            } => {
                let parked = match (&self.dead_letters, dead_letter_channel) {
                    (DeadLetters::Exchange(exchange), Some(channel)) => {
                        self.park_on_exchange(channel, exchange, delivery, &error, attempts)
                            .await
                    }
                    _ => self.park_in_inbox(delivery, event.as_deref(), &error).await,
                };
                match parked {
                    Ok(()) => {
                        if let Some(event) = &event {
                            memory.parked(event);
                            memory.attempts.remove(&event.message_id);
                        }
                        self.update(|s| s.parked += 1);
                        tracing::warn!(queue = %self.queue, error = %error, "message parked");
                        delivery.ack(BasicAckOptions::default()).await?;
                    }
                    Err(park_error) => {
                        // Not parked: keep the message in the queue and try again later.
                        memory.store_failures = memory.store_failures.saturating_add(1);
                        self.update(|s| {
                            s.retried += 1;
                            s.last_error = Some(format!("parking a message failed: {park_error}"));
                        });
                        pause(self.backoff.wait(memory.store_failures), stopped).await;
                        delivery
                            .nack(BasicNackOptions {
                                multiple: false,
                                requeue: true,
                            })
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn decide(&self, memory: &mut Memory, delivery: &Delivery) -> Action {
        let event = binding::cloud_event(&delivery.properties, &delivery.data)
            .map_err(|err| err.to_string())
            .and_then(|cloud| {
                IncomingEvent::from_cloud_event(cloud).map_err(|err| err.to_string())
            });
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                return Action::Park {
                    event: None,
                    error,
                    attempts: 0,
                };
            }
        };
        let applied = AssertUnwindSafe(self.inbox.apply(&event, &*self.handler))
            .catch_unwind()
            .await;
        match applied {
            Ok(Ok(InboxOutcome::Applied)) => {
                memory.attempts.remove(&event.message_id);
                memory.store_failures = 0;
                self.update(|s| {
                    s.applied += 1;
                    s.last_error = None;
                });
                Action::Ack
            }
            Ok(Ok(InboxOutcome::Duplicate)) => {
                memory.attempts.remove(&event.message_id);
                memory.store_failures = 0;
                self.update(|s| s.duplicates += 1);
                Action::Ack
            }
            Ok(Ok(InboxOutcome::Early { expected })) => {
                memory.store_failures = 0;
                self.update(|s| s.early += 1);
                if self.is_parked(memory, &event, expected).await {
                    let error = format!(
                        "version {expected} of stream `{}` is parked; version {} waits behind it",
                        event.stream_id, event.stream_version
                    );
                    Action::Park {
                        event: Some(Box::new(event)),
                        error,
                        attempts: 0,
                    }
                } else {
                    Action::Requeue(self.early_delay)
                }
            }
            Ok(Err(err @ InboxError::Handler { .. })) => {
                self.failed(memory, event, err.to_string())
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                self.failed(memory, event, format!("the handler panicked: {what}"))
            }
            Ok(Err(err)) => {
                memory.store_failures = memory.store_failures.saturating_add(1);
                tracing::warn!(queue = %self.queue, error = %err, "the inbox failed; the message is requeued");
                self.update(|s| {
                    s.retried += 1;
                    s.last_error = Some(err.to_string());
                });
                Action::Requeue(self.backoff.wait(memory.store_failures))
            }
        }
    }

    /// A handler failure: requeued with backoff, or parked on the last attempt.
    fn failed(&self, memory: &mut Memory, event: IncomingEvent, error: String) -> Action {
        if memory.attempts.len() > 10_000 {
            // Counts of messages another consumer finished; forget them rather than grow.
            memory.attempts.clear();
        }
        let attempts = memory.attempts.entry(event.message_id).or_insert(0);
        *attempts += 1;
        let attempts = *attempts;
        tracing::warn!(
            queue = %self.queue,
            stream = %event.stream_id,
            version = event.stream_version,
            attempt = attempts,
            error = %error,
            "the inbox handler failed"
        );
        self.update(|s| s.last_error = Some(error.clone()));
        if attempts >= self.max_attempts {
            Action::Park {
                event: Some(Box::new(event)),
                error: format!("{error} (after {attempts} attempts)"),
                attempts,
            }
        } else {
            self.update(|s| s.retried += 1);
            Action::Requeue(self.backoff.wait(attempts))
        }
    }

    /// Whether version `expected` of the event's stream was parked (by this consumer, or, with
    /// the inbox's dead letters, by an earlier run: one indexed lookup).
    async fn is_parked(&self, memory: &mut Memory, event: &IncomingEvent, expected: u64) -> bool {
        let key = (event.stream_id.to_string(), expected);
        if memory.parked.contains(&key) {
            return true;
        }
        if self.dead_letters != DeadLetters::Inbox {
            return false;
        }
        let parked = self
            .inbox
            .is_parked(&event.stream_id, expected)
            .await
            .unwrap_or(false);
        if parked {
            memory.parked.insert(key);
        }
        parked
    }

    async fn park_in_inbox(
        &self,
        delivery: &Delivery,
        event: Option<&IncomingEvent>,
        error: &str,
    ) -> Result<(), String> {
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok());
        let headers = binding::headers_json(
            &delivery.properties,
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            delivery.redelivered,
        );
        self.inbox
            .park(
                message_id,
                event,
                error,
                headers,
                &String::from_utf8_lossy(&delivery.data),
            )
            .await
            .map_err(|err| err.to_string())
    }

    async fn park_on_exchange(
        &self,
        channel: &Channel,
        name: &str,
        delivery: &Delivery,
        error: &str,
        attempts: u32,
    ) -> Result<(), String> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            ERROR_HEADER.into(),
            AMQPValue::LongString(LongString::from(error)),
        );
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(attempts.into()),
        );
        let properties = delivery.properties.clone().with_headers(headers);
        let exchange = binding::short("exchange name", name).map_err(|e| e.to_string())?;
        let confirmed = within(self.connect_timeout, async {
            channel
                .basic_publish(
                    exchange,
                    delivery.routing_key.clone(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &delivery.data,
                    properties,
                )
                .await?
                .await
        })
        .await
        .map_err(|err| err.to_string())?;
        match confirmed {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Err(format!(
                "no queue is bound to the dead-letter exchange `{name}`"
            )),
            Confirmation::Nack(None) | Confirmation::NotRequested => {
                Err("the broker did not take the dead letter".to_owned())
            }
        }
    }

    fn update(&self, change: impl FnOnce(&mut AmqpInboxStatus)) {
        change(&mut lock(&self.status));
    }
}

/// What to do with a delivery.
enum Action {
    Ack,
    Requeue(Duration),
    Park {
        event: Option<Box<IncomingEvent>>,
        error: String,
        attempts: u32,
    },
}

/// What the consumer remembers across deliveries and connections.
#[derive(Default)]
struct Memory {
    /// Handler failures per message id.
    attempts: HashMap<Uuid, u32>,
    /// Parked versions, by stream (`aggregate_type/id`).
    parked: HashSet<(String, u64)>,
    /// Consecutive database failures.
    store_failures: u32,
}

impl Memory {
    fn parked(&mut self, event: &IncomingEvent) {
        self.parked
            .insert((event.stream_id.to_string(), event.stream_version));
    }
}

/// A connection that is closed in the background if the session ends without closing it.
struct Session {
    connection: Option<Connection>,
}

impl Session {
    fn connection(&self) -> &Connection {
        self.connection
            .as_ref()
            .expect("the session's connection is open")
    }

    async fn close(mut self) {
        if let Some(connection) = self.connection.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                connection.close(200, "esframe-amqp inbox stopped".into()),
            )
            .await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            close_in_background(connection, "esframe-amqp inbox reconnecting");
        }
    }
}

/// Waits `wait`, or until stopped; `true` if stopped.
async fn pause(wait: Duration, stopped: &mut watch::Receiver<bool>) -> bool {
    if *stopped.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(wait) => *stopped.borrow(),
        _ = stopped.changed() => true,
    }
}

fn lock(status: &Mutex<AmqpInboxStatus>) -> std::sync::MutexGuard<'_, AmqpInboxStatus> {
    status.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An [`AmqpInbox`] running on its own task.
#[derive(Debug)]
pub struct RunningAmqpInbox {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    status: Arc<Mutex<AmqpInboxStatus>>,
}

impl RunningAmqpInbox {
    /// What it has done so far.
    pub fn status(&self) -> AmqpInboxStatus {
        lock(&self.status).clone()
    }

    /// Stops after the message in hand (a wait for an early or failed one is cut short and the
    /// message requeued), cancels the consumer and closes the connection: the messages the
    /// broker sent ahead go back to the queue.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops at once, as a crash would (the task is aborted; the broker requeues the
    /// unacknowledged messages when it notices the connection is gone).
    pub fn abort(self) {
        self.task.abort();
    }
}
