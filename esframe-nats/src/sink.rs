//! [`JetStreamSink`]: a [`MessageSink`] that publishes to JetStream and waits for the `PubAck`.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use esframe_core::publish::{MessageSink, OutgoingMessage, Published, SinkError};

use crate::headers;

/// Publishes each message to its subject on JetStream, in binary content mode
/// ([`headers`](crate::headers) lists what goes in the headers; the body is the event's data)
/// or, with [`JetStreamSink::structured`], in structured content mode, and returns only once
/// the stream's `PubAck` arrived: the message is stored.
///
/// JetStream drops a message whose `Nats-Msg-Id` it stored within the stream's duplicate
/// window and says so (`duplicate` in the `PubAck`, [`Published::duplicate`] here), so a
/// publisher's resends after a crash or a lost acknowledgement are stored once, as long as they
/// come within the window (see [`StreamSpec::duplicate_window`](crate::StreamSpec::duplicate_window)).
///
/// Errors: a timed-out acknowledgement, a lost connection, or a full client buffer is
/// [`SinkError::Unreachable`] (sent again with the same id); no stream for the subject, a
/// message over the server's `max_payload`, or another answer of the server's is
/// [`SinkError::Refused`] (a server saying it is temporarily unavailable, code 503, counts as
/// unreachable).
#[derive(Clone)]
pub struct JetStreamSink {
    context: jetstream::Context,
    ack_timeout: Option<Duration>,
    structured: bool,
}

impl std::fmt::Debug for JetStreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamSink")
            .field("ack_timeout", &self.ack_timeout)
            .field("structured", &self.structured)
            .finish_non_exhaustive()
    }
}

impl JetStreamSink {
    /// A sink on `context` (`async_nats::jetstream::new(client)`). The acknowledgement is awaited
    /// for the context's timeout (5 s unless the context was built with another) unless
    /// [`JetStreamSink::ack_timeout`] says otherwise.
    pub fn new(context: jetstream::Context) -> Self {
        Self {
            context,
            ack_timeout: None,
            structured: false,
        }
    }

    /// Sends the messages in structured content mode (default `false`, binary mode): the body
    /// is the CloudEvent in the JSON event format
    /// ([`CloudEvent::to_structured`](esframe_core::publish::CloudEvent::to_structured)), the
    /// headers only `Nats-Msg-Id`, `content-type: application/cloudevents+json` and the
    /// `esframe-*` ones ([`headers::outgoing_structured`]), no `ce-` header. For consumers that
    /// read the JSON format only; [`JetStreamInbox`](crate::JetStreamInbox) reads both modes.
    #[must_use]
    pub fn structured(mut self, structured: bool) -> Self {
        self.structured = structured;
        self
    }

    /// Waits at most `timeout` for each acknowledgement (then the message counts as unreachable
    /// and is sent again later). Only a timeout shorter than the context's own takes effect.
    #[must_use]
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = Some(timeout);
        self
    }

    /// The JetStream context.
    pub fn context(&self) -> &jetstream::Context {
        &self.context
    }

    async fn send(&self, message: &OutgoingMessage) -> Result<Published, SinkError> {
        let (headers, body) = if self.structured {
            let headers = headers::outgoing_structured(message).map_err(SinkError::refused)?;
            (headers, message.event.to_structured())
        } else {
            let headers = headers::outgoing(message).map_err(SinkError::refused)?;
            (headers, message.event.data.clone())
        };
        let publish = PublishMessage::build()
            .headers(headers)
            .payload(body.into());
        let ack = self
            .context
            .send_publish(message.subject.clone(), publish)
            .await
            .map_err(classify)?;
        let ack = match self.ack_timeout {
            None => ack.await,
            Some(timeout) => match tokio::time::timeout(timeout, ack.into_future()).await {
                Ok(ack) => ack,
                Err(_) => {
                    return Err(SinkError::Unreachable {
                        message: format!("no acknowledgement within {timeout:?}"),
                        source: None,
                    });
                }
            },
        }
        .map_err(classify)?;
        Ok(Published {
            duplicate: ack.duplicate,
        })
    }
}

impl MessageSink for JetStreamSink {
    async fn publish(&self, message: &OutgoingMessage) -> Result<Published, SinkError> {
        self.send(message).await
    }
}

/// Sorts a publish error into transient and refused.
fn classify(err: jetstream::context::PublishError) -> SinkError {
    match err.kind() {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => SinkError::unreachable(err),
        PublishErrorKind::StreamNotFound
        | PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => SinkError::refused(err),
        _ => {
            // `Other`: the server's own error (a JetStream API error in the PubAck), or the
            // client's (its connection task gone, an ack that does not parse).
            let server = std::error::Error::source(&err)
                .and_then(|source| source.downcast_ref::<jetstream::Error>())
                .map(jetstream::Error::code);
            match server {
                Some(503) | None => SinkError::unreachable(err),
                Some(_) => SinkError::refused(err),
            }
        }
    }
}
