//! What loading an aggregate's state reads: each event with only the fields folding it into the
//! state needs, and, for a cold load, the snapshot in the same read.

use std::borrow::Cow;

use crate::{
    Event, EventMetadata, Payload, Position, RecordedEvent, Snapshot, StoreError, StreamId,
    Upcasters, envelope::decode_payload, error::EventDecodeError,
};

/// A stored event of a stream as an aggregate's load reads it: version, types and payload,
/// without the ids, position, time and metadata that folding events into state never looks at.
///
/// A backend can fetch just these columns
/// ([`EventStore::load_stream_for_state`](crate::EventStore::load_stream_for_state)).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedEvent {
    /// Position in the stream (1-based).
    pub stream_version: u64,
    /// The event type name.
    pub event_type: Cow<'static, str>,
    /// The schema version of the payload.
    pub schema_version: u32,
    /// The payload.
    pub payload: Payload,
}

impl LoadedEvent {
    /// Decodes the payload into the application's event type, checking type and schema version,
    /// as [`RecordedEvent::decode`] does; errors name `stream` and the version.
    pub fn decode<E: Event>(&self, stream: &StreamId) -> Result<E, EventDecodeError> {
        decode_payload(&self.event_type, self.schema_version, &self.payload).map_err(|kind| {
            EventDecodeError {
                stream: stream.clone(),
                stream_version: self.stream_version,
                event_type: self.event_type.to_string(),
                schema_version: self.schema_version,
                kind,
            }
        })
    }

    /// The fields a load reads of a recorded event.
    pub fn from_recorded(event: RecordedEvent) -> Self {
        Self {
            stream_version: event.stream_version,
            event_type: event.event_type,
            schema_version: event.schema_version,
            payload: event.payload,
        }
    }

    /// A recorded event for the upcasters, which read only type, version and payload; the
    /// fields a load does not read are left empty.
    fn into_recorded(self, stream: &StreamId) -> RecordedEvent {
        RecordedEvent {
            event_id: uuid::Uuid::nil(),
            stream_id: stream.clone(),
            stream_version: self.stream_version,
            global_position: Position::START,
            recorded_at: chrono::DateTime::UNIX_EPOCH,
            event_type: self.event_type,
            schema_version: self.schema_version,
            payload: self.payload,
            metadata: EventMetadata::default(),
        }
    }
}

/// What a cold load reads in one go: the stream's snapshot, if any, and its events from the
/// snapshot's own version on (from version 1 without a snapshot). Reading from the snapshot's
/// version, not the one after, proves the stream has it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoadedStream {
    /// The stream's snapshot, exactly as stored.
    pub snapshot: Option<Snapshot>,
    /// The events from the snapshot's version (or 1) on, in version order.
    pub events: Vec<LoadedEvent>,
}

impl LoadedStream {
    /// The version the events were read from.
    pub fn read_from(&self) -> u64 {
        self.snapshot.as_ref().map_or(1, |s| s.version.max(1))
    }
}

/// Brings loaded events to their current versions: only those an upcaster applies to are
/// converted (through a [`RecordedEvent`]); the others pass untouched.
pub(crate) fn upcast_loaded(
    upcasters: &Upcasters,
    stream: &StreamId,
    events: Vec<LoadedEvent>,
) -> Result<Vec<LoadedEvent>, StoreError> {
    if upcasters.is_empty() {
        return Ok(events);
    }
    let mut out = Vec::with_capacity(events.len());
    let mut converted = Vec::new();
    for event in events {
        if !upcasters.applies_to(&event.event_type, event.schema_version) {
            out.push(event);
            continue;
        }
        upcasters.apply(event.into_recorded(stream), &mut converted)?;
        out.extend(converted.drain(..).map(LoadedEvent::from_recorded));
    }
    Ok(out)
}
