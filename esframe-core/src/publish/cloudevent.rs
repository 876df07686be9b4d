//! CloudEvents 1.0.2: the envelope an event leaves the service in.
//!
//! The attributes follow the spec's rules (`cloudevents/spec` v1.0.2, `spec.md`): `id`,
//! `source`, `specversion` and `type` are required and non-empty; extension names are 1 to 20
//! lowercase ASCII letters or digits; `time` is RFC 3339; `sequence` (the `sequence` extension)
//! is the global position zero-padded to 20 digits, so that it compares lexicographically.
//! Brokers with headers carry the attributes as headers and the payload as the body (binary
//! content mode, [`CloudEvent::binary_headers`], read back with [`CloudEvent::from_binary`]);
//! [`CloudEvent::to_structured`] and [`CloudEvent::from_structured`] are the JSON event format
//! (`formats/json-format.md` v1.0.2: structured content mode, media type
//! [`STRUCTURED_CONTENT_TYPE`]).

use std::{borrow::Cow, collections::BTreeMap};

use serde_json::{Value, value::RawValue};
use uuid::Uuid;

use crate::{RecordedEvent, StreamId};

/// The CloudEvents spec version this module writes.
pub const SPEC_VERSION: &str = "1.0";

/// The media type of a CloudEvent in the JSON event format (structured content mode): the
/// content type of a message whose body is [`CloudEvent::to_structured`].
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Whether a message's content type says structured content mode in the JSON format: its media
/// type, parameters stripped and case ignored, is [`STRUCTURED_CONTENT_TYPE`]
/// (`application/cloudevents+json; charset=utf-8` is).
pub fn is_structured_content_type(content_type: &str) -> bool {
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    media_type.eq_ignore_ascii_case(STRUCTURED_CONTENT_TYPE)
}

/// A CloudEvent: its attributes and its data (the event's payload, JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct CloudEvent {
    /// `id`: the message id (the event id, or one derived from it); the dedup key.
    pub id: Uuid,
    /// `source`: the producing service's URI reference.
    pub source: String,
    /// `type`: the event type with its schema version, `MoneyDeposited.v2`.
    pub ty: String,
    /// `subject`: the stream, `aggregate_type/id`.
    pub subject: String,
    /// `time`: when the store recorded the event, RFC 3339.
    pub time: String,
    /// `datacontenttype`: always `application/json`.
    pub datacontenttype: &'static str,
    /// Extension attributes, by name: `sequence`, `sequencetype`, `partitionkey`,
    /// `esframestream`, `esframeaggregate`, `esframeversion`, `correlationid`, `causationid`,
    /// `traceparent`, and whatever a transform adds. The names esframe writes are borrowed
    /// (`Cow::Borrowed`), so building an event copies only the values.
    pub extensions: BTreeMap<Cow<'static, str>, String>,
    /// The data: the payload's JSON text.
    pub data: String,
}

/// Why a [`CloudEvent`] breaks the spec's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidCloudEvent {
    /// A required attribute is empty.
    #[error("CloudEvents attribute `{0}` must not be empty")]
    Empty(&'static str),
    /// A required attribute is missing (or `specversion` is not 1.0).
    #[error("CloudEvents attribute `{0}` is missing or not what esframe writes")]
    Missing(&'static str),
    /// The `id` is not a UUID, as esframe's message ids are.
    #[error("CloudEvents id {0:?} is not a UUID")]
    NotAnEsframeId(String),
    /// An extension name is not 1 to 20 lowercase ASCII letters or digits, or reuses a core
    /// attribute's name.
    #[error(
        "CloudEvents extension name {0:?} is invalid: use 1 to 20 lowercase ASCII letters or digits, not a core attribute's name"
    )]
    ExtensionName(String),
    /// An attribute value holds a control character, which no header can carry.
    #[error("CloudEvents attribute `{name}` holds a control character")]
    ControlCharacter {
        /// The attribute.
        name: String,
    },
    /// The text is not a CloudEvent in the JSON event format: not JSON, or not an object.
    #[error("not a CloudEvent in the JSON event format: {0}")]
    NotStructured(String),
    /// An attribute of a structured CloudEvent has a JSON type the format does not allow for
    /// it: the core attributes are strings, an extension is a string, an integer or a boolean.
    #[error(
        "CloudEvents attribute `{name}` is a JSON {found}; the JSON format wants a string{}",
        if *.extension { " (or, for an extension, an integer or a boolean)" } else { "" }
    )]
    AttributeType {
        /// The attribute.
        name: String,
        /// What it is: `number`, `boolean`, `array`, `object`.
        found: &'static str,
        /// Whether it is an extension attribute.
        extension: bool,
    },
    /// A structured CloudEvent carries binary data (`data_base64`): esframe's data is JSON,
    /// which the JSON format carries as `data`.
    #[error(
        "CloudEvents `data_base64` (binary data) is not supported: esframe's data is JSON, carried as `data`"
    )]
    BinaryData,
}

const CORE_ATTRIBUTES: [&str; 10] = [
    "id",
    "source",
    "specversion",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
];

/// Whether `name` is a valid extension attribute name (CloudEvents 1.0.2, "Attribute Naming
/// Convention": lowercase ASCII letters or digits, at most 20 characters).
pub fn valid_extension_name(name: &str) -> bool {
    (1..=20).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && !CORE_ATTRIBUTES.contains(&name)
}

impl CloudEvent {
    /// The CloudEvent of a stored event: `id` = `message_id`, `source`, `type` =
    /// `{event_type}.v{schema_version}`, `subject` = the stream, `time` = recorded at, and the
    /// extensions `sequence` (zero-padded global position), `sequencetype` (`Integer`),
    /// `partitionkey` (the stream), `esframeaggregate`, `esframestream` (the id),
    /// `esframeversion` (the stream version), `correlationid`, `causationid` and
    /// `traceparent` when the event has them.
    ///
    /// `traceparent` is the event's metadata entry of that name if it holds one; otherwise,
    /// for an event with a correlation id, a W3C trace context whose trace id is the correlation
    /// id and whose parent id is taken from the event id, so every message of one flow shares a
    /// trace.
    pub fn from_event(event: &RecordedEvent, message_id: Uuid, source: &str) -> Self {
        let mut extensions = BTreeMap::new();
        let mut put = |name: &'static str, value: String| {
            extensions.insert(Cow::Borrowed(name), value);
        };
        put("sequence", sequence(event.global_position.get()));
        put("sequencetype", "Integer".to_owned());
        put("partitionkey", event.stream_id.to_string());
        put("esframeaggregate", event.aggregate_type().to_owned());
        put("esframestream", event.aggregate_id().to_owned());
        put("esframeversion", event.stream_version.to_string());
        if let Some(correlation) = event.metadata.correlation_id {
            put("correlationid", correlation.to_string());
        }
        if let Some(causation) = event.metadata.causation_id {
            put("causationid", causation.to_string());
        }
        let traceparent = match event.metadata.extra.get("traceparent") {
            Some(Value::String(given)) if valid_traceparent(given) => Some(given.clone()),
            _ => event
                .metadata
                .correlation_id
                .map(|trace| traceparent(trace, event.event_id)),
        };
        if let Some(traceparent) = traceparent {
            put("traceparent", traceparent);
        }
        Self {
            id: message_id,
            source: source.to_owned(),
            ty: format!("{}.v{}", event.event_type, event.schema_version),
            subject: event.stream_id.to_string(),
            time: event
                .recorded_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            datacontenttype: "application/json",
            extensions,
            data: event.payload.to_json_text().into_owned(),
        }
    }

    /// Checks the attributes against the spec's rules.
    pub fn check(&self) -> Result<(), InvalidCloudEvent> {
        if self.source.is_empty() {
            return Err(InvalidCloudEvent::Empty("source"));
        }
        if self.ty.is_empty() {
            return Err(InvalidCloudEvent::Empty("type"));
        }
        for (name, value) in self.attributes() {
            if value.chars().any(char::is_control) {
                return Err(InvalidCloudEvent::ControlCharacter { name });
            }
        }
        match self.extensions.keys().find(|n| !valid_extension_name(n)) {
            Some(bad) => Err(InvalidCloudEvent::ExtensionName(bad.to_string())),
            None => Ok(()),
        }
    }

    /// Every attribute but the data, by name: the core ones, then the extensions.
    pub fn attributes(&self) -> Vec<(String, String)> {
        let mut all = Vec::with_capacity(7 + self.extensions.len());
        self.for_each_attribute(|name, value| all.push((name.to_owned(), value.to_owned())));
        all
    }

    /// Calls `f` with every attribute but the data, by name, in the order of
    /// [`CloudEvent::attributes`], without copying any: what a binding writing headers uses.
    pub fn for_each_attribute(&self, mut f: impl FnMut(&str, &str)) {
        let mut id = Uuid::encode_buffer();
        f("id", self.id.hyphenated().encode_lower(&mut id));
        f("source", &self.source);
        f("specversion", SPEC_VERSION);
        f("type", &self.ty);
        f("subject", &self.subject);
        f("time", &self.time);
        f("datacontenttype", self.datacontenttype);
        for (name, value) in &self.extensions {
            f(name, value);
        }
    }

    /// The attributes as headers for binary content mode, each name behind `prefix` (`ce-` on
    /// NATS and HTTP, `cloudEvents:` on AMQP), except `datacontenttype`, which binary mode
    /// carries as the message's content type (`content-type`).
    pub fn binary_headers(&self, prefix: &str) -> Vec<(String, String)> {
        self.attributes()
            .into_iter()
            .filter(|(name, _)| name != "datacontenttype")
            .map(|(name, value)| (format!("{prefix}{name}"), value))
            .collect()
    }

    /// The JSON event format (structured content mode), as text: every attribute as a string
    /// member (the core ones, then the extensions), and the data as `data`, its JSON text as
    /// it is (not re-serialized: key order, spacing and number spelling kept). Data that is not
    /// JSON (never the case for a stored event) goes as a JSON string; empty data (nothing
    /// received in binary mode) as no `data` member.
    ///
    /// [`CloudEvent::from_structured`] reads it back: the same event, the data's text exactly
    /// (but for whitespace around it).
    pub fn to_structured(&self) -> String {
        let mut out = String::with_capacity(self.data.len() + 512);
        out.push('{');
        self.for_each_attribute(|name, value| {
            if out.len() > 1 {
                out.push(',');
            }
            push_json_string(&mut out, name);
            out.push(':');
            push_json_string(&mut out, value);
        });
        if !self.data.is_empty() {
            out.push_str(",\"data\":");
            match serde_json::from_str::<&RawValue>(&self.data) {
                Ok(json) => out.push_str(json.get()),
                Err(_) => push_json_string(&mut out, &self.data),
            }
        }
        out.push('}');
        out
    }

    /// Reads a CloudEvent in the JSON event format (structured content mode,
    /// `formats/json-format.md` v1.0.2): an object whose members are the attributes and the
    /// data.
    ///
    /// - `data` is kept as its JSON text, exactly as it came (an object, an array, a string
    ///   with its quotes, `null`); no `data` member is empty data. `data_base64` (binary data)
    ///   is refused ([`InvalidCloudEvent::BinaryData`]): esframe's data is JSON.
    /// - The core attributes must be JSON strings; an extension may also be an integer or a
    ///   boolean, read as its canonical text (`5`, `true`), as binary mode would carry it;
    ///   anything else is [`InvalidCloudEvent::AttributeType`] naming the attribute. A member
    ///   that is `null` is unset, as the format says.
    /// - As [`CloudEvent::from_binary`]: `id`, `source`, `type` and `specversion` (`1.0`) are
    ///   required and non-empty ([`InvalidCloudEvent::Missing`] names the first one that is
    ///   not), the `id` a UUID, and the spec's rules hold ([`CloudEvent::check`]);
    ///   `datacontenttype` is not kept (esframe's data is JSON).
    ///
    /// Text that is not a JSON object is [`InvalidCloudEvent::NotStructured`].
    pub fn from_structured(text: &str) -> Result<Self, InvalidCloudEvent> {
        let members: BTreeMap<String, &RawValue> = serde_json::from_str(text)
            .map_err(|err| InvalidCloudEvent::NotStructured(err.to_string()))?;
        let mut attributes = BTreeMap::new();
        let mut data = String::new();
        for (name, raw) in members {
            match name.as_str() {
                "data" => data = raw.get().to_owned(),
                "data_base64" if raw.get() != "null" => return Err(InvalidCloudEvent::BinaryData),
                "data_base64" => {}
                _ => {
                    let value: Value = serde_json::from_str(raw.get())
                        .map_err(|err| InvalidCloudEvent::NotStructured(err.to_string()))?;
                    let extension = !CORE_ATTRIBUTES.contains(&name.as_str());
                    let text = match value {
                        Value::Null => continue,
                        Value::String(text) => text,
                        Value::Bool(b) if extension => b.to_string(),
                        Value::Number(n) if extension && (n.is_i64() || n.is_u64()) => {
                            n.to_string()
                        }
                        other => {
                            return Err(InvalidCloudEvent::AttributeType {
                                name,
                                found: json_type(&other),
                                extension,
                            });
                        }
                    };
                    attributes.insert(name, text);
                }
            }
        }
        Self::from_attributes(attributes, data)
    }

    /// Reads a CloudEvent in binary content mode: the attributes from the headers named
    /// `{prefix}{attribute}` (other headers are ignored), the data from the body. Fails on a
    /// missing or malformed required attribute, or another spec version.
    pub fn from_binary<I, N, V>(
        headers: I,
        prefix: &str,
        body: String,
    ) -> Result<Self, InvalidCloudEvent>
    where
        I: IntoIterator<Item = (N, V)>,
        N: AsRef<str>,
        V: Into<String>,
    {
        let mut attributes: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in headers {
            if let Some(attribute) = name.as_ref().strip_prefix(prefix) {
                attributes.insert(attribute.to_ascii_lowercase(), value.into());
            }
        }
        Self::from_attributes(attributes, body)
    }

    /// The event of `attributes` (name to value, as received) and `data`: the required ones
    /// checked, the rest extensions, then [`CloudEvent::check`].
    fn from_attributes(
        mut attributes: BTreeMap<String, String>,
        data: String,
    ) -> Result<Self, InvalidCloudEvent> {
        let mut take = |name: &'static str| {
            attributes
                .remove(name)
                .filter(|v| !v.is_empty())
                .ok_or(InvalidCloudEvent::Missing(name))
        };
        if take("specversion")? != SPEC_VERSION {
            return Err(InvalidCloudEvent::Missing("specversion"));
        }
        let id = take("id")?;
        let id = Uuid::parse_str(&id).map_err(|_| InvalidCloudEvent::NotAnEsframeId(id))?;
        let event = Self {
            id,
            source: take("source")?,
            ty: take("type")?,
            subject: take("subject").unwrap_or_default(),
            time: take("time").unwrap_or_default(),
            datacontenttype: "application/json",
            extensions: {
                attributes.remove("datacontenttype");
                attributes
                    .into_iter()
                    .map(|(name, value)| (Cow::Owned(name), value))
                    .collect()
            },
            data,
        };
        event.check()?;
        Ok(event)
    }

    /// The stream the event came from, from the `esframeaggregate` and `esframestream`
    /// extensions.
    pub fn stream_id(&self) -> Option<StreamId> {
        let aggregate = self.extensions.get("esframeaggregate")?;
        let id = self.extensions.get("esframestream")?;
        StreamId::new(aggregate, id).ok()
    }
}

/// Appends `text` as a JSON string.
fn push_json_string(out: &mut String, text: &str) {
    out.push_str(&Value::from(text).to_string());
}

/// The JSON type of `value`, for an error.
fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A global position as the `sequence` extension: zero-padded to the 20 digits of `u64::MAX`,
/// so that the strings compare as the numbers do.
pub fn sequence(position: u64) -> String {
    format!("{position:020}")
}

/// A W3C `traceparent` (version 00, sampled) with trace id `trace` and parent id the first 8
/// bytes of `parent`.
fn traceparent(trace: Uuid, parent: Uuid) -> String {
    let parent = &parent.simple().to_string()[..16];
    format!("00-{}-{parent}-01", trace.simple())
}

/// Whether `value` has the W3C `traceparent` form: `00-<32 hex>-<16 hex>-<2 hex>`.
fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "0".repeat(32)
        && parts[2] != "0".repeat(16)
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, json};

    use super::*;
    use crate::{EventMetadata, Payload, Position};

    fn recorded() -> RecordedEvent {
        RecordedEvent {
            event_id: Uuid::parse_str("0190a5f2-0000-7000-8000-000000000001").unwrap(),
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
                correlation_id: Some(
                    Uuid::parse_str("4bf92f35-77b3-4da6-a3ce-929d0e0e4736").unwrap(),
                ),
                causation_id: None,
                extra: Map::new(),
            },
        }
    }

    #[test]
    fn maps_the_envelope_to_attributes() {
        let event = recorded();
        let ce = CloudEvent::from_event(&event, event.event_id, "/bank");
        ce.check().unwrap();
        assert_eq!(ce.ty, "MoneyDeposited.v2");
        assert_eq!(ce.subject, "account/ada");
        assert_eq!(ce.time, "2026-12-01T10:00:00.500000Z");
        assert_eq!(ce.extensions["sequence"], "00000000000000000042");
        assert_eq!(ce.extensions["esframeversion"], "3");
        assert_eq!(ce.extensions["partitionkey"], "account/ada");
        assert_eq!(
            ce.extensions["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0190a5f200007000-01"
        );
        assert!(!ce.extensions.contains_key("causationid"));
        assert_eq!(ce.stream_id(), Some(event.stream_id.clone()));
        let headers = ce.binary_headers("ce-");
        assert!(headers.contains(&("ce-specversion".into(), "1.0".into())));
        assert!(headers.contains(&("ce-id".into(), event.event_id.to_string())));
        assert!(!headers.iter().any(|(n, _)| n == "ce-datacontenttype"));
        let structured: Value = serde_json::from_str(&ce.to_structured()).unwrap();
        assert_eq!(structured["data"]["amount"], 5);
        assert_eq!(structured["specversion"], "1.0");
        assert_eq!(structured["datacontenttype"], "application/json");
        assert_eq!(structured["sequence"], "00000000000000000042");
        // As the book shows it (`docs/src/concepts/publishing.md`, unwrapped).
        assert_eq!(
            ce.to_structured(),
            concat!(
                r#"{"id":"0190a5f2-0000-7000-8000-000000000001","source":"/bank","#,
                r#""specversion":"1.0","type":"MoneyDeposited.v2","subject":"account/ada","#,
                r#""time":"2026-12-01T10:00:00.500000Z","datacontenttype":"application/json","#,
                r#""correlationid":"4bf92f35-77b3-4da6-a3ce-929d0e0e4736","#,
                r#""esframeaggregate":"account","esframestream":"ada","esframeversion":"3","#,
                r#""partitionkey":"account/ada","sequence":"00000000000000000042","#,
                r#""sequencetype":"Integer","#,
                r#""traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-0190a5f200007000-01","#,
                r#""data":{"amount":5}}"#,
            )
        );
    }

    #[test]
    fn binary_mode_round_trips_and_refuses_what_is_missing() {
        let event = recorded();
        let ce = CloudEvent::from_event(&event, event.event_id, "/bank");
        let headers = ce.binary_headers("ce-");
        let back = CloudEvent::from_binary(headers.clone(), "ce-", ce.data.clone()).unwrap();
        assert_eq!(back, ce);
        let without_id: Vec<_> = headers
            .iter()
            .filter(|(n, _)| n != "ce-id")
            .cloned()
            .collect();
        assert_eq!(
            CloudEvent::from_binary(without_id, "ce-", String::new()),
            Err(InvalidCloudEvent::Missing("id"))
        );
    }

    #[test]
    fn sequences_compare_as_positions_do() {
        let (a, b) = (sequence(9), sequence(10));
        assert!(a < b, "{a} < {b}");
        assert_eq!(sequence(u64::MAX).len(), 20);
    }

    #[test]
    fn a_given_traceparent_is_kept_and_a_malformed_one_replaced() {
        let mut event = recorded();
        let given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        event
            .metadata
            .extra
            .insert("traceparent".into(), given.into());
        let ce = CloudEvent::from_event(&event, event.event_id, "/bank");
        assert_eq!(ce.extensions["traceparent"], given);
        event
            .metadata
            .extra
            .insert("traceparent".into(), "nonsense".into());
        let ce = CloudEvent::from_event(&event, event.event_id, "/bank");
        assert!(ce.extensions["traceparent"].starts_with("00-4bf92f35"));
    }

    #[test]
    fn breaking_the_rules_is_refused() {
        let event = recorded();
        let mut ce = CloudEvent::from_event(&event, event.event_id, "");
        assert_eq!(ce.check(), Err(InvalidCloudEvent::Empty("source")));
        ce.source = "/bank".into();
        for bad in [
            "",
            "UpperCase",
            "with-dash",
            "waytoolongextensionname",
            "type",
        ] {
            let mut wrong = ce.clone();
            wrong.extensions.insert(bad.into(), "x".into());
            assert!(
                matches!(wrong.check(), Err(InvalidCloudEvent::ExtensionName(_))),
                "{bad:?}"
            );
        }
        let mut control = ce.clone();
        control.extensions.insert("note".into(), "a\nb".into());
        assert!(matches!(
            control.check(),
            Err(InvalidCloudEvent::ControlCharacter { .. })
        ));
    }

    /// The structured form of `ce` as a JSON object, to break on purpose.
    fn structured_object(ce: &CloudEvent) -> Map<String, Value> {
        match serde_json::from_str(&ce.to_structured()).unwrap() {
            Value::Object(object) => object,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn structured_mode_round_trips_exactly() {
        let event = recorded();
        let mut ce = CloudEvent::from_event(&event, event.event_id, "/bank");
        ce.subject = "account/zoë \"quoted\" \\ back".into();
        ce.extensions
            .insert("note".into(), "€ and \u{1F600}".into());
        ce.extensions
            .insert("causationid".into(), Uuid::now_v7().to_string());
        for data in [
            // An object as PostgreSQL's jsonb writes it: spaces, its own key order, a number
            // beyond f64's precision; a `Value` would reorder, respace and round it.
            r#"{"zeta": 1, "alpha": {"nested": [1, 2.50, -0.0]}, "big": 123456789012345678901234567890}"#,
            r#"{"amount":5}"#,
            "[1,\"two\",{\"three\":3},[],null]",
            r#""just a string, with \"quotes\" and \u00e9""#,
            "null",
            "42",
            "{}",
        ] {
            ce.data = data.to_owned();
            let text = ce.to_structured();
            let back = CloudEvent::from_structured(&text).unwrap();
            assert_eq!(back, ce, "{data}");
            assert_eq!(back.data, data, "the data's text as it was");
            let json: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(json["data"], serde_json::from_str::<Value>(data).unwrap());
            assert_eq!(json["specversion"], "1.0");
            assert_eq!(json["id"], event.event_id.to_string());
            assert_eq!(json["note"], "€ and \u{1F600}");
            assert!(json.get("data_base64").is_none());
            // The same event as binary mode reads it.
            let binary = CloudEvent::from_binary(ce.binary_headers("ce-"), "ce-", ce.data.clone());
            assert_eq!(binary.unwrap(), back);
        }
        // Empty data (an empty body in binary mode) is no `data` member, and back.
        ce.data = String::new();
        let text = ce.to_structured();
        assert!(!structured_object(&ce).contains_key("data"), "{text}");
        assert_eq!(CloudEvent::from_structured(&text).unwrap(), ce);
        // Data that is not JSON goes as a string (and comes back as that JSON string).
        ce.data = "not json".into();
        assert_eq!(structured_object(&ce)["data"], "not json");
        assert_eq!(
            CloudEvent::from_structured(&ce.to_structured())
                .unwrap()
                .data,
            r#""not json""#
        );
        assert!(is_structured_content_type(STRUCTURED_CONTENT_TYPE));
        assert!(is_structured_content_type(
            "Application/CloudEvents+JSON; charset=utf-8"
        ));
        assert!(!is_structured_content_type("application/json"));
        assert!(!is_structured_content_type(
            "application/cloudevents-batch+json"
        ));
    }

    #[test]
    fn structured_mode_reads_what_the_json_format_allows() {
        let id = Uuid::now_v7();
        let text = json!({
            "specversion": "1.0",
            "type": "MoneyDeposited.v2",
            "source": "/bank",
            "id": id.to_string(),
            "subject": null,
            "time": "2026-12-01T10:00:00Z",
            "comexampleothervalue": 5,
            "negative": -3,
            "flag": true,
            "unsetextension": null,
            "data_base64": null,
            "data": { "amount": 5 },
        })
        .to_string();
        let ce = CloudEvent::from_structured(&text).unwrap();
        assert_eq!(ce.id, id);
        assert_eq!(ce.subject, "", "null is unset");
        assert_eq!(ce.datacontenttype, "application/json", "implied");
        assert_eq!(ce.extensions["comexampleothervalue"], "5");
        assert_eq!(ce.extensions["negative"], "-3");
        assert_eq!(ce.extensions["flag"], "true");
        assert!(!ce.extensions.contains_key("unsetextension"));
        assert_eq!(ce.data, r#"{"amount":5}"#);
    }

    #[test]
    fn structured_mode_refuses_what_is_not_a_cloud_event_naming_the_attribute() {
        let event = recorded();
        let ce = CloudEvent::from_event(&event, event.event_id, "/bank");
        let read = |object: &Map<String, Value>| {
            CloudEvent::from_structured(&Value::Object(object.clone()).to_string())
        };
        for text in ["", "not json", "[1, 2]", r#""a string""#, "42", "null", "{"] {
            assert!(
                matches!(
                    CloudEvent::from_structured(text),
                    Err(InvalidCloudEvent::NotStructured(_))
                ),
                "{text:?}"
            );
        }
        for name in ["id", "source", "type", "specversion"] {
            let mut object = structured_object(&ce);
            object.remove(name);
            assert_eq!(
                read(&object),
                Err(InvalidCloudEvent::Missing(name)),
                "{name}"
            );
            object.insert(name.into(), Value::Null);
            assert_eq!(
                read(&object),
                Err(InvalidCloudEvent::Missing(name)),
                "{name} null"
            );
            object.insert(name.into(), "".into());
            assert_eq!(
                read(&object),
                Err(InvalidCloudEvent::Missing(name)),
                "{name} empty"
            );
        }
        for version in ["0.3", "1.0.2", "2.0"] {
            let mut object = structured_object(&ce);
            object.insert("specversion".into(), version.into());
            assert_eq!(
                read(&object),
                Err(InvalidCloudEvent::Missing("specversion")),
                "{version}"
            );
        }
        let mut object = structured_object(&ce);
        object.insert("id".into(), "A234-1234-1234".into());
        assert_eq!(
            read(&object),
            Err(InvalidCloudEvent::NotAnEsframeId("A234-1234-1234".into()))
        );
        for (name, value, found, extension) in [
            ("id", json!(42), "number", false),
            ("type", json!(true), "boolean", false),
            ("specversion", json!(1.0), "number", false),
            ("subject", json!(["account", "ada"]), "array", false),
            ("time", json!({ "at": 1 }), "object", false),
            ("datacontenttype", json!(7), "number", false),
            ("sequence", json!(1.5), "number", true),
            ("note", json!({ "a": 1 }), "object", true),
            ("note", json!([1]), "array", true),
        ] {
            let mut object = structured_object(&ce);
            object.insert(name.into(), value.clone());
            let err = read(&object).unwrap_err();
            assert_eq!(
                err,
                InvalidCloudEvent::AttributeType {
                    name: name.into(),
                    found,
                    extension
                },
                "{name}: {value}"
            );
            assert!(err.to_string().contains(&format!("`{name}`")), "{err}");
        }
        let mut object = structured_object(&ce);
        object.remove("data");
        object.insert("data_base64".into(), "eyJhbW91bnQiOjV9".into());
        let err = read(&object).unwrap_err();
        assert_eq!(err, InvalidCloudEvent::BinaryData);
        assert!(err.to_string().contains("data_base64"), "{err}");
        // The spec's rules, as in binary mode.
        let mut object = structured_object(&ce);
        object.insert("Upper".into(), "x".into());
        assert_eq!(
            read(&object),
            Err(InvalidCloudEvent::ExtensionName("Upper".into()))
        );
        let mut object = structured_object(&ce);
        object.insert("note".into(), "a\nb".into());
        assert!(matches!(
            read(&object),
            Err(InvalidCloudEvent::ControlCharacter { .. })
        ));
    }
}
