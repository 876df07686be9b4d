//! The [`MessageSink`] contract: where a [`Publisher`](super::Publisher) sends messages.

use std::{future::Future, time::Duration};

use uuid::Uuid;

use crate::{Position, RecordedEvent, StreamId};

use super::CloudEvent;

/// One message for a broker: a stored event as a CloudEvent, the subject (or routing key) it
/// goes to, and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    /// The broker's message id, for deduplication: the event id, or for the second and later
    /// messages an event fans out into, UUIDv5 of the event id and the index.
    pub id: Uuid,
    /// The subject (NATS) or routing key (AMQP).
    pub subject: String,
    /// The stream the event belongs to; a sink never has two of its messages in flight.
    pub stream_id: StreamId,
    /// The event's version in its stream.
    pub stream_version: u64,
    /// The event's position in the global log.
    pub position: Position,
    /// The message itself.
    pub event: CloudEvent,
}

/// What the broker said about a message it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Published {
    /// The broker recognised the message id and did not store it again (JetStream's
    /// `duplicate`); brokers without deduplication never say so.
    pub duplicate: bool,
}

/// Why a sink could not hand a message to its broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The broker could not be reached or did not acknowledge in time; the message may or may
    /// not have arrived. The publisher backs off and sends it again (with the same id).
    #[error("broker unreachable: {message}")]
    Unreachable {
        /// What happened.
        message: String,
        /// The client's error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The broker refused the message (no stream for the subject, a message too large, not
    /// authorised). The publisher stops at it and reports it: sending it again would fail
    /// again until the broker (or the publisher's configuration) changes.
    #[error("broker refused the message: {message}")]
    Refused {
        /// What happened.
        message: String,
        /// The client's error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl SinkError {
    /// An unreachable broker, from the client's error.
    pub fn unreachable(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unreachable {
            message: err.to_string(),
            source: Some(Box::new(err)),
        }
    }

    /// A refused message, from the client's error.
    pub fn refused(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Refused {
            message: err.to_string(),
            source: Some(Box::new(err)),
        }
    }

    /// Whether sending the message again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// A broker client that publishes messages and waits for the broker's acknowledgement.
///
/// A sink must return `Ok` only once the broker has taken the message durably (a JetStream
/// `PubAck`, an AMQP publisher confirm of a persistent message), so that the publisher's
/// checkpoint never passes a message the broker could lose. The publisher calls it with at most
/// one message per stream at a time, in stream order, so a sink need not order anything itself.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an esframe message sink",
    label = "not a `MessageSink`",
    note = "use `esframe_nats::JetStreamSink`, `esframe_amqp::AmqpSink`, or `esframe_core::publish::MemorySink` in tests"
)]
pub trait MessageSink: Clone + Send + Sync + 'static {
    /// Sends `message` and waits for the broker to acknowledge it.
    fn publish(
        &self,
        message: &OutgoingMessage,
    ) -> impl Future<Output = Result<Published, SinkError>> + Send;
}

/// How a publisher turns a stored event into messages: the default sends one message, the
/// event as a CloudEvent, to the subject of [`subject_for`]. A transform may drop an event
/// (`Ok(vec![])`), change its CloudEvent (hide internal fields), or fan it out.
pub type Transform =
    std::sync::Arc<dyn Fn(&RecordedEvent, CloudEvent) -> Vec<CloudEvent> + Send + Sync>;

/// The default subject of an event: `{prefix}.{aggregate type}.{event type}`, each part with
/// the characters NATS subjects and AMQP routing keys treat specially (`.`, `*`, `>`, `#`,
/// whitespace) replaced by `_`.
pub fn subject_for(prefix: &str, event: &RecordedEvent) -> String {
    let clean = |part: &str| -> String {
        part.chars()
            .map(|c| match c {
                '.' | '*' | '>' | '#' => '_',
                c if c.is_whitespace() || c.is_control() => '_',
                c => c,
            })
            .collect()
    };
    format!(
        "{prefix}.{}.{}",
        clean(event.aggregate_type()),
        clean(&event.event_type)
    )
}

/// How long a publisher waits before trying a failed message again: exponential from `min` to
/// `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait.
    pub min: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The wait before try `attempt` (1 for the first retry).
    pub fn wait(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.min.saturating_mul(factor).min(self.max)
    }
}
