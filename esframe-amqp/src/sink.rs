//! [`AmqpSink`]: a [`MessageSink`] that publishes to a RabbitMQ exchange with publisher
//! confirms.

use std::{
    borrow::Cow,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use esframe_core::publish::{MessageSink, OutgoingMessage, Published, SinkError};
use lapin::{
    Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::FieldTable,
};
use tokio::sync::Mutex;

use crate::{
    binding,
    connection::{AmqpError, DEFAULT_CONNECT_TIMEOUT, close_in_background, connect_within, within},
};

/// How long [`AmqpSink`] waits for the broker's confirm of a message by default.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes each message to an exchange and returns once the broker confirmed it.
///
/// - **Confirms.** The channel is in confirm mode (RabbitMQ's publisher confirms), and
///   [`publish`](MessageSink::publish) returns `Ok` only on the broker's `basic.ack` of the
///   message, sent persistent (delivery mode 2). For a queue that is durable (a classic durable
///   queue, or a quorum queue) RabbitMQ acks a persistent message once it is written to disk
///   (for a quorum queue, on a majority of nodes): the broker will not lose it. A message sent to
///   a transient queue is acked sooner and lost with the broker; declare durable queues in
///   production.
/// - **Routing.** The exchange is configurable (a topic exchange is the usual choice), the
///   routing key is the message's subject (`esframe.{aggregate type}.{event type}` by default).
///   Messages are sent `mandatory`: one that no queue is bound for comes back (`basic.return`)
///   and the publish fails with [`SinkError::Refused`], so a missing binding stops the publisher
///   at the message instead of dropping events on the floor ([`AmqpSink::mandatory`] turns this
///   off, for an exchange with an alternate exchange, or a fan-out where nobody listening is
///   fine).
/// - **Failures.** A `basic.nack` (the broker could not take the message, for instance a
///   queue's length limit with `reject-publish`) and anything that breaks the connection or the
///   channel, or leaves the confirm missing for [`AmqpSink::confirm_timeout`], is
///   [`SinkError::Unreachable`]: the publisher backs off and sends the message again, with the
///   same message id. The broker's refusals (no such exchange, access refused, a message too
///   large, an unroutable mandatory message) are [`SinkError::Refused`].
/// - **Reconnection.** The connection and its channel are opened on the first publish (or by
///   [`AmqpSink::connect`]) and shared by every clone and every concurrent publish. A publish
///   that finds them broken (the connection was lost since the last one, or breaks while it
///   waits for its confirm) drops them and fails as [`SinkError::Unreachable`], so that the loss
///   shows in the publisher's status; the next publish connects again with the configured URI.
///   Dropping the last clone closes the connection.
/// - **No deduplication.** RabbitMQ keeps every copy of a message sent twice (after a lost
///   confirm, or a publisher restarted before its checkpoint moved): [`Published::duplicate`]
///   is always `false`, and the consumer deduplicates (by stream and version, as
///   [`AmqpInbox`](crate::AmqpInbox) does with an inbox).
///
/// When the broker closes the channel over one message (a message too large), every message in
/// flight on it at that moment fails with the same refusal; the publisher sends the others
/// again.
#[derive(Clone)]
pub struct AmqpSink {
    config: Arc<Config>,
    link: Arc<Mutex<LinkState>>,
    links: Arc<AtomicU64>,
}

/// The shared connection, or when the last attempt to make one failed.
#[derive(Default)]
struct LinkState {
    link: Option<Link>,
    /// When the last connection attempt failed, and how.
    failed: Option<(Instant, String)>,
}

/// After a failed connection attempt, publishes fail at once with its error for this long
/// instead of each making an attempt of its own: with many streams in flight against a broker
/// that does not answer, attempts one after another would take streams × connect timeout.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
struct Config {
    uri: String,
    exchange: String,
    connection_name: String,
    mandatory: bool,
    structured: bool,
    confirm_timeout: Duration,
    connect_timeout: Duration,
}

/// An open connection and its confirm-mode channel.
struct Link {
    id: u64,
    channel: Channel,
    connection: Option<Connection>,
}

impl Link {
    fn usable(&self) -> bool {
        self.channel.status().connected()
            && self
                .connection
                .as_ref()
                .is_some_and(|c| c.status().connected())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            close_in_background(connection, "esframe-amqp sink closed");
        }
    }
}

impl std::fmt::Debug for AmqpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSink")
            .field("exchange", &self.config.exchange)
            .field("connection_name", &self.config.connection_name)
            .field("mandatory", &self.config.mandatory)
            .field("structured", &self.config.structured)
            .field("confirm_timeout", &self.config.confirm_timeout)
            .finish_non_exhaustive()
    }
}

impl AmqpSink {
    /// A sink that publishes to `exchange` on the broker at `uri`
    /// (`amqp://user:password@host:port/vhost`). It connects on the first publish; the exchange
    /// must exist by then ([`Topology`](crate::Topology) declares one).
    pub fn new(uri: impl Into<String>, exchange: impl Into<String>) -> Self {
        Self {
            config: Arc::new(Config {
                uri: uri.into(),
                exchange: exchange.into(),
                connection_name: "esframe-amqp sink".to_owned(),
                mandatory: true,
                structured: false,
                confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            }),
            link: Arc::default(),
            links: Arc::default(),
        }
    }

    /// Whether messages are sent `mandatory` (default `true`): an unroutable message is then
    /// [`SinkError::Refused`] instead of dropped by the broker.
    #[must_use]
    pub fn mandatory(mut self, mandatory: bool) -> Self {
        Arc::make_mut(&mut self.config).mandatory = mandatory;
        self
    }

    /// Sends the messages in structured content mode (default `false`, binary mode): the body
    /// is the CloudEvent in the JSON event format
    /// ([`CloudEvent::to_structured`](esframe_core::publish::CloudEvent::to_structured)), the
    /// `content-type` `application/cloudevents+json`, and no `cloudEvents:` header; the
    /// `message-id` and the other properties and the `esframe-*` headers are kept
    /// ([`binding::structured_properties`]). For consumers that read the JSON format only;
    /// [`AmqpInbox`](crate::AmqpInbox) reads both modes.
    #[must_use]
    pub fn structured(mut self, structured: bool) -> Self {
        Arc::make_mut(&mut self.config).structured = structured;
        self
    }

    /// How long a publish waits for the broker's confirm (default
    /// [`DEFAULT_CONFIRM_TIMEOUT`]) before it fails as [`SinkError::Unreachable`] and drops the
    /// connection.
    #[must_use]
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.config).confirm_timeout = timeout;
        self
    }

    /// How long connecting may take (default 10 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.config).connect_timeout = timeout;
        self
    }

    /// The connection's name in the broker's connection list (default `esframe-amqp sink`).
    #[must_use]
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.config).connection_name = name.into();
        self
    }

    /// The exchange messages go to.
    pub fn exchange(&self) -> &str {
        &self.config.exchange
    }

    /// Connects now (if not connected) and checks that the exchange exists: a broker that
    /// cannot be reached is [`SinkError::Unreachable`], a missing exchange or a refused login
    /// [`SinkError::Refused`].
    pub async fn connect(&self) -> Result<(), SinkError> {
        let (channel, id) = self.channel().await?;
        let exchange =
            binding::short("exchange name", &self.config.exchange).map_err(SinkError::refused)?;
        let checked = within(
            self.config.connect_timeout,
            channel.exchange_declare(
                exchange,
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        match checked {
            Ok(()) => Ok(()),
            Err(err) => {
                self.discard(id).await;
                Err(sink_error(err))
            }
        }
    }

    /// Whether the sink holds a connection that is open.
    pub async fn is_connected(&self) -> bool {
        self.link
            .lock()
            .await
            .link
            .as_ref()
            .is_some_and(Link::usable)
    }

    /// Closes the connection (the next publish opens a new one).
    pub async fn close(&self) {
        let link = self.link.lock().await.link.take();
        if let Some(mut link) = link
            && let Some(connection) = link.connection.take()
        {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                connection.close(200, "esframe-amqp sink closed".into()),
            )
            .await;
        }
    }

    /// The shared channel, connecting first if there is none. A connection found broken (the
    /// broker closed it, the network failed) since the last publish is dropped and reported as
    /// [`SinkError::Unreachable`], so that the publisher's status shows the loss; the next
    /// publish connects again.
    async fn channel(&self) -> Result<(Channel, u64), SinkError> {
        let mut state = self.link.lock().await;
        if let Some(open) = state.link.as_ref() {
            if open.usable() {
                return Ok((open.channel.clone(), open.id));
            }
            state.link = None;
            return Err(SinkError::Unreachable {
                message: "the connection to the broker was lost; reconnecting on the next publish"
                    .to_owned(),
                source: None,
            });
        }
        if let Some((at, error)) = &state.failed
            && at.elapsed() < RECONNECT_PAUSE
        {
            return Err(SinkError::Unreachable {
                message: format!(
                    "not connecting again yet: the attempt {} ms ago failed: {error}",
                    at.elapsed().as_millis()
                ),
                source: None,
            });
        }
        match self.open_link().await {
            Ok(link) => {
                let opened = (link.channel.clone(), link.id);
                state.link = Some(link);
                state.failed = None;
                Ok(opened)
            }
            Err(err) => {
                state.failed = Some((Instant::now(), err.to_string()));
                Err(err)
            }
        }
    }

    /// A new connection and confirming channel.
    async fn open_link(&self) -> Result<Link, SinkError> {
        let config = &self.config;
        let connection =
            connect_within(&config.uri, &config.connection_name, config.connect_timeout)
                .await
                .map_err(sink_error)?;
        let opened = async {
            let channel = within(config.connect_timeout, connection.create_channel()).await?;
            within(
                config.connect_timeout,
                channel.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?;
            Ok::<_, AmqpError>(channel)
        }
        .await;
        let channel = match opened {
            Ok(channel) => channel,
            Err(err) => {
                close_in_background(connection, "esframe-amqp sink: no channel");
                return Err(sink_error(err));
            }
        };
        let id = self.links.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(exchange = %config.exchange, link = id, "AMQP sink connected");
        Ok(Link {
            id,
            channel,
            connection: Some(connection),
        })
    }

    /// Drops the link `id` if it is still the current one, so that the next publish connects
    /// again.
    async fn discard(&self, id: u64) {
        let mut state = self.link.lock().await;
        if state.link.as_ref().is_some_and(|l| l.id == id) {
            state.link = None;
        }
    }

    async fn send(&self, message: &OutgoingMessage) -> Result<Published, SinkError> {
        let (properties, body) = if self.config.structured {
            let properties = binding::structured_properties(message).map_err(SinkError::refused)?;
            (properties, Cow::Owned(message.event.to_structured()))
        } else {
            let properties = binding::properties(message).map_err(SinkError::refused)?;
            (properties, Cow::Borrowed(message.event.data.as_str()))
        };
        let exchange =
            binding::short("exchange name", &self.config.exchange).map_err(SinkError::refused)?;
        let routing_key =
            binding::short("routing key", &message.subject).map_err(SinkError::refused)?;
        let (channel, id) = self.channel().await?;
        let options = BasicPublishOptions {
            mandatory: self.config.mandatory,
            immediate: false,
        };
        let body = body.as_bytes();
        let confirmed = within(self.config.confirm_timeout, async {
            channel
                .basic_publish(exchange, routing_key, options, body, properties)
                .await?
                .await
        })
        .await;
        match confirmed {
            Ok(Confirmation::Ack(None)) => Ok(Published { duplicate: false }),
            Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => {
                Err(SinkError::Refused {
                    message: format!(
                        "the broker returned the message: {} {} (no queue is bound to exchange `{}` for routing key `{}`)",
                        returned.reply_code,
                        returned.reply_text,
                        self.config.exchange,
                        message.subject
                    ),
                    source: None,
                })
            }
            Ok(Confirmation::Nack(None)) => Err(SinkError::Unreachable {
                message: "the broker nacked the message (it could not take it)".to_owned(),
                source: None,
            }),
            Ok(Confirmation::NotRequested) => {
                // The channel is not in confirm mode: never ours, but do not trust it.
                self.discard(id).await;
                Err(SinkError::Unreachable {
                    message: "the channel is not in confirm mode".to_owned(),
                    source: None,
                })
            }
            Err(err) => {
                // A closed channel or connection, or a confirm that never came: start again on
                // a new connection.
                self.discard(id).await;
                Err(sink_error(err))
            }
        }
    }
}

impl MessageSink for AmqpSink {
    async fn publish(&self, message: &OutgoingMessage) -> Result<Published, SinkError> {
        self.send(message).await
    }
}

/// A client error as the publisher understands it.
fn sink_error(err: AmqpError) -> SinkError {
    if err.is_refusal() {
        SinkError::refused(err)
    } else {
        SinkError::unreachable(err)
    }
}
