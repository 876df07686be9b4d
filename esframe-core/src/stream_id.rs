//! Validated stream identifiers.

use std::{borrow::Borrow, fmt, sync::Arc};

use serde::{Deserialize, Serialize};

/// Longest stream id accepted, in bytes.
pub const MAX_STREAM_ID_LEN: usize = 512;

/// The id of one event stream (one aggregate instance).
///
/// Guarantees: not empty, at most [`MAX_STREAM_ID_LEN`] bytes, no NUL byte and no other
/// control character (Unicode `Cc`). Any other text, including quotes and SQL, is stored verbatim: stores
/// must bind it as a parameter, never splice it into a query. Cloning is cheap (shared `Arc<str>`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(Arc<str>);

/// Why a string was refused as a [`StreamId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidStreamId {
    /// The id was the empty string.
    #[error("stream id is empty")]
    Empty,
    /// The id was longer than [`MAX_STREAM_ID_LEN`] bytes.
    #[error("stream id is {len} bytes long; the limit is {MAX_STREAM_ID_LEN}")]
    TooLong {
        /// Length of the refused id in bytes.
        len: usize,
    },
    /// The id contained a NUL byte or another control character.
    #[error("stream id {id:?} contains the control character {ch:?} at byte {at}")]
    ControlCharacter {
        /// The refused id, shortened to 64 characters.
        id: String,
        /// The offending character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
}

impl StreamId {
    /// Validates `id` and wraps it.
    ///
    /// ```
    /// use esframe_core::StreamId;
    /// assert_eq!(StreamId::new("account-1").unwrap().as_str(), "account-1");
    /// assert!(StreamId::new("bad\0id").is_err());
    /// ```
    pub fn new(id: impl AsRef<str>) -> Result<Self, InvalidStreamId> {
        let id = id.as_ref();
        if id.is_empty() {
            return Err(InvalidStreamId::Empty);
        }
        if id.len() > MAX_STREAM_ID_LEN {
            return Err(InvalidStreamId::TooLong { len: id.len() });
        }
        if let Some((at, ch)) = id.char_indices().find(|(_, c)| c.is_control()) {
            return Err(InvalidStreamId::ControlCharacter {
                id: id.chars().take(64).collect(),
                ch,
                at,
            });
        }
        Ok(Self(Arc::from(id)))
    }

    /// A valid id that names `text` even when `text` itself is invalid: control characters are
    /// escaped, the result is cut to the length limit, and empty text becomes `(empty)`. For
    /// error messages about stored data that is not a valid stream id.
    pub fn lossy(text: &str) -> Self {
        let mut escaped: String = text.escape_debug().collect();
        if escaped.is_empty() {
            escaped.push_str("(empty)");
        }
        let mut end = escaped.len().min(MAX_STREAM_ID_LEN);
        while !escaped.is_char_boundary(end) {
            end -= 1;
        }
        escaped.truncate(end);
        Self(Arc::from(escaped))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for StreamId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<String> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::new(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hostile_but_printable_ids_verbatim() {
        for id in ["a'b", "x\"; DROP TABLE events; --", "ünïcødé", "  spaced  "] {
            assert_eq!(StreamId::new(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn rejects_empty_long_and_control_ids() {
        assert_eq!(StreamId::new(""), Err(InvalidStreamId::Empty));
        let long = "x".repeat(10_000);
        assert_eq!(
            StreamId::new(&long),
            Err(InvalidStreamId::TooLong { len: 10_000 })
        );
        let err = StreamId::new("ab\0c").unwrap_err();
        assert_eq!(
            err,
            InvalidStreamId::ControlCharacter {
                id: "ab\0c".into(),
                ch: '\0',
                at: 2
            }
        );
        assert!(err.to_string().contains("byte 2"));
    }

    #[test]
    fn lossy_ids_are_always_valid() {
        for text in ["", "a\0b", &"é".repeat(600), "plain"] {
            let id = StreamId::lossy(text);
            assert!(StreamId::new(id.as_str()).is_ok(), "{text:?} -> {id:?}");
        }
        assert_eq!(StreamId::lossy("a\0b").as_str(), "a\\0b");
        assert_eq!(StreamId::lossy("").as_str(), "(empty)");
    }
}
