//! Validated stream identifiers: an aggregate type and an id within it.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{Aggregate, limits::MAX_NAME_LEN};

/// Longest id within an aggregate type, in bytes.
pub const MAX_STREAM_ID_LEN: usize = 512;

/// The id of one event stream (one aggregate instance): the aggregate type that owns the stream
/// and the aggregate's id within that type.
///
/// Streams are namespaced by aggregate type: an `order` "42" and an `inventory` "42" are two
/// streams. Stores keep both parts apart (the PostgreSQL store in the `aggregate_type` and
/// `aggregate_id` columns).
///
/// Guarantees: the aggregate type is 1 to [`MAX_NAME_LEN`] bytes and the id 1 to
/// [`MAX_STREAM_ID_LEN`] bytes, neither with a NUL byte or another control character (Unicode
/// `Cc`). Any other text, including quotes and SQL, is kept verbatim: stores must bind it as a
/// parameter, never splice it into a query. Cloning is cheap (one shared `Arc<str>`), and
/// streams are ordered by aggregate type, then id.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(
    /// The aggregate type, a NUL, and the id. Neither part can hold a NUL, so the first one
    /// splits them, and the order of the text is that of (aggregate type, id).
    Arc<str>,
);

const SEPARATOR: char = '\0';

/// The part of a [`StreamId`] an [`InvalidStreamId`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamIdPart {
    /// The aggregate type.
    AggregateType,
    /// The id within the aggregate type.
    Id,
}

impl fmt::Display for StreamIdPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AggregateType => "aggregate type",
            Self::Id => "id",
        })
    }
}

/// Why text was refused as a [`StreamId`]; every variant names the part it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidStreamId {
    /// The part was the empty string.
    #[error("stream {part} is empty")]
    Empty {
        /// The refused part.
        part: StreamIdPart,
    },
    /// The part was longer than its limit.
    #[error("stream {part} is {len} bytes long; the limit is {limit}")]
    TooLong {
        /// The refused part.
        part: StreamIdPart,
        /// Its length in bytes.
        len: usize,
        /// The limit ([`MAX_NAME_LEN`] or [`MAX_STREAM_ID_LEN`]).
        limit: usize,
    },
    /// The part contained a NUL byte or another control character.
    #[error("stream {part} {text:?} contains the control character {ch:?} at byte {at}")]
    ControlCharacter {
        /// The refused part.
        part: StreamIdPart,
        /// The refused text, shortened to 64 characters.
        text: String,
        /// The offending character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
}

fn check(part: StreamIdPart, text: &str) -> Result<(), InvalidStreamId> {
    let limit = match part {
        StreamIdPart::AggregateType => MAX_NAME_LEN,
        StreamIdPart::Id => MAX_STREAM_ID_LEN,
    };
    if text.is_empty() {
        return Err(InvalidStreamId::Empty { part });
    }
    if text.len() > limit {
        return Err(InvalidStreamId::TooLong {
            part,
            len: text.len(),
            limit,
        });
    }
    if let Some((at, ch)) = text.char_indices().find(|(_, c)| c.is_control()) {
        return Err(InvalidStreamId::ControlCharacter {
            part,
            text: text.chars().take(64).collect(),
            ch,
            at,
        });
    }
    Ok(())
}

impl StreamId {
    /// Validates both parts and joins them.
    ///
    /// ```
    /// use esframe_core::StreamId;
    /// let stream = StreamId::new("account", "1").unwrap();
    /// assert_eq!((stream.aggregate_type(), stream.id()), ("account", "1"));
    /// assert_ne!(stream, StreamId::new("loan", "1").unwrap());
    /// assert!(StreamId::new("account", "bad\0id").is_err());
    /// ```
    pub fn new(
        aggregate_type: impl AsRef<str>,
        id: impl AsRef<str>,
    ) -> Result<Self, InvalidStreamId> {
        let (aggregate_type, id) = (aggregate_type.as_ref(), id.as_ref());
        check(StreamIdPart::AggregateType, aggregate_type)?;
        check(StreamIdPart::Id, id)?;
        Ok(Self::join(aggregate_type, id))
    }

    /// The stream of aggregate `A` with id `id`: `StreamId::new(A::TYPE, id)`, the stream a
    /// [`CommandHandler<A>`](crate::CommandHandler) reads and writes for that id.
    pub fn of<A: Aggregate>(id: impl AsRef<str>) -> Result<Self, InvalidStreamId> {
        Self::new(A::TYPE, id)
    }

    fn join(aggregate_type: &str, id: &str) -> Self {
        let mut text = String::with_capacity(aggregate_type.len() + 1 + id.len());
        text.push_str(aggregate_type);
        text.push(SEPARATOR);
        text.push_str(id);
        Self(Arc::from(text))
    }

    /// A valid id that names `aggregate_type` and `id` even when they are invalid: control
    /// characters are escaped, each part is cut to its limit, and an empty part becomes
    /// `(empty)`. For error messages about stored data that is not a valid stream id.
    pub fn lossy(aggregate_type: &str, id: &str) -> Self {
        let clean = |text: &str, limit: usize| {
            let mut escaped: String = text.escape_debug().collect();
            if escaped.is_empty() {
                escaped.push_str("(empty)");
            }
            let mut end = escaped.len().min(limit);
            while !escaped.is_char_boundary(end) {
                end -= 1;
            }
            escaped.truncate(end);
            escaped
        };
        Self::join(
            &clean(aggregate_type, MAX_NAME_LEN),
            &clean(id, MAX_STREAM_ID_LEN),
        )
    }

    /// The aggregate type that owns the stream.
    pub fn aggregate_type(&self) -> &str {
        self.parts().0
    }

    /// The aggregate's id within its type.
    pub fn id(&self) -> &str {
        self.parts().1
    }

    /// Both parts: `(aggregate_type, id)`.
    pub fn parts(&self) -> (&str, &str) {
        // The separator is always there (`join` puts it in).
        self.0.split_once(SEPARATOR).unwrap_or((&self.0, ""))
    }
}

/// `aggregate_type/id`, both quoted: `"account"/"1"`.
impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{:?}", self.aggregate_type(), self.id())
    }
}

/// `aggregate_type/id`: `account/1`.
impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.aggregate_type(), self.id())
    }
}

/// The serialized form: `{"aggregate_type": "account", "id": "1"}`.
#[derive(Serialize, Deserialize)]
struct StreamIdParts<'a> {
    #[serde(borrow)]
    aggregate_type: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
}

impl Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (aggregate_type, id) = self.parts();
        StreamIdParts {
            aggregate_type: aggregate_type.into(),
            id: id.into(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let parts = StreamIdParts::deserialize(deserializer)?;
        Self::new(parts.aggregate_type, parts.id).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hostile_but_printable_ids_verbatim() {
        for id in ["a'b", "x\"; DROP TABLE events; --", "ünïcødé", "  spaced  "] {
            let stream = StreamId::new("order", id).unwrap();
            assert_eq!(stream.parts(), ("order", id));
        }
    }

    #[test]
    fn the_same_id_under_two_aggregate_types_is_two_streams() {
        let order = StreamId::new("order", "42").unwrap();
        let inventory = StreamId::new("inventory", "42").unwrap();
        assert_ne!(order, inventory);
        // Parts that would run together are kept apart.
        assert_ne!(
            StreamId::new("ab", "c").unwrap(),
            StreamId::new("a", "bc").unwrap()
        );
        let mut sorted = vec![order.clone(), inventory.clone()];
        sorted.sort();
        assert_eq!(sorted, [inventory, order.clone()]);
        assert_eq!(order.to_string(), "order/42");
        assert_eq!(format!("{order:?}"), r#""order"/"42""#);
    }

    #[test]
    fn rejects_empty_long_and_control_parts_naming_the_part() {
        assert_eq!(
            StreamId::new("order", ""),
            Err(InvalidStreamId::Empty {
                part: StreamIdPart::Id
            })
        );
        assert_eq!(
            StreamId::new("", "1"),
            Err(InvalidStreamId::Empty {
                part: StreamIdPart::AggregateType
            })
        );
        let long = "x".repeat(10_000);
        assert_eq!(
            StreamId::new("order", &long),
            Err(InvalidStreamId::TooLong {
                part: StreamIdPart::Id,
                len: 10_000,
                limit: MAX_STREAM_ID_LEN
            })
        );
        assert!(matches!(
            StreamId::new(&long, "1"),
            Err(InvalidStreamId::TooLong {
                part: StreamIdPart::AggregateType,
                ..
            })
        ));
        let err = StreamId::new("order", "ab\0c").unwrap_err();
        assert_eq!(
            err,
            InvalidStreamId::ControlCharacter {
                part: StreamIdPart::Id,
                text: "ab\0c".into(),
                ch: '\0',
                at: 2
            }
        );
        assert!(err.to_string().contains("stream id"), "{err}");
        assert!(err.to_string().contains("byte 2"), "{err}");
    }

    #[test]
    fn round_trips_through_serde_and_refuses_invalid_parts() {
        let stream = StreamId::new("order", "4\"2").unwrap();
        let json = serde_json::to_value(&stream).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"aggregate_type": "order", "id": "4\"2"})
        );
        assert_eq!(serde_json::from_value::<StreamId>(json).unwrap(), stream);
        let bad = serde_json::json!({"aggregate_type": "order", "id": ""});
        assert!(serde_json::from_value::<StreamId>(bad).is_err());
    }

    #[test]
    fn lossy_ids_are_always_valid() {
        for text in ["", "a\0b", &"é".repeat(600), "plain"] {
            let id = StreamId::lossy(text, text);
            assert!(
                StreamId::new(id.aggregate_type(), id.id()).is_ok(),
                "{text:?} -> {id:?}"
            );
        }
        assert_eq!(StreamId::lossy("t", "a\0b").id(), "a\\0b");
        assert_eq!(StreamId::lossy("", "").parts(), ("(empty)", "(empty)"));
    }
}
