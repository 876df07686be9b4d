//! The event envelope: an event together with everything the store knows about it.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::{DecodeErrorKind, Event, Payload, Position, StreamId, error::EventDecodeError};

/// Tracing and free-form metadata carried by every event.
///
/// The correlation id ties together everything caused by one original request; the causation id
/// names the command (or event) that directly caused this event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// Id shared by every message in one business flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// Id of the command or event that directly caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Application-defined entries (user id, tenant, request id, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

/// An event ready to be appended to a stream; the store assigns version, position and time.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Unique id of the event: UUIDv7 by default, derived from the command's id when it has
    /// one ([`derived_event_id`](crate::derived_event_id)). Appending the same id twice is
    /// idempotent.
    pub event_id: Uuid,
    /// Stable event type name.
    pub event_type: Cow<'static, str>,
    /// Schema version of the payload.
    pub schema_version: u32,
    /// Event data as JSON.
    pub payload: Value,
    /// Correlation, causation and free-form metadata.
    pub metadata: EventMetadata,
}

impl NewEvent {
    /// Encodes a typed event with a fresh UUIDv7 id and empty metadata. The stream it is
    /// appended to (and so its aggregate type) is given to the append.
    pub fn from_event<E: Event>(event: &E) -> Result<Self, serde_json::Error> {
        Ok(Self {
            event_id: Uuid::now_v7(),
            event_type: Cow::Borrowed(event.event_type()),
            schema_version: event.schema_version(),
            payload: event.to_payload()?,
            metadata: EventMetadata::default(),
        })
    }

    /// Replaces the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: EventMetadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Whether `other` carries the same content: type, schema version and payload.
    ///
    /// This is what idempotent appends compare when an event id is seen again.
    pub fn same_content(&self, stream: &StreamId, other: &RecordedEvent) -> bool {
        *stream == other.stream_id
            && self.event_type == other.event_type
            && self.schema_version == other.schema_version
            && other.payload == self.payload
    }
}

/// An event as stored, with its typed or raw payload and everything the store recorded.
///
/// [`RecordedEvent`] is the raw form (`EventEnvelope<Payload>`); decode it into the
/// application's event type with [`RecordedEvent::decode`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope<P> {
    /// Unique id of the event.
    pub event_id: Uuid,
    /// Stream (aggregate instance) the event belongs to: its aggregate type and id.
    pub stream_id: StreamId,
    /// Position within the stream, starting at 1, without gaps.
    pub stream_version: u64,
    /// Position in the global log of all streams: unique, strictly increasing.
    pub global_position: Position,
    /// When the store recorded the event.
    pub recorded_at: DateTime<Utc>,
    /// Stable event type name (borrowed from the code when possible).
    pub event_type: Cow<'static, str>,
    /// Schema version the payload was written with.
    pub schema_version: u32,
    /// The event: raw JSON in a [`RecordedEvent`], the application's type once decoded.
    pub payload: P,
    /// Correlation, causation and free-form metadata.
    pub metadata: EventMetadata,
}

/// An event as stored, with its payload still JSON ([`Payload`]: parsed only when needed).
pub type RecordedEvent = EventEnvelope<Payload>;

impl<P> EventEnvelope<P> {
    /// Keeps the envelope and replaces the payload.
    pub fn map<Q>(self, f: impl FnOnce(P) -> Q) -> EventEnvelope<Q> {
        EventEnvelope {
            event_id: self.event_id,
            stream_id: self.stream_id,
            stream_version: self.stream_version,
            global_position: self.global_position,
            recorded_at: self.recorded_at,
            event_type: self.event_type,
            schema_version: self.schema_version,
            payload: f(self.payload),
            metadata: self.metadata,
        }
    }
}

impl<P> EventEnvelope<P> {
    /// The aggregate type that owns the event's stream (`stream_id.aggregate_type()`).
    pub fn aggregate_type(&self) -> &str {
        self.stream_id.aggregate_type()
    }

    /// The id of the aggregate within its type (`stream_id.id()`).
    pub fn aggregate_id(&self) -> &str {
        self.stream_id.id()
    }
}

impl RecordedEvent {
    /// Decodes the payload into the application's event type, checking type and schema version.
    ///
    /// Errors name the stream, version, type and schema version of the event.
    pub fn decode<E: Event>(&self) -> Result<E, EventDecodeError> {
        decode_payload(&self.event_type, self.schema_version, &self.payload).map_err(|kind| {
            EventDecodeError {
                stream: self.stream_id.clone(),
                stream_version: self.stream_version,
                event_type: self.event_type.to_string(),
                schema_version: self.schema_version,
                kind,
            }
        })
    }

    /// Decodes into a typed envelope; see [`RecordedEvent::decode`].
    pub fn into_typed<E: Event>(self) -> Result<EventEnvelope<E>, EventDecodeError> {
        let event = self.decode::<E>()?;
        Ok(self.map(|_| event))
    }
}

/// Decodes a stored payload of `event_type` at `schema_version` into `E`, refusing types and
/// versions `E` does not know.
pub(crate) fn decode_payload<E: Event>(
    event_type: &str,
    schema_version: u32,
    payload: &Payload,
) -> Result<E, DecodeErrorKind> {
    let Some(current) = E::current_version(event_type) else {
        return Err(DecodeErrorKind::UnknownType);
    };
    if schema_version > current {
        return Err(DecodeErrorKind::VersionTooNew {
            stored: schema_version,
            current,
        });
    }
    if schema_version < current {
        return Err(DecodeErrorKind::VersionTooOld {
            stored: schema_version,
            current,
        });
    }
    E::from_payload(event_type, payload)
}
