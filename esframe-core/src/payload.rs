//! An event's stored payload: JSON that is parsed only when something looks at it.

use std::{fmt, sync::OnceLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::DeserializeOwned};
use serde_json::Value;

/// The JSON payload of a [`RecordedEvent`](crate::RecordedEvent).
///
/// A store hands it over either parsed ([`Payload::from`] a `Value`, as the memory store does)
/// or as the JSON text it read ([`Payload::from_json_text`], as PostgreSQL does). Text is not
/// parsed until it is needed: [`RecordedEvent::decode`](crate::RecordedEvent::decode) and
/// [`Payload::deserialize`] read the application's type straight from it, without building a
/// `Value`, and a reader that only counts or forwards events never parses it at all.
///
/// For ad-hoc access it dereferences to the parsed [`Value`] (`event.payload["amount"]`), parsed
/// once on first use. Text that is not JSON serde can read (only possible for rows written
/// around esframe, such as a number beyond `f64` in a `jsonb` column) reads as `null` there;
/// [`Payload::value`], `decode` and `deserialize` report it as an error instead.
#[derive(Clone)]
pub struct Payload(Repr);

#[derive(Clone)]
enum Repr {
    Parsed(Value),
    Text {
        text: Box<str>,
        parsed: OnceLock<Result<Value, String>>,
    },
}

impl Payload {
    /// A payload from the JSON text a store read back; parsed when first needed.
    pub fn from_json_text(text: impl Into<Box<str>>) -> Self {
        Self(Repr::Text {
            text: text.into(),
            parsed: OnceLock::new(),
        })
    }

    /// The parsed JSON, or why the stored text cannot be parsed.
    pub fn value(&self) -> Result<&Value, PayloadError> {
        match &self.0 {
            Repr::Parsed(value) => Ok(value),
            Repr::Text { text, parsed } => parsed
                .get_or_init(|| serde_json::from_str(text).map_err(|err| err.to_string()))
                .as_ref()
                .map_err(|reason| PayloadError(reason.clone())),
        }
    }

    /// The parsed JSON, owned.
    pub fn into_value(self) -> Result<Value, PayloadError> {
        match self.0 {
            Repr::Parsed(value) => Ok(value),
            Repr::Text { text, parsed } => match parsed.into_inner() {
                Some(parsed) => parsed.map_err(PayloadError),
                None => serde_json::from_str(&text).map_err(|err| PayloadError(err.to_string())),
            },
        }
    }

    /// The JSON text as the store returned it, if the payload came as text.
    pub fn json_text(&self) -> Option<&str> {
        match &self.0 {
            Repr::Parsed(_) => None,
            Repr::Text { text, .. } => Some(text),
        }
    }

    /// The payload as JSON text: the stored text as it is, or the parsed value serialized.
    pub fn to_json_text(&self) -> std::borrow::Cow<'_, str> {
        match &self.0 {
            Repr::Parsed(value) => std::borrow::Cow::Owned(value.to_string()),
            Repr::Text { text, .. } => std::borrow::Cow::Borrowed(text),
        }
    }

    /// Reads `T` from the payload: straight from the stored text when it came as text (no
    /// `Value` is built), else from the parsed value.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        self.deserialize_with(|value| T::deserialize(value), |text| T::deserialize(text))
    }

    /// Runs the matching deserialization: `from_value` on a parsed payload, `from_text` on a
    /// JSON deserializer over the stored text (which must then be at its end).
    #[doc(hidden)]
    pub fn deserialize_with<T>(
        &self,
        from_value: impl FnOnce(&Value) -> Result<T, serde_json::Error>,
        from_text: impl FnOnce(
            &mut serde_json::Deserializer<serde_json::de::StrRead<'_>>,
        ) -> Result<T, serde_json::Error>,
    ) -> Result<T, serde_json::Error> {
        match &self.0 {
            Repr::Parsed(value) => from_value(value),
            Repr::Text { text, parsed } => match parsed.get() {
                Some(Ok(value)) => from_value(value),
                _ => {
                    let mut de = serde_json::Deserializer::from_str(text);
                    let value = from_text(&mut de)?;
                    de.end()?;
                    Ok(value)
                }
            },
        }
    }
}

impl Default for Payload {
    /// `null`.
    fn default() -> Self {
        Self(Repr::Parsed(Value::Null))
    }
}

impl From<Value> for Payload {
    fn from(value: Value) -> Self {
        Self(Repr::Parsed(value))
    }
}

impl std::ops::Deref for Payload {
    type Target = Value;

    /// The parsed JSON (`null` if the stored text cannot be parsed: see [`Payload::value`]).
    fn deref(&self) -> &Value {
        static NULL: Value = Value::Null;
        self.value().unwrap_or(&NULL)
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        if let (Some(a), Some(b)) = (self.json_text(), other.json_text())
            && a == b
        {
            return true;
        }
        match (self.value(), other.value()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

impl PartialEq<Value> for Payload {
    fn eq(&self, other: &Value) -> bool {
        self.value().is_ok_and(|value| value == other)
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Parsed(value) => fmt::Debug::fmt(value, f),
            Repr::Text { text, .. } => write!(f, "Payload({text})"),
        }
    }
}

impl fmt::Display for Payload {
    /// The JSON text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Parsed(value) => fmt::Display::fmt(value, f),
            Repr::Text { text, .. } => f.write_str(text),
        }
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value()
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(Self::from)
    }
}

/// Stored payload text that is not JSON serde can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the stored payload is not readable JSON: {0}")]
pub struct PayloadError(String);

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn text_and_value_read_alike() {
        let text = Payload::from_json_text(r#"{"amount": 5, "currency": "EUR"}"#);
        let value = Payload::from(json!({ "amount": 5, "currency": "EUR" }));
        assert_eq!(text, value);
        assert_eq!(text["amount"], json!(5));
        #[derive(Deserialize, PartialEq, Debug)]
        struct Deposit {
            amount: u64,
        }
        assert_eq!(
            text.deserialize::<Deposit>().unwrap(),
            Deposit { amount: 5 }
        );
        assert_eq!(
            value.deserialize::<Deposit>().unwrap(),
            Deposit { amount: 5 }
        );
        assert_eq!(
            text.clone().into_value().unwrap(),
            json!({ "amount": 5, "currency": "EUR" })
        );
    }

    #[test]
    fn unreadable_text_is_an_error_not_a_panic() {
        let huge = Payload::from_json_text(r#"{"n": 1e400}"#);
        assert!(huge.value().is_err());
        assert!(huge.deserialize::<Value>().is_err());
        assert!(huge.clone().into_value().is_err());
        assert_eq!(*huge, Value::Null, "deref reads it as null");
        let trailing = Payload::from_json_text("1 2");
        assert!(trailing.deserialize::<u32>().is_err());
    }
}
