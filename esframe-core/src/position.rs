//! [`Position`]: where an event sits in the global log.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A position in the global log of all streams.
///
/// Positions are assigned by the store: unique, strictly increasing in the order readers see the
/// log, and never reused. They are not dense (the PostgreSQL store leaves gaps) and say nothing
/// about a stream's version, which is why they have their own type: a stream version is a count
/// of that stream's events, a position is an opaque place in the log.
///
/// [`Position::START`] is before the first event: reading "after" it reads everything.
///
/// ```
/// use esframe_core::Position;
/// let p = Position::new(42);
/// assert!(p > Position::START);
/// assert_eq!(p.get(), 42);
/// assert_eq!(p.to_string(), "42");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Position(u64);

impl Position {
    /// Before the first event of the log.
    pub const START: Self = Self(0);

    /// The largest position a store can hand out (`i64::MAX`, the range of a PostgreSQL
    /// `BIGINT`).
    pub const MAX: Self = Self(i64::MAX as u64);

    /// The position `value`.
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The position as a number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The position just before this one (saturating at [`Position::START`]): reading after it
    /// reads the event at this position again.
    #[must_use]
    pub const fn before(self) -> Self {
        Self(self.0.saturating_sub(1))
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Position({})", self.0)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<Position> for u64 {
    fn from(position: Position) -> Self {
        position.0
    }
}
