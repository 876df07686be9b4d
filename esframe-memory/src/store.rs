//! The in-memory store.

use std::sync::{
    Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst},
};

use chrono::Utc;
// foldhash instead of SipHash: hashing event ids and stream ids was the largest cost of an
// append. Its per-map random seed still spreads ids a caller chooses.
use esframe_core::{
    AppendBatch, AppendOutcome, Conflict, EventStore, GlobalLog, LoadedEvent, Position,
    RecordedEvent, Snapshot, SnapshotStore, StoreError, StreamId, Upcasters, resolve_stored_ids,
};
use foldhash::HashMap;
use tokio::sync::Notify;
use uuid::Uuid;

/// An event and snapshot store held in memory.
///
/// Cheap to clone: clones share the same data. Safe to use from many tasks at once: appends are
/// serialized by one write lock, so the expected-version check and the write are one atomic step;
/// reads run in parallel. Global positions are dense (`1, 2, 3, ...`) and follow append order.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    data: RwLock<Data>,
    head: Head,
    upcasters: Upcasters,
}

/// The global position of the last appended event, and wake-ups for those waiting past it.
///
/// Appends only pay for a wake-up when someone waits: the appender raises `position` and then
/// reads `waiters`; a waiter registers with `notify`, raises `waiters` and then reads
/// `position`. Both sides use sequentially consistent operations, so at least one of them sees
/// the other: either the waiter sees the new position, or the appender sees the waiter and
/// notifies it.
#[derive(Debug, Default)]
struct Head {
    position: AtomicU64,
    waiters: AtomicUsize,
    notify: Notify,
}

impl Head {
    fn advance(&self, position: Position) {
        let position = position.get();
        self.position.fetch_max(position, SeqCst);
        if self.waiters.load(SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    async fn wait_past(&self, after: Position) {
        let after = after.get();
        struct Registered<'a>(&'a AtomicUsize);
        impl Drop for Registered<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, SeqCst);
            }
        }
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let _registered = {
                self.waiters.fetch_add(1, SeqCst);
                Registered(&self.waiters)
            };
            if self.position.load(SeqCst) > after {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Debug, Default)]
struct Data {
    /// The global log: the event at position `p` is `log[p - 1]`.
    log: Vec<RecordedEvent>,
    /// For each stream, the log index of each version: version `v` is `streams[s][v - 1]`.
    streams: HashMap<StreamId, Vec<usize>>,
    /// Log index of every stored event id.
    ids: HashMap<Uuid, usize>,
    snapshots: HashMap<StreamId, Snapshot>,
}

impl Data {
    /// The events of `stream` from `from_version` (1-based) on, in version order.
    fn stream_events(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> impl Iterator<Item = &RecordedEvent> {
        let skip = usize::try_from(from_version.saturating_sub(1)).unwrap_or(usize::MAX);
        self.streams
            .get(stream)
            .into_iter()
            .flat_map(move |indices| indices.iter().skip(skip))
            .map(|&i| &self.log[i])
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::with_upcasters(Upcasters::default())
    }

    /// An empty store whose reads bring old events to their current version with `upcasters`
    /// (see [`esframe_core::upcast`]); stored events are never rewritten.
    pub fn with_upcasters(upcasters: Upcasters) -> Self {
        Self {
            inner: Arc::new(Inner {
                data: RwLock::new(Data::default()),
                head: Head::default(),
                upcasters,
            }),
        }
    }

    /// Number of events in the store, over all streams.
    pub fn len(&self) -> usize {
        self.read().log.len()
    }

    /// Whether the store holds no event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A panic while a lock is held cannot leave the data half-written (every write step below
    // is infallible once checks pass), so a poisoned lock is safe to recover.
    fn read(&self) -> RwLockReadGuard<'_, Data> {
        self.inner
            .data
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Data> {
        self.inner
            .data
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The append, the snapshot and the idempotency decision under one write lock: both or
    /// neither, and no other writer in between.
    fn append_sync(
        &self,
        batch: AppendBatch,
        snapshot: Option<Snapshot>,
    ) -> Result<AppendOutcome, StoreError> {
        let outcome = {
            let mut data = self.write();
            let stored =
                resolve_stored_ids(&batch, |id| data.ids.get(id).map(|&index| &data.log[index]))?;
            if let Some(original) = stored {
                return Ok(original);
            }
            let outcome = data.append(batch)?;
            if let Some(snapshot) = snapshot
                && snapshot.version == outcome.stream_version
            {
                data.save_snapshot(snapshot);
            }
            outcome
        };
        if let Some(&last) = outcome.positions.last() {
            self.inner.head.advance(last);
        }
        Ok(outcome)
    }
}

impl MemoryStore {
    /// Appends to several streams atomically, in order: every batch's expectation is checked
    /// (against the stream as the batches before it leave it) and none of their event ids may
    /// be stored already, then all are stored, under one write lock, or
    /// nothing is. Process managers store a batch's commands' events with it.
    pub fn append_streams(
        &self,
        batches: Vec<AppendBatch>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let outcomes = {
            let mut data = self.write();
            // Each batch is checked against the stream as the batches before it leave it.
            let mut added: HashMap<&StreamId, u64> = HashMap::default();
            for batch in &batches {
                let stored = data.streams.get(batch.stream()).map_or(0, Vec::len) as u64;
                let current = stored + added.get(batch.stream()).copied().unwrap_or(0);
                let actual = (current > 0).then_some(current);
                if !batch.expected().accepts(actual) {
                    return Err(Conflict {
                        stream: batch.stream().clone(),
                        expected: batch.expected(),
                        actual,
                    }
                    .into());
                }
                *added.entry(batch.stream()).or_default() += batch.len() as u64;
                if let Some(&index) = batch
                    .events()
                    .iter()
                    .find_map(|e| data.ids.get(&e.event_id))
                {
                    let stored = &data.log[index];
                    return Err(StoreError::EventIdReused {
                        event_id: stored.event_id,
                        stream: batch.stream().clone(),
                        stored_stream: stored.stream_id.clone(),
                        stored_version: stored.stream_version,
                    });
                }
            }
            batches
                .into_iter()
                .map(|batch| data.append(batch))
                .collect::<Result<Vec<_>, _>>()?
        };
        if let Some(&last) = outcomes.iter().filter_map(|o| o.positions.last()).max() {
            self.inner.head.advance(last);
        }
        Ok(outcomes)
    }
}

impl Data {
    fn append(&mut self, batch: AppendBatch) -> Result<AppendOutcome, StoreError> {
        let (stream, expected) = (batch.stream().clone(), batch.expected());
        let current = self.streams.get(&stream).map_or(0, Vec::len) as u64;
        let actual = (current > 0).then_some(current);
        if !expected.accepts(actual) {
            return Err(Conflict {
                stream,
                expected,
                actual,
            }
            .into());
        }
        let recorded_at = Utc::now();
        let mut positions = Vec::with_capacity(batch.len());
        if batch.is_empty() {
            return Ok(AppendOutcome {
                stream_version: current,
                positions,
                recorded_at,
                deduplicated: false,
            });
        }
        let indices = self.streams.entry(stream.clone()).or_default();
        for event in batch.into_events() {
            let index = self.log.len();
            let position = Position::new(index as u64 + 1);
            indices.push(index);
            self.ids.insert(event.event_id, index);
            self.log.push(RecordedEvent {
                event_id: event.event_id,
                stream_id: stream.clone(),
                stream_version: indices.len() as u64,
                global_position: position,
                recorded_at,
                event_type: event.event_type,
                schema_version: event.schema_version,
                payload: event.payload.into(),
                metadata: event.metadata,
            });
            positions.push(position);
        }
        Ok(AppendOutcome {
            stream_version: indices.len() as u64,
            positions,
            recorded_at,
            deduplicated: false,
        })
    }

    fn save_snapshot(&mut self, snapshot: Snapshot) {
        match self.snapshots.get(&snapshot.stream_id) {
            Some(existing) if existing.version > snapshot.version => {}
            _ => {
                self.snapshots.insert(snapshot.stream_id.clone(), snapshot);
            }
        }
    }
}

impl EventStore for MemoryStore {
    async fn append_batch(&self, batch: AppendBatch) -> Result<AppendOutcome, StoreError> {
        self.append_sync(batch, None)
    }

    async fn load_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        Ok(self
            .read()
            .stream_events(stream, from_version)
            .cloned()
            .collect())
    }

    /// Copies only what a load reads.
    async fn load_stream_for_state(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> Result<Vec<LoadedEvent>, StoreError> {
        Ok(self
            .read()
            .stream_events(stream, from_version)
            .map(|event| LoadedEvent {
                stream_version: event.stream_version,
                event_type: event.event_type.clone(),
                schema_version: event.schema_version,
                payload: event.payload.clone(),
            })
            .collect())
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<u64>, StoreError> {
        Ok(self.read().streams.get(stream).map(|v| v.len() as u64))
    }

    fn upcasters(&self) -> &Upcasters {
        &self.inner.upcasters
    }
}

impl GlobalLog for MemoryStore {
    async fn load_log(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let data = self.read();
        let start = usize::try_from(after.get())
            .unwrap_or(usize::MAX)
            .min(data.log.len());
        let end = start.saturating_add(limit).min(data.log.len());
        Ok(data.log[start..end].to_vec())
    }

    async fn head_position(&self) -> Result<Position, StoreError> {
        Ok(Position::new(self.read().log.len() as u64))
    }

    async fn count_events_after(&self, after: Position) -> Result<Option<u64>, StoreError> {
        let stored = self.read().log.len() as u64;
        Ok(Some(stored.saturating_sub(after.get())))
    }

    async fn wait_for_events(&self, after: Position) -> Result<(), StoreError> {
        self.inner.head.wait_past(after).await;
        Ok(())
    }
}

impl SnapshotStore for MemoryStore {
    async fn store_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.write().save_snapshot(snapshot);
        Ok(())
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.read().snapshots.get(stream).cloned())
    }

    async fn delete_snapshot(&self, stream: &StreamId, version: u64) -> Result<bool, StoreError> {
        let mut data = self.write();
        if data
            .snapshots
            .get(stream)
            .is_some_and(|s| s.version == version)
        {
            data.snapshots.remove(stream);
            return Ok(true);
        }
        Ok(false)
    }

    /// Appends and stores the snapshot under one lock: both or neither.
    async fn append_batch_with_snapshot(
        &self,
        batch: AppendBatch,
        snapshot: Snapshot,
    ) -> Result<AppendOutcome, StoreError> {
        self.append_sync(batch, Some(snapshot))
    }
}
