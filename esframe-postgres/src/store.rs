//! [`PgEventStore`]: the store handle, its connections, and the contract's traits, whose work
//! is in `append.rs`, `inline.rs` and `read.rs`.

use std::{sync::Arc, time::Duration};

use esframe_core::{
    AppendBatch, AppendOutcome, EventStore, GlobalBatch, GlobalLog, LoadedEvent, LoadedStream,
    LogPartition, Position, RecordedEvent, Snapshot, SnapshotStore, StoreError, StreamId,
    Upcasters,
};
use sqlx::{PgPool, Postgres, pool::PoolConnection, postgres::PgPoolOptions};
use tokio::sync::watch;

use crate::{
    PgCheckpoints, PgEventStoreBuilder, PgStoreError, SchemaName,
    connection::Reconnect,
    error::Failure,
    horizon::{self, HorizonStatus, Stall},
    inline::InlineProjection,
    listener::{Notifier, Waker},
    sql::Queries,
    stash::ConnectionStash,
};

/// The PostgreSQL event store: streams, the global log and snapshots.
///
/// Cheap to clone: clones share the pool, the prepared SQL and the notification listener.
///
/// Guarantees, beyond the store contract the conformance suite checks: every append is one
/// statement (one round trip) that checks the expected version and inserts all events with one
/// `INSERT ... SELECT`, and, with a snapshot, stores it in the same transaction. Concurrency is
/// decided by the `(aggregate_type, aggregate_id, stream_version)` unique constraint, so no two writers ever store
/// the same version, and a conflict is recognised by SQLSTATE and constraint name. An operation
/// whose connection dies runs again on another (see
/// [`PgEventStoreBuilder::reconnect_within`]).
#[derive(Clone)]
pub struct PgEventStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: PgPool,
    pub(crate) schema: SchemaName,
    pub(crate) sql: Queries,
    pub(crate) channel: String,
    pub(crate) upcasters: Upcasters,
    pub(crate) notify: bool,
    pub(crate) notifier: Notifier,
    pub(crate) waker: Waker,
    pub(crate) poll_interval: Duration,
    pub(crate) stall_warning_after: Duration,
    pub(crate) reconnect_within: Duration,
    /// Connections kept between appends; see [`ConnectionStash`].
    pub(crate) stash: ConnectionStash,
    /// Projections updated in each append's transaction.
    pub(crate) inline: Vec<Arc<dyn InlineProjection>>,
    /// Bumped by every projection checkpoint commit in this process, shared by every
    /// [`PgCheckpoints`] of this store so that waits wake at once.
    pub(crate) checkpoint_commits: watch::Sender<u64>,
    pub(crate) stall: Stall,
}

impl std::fmt::Debug for PgEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEventStore")
            .field("schema", &self.inner.schema)
            .field("poll_interval", &self.inner.poll_interval)
            .field("stall_warning_after", &self.inner.stall_warning_after)
            .field("reconnect_within", &self.inner.reconnect_within)
            .finish_non_exhaustive()
    }
}

impl PgEventStore {
    /// A builder over `pool` with the default schema `esframe`.
    pub fn builder(pool: PgPool) -> PgEventStoreBuilder {
        PgEventStoreBuilder::new(pool)
    }

    /// Connects to `url` with the recommended pool settings ([`PgEventStore::pool_options`]) and
    /// opens the store in the default schema.
    pub async fn connect(url: &str) -> Result<Self, PgStoreError> {
        Self::builder(Self::pool_options().connect(url).await?)
            .build()
            .await
    }

    /// Pool settings for esframe: no ping before each statement (sqlx's default pings, which
    /// doubles the cost of a one-round-trip append; a broken connection still surfaces as an
    /// error and is replaced), 20 connections.
    ///
    /// The store keeps up to half of its pool's connections checked out between its own
    /// operations (sqlx pings a connection each time it goes back to the pool); the other half
    /// stays free for transactions, projections and your own queries.
    pub fn pool_options() -> PgPoolOptions {
        PgPoolOptions::new()
            .test_before_acquire(false)
            .max_connections(20)
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Begins a transaction on the store's pool, for [`append_in`](Self::append_in) and your own
    /// writes. Unlike `pool().begin()` in sqlx 0.9, it is safe to cancel: a task aborted while
    /// it waits for `BEGIN` never leaves a pooled connection inside a transaction (which the
    /// pool's next user, an append say, would silently join).
    pub async fn begin(&self) -> Result<crate::PgTransaction, StoreError> {
        crate::transaction::begin(&self.inner.pool)
            .await
            .map_err(|err| StoreError::unavailable(None, err))
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &SchemaName {
        &self.inner.schema
    }

    /// Projection checkpoints, leases and dead letters in this store's schema, exactly once;
    /// see [`PgCheckpoints`].
    pub fn checkpoints(&self) -> PgCheckpoints {
        PgCheckpoints::new(
            self.inner.pool.clone(),
            self.inner.schema.clone(),
            self.inner.checkpoint_commits.clone(),
        )
    }

    /// Who holds the global log back, if anyone; see [`HorizonStatus`].
    pub async fn horizon_status(&self) -> Result<HorizonStatus, StoreError> {
        horizon::horizon_status(&self.inner.pool, &self.inner.sql)
            .await
            .map_err(|err| StoreError::unavailable(None, err))
    }

    /// A connection for one operation: a stashed one, or one from the pool.
    pub(crate) async fn connection(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        self.inner.stash.acquire(&self.inner.pool).await
    }

    /// Ends an operation on `conn`: stashes it unless the database failed under it (then the
    /// pool tests it).
    pub(crate) fn release<T>(
        &self,
        conn: PoolConnection<Postgres>,
        result: Result<T, Failure>,
    ) -> Result<T, Failure> {
        if !matches!(result, Err(Failure::Db(_))) {
            self.inner.stash.keep(conn, &self.inner.pool);
        }
        result
    }

    /// The reconnect budget of one operation.
    pub(crate) fn reconnect(&self) -> Reconnect {
        Reconnect::within(self.inner.reconnect_within)
    }

    /// Wakes subscriptions after a committed append: local ones at once, others by `NOTIFY`.
    pub(crate) fn appended(&self) {
        self.inner.waker.wake_local();
        if self.inner.notify {
            self.inner.notifier.poke();
        }
    }
}

impl EventStore for PgEventStore {
    async fn append_batch(&self, batch: AppendBatch) -> Result<AppendOutcome, StoreError> {
        self.append_own(batch, None).await
    }

    async fn load_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.load_stream_rows(stream, from_version).await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<u64>, StoreError> {
        self.read_stream_version(stream).await
    }

    /// Fetches only the columns a load reads.
    async fn load_stream_for_state(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> Result<Vec<LoadedEvent>, StoreError> {
        self.load_state_rows(stream, from_version).await
    }

    fn upcasters(&self) -> &Upcasters {
        &self.inner.upcasters
    }
}

impl GlobalLog for PgEventStore {
    async fn load_log(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.load_log_rows(after, limit).await
    }

    async fn head_position(&self) -> Result<Position, StoreError> {
        self.read_head().await
    }

    async fn count_events_after(&self, after: Position) -> Result<Option<u64>, StoreError> {
        self.count_after(after).await.map(Some)
    }

    async fn wait_for_events(&self, after: Position) -> Result<(), StoreError> {
        self.wait_past(after).await
    }

    /// One index scan per bucket of the partition, merged in log order (`sql::read_partition`):
    /// only the partition's rows are read.
    async fn load_log_partition(
        &self,
        after: Position,
        limit: usize,
        partition: LogPartition,
    ) -> Result<GlobalBatch, StoreError> {
        self.load_partition_rows(after, limit, partition).await
    }

    async fn count_partition_events_after(
        &self,
        after: Position,
        partition: LogPartition,
    ) -> Result<Option<u64>, StoreError> {
        if partition.is_all() {
            return self.count_after(after).await.map(Some);
        }
        self.count_partition_after(after, partition).await.map(Some)
    }
}

impl SnapshotStore for PgEventStore {
    async fn store_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.write_snapshot(&snapshot).await
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        self.read_snapshot(stream).await
    }

    async fn delete_snapshot(&self, stream: &StreamId, version: u64) -> Result<bool, StoreError> {
        self.remove_snapshot(stream, version).await
    }

    /// One statement: the snapshot row, then the events from its version on.
    async fn load_snapshot_and_stream(
        &self,
        stream: &StreamId,
    ) -> Result<LoadedStream, StoreError> {
        self.load_snapshot_and_state_rows(stream).await
    }

    /// Appends and stores the snapshot in the same statement, hence the same transaction.
    async fn append_batch_with_snapshot(
        &self,
        batch: AppendBatch,
        snapshot: Snapshot,
    ) -> Result<AppendOutcome, StoreError> {
        self.append_own(batch, Some(snapshot)).await
    }
}
