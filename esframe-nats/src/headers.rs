//! The headers of a published message: the CloudEvent in binary content mode as the NATS
//! binding of CloudEvents says (spec `main`, `cloudevents/bindings/nats-protocol-binding.md`,
//! 1.0.3-wip), plus JetStream's `Nats-Msg-Id` and esframe's own ([`outgoing`]). In structured
//! content mode ([`JetStreamSink::structured`](crate::JetStreamSink::structured)) the body is
//! the CloudEvent in the JSON format and the headers are `Nats-Msg-Id`, `content-type:
//! application/cloudevents+json` and esframe's own ([`outgoing_structured`]).
//!
//! Per that binding every attribute, `datacontenttype` included, is a header named `ce-` and the
//! attribute's name, and each value is percent-encoded: space, `"`, `%` and every character
//! outside printable ASCII become `%XY` per UTF-8 byte. A receiver first unquotes a
//! double-quoted value, then percent-decodes once, rejecting byte sequences that are not UTF-8.

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use esframe_core::publish::{OutgoingMessage, STRUCTURED_CONTENT_TYPE, is_structured_content_type};

/// The prefix of every CloudEvents attribute header.
pub const CE_PREFIX: &str = "ce-";

/// The header JetStream deduplicates by: the message id.
pub const MESSAGE_ID_HEADER: &str = "Nats-Msg-Id";

/// The message's content type: in binary mode the data's (`application/json`; the NATS binding
/// calls it `ce-datacontenttype`, which is sent too), in structured mode
/// `application/cloudevents+json`, which is how a receiver tells the two apart.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// The producer's stream, `aggregate_type/id` (percent-encoded like the `ce-` headers).
pub const STREAM_HEADER: &str = "esframe-stream";

/// The event's version in its stream.
pub const STREAM_VERSION_HEADER: &str = "esframe-stream-version";

/// The event's position in the producer's global log (not zero-padded; `ce-sequence` is).
pub const POSITION_HEADER: &str = "esframe-position";

/// Why a message's headers could not be built.
#[derive(Debug, thiserror::Error)]
#[error("header `{name}` cannot be sent: {reason}")]
pub struct InvalidHeader {
    /// The header.
    pub name: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The headers of `message` in binary content mode: `Nats-Msg-Id`, every CloudEvents attribute
/// as `ce-{name}`, `content-type`, and the `esframe-*` headers.
pub fn outgoing(message: &OutgoingMessage) -> Result<HeaderMap, InvalidHeader> {
    let mut headers = HeaderMap::new();
    put_id(&mut headers, message);
    // `for_each_attribute`, not `binary_headers()`: the HTTP binding carries `datacontenttype`
    // as `Content-Type` only, the NATS binding as `ce-datacontenttype`.
    let mut failed = None;
    message.event.for_each_attribute(|name, value| {
        if failed.is_some() {
            return;
        }
        match attribute_header(name) {
            Some(header) => put_named(&mut headers, header, value),
            None => failed = put(&mut headers, &format!("{CE_PREFIX}{name}"), value).err(),
        }
    });
    if let Some(failed) = failed {
        return Err(failed);
    }
    put_named(
        &mut headers,
        HeaderName::from_static(CONTENT_TYPE_HEADER),
        message.event.datacontenttype,
    );
    put_esframe(&mut headers, message);
    Ok(headers)
}

/// The header of each attribute esframe writes (`CloudEvent::from_event`), without building
/// its name. Only a shortcut: any other attribute, a transform's say, gets its name built.
fn attribute_header(attribute: &str) -> Option<HeaderName> {
    macro_rules! known {
        ($($name:literal),* $(,)?) => {
            match attribute {
                $($name => Some(HeaderName::from_static(concat!("ce-", $name))),)*
                _ => None,
            }
        };
    }
    known!(
        "id",
        "source",
        "specversion",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "sequence",
        "sequencetype",
        "partitionkey",
        "esframeaggregate",
        "esframestream",
        "esframeversion",
        "correlationid",
        "causationid",
        "traceparent",
    )
}

/// `Nats-Msg-Id`: the message id.
fn put_id(headers: &mut HeaderMap, message: &OutgoingMessage) {
    let mut id = uuid::Uuid::encode_buffer();
    let id = message.id.hyphenated().encode_lower(&mut id);
    // A hyphenated UUID is plain ASCII: nothing to encode, nothing a header refuses.
    headers.insert(
        HeaderName::from_static(MESSAGE_ID_HEADER),
        HeaderValue::from(&*id),
    );
}

/// The headers of `message` in structured content mode, whose body is the CloudEvent in the
/// JSON format ([`CloudEvent::to_structured`](esframe_core::publish::CloudEvent::to_structured)):
/// `Nats-Msg-Id`, `content-type` ([`STRUCTURED_CONTENT_TYPE`],
/// `application/cloudevents+json`) and the `esframe-*` headers; no `ce-` header, the body holds
/// the attributes.
pub fn outgoing_structured(message: &OutgoingMessage) -> Result<HeaderMap, InvalidHeader> {
    let mut headers = HeaderMap::new();
    put_id(&mut headers, message);
    put_named(
        &mut headers,
        HeaderName::from_static(CONTENT_TYPE_HEADER),
        STRUCTURED_CONTENT_TYPE,
    );
    put_esframe(&mut headers, message);
    Ok(headers)
}

/// Whether a received message is in structured content mode: its `content-type` is
/// `application/cloudevents+json` (parameters and case aside). `headers` as [`incoming`] gives
/// them.
pub fn is_structured(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .any(|(name, value)| name == CONTENT_TYPE_HEADER && is_structured_content_type(value))
}

fn put_esframe(headers: &mut HeaderMap, message: &OutgoingMessage) {
    put_named(
        headers,
        HeaderName::from_static(STREAM_HEADER),
        &message.stream_id.to_string(),
    );
    headers.insert(
        HeaderName::from_static(STREAM_VERSION_HEADER),
        HeaderValue::from(message.stream_version),
    );
    headers.insert(
        HeaderName::from_static(POSITION_HEADER),
        HeaderValue::from(message.position.get()),
    );
}

/// Sets the header `name` to `value`, percent-encoded.
fn put(headers: &mut HeaderMap, name: &str, value: &str) -> Result<(), InvalidHeader> {
    let header: HeaderName = name.parse().map_err(|err| InvalidHeader {
        name: name.to_owned(),
        reason: format!("{err}"),
    })?;
    put_named(headers, header, value);
    Ok(())
}

/// Sets the header `header` to `value`, percent-encoded. The encoded text is printable ASCII
/// only, which every header value may be (no CR or LF), and a plain value is copied once.
fn put_named(headers: &mut HeaderMap, header: HeaderName, value: &str) {
    let value = match encode_cow(value) {
        std::borrow::Cow::Borrowed(plain) => HeaderValue::from(plain),
        std::borrow::Cow::Owned(encoded) => HeaderValue::from(encoded),
    };
    headers.insert(header, value);
}

/// Every header of a received message as (lowercase name, decoded value), in no particular
/// order; a value that does not decode is kept as it came (and fails later, if it matters).
pub fn incoming(headers: Option<&HeaderMap>) -> Vec<(String, String)> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    let mut all = Vec::with_capacity(headers.len());
    for (name, values) in headers.iter() {
        let name = name.to_string().to_ascii_lowercase();
        for value in values {
            let raw = value.as_str();
            all.push((name.clone(), decode(raw).unwrap_or_else(|| raw.to_owned())));
        }
    }
    all
}

/// The headers as JSON, name to value (or to an array of values when repeated), as they came:
/// what an inbox keeps of a parked message.
pub fn to_json(headers: Option<&HeaderMap>) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            let values: Vec<serde_json::Value> = values
                .iter()
                .map(|v| serde_json::Value::String(v.as_str().to_owned()))
                .collect();
            let value = match <[_; 1]>::try_from(values) {
                Ok([one]) => one,
                Err(many) => serde_json::Value::Array(many),
            };
            object.insert(name.to_string(), value);
        }
    }
    serde_json::Value::Object(object)
}

/// Percent-encodes a header value as the NATS binding says: space, `"`, `%`, and every byte of
/// a character outside printable ASCII (U+0021 to U+007E), upper-case hex.
pub fn encode(value: &str) -> String {
    encode_cow(value).into_owned()
}

/// [`encode`], borrowing a value that needs no escape.
fn encode_cow(value: &str) -> std::borrow::Cow<'_, str> {
    let plain = |b: u8| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%';
    if value.bytes().all(plain) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for b in value.bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    std::borrow::Cow::Owned(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Decodes a header value: unquotes a double-quoted string (with backslash escapes), then
/// percent-decodes once (either case of hex). `None` for a malformed escape or bytes that are
/// not UTF-8 (overlong encodings included).
pub fn decode(value: &str) -> Option<String> {
    let trimmed = value.trim_matches([' ', '\t']);
    let unquoted = match trimmed
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
    {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.push(chars.next()?),
                    '"' => return None,
                    c => out.push(c),
                }
            }
            std::borrow::Cow::Owned(out)
        }
        None => std::borrow::Cow::Borrowed(trimmed),
    };
    if !unquoted.contains('%') {
        return Some(unquoted.into_owned());
    }
    let bytes = unquoted.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let text = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(text, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_the_binding_says() {
        assert_eq!(encode("account/ada"), "account/ada");
        assert_eq!(
            encode("Euro \u{20AC} \u{1F600}"),
            "Euro%20%E2%82%AC%20%F0%9F%98%80"
        );
        assert_eq!(encode(r#"a "b" 100%"#), "a%20%22b%22%20100%25");
    }

    #[test]
    fn decodes_what_it_encodes_and_older_quoted_values() {
        for value in ["plain", "zoë/ünïcode", "with space", "100%", "\"quoted\""] {
            assert_eq!(decode(&encode(value)).as_deref(), Some(value), "{value}");
        }
        assert_eq!(decode("%e2%82%ac").as_deref(), Some("\u{20AC}"));
        assert_eq!(decode(r#""a \"b\" c""#).as_deref(), Some(r#"a "b" c"#));
        assert_eq!(decode("%C0%A0"), None, "an overlong encoding is rejected");
        assert_eq!(decode("%4"), None);
        assert_eq!(decode("%zz"), None);
    }

    #[test]
    fn tells_structured_mode_by_the_content_type() {
        let headers = |content_type: &str| {
            vec![
                ("nats-msg-id".to_owned(), "x".to_owned()),
                (CONTENT_TYPE_HEADER.to_owned(), content_type.to_owned()),
            ]
        };
        assert!(is_structured(&headers("application/cloudevents+json")));
        assert!(is_structured(&headers(
            "application/cloudevents+json; charset=utf-8"
        )));
        assert!(!is_structured(&headers("application/json")));
        assert!(!is_structured(&[]));
    }

    fn message(extensions: &[(&'static str, &str)]) -> OutgoingMessage {
        let id = uuid::Uuid::now_v7();
        let stream_id = esframe_core::StreamId::new("account", "zoë 1").unwrap();
        OutgoingMessage {
            id,
            subject: "bank.account.MoneyDeposited".to_owned(),
            stream_id: stream_id.clone(),
            stream_version: 7,
            position: esframe_core::Position::new(42),
            event: esframe_core::publish::CloudEvent {
                id,
                source: "/bank".to_owned(),
                ty: "MoneyDeposited.v2".to_owned(),
                subject: stream_id.to_string(),
                time: "2026-12-02T05:00:00.000000Z".to_owned(),
                datacontenttype: "application/json",
                extensions: extensions
                    .iter()
                    .map(|(name, value)| ((*name).into(), (*value).to_owned()))
                    .collect(),
                data: "{}".to_owned(),
            },
        }
    }

    #[test]
    fn every_attribute_goes_out_as_a_ce_header_known_or_not() {
        // `sequence` has a header name built in; `region` (added by a transform) does not.
        let message = message(&[("sequence", "00000000000000000042"), ("region", "eu west")]);
        let headers = outgoing(&message).unwrap();
        let mut got = incoming(Some(&headers));
        got.sort();
        let id = message.id.to_string();
        let mut want: Vec<(String, String)> = [
            ("ce-id", id.as_str()),
            ("ce-source", "/bank"),
            ("ce-specversion", "1.0"),
            ("ce-type", "MoneyDeposited.v2"),
            ("ce-subject", "account/zoë 1"),
            ("ce-time", "2026-12-02T05:00:00.000000Z"),
            ("ce-datacontenttype", "application/json"),
            ("ce-sequence", "00000000000000000042"),
            ("ce-region", "eu west"),
            ("content-type", "application/json"),
            ("nats-msg-id", id.as_str()),
            ("esframe-stream", "account/zoë 1"),
            ("esframe-stream-version", "7"),
            ("esframe-position", "42"),
        ]
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
        want.sort();
        assert_eq!(got, want);
        // On the wire the values are percent-encoded.
        let subject = headers.get("ce-subject").unwrap().as_str();
        assert_eq!(subject, "account/zo%C3%AB%201");
        assert_eq!(headers.get("ce-region").unwrap().as_str(), "eu%20west");
    }

    #[test]
    fn an_extension_name_no_header_can_carry_is_refused_by_name() {
        let err = outgoing(&message(&[("bad name", "x")])).unwrap_err();
        assert_eq!(err.name, "ce-bad name");
    }
}
