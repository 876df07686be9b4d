//! The storage contract, as three small capabilities: [`EventStore`] (streams), [`GlobalLog`]
//! (every event in one order) and [`SnapshotStore`] (an aggregate's state at a version).
//!
//! Each trait has two kinds of methods. **Backends implement** the `append_batch` / `load_*` /
//! `store_*` methods, which store and return data exactly as stored. **Callers use** the
//! provided methods (`append`, `read_stream`, `read_all_batch`, `subscribe`, `save_snapshot`,
//! ...), which apply the framework's rules above every backend: input checked against the
//! [`limits`](crate::limits) ([`AppendBatch`]), stored data checked (consecutive versions, an
//! ordered log), and old events brought to their current version by the store's
//! [`Upcasters`]. Backends do not override the provided methods; the shared idempotency rule is
//! [`resolve_stored_ids`].
//!
//! The memory store (`esframe-memory`) is the reference implementation; every backend runs the
//! conformance suite in [`crate::testing`] (feature `testing`) unchanged.

mod append;
mod idempotency;
mod loaded;
mod partition;
mod read;
mod types;

use std::future::Future;

pub use append::AppendBatch;
pub use idempotency::resolve_stored_ids;
pub use loaded::{LoadedEvent, LoadedStream};
pub use partition::{
    InvalidPartition, LogPartition, MAX_PARTITIONS, PARTITION_BUCKETS, stream_bucket,
};
pub use types::{AppendOutcome, ExpectedVersion, GlobalBatch, Snapshot};

use crate::{NewEvent, Position, RecordedEvent, StoreError, StreamId, Subscription, Upcasters};

/// Event streams: append with optimistic concurrency, read back in order.
///
/// Guarantees every implementation gives (checked by the conformance suite):
/// - [`append_batch`](EventStore::append_batch) is atomic: all events or none; versions within a
///   stream are `1, 2, 3, ...` without gaps; the expected version is checked in the same atomic
///   step, so among concurrent writers expecting the same version exactly one wins and the
///   others get [`StoreError::Conflict`].
/// - It is idempotent by event id, decided by [`resolve_stored_ids`] before the expectation: a
///   batch whose ids are all stored with the same content writes nothing and returns the
///   original outcome with `deduplicated: true`.
/// - Reads of one stream see an append as soon as it has returned.
/// - Stores are cheap to clone: clones share the same data.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an esframe event store",
    label = "not an `EventStore`",
    note = "use `esframe_memory::MemoryStore` or `esframe_postgres::PgEventStore`, or implement `EventStore` for it (the book's \"Writing a store backend\" guide)"
)]
pub trait EventStore: Clone + Send + Sync + 'static {
    /// **Backend.** Stores a checked append if the stream is at `batch.expected()`; see the
    /// trait's guarantees. An empty batch stores nothing but still checks the expectation.
    fn append_batch(
        &self,
        batch: AppendBatch,
    ) -> impl Future<Output = Result<AppendOutcome, StoreError>> + Send;

    /// **Backend.** The stored events of `stream` from `from_version` (inclusive, 1-based) to
    /// its end, in version order, exactly as stored (not upcast). A stream that does not exist
    /// reads as empty.
    fn load_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send;

    /// **Backend.** The stream's current version, or `None` if it does not exist.
    fn stream_version(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// **Backend.** The upcasters the store was given: the read methods apply them to every
    /// event read. `Upcasters::none()` for a store without any.
    fn upcasters(&self) -> &Upcasters;

    /// **Backend, optional.** What [`load_stream`](EventStore::load_stream) returns, with only
    /// the fields loading an aggregate's state reads (a [`LoadedEvent`] each), exactly as
    /// stored. A backend that can fetch fewer columns overrides it; the default calls
    /// `load_stream`.
    fn load_stream_for_state(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> impl Future<Output = Result<Vec<LoadedEvent>, StoreError>> + Send {
        async move {
            let stored = self.load_stream(stream, from_version).await?;
            read::check_stream(stream, from_version, &stored)?;
            Ok(stored.into_iter().map(LoadedEvent::from_recorded).collect())
        }
    }

    /// Reads `stream` from `from_version` on for loading an aggregate's state: the events of
    /// [`read_stream`](EventStore::read_stream) (checked and at current versions), with only the
    /// fields a load reads. Only events an upcaster applies to are converted.
    fn read_stream_for_state(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> impl Future<Output = Result<Vec<LoadedEvent>, StoreError>> + Send {
        async move {
            let stored = self.load_stream_for_state(stream, from_version).await?;
            read::check_loaded(stream, from_version, &stored)?;
            loaded::upcast_loaded(self.upcasters(), stream, stored)
        }
    }

    /// Appends `events` to `stream` if it is at `expected`.
    ///
    /// The input is checked first ([`AppendBatch::new`]): refused input is
    /// [`StoreError::InvalidInput`] and nothing is stored. [`StoreError::kind`] says what any
    /// other error means for the data.
    fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<AppendOutcome, StoreError>> + Send {
        let batch = AppendBatch::new(stream, expected, events);
        async move { self.append_batch(batch?).await }
    }

    /// Reads `stream` from `from_version` (inclusive, 1-based) to its end, in version order, at
    /// current versions. Stored versions that are not consecutive are
    /// [`StoreError::Corrupt`] naming the version.
    fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send {
        async move {
            let stored = self.load_stream(stream, from_version).await?;
            read::check_stream(stream, from_version, &stored)?;
            self.upcasters().apply_all(stored)
        }
    }
}

/// The global log: every stored event of every stream in one order, with live following.
///
/// Guarantees every implementation gives (checked by the conformance suite): positions are
/// unique and increase in the order a reader of [`load_log`](GlobalLog::load_log) sees them;
/// no reader ever sees an event appear at a position below one it has already read. An appended
/// event becomes readable once every append that could precede it has finished: at once in the
/// memory store; in PostgreSQL, when the transactions that were running when it committed have
/// ended.
#[diagnostic::on_unimplemented(
    message = "`{Self}` has no global log esframe can read",
    label = "not a `GlobalLog`",
    note = "projections and subscriptions read every stream in one order: use a store that implements `GlobalLog` (`MemoryStore`, `PgEventStore`)"
)]
pub trait GlobalLog: EventStore {
    /// **Backend.** At most `limit` (at least 1) stored events with a position after `after`,
    /// in log order (within a stream, version order), exactly as stored.
    fn load_log(
        &self,
        after: Position,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send;

    /// **Backend.** The position of the last stored event that has committed
    /// ([`Position::START`] if none), whether or not readers can see it yet. A catch-up reads
    /// until it has passed it.
    fn head_position(&self) -> impl Future<Output = Result<Position, StoreError>> + Send;

    /// **Backend.** How many stored events have a position after `after`, if the store can count
    /// them (for rebuild progress); `None` by default.
    fn count_events_after(
        &self,
        after: Position,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send {
        let _ = after;
        async { Ok(None) }
    }

    /// **Backend.** Resolves once events after `after` may be readable. May resolve early (a
    /// poll interval, say); must not stay pending while such events exist.
    fn wait_for_events(
        &self,
        after: Position,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads at most `limit` stored events after `after`, in log order, at their current
    /// versions, and how far it looked: past the last returned event when upcasters retired
    /// the events after it.
    fn read_all_batch(
        &self,
        after: Position,
        limit: usize,
    ) -> impl Future<Output = Result<GlobalBatch, StoreError>> + Send {
        async move {
            let stored = self.load_log(after, limit.max(1)).await?;
            read::check_log(after, &stored)?;
            let scanned_to = stored.last().map_or(after, |e| e.global_position);
            Ok(GlobalBatch {
                events: self.upcasters().apply_all(stored)?,
                scanned_to,
            })
        }
    }

    /// **Backend.** The stored events of `partition` after `after`, at most `limit` (at least
    /// 1), in log order, exactly as stored, with `scanned_to` the last position the read has
    /// looked at: every event of the partition up to it is returned, so the next read starts
    /// after it even when it returned nothing. The default reads the whole log and keeps the
    /// partition's events ([`LogPartition::contains`]); a backend that can read one partition
    /// alone (PostgreSQL: an index by stream bucket) overrides it, so that N readers of N
    /// partitions do not read the log N times.
    fn load_log_partition(
        &self,
        after: Position,
        limit: usize,
        partition: LogPartition,
    ) -> impl Future<Output = Result<GlobalBatch, StoreError>> + Send {
        async move {
            let limit = limit.max(1);
            let chunk = limit.max(256);
            let (mut events, mut scanned_to) = (Vec::new(), after);
            loop {
                let stored = self.load_log(scanned_to, chunk).await?;
                let full = stored.len() >= chunk;
                for event in stored {
                    scanned_to = event.global_position;
                    if partition.contains(&event.stream_id) {
                        events.push(event);
                        if events.len() == limit {
                            return Ok(GlobalBatch { events, scanned_to });
                        }
                    }
                }
                if !full {
                    return Ok(GlobalBatch { events, scanned_to });
                }
            }
        }
    }

    /// **Backend.** How many stored events of `partition` have a position after `after`, if
    /// the store can count them; for the whole log, [`GlobalLog::count_events_after`]. The
    /// default counts what [`GlobalLog::load_log_partition`] reads.
    fn count_partition_events_after(
        &self,
        after: Position,
        partition: LogPartition,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send {
        async move {
            if partition.is_all() {
                return self.count_events_after(after).await;
            }
            let (mut count, mut from) = (0u64, after);
            loop {
                let read = self.load_log_partition(from, 4096, partition).await?;
                count += read.events.len() as u64;
                if read.scanned_to <= from {
                    return Ok(Some(count));
                }
                from = read.scanned_to;
            }
        }
    }

    /// [`GlobalLog::read_all_batch`] of one partition: at most `limit` events of `partition`
    /// after `after`, in log order, at their current versions, and how far the read looked
    /// (`scanned_to`, which can be past the last event returned, or past `after` with none).
    fn read_partition_batch(
        &self,
        after: Position,
        limit: usize,
        partition: LogPartition,
    ) -> impl Future<Output = Result<GlobalBatch, StoreError>> + Send {
        async move {
            if partition.is_all() {
                return self.read_all_batch(after, limit).await;
            }
            let stored = self
                .load_log_partition(after, limit.max(1), partition)
                .await?;
            read::check_log(after, &stored.events)?;
            let last = stored.events.last().map_or(after, |e| e.global_position);
            Ok(GlobalBatch {
                scanned_to: stored.scanned_to.max(last).max(after),
                events: self.upcasters().apply_all(stored.events)?,
            })
        }
    }

    /// The events of [`GlobalLog::read_all_batch`].
    fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send {
        async move { Ok(self.read_all_batch(after, limit).await?.events) }
    }

    /// Follows the log from after `after`: stored events, then new ones as they are appended
    /// (or, with [`Subscription::until_head`], until the head and then the end). A
    /// [`futures::Stream`](futures_util::Stream) of events.
    fn subscribe(&self, after: Position) -> Subscription<Self> {
        Subscription::new(self.clone(), after)
    }
}

/// Keeps the latest snapshot of each stream.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not keep snapshots",
    label = "not a `SnapshotStore`",
    note = "snapshots are optional: drop the `snapshot_policy(..)` call to rebuild aggregates from their events alone, or use a store that implements `SnapshotStore`"
)]
pub trait SnapshotStore: EventStore {
    /// **Backend.** Stores a checked `snapshot` unless the stream already has one of a higher
    /// version.
    fn store_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// **Backend.** The stream's snapshot, if any, exactly as stored.
    fn load_snapshot(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<Snapshot>, StoreError>> + Send;

    /// **Backend.** Deletes the stream's snapshot if it is still the one at `version` (an
    /// unusable one the handler is replacing); `false` if there was no such snapshot.
    fn delete_snapshot(
        &self,
        stream: &StreamId,
        version: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// **Backend, optional.** The stream's snapshot, exactly as stored, and its events from
    /// the snapshot's version on (from 1 without one) as [`load_stream_for_state`] gives them:
    /// a cold load in one read where the backend can do it. The default makes two calls.
    ///
    /// [`load_stream_for_state`]: EventStore::load_stream_for_state
    fn load_snapshot_and_stream(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<LoadedStream, StoreError>> + Send {
        async move {
            let snapshot = self.load_snapshot(stream).await?;
            let from = snapshot.as_ref().map_or(1, |s| s.version.max(1));
            let events = self.load_stream_for_state(stream, from).await?;
            Ok(LoadedStream { snapshot, events })
        }
    }

    /// The stream's snapshot, if any, and its events from the snapshot's version on, checked
    /// and at current versions (see [`EventStore::read_stream_for_state`]). The snapshot is
    /// returned as stored: whether it can be used is the caller's decision.
    fn read_snapshot_and_stream(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<LoadedStream, StoreError>> + Send {
        async move {
            let mut loaded = self.load_snapshot_and_stream(stream).await?;
            read::check_loaded(stream, loaded.read_from(), &loaded.events)?;
            loaded.events = loaded::upcast_loaded(
                self.upcasters(),
                stream,
                std::mem::take(&mut loaded.events),
            )?;
            Ok(loaded)
        }
    }

    /// **Backend, optional.** Appends a checked batch and, if the append lands at
    /// `snapshot.version`, stores the checked snapshot.
    ///
    /// Backends that can do both atomically (both built-in stores do) override this. The
    /// default appends first and then stores; a failure to store is logged and ignored, because
    /// snapshots are an optimisation: the events are the truth.
    fn append_batch_with_snapshot(
        &self,
        batch: AppendBatch,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<AppendOutcome, StoreError>> + Send {
        async move {
            let stream = batch.stream().clone();
            let outcome = self.append_batch(batch).await?;
            if !outcome.deduplicated
                && outcome.stream_version == snapshot.version
                && let Err(err) = self.store_snapshot(snapshot).await
            {
                tracing::warn!(stream = %stream, error = %err, "snapshot not saved");
            }
            Ok(outcome)
        }
    }

    /// Stores `snapshot` unless the stream already has one of a higher version. The snapshot is
    /// checked first ([`Snapshot::check`]).
    fn save_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let snapshot = snapshot.checked();
        async move { self.store_snapshot(snapshot?).await }
    }

    /// Appends and, if the append lands at `snapshot.version`, stores the snapshot; both are
    /// checked first. See [`EventStore::append`].
    fn append_with_snapshot(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<AppendOutcome, StoreError>> + Send {
        let checked = match AppendBatch::new(stream, expected, events) {
            Ok(_) if snapshot.stream_id != *stream => {
                let err = crate::InvalidInput {
                    stream: stream.clone(),
                    location: crate::InputLocation::Snapshot,
                    problem: crate::InputProblem::OtherStream {
                        stream: snapshot.stream_id.clone(),
                    },
                };
                crate::limits::dismantle(snapshot.state);
                Err(err.into())
            }
            Ok(batch) => snapshot
                .checked()
                .map(|snapshot| (batch, snapshot))
                .map_err(StoreError::from),
            Err(err) => {
                // The snapshot, unchecked, may be nested too deep for a recursive drop.
                crate::limits::dismantle(snapshot.state);
                Err(err)
            }
        };
        async move {
            let (batch, snapshot) = checked?;
            self.append_batch_with_snapshot(batch, snapshot).await
        }
    }
}
