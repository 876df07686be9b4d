//! The storage contract every backend implements: [`EventStore`] and [`SnapshotStore`].
//!
//! The memory store (`esframe-memory`) is the reference implementation; every backend runs the
//! conformance suite in [`crate::testing`] (feature `testing`) unchanged.

use std::{fmt, future::Future};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{NewEvent, RecordedEvent, StoreError, StreamId, Subscription};

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
    /// The stream must be at exactly this version.
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
    pub positions: Vec<u64>,
    /// When the events were recorded.
    pub recorded_at: DateTime<Utc>,
    /// `true` when every event id was already stored with the same content: nothing was
    /// written and this is the outcome of the original append.
    pub deduplicated: bool,
}

/// A batch of the global log, from [`EventStore::read_all_batch`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GlobalBatch {
    /// The events, at their current versions.
    pub events: Vec<RecordedEvent>,
    /// The position of the last stored event looked at (`after` if none): the next batch starts
    /// after it.
    pub scanned_to: u64,
}

/// The stored state of an aggregate at a stream version.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The stream.
    pub stream_id: StreamId,
    /// The aggregate type that wrote it.
    pub aggregate_type: String,
    /// The stream version the state includes.
    pub version: u64,
    /// The aggregate's snapshot schema version when it was written.
    pub schema_version: u32,
    /// The serialized state.
    pub state: Value,
    /// When it was taken.
    pub taken_at: DateTime<Utc>,
}

/// An append-only store of event streams with a global log.
///
/// Guarantees every implementation must give (checked by the conformance suite):
/// - `append` is atomic: all events or none; versions within a stream are `1, 2, 3, ...` without
///   gaps; the expected version is checked in the same atomic step, so among concurrent writers
///   expecting the same version exactly one wins and the others get [`StoreError::Conflict`].
/// - `append` is idempotent by event id: if every event id is already stored with the same
///   content, nothing is written and the original outcome is returned with `deduplicated: true`;
///   a stored id with other content is [`StoreError::EventIdReused`].
/// - Global positions are unique and increase in the order a reader of `read_all` sees them; no
///   reader ever sees an event appear at a position below one it has already read. An appended
///   event becomes readable by `read_all` once every append that could precede it has finished:
///   at once in the memory store; in PostgreSQL, when the transactions that were running when
///   it committed have ended. Reads of one stream see it as soon as `append` returns.
/// - Stores are cheap to clone: clones share the same data.
pub trait EventStore: Clone + Send + Sync + 'static {
    /// Appends `events` to `stream` if it is at `expected`; returns the new version.
    fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<AppendOutcome, StoreError>> + Send;

    /// Reads `stream` from `from_version` (inclusive, 1-based) to its end, in version order.
    /// A stream that does not exist reads as empty.
    fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send;

    /// The stream's current version, or `None` if it does not exist.
    fn stream_version(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// Reads at most `limit` stored events of all streams with a global position greater than
    /// `after`, in global order (within one stream, version order), brought to their current
    /// versions by the store's upcasters. Also reports how far it looked, which is past the last
    /// returned event when upcasters dropped retired events.
    fn read_all_batch(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<GlobalBatch, StoreError>> + Send;

    /// The events of [`EventStore::read_all_batch`].
    fn read_all(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send {
        async move { Ok(self.read_all_batch(after, limit).await?.events) }
    }

    /// The global position of the last stored event that has committed (0 if none), if the
    /// store can tell; `None` by default. A projection catch-up reads until it has passed it.
    fn head_position(&self) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send {
        async { Ok(None) }
    }

    /// How many stored events have a global position greater than `after`, if the store can
    /// count them (used for rebuild progress estimates); `None` by default.
    fn count_events_after(
        &self,
        after: u64,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send {
        let _ = after;
        async { Ok(None) }
    }

    /// Resolves once events after global position `after` may be readable.
    ///
    /// May resolve early (a poll interval, say); must not stay pending while such events exist.
    fn wait_for_events(&self, after: u64) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Follows the global log from position `after`: first stored events, then new ones as they
    /// are appended.
    fn subscribe(&self, after: u64) -> Subscription<Self> {
        Subscription::new(self.clone(), after)
    }
}

/// Keeps the latest snapshot of each stream.
pub trait SnapshotStore: EventStore {
    /// Stores `snapshot` unless the stream already has one of a higher version.
    fn save_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The latest snapshot of `stream`, if any.
    fn load_snapshot(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<Snapshot>, StoreError>> + Send;

    /// Appends and, if the append lands at `snapshot.version`, stores the snapshot.
    ///
    /// Backends that can do both atomically (the PostgreSQL store does, in one transaction)
    /// override this. The default appends first and then saves; a failure to save is logged and
    /// ignored, because snapshots are an optimisation: the events are the truth.
    fn append_with_snapshot(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<AppendOutcome, StoreError>> + Send {
        async move {
            let outcome = self.append(stream, expected, events).await?;
            if !outcome.deduplicated
                && outcome.stream_version == snapshot.version
                && let Err(err) = self.save_snapshot(snapshot).await
            {
                tracing::warn!(stream = %stream, error = %err, "snapshot not saved");
            }
            Ok(outcome)
        }
    }
}
