//! [`IncomingEvent`]: an esframe event as a consumer in another service receives it.

use std::borrow::Cow;

use uuid::Uuid;

use crate::{
    CommandContext, DecodeErrorKind, Event, EventMetadata, Payload, Position, RecordedEvent,
    StoreError, StreamId, envelope::decode_payload, upcast::Upcasters,
};

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

    /// The producer's correlation id (the `correlationid` extension), if it sent one.
    pub fn correlation_id(&self) -> Option<Uuid> {
        self.uuid_extension("correlationid")
    }

    /// The producer's causation id (the `causationid` extension), if it sent one.
    pub fn causation_id(&self) -> Option<Uuid> {
        self.uuid_extension("causationid")
    }

    /// The W3C trace context (the `traceparent` extension), if it came with one.
    pub fn traceparent(&self) -> Option<&str> {
        self.cloud_event
            .extensions
            .get("traceparent")
            .map(String::as_str)
    }

    fn uuid_extension(&self, name: &str) -> Option<Uuid> {
        self.cloud_event
            .extensions
            .get(name)
            .and_then(|text| Uuid::parse_str(text).ok())
    }

    /// The context of a command this event causes in the consumer's service: its command id
    /// is derived from the message id and `name` (which tells apart the commands one message
    /// causes), so a redelivered message gives the same command and the consumer's store
    /// keeps its events once ([`CommandContext`]); the causation id is the message id, the
    /// correlation id the producer's (or the message id when it sent none), and the
    /// `traceparent`, if any, goes into the events' metadata.
    pub fn command_context(&self, name: &str) -> CommandContext {
        let context = CommandContext::new()
            .command_id(Uuid::new_v5(&self.message_id, name.as_bytes()))
            .correlation_id(self.correlation_id().unwrap_or(self.message_id))
            .causation_id(self.message_id);
        match self.traceparent() {
            Some(traceparent) => context.metadata("traceparent", traceparent),
            None => context,
        }
    }

    /// Brings the event to the consumer's current schema versions through `upcasters`, the
    /// chain a store applies on read, so that a consumer reads a producer's older events as a
    /// producer's own reads would: usually one event at its current version (its `event_type`,
    /// `schema_version`, CloudEvent `type` and data follow; the rest is kept), none for a
    /// retired type, several for a split. The parts of a split share the message's id,
    /// stream, version and position: apply them together, in the inbox's one transaction. An
    /// event no upcaster reads comes back as it is.
    ///
    /// A failed step is [`StoreError::Upcast`] naming the stream, version, type and schema
    /// version; data that is not JSON is [`StoreError::Corrupt`].
    pub fn upcast(&self, upcasters: &Upcasters) -> Result<Vec<IncomingEvent>, StoreError> {
        if !upcasters.applies_to(&self.event_type, self.schema_version) {
            return Ok(vec![self.clone()]);
        }
        let recorded = RecordedEvent {
            event_id: self.message_id,
            stream_id: self.stream_id.clone(),
            stream_version: self.stream_version,
            global_position: self.position,
            // Upcasters read the type, version and payload only; the rest is not kept.
            recorded_at: chrono::DateTime::default(),
            event_type: Cow::Owned(self.event_type.clone()),
            schema_version: self.schema_version,
            payload: Payload::from_json_text(self.cloud_event.data.as_str()),
            metadata: EventMetadata::default(),
        };
        let mut current = Vec::with_capacity(1);
        upcasters.apply(recorded, &mut current)?;
        Ok(current
            .into_iter()
            .map(|event| {
                let mut next = self.clone();
                next.cloud_event.ty = format!("{}.v{}", event.event_type, event.schema_version);
                next.cloud_event.data = event.payload.to_json_text().into_owned();
                next.event_type = event.event_type.into_owned();
                next.schema_version = event.schema_version;
                next
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        EventType,
        publish::CloudEvent,
        upcast::{Upcast, upcaster},
    };

    /// The consumer's current event types.
    struct Current;

    impl Event for Current {
        fn event_types() -> &'static [EventType] {
            const TYPES: &[EventType] = &[
                EventType::new("Credited", 3),
                EventType::new("Audited", 3),
                EventType::new("Withdrawn", 1),
            ];
            TYPES
        }
        fn event_type(&self) -> &'static str {
            "Credited"
        }
        fn schema_version(&self) -> u32 {
            3
        }
        fn to_payload(&self) -> Result<Value, serde_json::Error> {
            Ok(Value::Null)
        }
        fn from_payload(_: &str, _: &Payload) -> Result<Self, DecodeErrorKind> {
            Ok(Current)
        }
    }

    /// Version 1 of a `Deposited` event of `account/ada`, as a consumer receives it.
    fn deposited_v1(data: &str) -> IncomingEvent {
        deposited_v1_with(data, EventMetadata::default())
    }

    /// [`deposited_v1`] with the producer's `metadata`.
    fn deposited_v1_with(data: &str, metadata: EventMetadata) -> IncomingEvent {
        let recorded = RecordedEvent {
            event_id: Uuid::now_v7(),
            stream_id: StreamId::new("account", "ada").unwrap(),
            stream_version: 3,
            global_position: Position::new(42),
            recorded_at: chrono::Utc::now(),
            event_type: "Deposited".into(),
            schema_version: 1,
            payload: Payload::from_json_text(data),
            metadata,
        };
        let cloud = CloudEvent::from_event(&recorded, recorded.event_id, "/bank");
        IncomingEvent::from_cloud_event(cloud).unwrap()
    }

    fn chain() -> Upcasters {
        Upcasters::builder()
            .register(upcaster("Deposited", 1, |mut payload: Value| {
                if payload["amount"].is_null() {
                    return Err("no amount".into());
                }
                payload["currency"] = json!("EUR");
                Ok(Upcast::Next(payload))
            }))
            .register(
                upcaster("Deposited", 2, |payload: Value| {
                    if payload["amount"] == json!(0) {
                        return Ok(Upcast::Drop);
                    }
                    Ok(Upcast::Split(vec![
                        ("Credited".into(), payload.clone()),
                        ("Audited".into(), json!({"amount": payload["amount"]})),
                    ]))
                })
                .outputs(["Credited", "Audited"]),
            )
            .current::<Current>()
            .build()
            .unwrap()
    }

    #[test]
    fn an_old_event_is_read_at_its_current_versions_and_keeps_its_identity() {
        let v1 = deposited_v1(r#"{"amount":5}"#);
        let current = v1.upcast(&chain()).unwrap();
        let summary: Vec<(&str, u32, &str)> = current
            .iter()
            .map(|e| {
                (
                    e.event_type.as_str(),
                    e.schema_version,
                    e.cloud_event.ty.as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [("Credited", 3, "Credited.v3"), ("Audited", 3, "Audited.v3")]
        );
        let credited: Value = serde_json::from_str(&current[0].cloud_event.data).unwrap();
        assert_eq!(credited, json!({"amount": 5, "currency": "EUR"}));
        for part in &current {
            assert_eq!(
                (
                    part.message_id,
                    &part.stream_id,
                    part.stream_version,
                    part.position
                ),
                (v1.message_id, &v1.stream_id, 3, Position::new(42))
            );
            assert_eq!(part.cloud_event.id, v1.cloud_event.id);
        }
    }

    #[test]
    fn retired_events_vanish_and_unknown_ones_pass_unchanged() {
        assert!(
            deposited_v1(r#"{"amount":0}"#)
                .upcast(&chain())
                .unwrap()
                .is_empty()
        );
        let mut other = deposited_v1(r#"{"amount":1}"#);
        other.event_type = "Withdrawn".into();
        assert_eq!(
            other.upcast(&chain()).unwrap(),
            std::slice::from_ref(&other)
        );
        let plain = deposited_v1(r#"{"amount":1}"#);
        assert_eq!(
            plain.upcast(Upcasters::none()).unwrap(),
            std::slice::from_ref(&plain)
        );
    }

    #[test]
    fn the_producers_correlation_causation_and_trace_are_read_from_the_extensions() {
        let correlation = Uuid::now_v7();
        let event = deposited_v1_with(
            "{}",
            EventMetadata {
                correlation_id: Some(correlation),
                causation_id: Some(correlation),
                extra: Default::default(),
            },
        );
        assert_eq!(event.correlation_id(), Some(correlation));
        assert_eq!(event.causation_id(), Some(correlation));
        let trace = event
            .traceparent()
            .expect("derived from the correlation id");
        assert!(trace.starts_with("00-"), "{trace}");

        // Without the producer's ids there is nothing to carry (the command's context then
        // correlates by the message id; `examples/tests/caused_commands.rs` runs it).
        let bare = deposited_v1("{}");
        assert_eq!(
            (
                bare.correlation_id(),
                bare.causation_id(),
                bare.traceparent()
            ),
            (None, None, None)
        );
    }

    #[test]
    fn a_failed_step_names_the_event() {
        let err = deposited_v1(r#"{"sum":1}"#).upcast(&chain()).unwrap_err();
        let StoreError::Upcast {
            stream,
            version,
            event_type,
            schema_version,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(
            (
                stream.to_string(),
                *version,
                event_type.as_str(),
                *schema_version
            ),
            ("account/ada".to_owned(), 3, "Deposited", 1)
        );
        let corrupt = deposited_v1("not json").upcast(&chain()).unwrap_err();
        assert!(matches!(corrupt, StoreError::Corrupt(_)), "{corrupt:?}");
    }
}
