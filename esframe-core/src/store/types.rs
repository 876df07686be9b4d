//! The values the store contract exchanges: expectations, outcomes, batches of the log,
//! snapshots.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    InputLocation, InvalidInput, Position, RecordedEvent, StreamId,
    limits::{self, MAX_SCHEMA_VERSION, MAX_VERSION},
};

/// What the writer believes about a stream's version before appending.
///
/// Versions count events: a stream with three events is at version 3; a stream that does not
/// exist is at version 0, so `Exact(0)` means the same as `NoStream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version is.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must exist (have at least one event).
    StreamExists,
    /// The stream must be at exactly this version (at most
    /// [`MAX_VERSION`](crate::limits::MAX_VERSION)).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at `actual` (`None`: no stream) satisfies this expectation.
    pub fn accepts(self, actual: Option<u64>) -> bool {
        let current = actual.unwrap_or(0);
        match self {
            Self::Any => true,
            Self::NoStream => current == 0,
            Self::StreamExists => current > 0,
            Self::Exact(v) => current == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any version"),
            Self::NoStream => f.write_str("no stream"),
            Self::StreamExists => f.write_str("an existing stream"),
            Self::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// The result of a successful append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The stream's version after the append: the version of its last event.
    pub stream_version: u64,
    /// Global position of each appended event, in the order given.
    pub positions: Vec<Position>,
    /// When the events were recorded.
    pub recorded_at: DateTime<Utc>,
    /// `true` when every event id was already stored with the same content: nothing was
    /// written and this is the outcome of the original append.
    pub deduplicated: bool,
}

/// A batch of the global log, from
/// [`GlobalLog::read_all_batch`](crate::GlobalLog::read_all_batch).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GlobalBatch {
    /// The events, at their current versions.
    pub events: Vec<RecordedEvent>,
    /// The position of the last stored event looked at (`after` if none): the next batch starts
    /// after it. It is past the last returned event when upcasters retired the events after it.
    pub scanned_to: Position,
}

/// The stored state of an aggregate at a stream version.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The stream (its aggregate type wrote the snapshot).
    pub stream_id: StreamId,
    /// The stream version the state includes (1 to
    /// [`MAX_VERSION`](crate::limits::MAX_VERSION)).
    pub version: u64,
    /// The aggregate's snapshot schema version when it was written (1 to
    /// [`MAX_SCHEMA_VERSION`](crate::limits::MAX_SCHEMA_VERSION)).
    pub schema_version: u32,
    /// The serialized state.
    pub state: Value,
    /// When it was taken.
    pub taken_at: DateTime<Utc>,
}

impl Snapshot {
    /// Checks the snapshot against the contract's [`limits`](crate::limits): what
    /// [`SnapshotStore::save_snapshot`](crate::SnapshotStore::save_snapshot) and
    /// [`append_with_snapshot`](crate::SnapshotStore::append_with_snapshot) check before a
    /// backend sees it.
    pub fn check(&self) -> Result<(), InvalidInput> {
        let fail = |problem| InvalidInput {
            stream: self.stream_id.clone(),
            location: InputLocation::Snapshot,
            problem,
        };
        limits::check_range("version", self.version, 1, MAX_VERSION).map_err(fail)?;
        limits::check_range(
            "schema_version",
            u64::from(self.schema_version),
            1,
            u64::from(MAX_SCHEMA_VERSION),
        )
        .map_err(fail)?;
        limits::check_json("state", &self.state).map_err(fail)
    }

    /// [`Snapshot::check`], dropping a refused state without recursion.
    pub(crate) fn checked(self) -> Result<Self, InvalidInput> {
        match self.check() {
            Ok(()) => Ok(self),
            Err(err) => {
                limits::dismantle(self.state);
                Err(err)
            }
        }
    }
}
