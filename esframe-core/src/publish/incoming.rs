//! [`IncomingEvent`]: an esframe event as a consumer in another service receives it.

use uuid::Uuid;

use crate::{DecodeErrorKind, Event, Payload, Position, StreamId, envelope::decode_payload};

use super::CloudEvent;

/// An event received from a broker, read from the CloudEvent a [`Publisher`](super::Publisher)
/// sent: its id, stream, version and position are what an inbox deduplicates and orders by.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingEvent {
    /// The message id (the event id, for an event sent once).
    pub message_id: Uuid,
    /// The producer's stream.
    pub stream_id: StreamId,
    /// The event's version in that stream.
    pub stream_version: u64,
    /// The event's position in the producer's global log.
    pub position: Position,
    /// The event type.
    pub event_type: String,
    /// Its schema version.
    pub schema_version: u32,
    /// The whole CloudEvent, attributes and data.
    pub cloud_event: CloudEvent,
}

/// Why a received CloudEvent is not an esframe event; such a message goes to the dead letters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the message {message_id} is not an esframe event: {problem}")]
pub struct NotAnEsframeEvent {
    /// The message id.
    pub message_id: Uuid,
    /// What is missing or malformed.
    pub problem: String,
}

impl IncomingEvent {
    /// Reads the esframe attributes of `cloud_event`: the `esframeaggregate`, `esframestream`,
    /// `esframeversion` and `sequence` extensions and a `type` of the form `{type}.v{version}`.
    pub fn from_cloud_event(cloud_event: CloudEvent) -> Result<Self, NotAnEsframeEvent> {
        let fail = |problem: String| NotAnEsframeEvent {
            message_id: cloud_event.id,
            problem,
        };
        let extension = |name: &str| {
            cloud_event
                .extensions
                .get(name)
                .ok_or_else(|| fail(format!("no `{name}` extension")))
        };
        let stream_id = StreamId::new(extension("esframeaggregate")?, extension("esframestream")?)
            .map_err(|err| fail(err.to_string()))?;
        let number = |name: &str| -> Result<u64, NotAnEsframeEvent> {
            let text = extension(name)?;
            text.parse()
                .map_err(|_| fail(format!("`{name}` {text:?} is not a number")))
        };
        let stream_version = number("esframeversion")?;
        let position = Position::new(number("sequence")?);
        let (event_type, schema_version) = cloud_event
            .ty
            .rsplit_once(".v")
            .and_then(|(name, v)| Some((name.to_owned(), v.parse::<u32>().ok()?)))
            .ok_or_else(|| {
                fail(format!(
                    "type {:?} is not `{{type}}.v{{version}}`",
                    cloud_event.ty
                ))
            })?;
        if stream_version == 0 {
            return Err(fail("`esframeversion` is 0".to_owned()));
        }
        Ok(Self {
            message_id: cloud_event.id,
            stream_id,
            stream_version,
            position,
            event_type,
            schema_version,
            cloud_event,
        })
    }

    /// Decodes the data into the application's event type, checking type and schema version as
    /// [`RecordedEvent::decode`](crate::RecordedEvent::decode) does.
    pub fn decode<E: Event>(&self) -> Result<E, DecodeErrorKind> {
        let payload = Payload::from_json_text(self.cloud_event.data.as_str());
        decode_payload(&self.event_type, self.schema_version, &payload)
    }
}
