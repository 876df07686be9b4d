//! How a CloudEvent travels as an AMQP 0-9-1 message, both ways.
//!
//! The CloudEvents project has an AMQP protocol binding for **AMQP 1.0** only; there is no
//! binding for RabbitMQ's AMQP 0-9-1. esframe follows the 1.0 binding's binary content mode as
//! closely as 0-9-1 allows:
//!
//! | CloudEvent | AMQP 0-9-1 |
//! | --- | --- |
//! | every attribute but `datacontenttype` (`id`, `source`, `specversion`, `type`, `subject`, `time`, and the extensions) | a header `cloudEvents:{name}`, a long string (the 1.0 binding's application-property prefix, `cloudEvents:`) |
//! | `datacontenttype` | the `content-type` property, `application/json` |
//! | `data` | the body, the payload's JSON text (UTF-8) |
//!
//! and, for AMQP tools and consumers that are not CloudEvents-aware, the message's properties
//! repeat what they can: `message-id` (the message id, the CloudEvent `id`), `type` (the
//! CloudEvent `type`), `timestamp` (the CloudEvent `time`, in whole seconds), `correlation-id`
//! (the `correlationid` extension, when the event has one) and `delivery-mode` 2
//! (persistent). Three more headers name the event in the producer's store:
//! [`STREAM_HEADER`] (`aggregate_type/id`, a long string), [`STREAM_VERSION_HEADER`] and
//! [`POSITION_HEADER`] (64-bit signed integers, `l`; a value above `i64::MAX`, which the
//! PostgreSQL store never produces, is sent as a decimal long string instead).
//!
//! In structured content mode ([`AmqpSink::structured`](crate::AmqpSink::structured),
//! [`structured_properties`]) the body is the CloudEvent in the JSON event format
//! ([`CloudEvent::to_structured`]), the `content-type` property is
//! `application/cloudevents+json`, and there is no `cloudEvents:` header; the other
//! properties and the `esframe-` headers are the same.
//!
//! Reading ([`cloud_event`]) takes, for a message whose content type is
//! `application/cloudevents+json`, the whole CloudEvent from the body
//! ([`CloudEvent::from_structured`]); for any other, the attributes from the `cloudEvents:`
//! headers alone (the `esframe-` headers and the properties are conveniences, never trusted
//! over them); a header written by another client as a short string, a number or a byte array
//! is read as its text.

use esframe_core::publish::{
    CloudEvent, InvalidCloudEvent, OutgoingMessage, STRUCTURED_CONTENT_TYPE,
    is_structured_content_type,
};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use serde_json::{Map, Number, Value};

/// The prefix of the CloudEvents attribute headers, after the AMQP 1.0 binding.
pub const CLOUD_EVENTS_PREFIX: &str = "cloudEvents:";
/// The header naming the producer's stream, `aggregate_type/id`.
pub const STREAM_HEADER: &str = "esframe-stream";
/// The header holding the event's version in its stream.
pub const STREAM_VERSION_HEADER: &str = "esframe-stream-version";
/// The header holding the event's position in the producer's global log.
pub const POSITION_HEADER: &str = "esframe-position";
/// The content type of a message in binary content mode: the data is the payload's JSON.
pub const CONTENT_TYPE: &str = "application/json";
/// AMQP 0-9-1's persistent delivery mode.
pub const PERSISTENT: u8 = 2;

/// Why a message cannot be sent as an AMQP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the message cannot be sent over AMQP 0-9-1: {0}")]
pub struct UnsendableMessage(pub String);

/// Why a received AMQP message is not a CloudEvent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnreadableMessage {
    /// The body is not UTF-8 (esframe's data is JSON text).
    #[error("the body is not UTF-8 text")]
    NotUtf8,
    /// The `cloudEvents:` headers are missing or break the spec's rules.
    #[error("not a CloudEvent in binary content mode: {0}")]
    NotACloudEvent(#[from] InvalidCloudEvent),
    /// The content type says structured mode (`application/cloudevents+json`), and the body
    /// is not a CloudEvent in the JSON event format.
    #[error("not a CloudEvent in structured content mode (the JSON format): {0}")]
    NotAStructuredCloudEvent(InvalidCloudEvent),
}

/// The short string `value`, for a property or the routing key (at most 255 bytes).
pub(crate) fn short(what: &str, value: &str) -> Result<ShortString, UnsendableMessage> {
    ShortString::try_new(value).map_err(|_| {
        UnsendableMessage(format!(
            "the {what} is {} bytes long; AMQP 0-9-1 allows 255",
            value.len()
        ))
    })
}

/// The properties (headers included) of `message` in binary content mode: see the
/// [module](self) for the mapping.
pub fn properties(message: &OutgoingMessage) -> Result<BasicProperties, UnsendableMessage> {
    build_properties(message, false)
}

/// The properties of `message` in structured content mode, whose body is
/// [`CloudEvent::to_structured`]: `content-type` `application/cloudevents+json`, no
/// `cloudEvents:` header, and the rest as in [`properties`].
pub fn structured_properties(
    message: &OutgoingMessage,
) -> Result<BasicProperties, UnsendableMessage> {
    build_properties(message, true)
}

fn build_properties(
    message: &OutgoingMessage,
    structured: bool,
) -> Result<BasicProperties, UnsendableMessage> {
    let event = &message.event;
    let mut headers = FieldTable::default();
    if !structured {
        for (name, value) in event.binary_headers(CLOUD_EVENTS_PREFIX) {
            headers.insert(short("header name", &name)?, long(value));
        }
    }
    headers.insert(STREAM_HEADER.into(), long(message.stream_id.to_string()));
    headers.insert(
        STREAM_VERSION_HEADER.into(),
        integer(message.stream_version),
    );
    headers.insert(POSITION_HEADER.into(), integer(message.position.get()));
    let content_type = if structured {
        STRUCTURED_CONTENT_TYPE
    } else {
        CONTENT_TYPE
    };
    let mut properties = BasicProperties::default()
        .with_message_id(short("message id", &message.id.to_string())?)
        .with_content_type(content_type.into())
        .with_delivery_mode(PERSISTENT)
        .with_type(short("CloudEvents type", &event.ty)?)
        .with_headers(headers);
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(&event.time)
        && let Ok(seconds) = u64::try_from(time.timestamp())
    {
        properties = properties.with_timestamp(seconds);
    }
    if let Some(correlation) = event.extensions.get("correlationid")
        && let Ok(correlation) = ShortString::try_new(correlation.as_str())
    {
        properties = properties.with_correlation_id(correlation);
    }
    Ok(properties)
}

/// Whether a received message is in structured content mode: its `content-type` property is
/// `application/cloudevents+json` (parameters and case aside).
pub fn is_structured(properties: &BasicProperties) -> bool {
    properties
        .content_type()
        .as_ref()
        .is_some_and(|content_type| is_structured_content_type(content_type.as_str()))
}

fn long(text: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.into()))
}

fn integer(n: u64) -> AMQPValue {
    match i64::try_from(n) {
        Ok(n) => AMQPValue::LongLongInt(n),
        Err(_) => long(n.to_string()),
    }
}

/// The text of a header value: strings as they are (a long string that is not UTF-8 is read
/// lossily), numbers and booleans in decimal; `None` for tables, arrays and void.
pub fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::Float(_)
        | AMQPValue::Double(_)
        | AMQPValue::DecimalValue(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_)
        | AMQPValue::Void => return None,
    })
}

/// Reads the CloudEvent of a received message: in structured content mode ([`is_structured`])
/// from the body, the JSON event format; otherwise (binary content mode) the attributes from
/// its `cloudEvents:` headers, the data from its body.
pub fn cloud_event(
    properties: &BasicProperties,
    body: &[u8],
) -> Result<CloudEvent, UnreadableMessage> {
    let body = std::str::from_utf8(body).map_err(|_| UnreadableMessage::NotUtf8)?;
    if is_structured(properties) {
        return CloudEvent::from_structured(body)
            .map_err(UnreadableMessage::NotAStructuredCloudEvent);
    }
    let headers = properties
        .headers()
        .iter()
        .flat_map(|table| table.inner().iter())
        .filter_map(|(name, value)| Some((name.as_str(), header_text(value)?)));
    Ok(CloudEvent::from_binary(
        headers,
        CLOUD_EVENTS_PREFIX,
        body.to_owned(),
    )?)
}

/// A message's headers as JSON, for a dead letter: every header by name, and the routing
/// facts and properties a replay needs under names that no header of esframe's uses
/// (`amqp:exchange`, `amqp:routing_key`, `amqp:message_id`, `amqp:content_type`, `amqp:type`,
/// `amqp:redelivered`).
pub fn headers_json(
    properties: &BasicProperties,
    exchange: &str,
    routing_key: &str,
    redelivered: bool,
) -> Value {
    let mut object = properties
        .headers()
        .as_ref()
        .map(table_json)
        .unwrap_or_default();
    let mut put = |name: &str, value: Value| {
        object.insert(name.to_owned(), value);
    };
    put("amqp:exchange", exchange.into());
    put("amqp:routing_key", routing_key.into());
    put("amqp:redelivered", redelivered.into());
    for (name, value) in [
        ("amqp:message_id", properties.message_id()),
        ("amqp:content_type", properties.content_type()),
        ("amqp:type", properties.kind()),
    ] {
        if let Some(value) = value {
            put(name, value.as_str().into());
        }
    }
    Value::Object(object)
}

fn table_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value_json(value)))
        .collect()
}

fn value_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::Float(f) => Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => Value::String(format!("{d:?}")),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(value_json).collect())
        }
        AMQPValue::FieldTable(table) => Value::Object(table_json(table)),
        AMQPValue::Void => Value::Null,
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) | AMQPValue::ByteArray(_) => {
            header_text(value).map_or(Value::Null, Value::String)
        }
    }
}

#[cfg(test)]
mod tests {
    use esframe_core::{EventMetadata, Payload, Position, RecordedEvent, StreamId};
    use uuid::Uuid;

    use super::*;

    fn message() -> OutgoingMessage {
        let event = RecordedEvent {
            event_id: Uuid::now_v7(),
            stream_id: StreamId::new("account", "ada").unwrap(),
            stream_version: 3,
            global_position: Position::new(42),
            recorded_at: chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00.5Z")
                .unwrap()
                .into(),
            event_type: "MoneyDeposited".into(),
            schema_version: 2,
            payload: Payload::from_json_text(r#"{"amount":5}"#),
            metadata: EventMetadata {
                correlation_id: Some(Uuid::now_v7()),
                ..EventMetadata::default()
            },
        };
        OutgoingMessage {
            id: event.event_id,
            subject: "esframe.account.MoneyDeposited".into(),
            stream_id: event.stream_id.clone(),
            stream_version: 3,
            position: event.global_position,
            event: CloudEvent::from_event(&event, event.event_id, "/bank"),
        }
    }

    #[test]
    fn a_message_round_trips_through_the_properties() {
        let message = message();
        let properties = properties(&message).unwrap();
        assert_eq!(*properties.delivery_mode(), Some(PERSISTENT));
        assert_eq!(
            properties.message_id().as_ref().map(ShortString::as_str),
            Some(message.id.to_string().as_str())
        );
        assert_eq!(
            properties.kind().as_ref().map(ShortString::as_str),
            Some("MoneyDeposited.v2")
        );
        assert_eq!(*properties.timestamp(), Some(1_796_119_200));
        let headers = properties.headers().as_ref().unwrap().inner();
        assert_eq!(
            headers[STREAM_VERSION_HEADER],
            AMQPValue::LongLongInt(3),
            "a number, not text"
        );
        assert!(!headers.contains_key("cloudEvents:datacontenttype"));
        let back = cloud_event(&properties, message.event.data.as_bytes()).unwrap();
        assert_eq!(back, message.event);
    }

    #[test]
    fn a_message_round_trips_in_structured_mode() {
        let message = message();
        let properties = structured_properties(&message).unwrap();
        assert_eq!(
            properties.content_type().as_ref().map(ShortString::as_str),
            Some(STRUCTURED_CONTENT_TYPE)
        );
        assert!(is_structured(&properties));
        assert_eq!(
            properties.message_id().as_ref().map(ShortString::as_str),
            Some(message.id.to_string().as_str())
        );
        assert_eq!(*properties.delivery_mode(), Some(PERSISTENT));
        assert!(properties.correlation_id().is_some());
        let headers = properties.headers().as_ref().unwrap().inner();
        assert!(
            !headers
                .keys()
                .any(|k| k.as_str().starts_with(CLOUD_EVENTS_PREFIX)),
            "{headers:?}"
        );
        assert_eq!(headers[STREAM_VERSION_HEADER], AMQPValue::LongLongInt(3));
        let body = message.event.to_structured();
        assert_eq!(
            cloud_event(&properties, body.as_bytes()).unwrap(),
            message.event
        );
        // A structured content type with a body that is not: told apart from binary mode.
        assert!(matches!(
            cloud_event(&properties, message.event.data.as_bytes()),
            Err(UnreadableMessage::NotAStructuredCloudEvent(
                InvalidCloudEvent::Missing(_)
            ))
        ));
        assert!(!is_structured(&self::properties(&message).unwrap()));
    }

    #[test]
    fn what_is_not_a_cloud_event_is_told_apart() {
        let properties = BasicProperties::default();
        assert_eq!(
            cloud_event(&properties, b"\xff"),
            Err(UnreadableMessage::NotUtf8)
        );
        assert!(matches!(
            cloud_event(&properties, b"{}"),
            Err(UnreadableMessage::NotACloudEvent(_))
        ));
        let json = headers_json(&properties, "ex", "a.b", true);
        assert_eq!(json["amqp:routing_key"], "a.b");
        assert_eq!(json["amqp:redelivered"], true);
    }

    #[test]
    fn an_overlong_routing_key_or_type_is_unsendable() {
        let mut message = message();
        message.event.ty = "T".repeat(300);
        assert!(properties(&message).unwrap_err().0.contains("300 bytes"));
        assert!(short("routing key", &"k".repeat(256)).is_err());
    }
}
