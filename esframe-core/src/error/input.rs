//! [`InvalidInput`]: a value the store contract refuses, named with where it is.

use std::fmt;

use crate::StreamId;

/// A value the store contract refuses. Checked once, in esframe-core, before any backend sees
/// the request, so every store refuses exactly the same input; nothing is stored.
///
/// The limits are in [`esframe_core::limits`](crate::limits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid input for stream `{stream}`, {location}: {problem}")]
pub struct InvalidInput {
    /// The stream the request was for.
    pub stream: StreamId,
    /// Which part of the request.
    pub location: InputLocation,
    /// What is wrong with it.
    pub problem: InputProblem,
}

/// Which part of a request holds an invalid value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InputLocation {
    /// The append as a whole.
    Append,
    /// The expected version.
    ExpectedVersion,
    /// One event of the append.
    Event {
        /// Its index in the append, from 0.
        index: usize,
        /// Its type name (escaped and shortened if the name itself is the problem).
        event_type: String,
    },
    /// The snapshot.
    Snapshot,
}

impl fmt::Display for InputLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Append => f.write_str("the append"),
            Self::ExpectedVersion => f.write_str("the expected version"),
            Self::Event { index, event_type } => write!(f, "event {index} (`{event_type}`)"),
            Self::Snapshot => f.write_str("the snapshot"),
        }
    }
}

/// What is wrong with a value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InputProblem {
    /// More events in one append than a store can number.
    TooManyEvents {
        /// Events in the append.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A number outside the range every store can hold.
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The smallest accepted value.
        min: u64,
        /// The largest accepted value.
        max: u64,
    },
    /// Text or JSON with a NUL character, which PostgreSQL cannot store in `text` or `jsonb`.
    NulCharacter {
        /// The field.
        field: &'static str,
        /// Where in the JSON, as a JSON pointer (`/items/0/name`; `""` for the whole value or
        /// a text field). A NUL in an object key points at that key.
        at: String,
    },
    /// JSON nested deeper than every store can read back.
    TooDeep {
        /// The field.
        field: &'static str,
        /// The deepest accepted nesting of arrays and objects.
        max: usize,
    },
    /// A snapshot given with an append to another stream.
    OtherStream {
        /// The snapshot's stream.
        stream: StreamId,
    },
    /// A name (event type, aggregate type) that is empty, too long or has control characters.
    InvalidName {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for InputProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyEvents { count, limit } => write!(
                f,
                "{count} events in one append exceed the limit of {limit}; split it"
            ),
            Self::OutOfRange {
                field,
                value,
                min,
                max,
            } => write!(
                f,
                "`{field}` is {value}, outside the range {min}..={max} that every store can hold"
            ),
            Self::NulCharacter { field, at } => {
                write!(f, "`{field}` contains a NUL character")?;
                if !at.is_empty() {
                    write!(f, " at `{at}`")?;
                }
                f.write_str(
                    "; PostgreSQL cannot store it in text or jsonb, so no esframe store accepts it",
                )
            }
            Self::TooDeep { field, max } => write!(
                f,
                "`{field}` nests JSON arrays and objects more than {max} levels deep, which could not be read back"
            ),
            Self::OtherStream { stream } => {
                write!(f, "it is a snapshot of stream `{stream}`, not of this one")
            }
            Self::InvalidName { field, reason } => write!(f, "`{field}` {reason}"),
        }
    }
}
