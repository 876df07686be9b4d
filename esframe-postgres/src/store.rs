//! [`PgEventStore`]: the `EventStore` and `SnapshotStore` on PostgreSQL.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use esframe_core::{
    AppendOutcome, Conflict, EventStore, ExpectedVersion, GlobalBatch, NewEvent, RecordedEvent,
    Snapshot, SnapshotStore, StoreError, StreamId, Upcasters, projection::Projection,
};
use futures_util::TryStreamExt;
use serde_json::Value;
use sqlx::{
    AssertSqlSafe, PgConnection, PgPool, Postgres, Row,
    pool::PoolConnection,
    postgres::{PgPoolOptions, PgRow},
};
use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    PgCheckpoints, PgStoreError, PgTransaction, SchemaName,
    diagnostics::{self, HorizonStatus},
    error::{AppendFailure, classify},
    inline::{InlineProjection, Registered, lease_key},
    listener::{Notifier, Waker},
    rows,
    schema::migrate,
    sql::{MAX_EVENTS_PER_APPEND, Queries},
    stash::ConnectionStash,
};

/// Runs `$op` with `$conn: &mut PgConnection`, a kept or pooled connection, and hands the
/// connection back ([`PgEventStore::release`]). If the connection turns out to have died while
/// idle (a database restart, say: [`connection_lost`]), runs it again on another, up to
/// [`PgEventStore::reconnect_limit`] times, counting them in `$reconnects` when given. Only for
/// operations that may run twice: reads, and appends (idempotent by event id).
macro_rules! on_connection {
    ($store:ident, |$conn:ident| $op:expr) => {{
        let mut reconnects = 0;
        on_connection!($store, reconnects, |$conn| $op)
    }};
    ($store:ident, $reconnects:ident, |$conn:ident| $op:expr) => {
        loop {
            let mut held = $store.connection().await?;
            let result: Result<_, StoreError> = {
                let $conn: &mut PgConnection = &mut held;
                $op
            };
            match result {
                Err(err) if connection_lost(&err) && $reconnects < $store.reconnect_limit() => {
                    $reconnects += 1;
                    tracing::debug!(error = %err, "connection lost; running again on another");
                }
                result => break $store.release(held, result),
            }
        }
    };
}

/// How often an `Any` append is retried when a concurrent writer takes the version it computed.
const ANY_RETRIES: u32 = 100;

/// How long an append that updates inline projections waits for a rebuild of one of them.
const INLINE_REBUILD_WAIT: Duration = Duration::from_secs(30);

/// The PostgreSQL event and snapshot store.
///
/// Cheap to clone: clones share the pool, the prepared SQL and the notification listener.
///
/// Guarantees, beyond the `EventStore` contract: every append is one statement (one round trip)
/// that checks the expected version and idempotency, inserts all events with one
/// `INSERT ... SELECT FROM unnest(...)`, and, with `append_with_snapshot`, stores the snapshot in
/// the same transaction. Concurrency is decided by the `(stream_id, stream_version)` unique
/// constraint, so no two writers ever store the same version, and a conflict is recognised by
/// SQLSTATE and constraint name.
#[derive(Clone)]
pub struct PgEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    schema: SchemaName,
    sql: Queries,
    channel: String,
    upcasters: Upcasters,
    notify: bool,
    notifier: Notifier,
    waker: Waker,
    poll_interval: Duration,
    stall_warning_after: Duration,
    /// Connections kept between appends; see [`ConnectionStash`].
    stash: ConnectionStash,
    /// Projections updated in each append's transaction.
    inline: Vec<Arc<dyn InlineProjection>>,
    /// Bumped by every projection checkpoint commit in this process, shared by every
    /// [`PgCheckpoints`] of this store so that waits wake at once.
    checkpoint_commits: watch::Sender<u64>,
    /// When the global log was first seen held back by an open transaction, when that was last
    /// reported, and the horizon it was stuck at.
    stall: Mutex<Option<(Instant, Option<Instant>, i64)>>,
}

impl std::fmt::Debug for PgEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEventStore")
            .field("schema", &self.inner.schema)
            .field("poll_interval", &self.inner.poll_interval)
            .field("stall_warning_after", &self.inner.stall_warning_after)
            .finish_non_exhaustive()
    }
}

/// Configures and opens a [`PgEventStore`].
///
/// ```no_run
/// # async fn open() -> Result<(), esframe_postgres::PgStoreError> {
/// use esframe_postgres::PgEventStore;
/// use std::time::Duration;
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/test").await?;
/// let store = PgEventStore::builder(pool)
///     .schema("billing")?
///     .poll_interval(Duration::from_millis(500))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct PgEventStoreBuilder {
    pool: PgPool,
    schema: SchemaName,
    upcasters: Upcasters,
    notify: bool,
    notify_interval: Duration,
    poll_interval: Duration,
    stall_warning_after: Duration,
    inline: Vec<Arc<dyn InlineProjection>>,
}

impl std::fmt::Debug for PgEventStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEventStoreBuilder")
            .field("schema", &self.schema)
            .field("notify", &self.notify)
            .field("poll_interval", &self.poll_interval)
            .field(
                "inline_projections",
                &self.inline.iter().map(|p| p.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl PgEventStoreBuilder {
    /// The Postgres schema holding esframe's tables (default `esframe`).
    pub fn schema(mut self, name: impl Into<String>) -> Result<Self, PgStoreError> {
        self.schema = SchemaName::new(name)?;
        Ok(self)
    }

    /// Upcasters applied to every event read (streams, the global log, subscriptions), so
    /// events stored by older code arrive at their current schema version. Stored rows are never
    /// rewritten.
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// Whether appends wake subscriptions in other processes with `NOTIFY` (default `true`).
    /// The notification is sent after the append commits, by a background task on its own
    /// connection, coalescing bursts into one, so appends never wait on PostgreSQL's
    /// notification lock. Subscriptions in this process are woken directly either way; without
    /// it, other processes see new events after at most their poll interval.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// The shortest time between two notifications (default 1 ms): appends within it share one
    /// `NOTIFY`, bounding its cost under heavy load at the price of that much extra latency for
    /// subscribers in other processes.
    pub fn notify_interval(mut self, interval: Duration) -> Self {
        self.notify_interval = interval;
        self
    }

    /// How long an idle subscription waits before polling, in case a notification was missed
    /// (default 1 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long the global log may be held back by an open transaction before a warning naming
    /// that transaction is logged (default 10 s).
    pub fn stall_warning_after(mut self, after: Duration) -> Self {
        self.stall_warning_after = after;
        self
    }

    /// Updates `projection` in the same transaction as every append, for read-your-writes: when
    /// `append` returns, the read model already holds the events, and if the projection fails
    /// the append is rolled back ([`StoreError::InlineProjection`]) and nothing is stored.
    ///
    /// An append that updates inline projections costs a few more round trips (`BEGIN`, a shared
    /// advisory lock, the projection's statements, `COMMIT`). Every process that appends must
    /// register the same inline projections. Do not also run a
    /// [`ProjectionRunner`](esframe_core::projection::ProjectionRunner) for it except to
    /// [`rebuild`](esframe_core::projection::ProjectionRunner::rebuild) it: the rebuild holds the
    /// projection's lease, which pauses appends that update it until the rebuild ends, so no
    /// event is applied twice or missed.
    pub fn inline_projection<P: Projection<PgTransaction>>(mut self, projection: P) -> Self {
        self.inline.push(Registered::boxed(projection));
        self
    }

    /// Applies pending migrations and opens the store.
    pub async fn build(self) -> Result<PgEventStore, PgStoreError> {
        if self.pool.options().get_test_before_acquire() {
            tracing::info!(
                "the sqlx pool pings each connection before every statement (test_before_acquire), \
                 doubling the round trips of esframe's one-statement appends; build the pool with \
                 PgPoolOptions::new().test_before_acquire(false) for full speed"
            );
        }
        migrate(&self.pool, &self.schema).await?;
        let stash = ConnectionStash::for_pool(&self.pool);
        let listener_pid = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let channel = format!("esframe_{}", self.schema.as_str().to_ascii_lowercase());
        Ok(PgEventStore {
            inner: Arc::new(Inner {
                sql: Queries::new(&self.schema),
                upcasters: self.upcasters,
                notify: self.notify,
                notifier: Notifier::new(
                    self.pool.clone(),
                    channel.clone(),
                    self.notify_interval,
                    Arc::clone(&listener_pid),
                ),
                waker: Waker::new(self.pool.clone(), channel.clone(), listener_pid),
                pool: self.pool,
                schema: self.schema,
                channel,
                poll_interval: self.poll_interval,
                stall_warning_after: self.stall_warning_after,
                inline: self.inline,
                stash,
                checkpoint_commits: watch::Sender::new(0),
                stall: Mutex::new(None),
            }),
        })
    }
}

/// Where an append statement runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppendMode {
    /// Its own transaction: a statement that lost a race can run again with a new transaction
    /// id; `NOTIFY` is sent after the commit.
    Autocommit,
    /// The store's own transaction with inline projections: no retry inside it; `NOTIFY` after
    /// its commit.
    OwnTransaction,
    /// The caller's transaction, whose commit the store cannot see: `NOTIFY` rides along.
    CallerTransaction,
}

/// What an append statement did.
enum Appended {
    Stored(AppendOutcome),
    /// The expectation did not hold; `actual` is the version if the statement reported it
    /// (`Some(None)`: no stream).
    Refused {
        actual: Option<Option<u64>>,
    },
}

impl PgEventStore {
    /// A builder over `pool` with the default schema `esframe`.
    pub fn builder(pool: PgPool) -> PgEventStoreBuilder {
        PgEventStoreBuilder {
            pool,
            schema: SchemaName::default(),
            upcasters: Upcasters::default(),
            notify: true,
            notify_interval: Duration::from_millis(1),
            poll_interval: Duration::from_secs(1),
            stall_warning_after: Duration::from_secs(10),
            inline: Vec::new(),
        }
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

    /// The schema holding the tables.
    pub fn schema(&self) -> &SchemaName {
        &self.inner.schema
    }

    /// Appends inside the caller's transaction, e.g. to update a read model atomically with the
    /// events. The append must be the first write of the transaction (it is checked: an earlier
    /// write would give the transaction an id older than the events it must follow), and a
    /// concurrent writer's version is reported as a [`Conflict`] whatever `expected` is, since a
    /// failed statement ends the transaction. A store with inline projections refuses it
    /// ([`PgStoreError::InlineProjectionsNeedOwnTransaction`]): they run in the store's own
    /// transaction.
    pub async fn append_in(
        &self,
        tx: &mut PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        if !self.inner.inline.is_empty() {
            let names: Vec<&str> = self.inner.inline.iter().map(|p| p.name()).collect();
            return Err(StoreError::backend(
                PgStoreError::InlineProjectionsNeedOwnTransaction {
                    stream: stream.to_string(),
                    projections: names.join(", "),
                },
            ));
        }
        let first_write: bool =
            sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned() IS NULL")
                .fetch_one(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
        if !first_write {
            return Err(StoreError::backend(PgStoreError::AppendNotFirstWrite {
                stream: stream.to_string(),
            }));
        }
        self.append_on(
            tx,
            stream,
            expected,
            events,
            None,
            AppendMode::CallerTransaction,
        )
        .await
    }

    /// A connection for one operation: a stashed one, or one from the pool.
    async fn connection(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        self.inner
            .stash
            .acquire(&self.inner.pool)
            .await
            .map_err(StoreError::backend)
    }

    /// Ends an operation on `conn`: stashes it unless the backend failed (then the pool tests
    /// it).
    fn release<T>(
        &self,
        conn: PoolConnection<Postgres>,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if !matches!(result, Err(StoreError::Backend(_))) {
            self.inner.stash.keep(conn, &self.inner.pool);
        }
        result
    }

    /// How many dead connections one operation may run into before it gives up: every idle
    /// connection of the pool may have died with the database.
    fn reconnect_limit(&self) -> u32 {
        self.inner.pool.options().get_max_connections() + 1
    }

    /// Wakes subscriptions after a committed append: local ones at once, others by `NOTIFY`.
    fn appended(&self) {
        self.inner.waker.wake_local();
        if self.inner.notify {
            self.inner.notifier.poke();
        }
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
        diagnostics::horizon_status(&self.inner.pool, &self.inner.sql)
            .await
            .map_err(StoreError::backend)
    }

    async fn append_pooled(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: Option<Snapshot>,
    ) -> Result<AppendOutcome, StoreError> {
        let span = tracing::debug_span!(
            "esframe.append",
            stream = %stream,
            expected = %expected,
            events = events.len(),
            version = tracing::field::Empty,
        );
        async {
            if !self.inner.inline.is_empty() {
                let outcome = self
                    .append_with_inline(stream, expected, events, snapshot)
                    .await?;
                tracing::Span::current().record("version", outcome.stream_version);
                return Ok(outcome);
            }
            let columns = prepare(stream, events)?;
            // Appends are idempotent by event id, so one run again on another connection after
            // the first broke returns the first's outcome if that one committed.
            let mut reconnects = 0;
            let outcome = on_connection!(self, reconnects, |conn| {
                self.append_columns(
                    conn,
                    stream,
                    expected,
                    &columns,
                    snapshot.as_ref(),
                    AppendMode::Autocommit,
                )
                .await
            })?;
            if !outcome.positions.is_empty() && (!outcome.deduplicated || reconnects > 0) {
                self.appended();
            }
            tracing::Span::current().record("version", outcome.stream_version);
            Ok(outcome)
        }
        .instrument(span)
        .await
    }

    /// Takes every inline projection's shared lease lock for `tx`; the name of one held
    /// exclusively (being rebuilt) if any could not be taken. A projection whose rebuild was
    /// left unfinished (interrupted after its reset) refuses the append: its read model is
    /// missing events until the rebuild is run again.
    async fn lock_inline_projections(
        &self,
        tx: &mut PgConnection,
        stream: &StreamId,
    ) -> Result<Option<String>, StoreError> {
        for projection in &self.inner.inline {
            let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.inline_guard)))
                .bind(lease_key(&self.inner.schema, projection.name()))
                .bind(projection.name())
                .fetch_one(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
            let free: bool = row.try_get("free").map_err(StoreError::backend)?;
            let unfinished: bool = row.try_get("unfinished").map_err(StoreError::backend)?;
            if !free {
                return Ok(Some(projection.name().to_owned()));
            }
            if unfinished {
                return Err(StoreError::InlineProjection {
                    projection: projection.name().to_owned(),
                    stream: stream.clone(),
                    reason:
                        "its last rebuild was interrupted, so its read model is missing events; \
                             run `ProjectionRunner::rebuild` for it again"
                            .to_owned(),
                });
            }
        }
        Ok(None)
    }

    /// The append in a transaction of its own that also updates the inline projections.
    async fn append_with_inline(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: Option<Snapshot>,
    ) -> Result<AppendOutcome, StoreError> {
        let mut attempt = 0;
        let rebuild_wait = Instant::now();
        let mut backoff = Duration::from_millis(1);
        loop {
            attempt += 1;
            let mut tx = self.inner.pool.begin().await.map_err(StoreError::backend)?;
            // Shared with other appends, exclusive with a rebuild holding the lease. Taking it
            // writes nothing, so the append stays the transaction's first write. While a rebuild
            // holds it, wait without holding a connection, which the rebuild may need.
            if let Some(rebuilding) = self.lock_inline_projections(&mut tx, stream).await? {
                drop(tx);
                if rebuild_wait.elapsed() >= INLINE_REBUILD_WAIT {
                    return Err(StoreError::InlineProjection {
                        projection: rebuilding,
                        stream: stream.clone(),
                        reason: format!(
                            "it is being rebuilt, and appends that update it waited {} s for the rebuild to end",
                            INLINE_REBUILD_WAIT.as_secs()
                        ),
                    });
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
                attempt -= 1;
                continue;
            }
            let result = self
                .append_on(
                    &mut tx,
                    stream,
                    expected,
                    events.clone(),
                    snapshot.clone(),
                    AppendMode::OwnTransaction,
                )
                .await;
            let outcome = match result {
                Ok(outcome) => outcome,
                Err(err) => {
                    drop(tx);
                    // A failed statement ended the transaction; decide on a fresh connection
                    // whether this was an idempotent retry, a race to retry, or a conflict.
                    let mut conn = self
                        .inner
                        .pool
                        .acquire()
                        .await
                        .map_err(StoreError::backend)?;
                    if let Some(original) = self
                        .deduplicate(&mut conn, stream, &Columns::new(events.clone()))
                        .await?
                    {
                        return Ok(original);
                    }
                    match err {
                        StoreError::Conflict(conflict) if conflict.actual.is_none() => {
                            let actual = self.stream_version_on(&mut conn, stream).await?;
                            if expected.accepts(actual) && attempt < ANY_RETRIES {
                                continue;
                            }
                            return Err(Conflict { actual, ..conflict }.into());
                        }
                        err => return Err(err),
                    }
                }
            };
            if outcome.deduplicated || outcome.positions.is_empty() {
                return Ok(outcome);
            }
            let recorded = recorded_events(stream, &events, &outcome);
            for projection in &self.inner.inline {
                let wanted: Vec<RecordedEvent> = recorded
                    .iter()
                    .filter(|e| projection.interest().matches(e))
                    .cloned()
                    .collect();
                if wanted.is_empty() {
                    continue;
                }
                if let Err(err) = projection.apply(&wanted, &mut tx).await {
                    return Err(StoreError::InlineProjection {
                        projection: projection.name().to_owned(),
                        stream: stream.clone(),
                        reason: err.to_string(),
                    });
                }
            }
            tx.commit().await.map_err(StoreError::backend)?;
            self.appended();
            return Ok(outcome);
        }
    }

    /// The append, on a connection in one of the [`AppendMode`]s.
    async fn append_on(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: Option<Snapshot>,
        mode: AppendMode,
    ) -> Result<AppendOutcome, StoreError> {
        let columns = prepare(stream, events)?;
        self.append_columns(conn, stream, expected, &columns, snapshot.as_ref(), mode)
            .await
    }

    /// The append of prepared columns, on a connection in one of the [`AppendMode`]s.
    async fn append_columns(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        columns: &Columns,
        snapshot: Option<&Snapshot>,
        mode: AppendMode,
    ) -> Result<AppendOutcome, StoreError> {
        let retry = mode == AppendMode::Autocommit;
        let count = columns.event_ids.len();
        let (kind, exact) = match expected {
            ExpectedVersion::Any => (0, 0),
            ExpectedVersion::NoStream => (1, 0),
            ExpectedVersion::StreamExists => (2, 0),
            ExpectedVersion::Exact(v) => (3, i64::try_from(v).unwrap_or(i64::MAX)),
        };
        if count == 0 {
            let current = self.stream_version_on(conn, stream).await?;
            if !expected.accepts(current) {
                return Err(Conflict {
                    stream: stream.clone(),
                    expected,
                    actual: current,
                }
                .into());
            }
            return Ok(AppendOutcome {
                stream_version: current.unwrap_or(0),
                positions: Vec::new(),
                recorded_at: Utc::now(),
                deduplicated: false,
            });
        }
        // The lean statement for the common case; the summarising one when a snapshot or an
        // in-transaction NOTIFY rides along.
        let lean =
            snapshot.is_none() && (mode != AppendMode::CallerTransaction || !self.inner.notify);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let one = lean && count == 1;
            let sql = match (&snapshot, lean) {
                (None, true) if one => &self.inner.sql.append_one,
                (Some(_), _) => &self.inner.sql.append_with_snapshot,
                (None, true) => &self.inner.sql.append,
                (None, false) => &self.inner.sql.append_notify,
            };
            let query = sqlx::query(AssertSqlSafe(Arc::clone(sql))).bind(stream.as_str());
            let query = if one {
                query
                    .bind(columns.event_ids[0])
                    .bind(&columns.aggregate_types[0])
                    .bind(&columns.event_types[0])
                    .bind(columns.schema_versions[0])
                    .bind(&columns.payloads[0])
                    .bind(columns.correlation_ids[0])
                    .bind(columns.causation_ids[0])
                    .bind(&columns.metadata[0])
            } else {
                query
                    .bind(&columns.event_ids)
                    .bind(&columns.aggregate_types)
                    .bind(&columns.event_types)
                    .bind(&columns.schema_versions)
                    .bind(&columns.payloads)
                    .bind(&columns.correlation_ids)
                    .bind(&columns.causation_ids)
                    .bind(&columns.metadata)
            };
            let mut query = query.bind(kind).bind(exact);
            if !lean {
                query = query.bind(&self.inner.channel);
            }
            if let Some(snapshot) = &snapshot {
                query = query
                    .bind(&snapshot.aggregate_type)
                    .bind(i64::try_from(snapshot.version).unwrap_or(i64::MAX))
                    .bind(i32::try_from(snapshot.schema_version).unwrap_or(i32::MAX))
                    .bind(&snapshot.state)
                    .bind(snapshot.taken_at);
            }
            let result = if lean {
                query
                    .fetch_all(&mut *conn)
                    .await
                    .map(|rows| stored_rows(&rows))
            } else {
                query
                    .fetch_one(&mut *conn)
                    .await
                    .map(|row| summary_row(&row, count))
            };
            let failure = match result {
                Ok(Err(err)) => return Err(StoreError::backend(err)),
                Ok(Ok(Appended::Stored(outcome))) => return Ok(outcome),
                Ok(Ok(Appended::Refused { actual })) => {
                    // A retry of an append that already landed carries a stale expectation:
                    // idempotency is decided before the conflict.
                    if let Some(original) = self.deduplicate(conn, stream, columns).await? {
                        return Ok(original);
                    }
                    let actual = match actual {
                        Some(actual) => actual,
                        None => self.stream_version_on(conn, stream).await?,
                    };
                    return Err(Conflict {
                        stream: stream.clone(),
                        expected,
                        actual,
                    }
                    .into());
                }
                Err(err) => (classify(&err), err),
            };
            match failure {
                (AppendFailure::VersionTaken, _)
                    if retry
                        && matches!(
                            expected,
                            ExpectedVersion::Any | ExpectedVersion::StreamExists
                        )
                        && attempt < ANY_RETRIES =>
                {
                    tokio::task::yield_now().await;
                }
                (AppendFailure::VersionTaken, _) => {
                    // Read on the connection already held: asking the pool for a second one
                    // could wait forever when every connection is held by a conflicting writer.
                    let actual = if retry {
                        // An idempotent retry racing its original loses on the version first:
                        // the original outcome still wins over the conflict.
                        if let Some(original) = self.deduplicate(conn, stream, columns).await? {
                            return Ok(original);
                        }
                        self.stream_version_on(conn, stream).await?
                    } else {
                        None
                    };
                    return Err(Conflict {
                        stream: stream.clone(),
                        expected,
                        actual,
                    }
                    .into());
                }
                (AppendFailure::EventIdTaken, err) => {
                    // In the caller's transaction the failed statement ended the transaction, so
                    // nothing more can be read there.
                    if !retry {
                        return Err(StoreError::backend(err));
                    }
                    if let Some(original) = self.deduplicate(conn, stream, columns).await? {
                        return Ok(original);
                    }
                    // The other writer of that id rolled back: try again.
                    if attempt >= ANY_RETRIES {
                        return Err(StoreError::backend(err));
                    }
                }
                (AppendFailure::Transient, _) if retry && attempt < ANY_RETRIES => {}
                (_, err) => return Err(StoreError::backend(err)),
            }
        }
    }

    /// The stream's version, read on `conn` (inside the caller's transaction).
    async fn stream_version_on(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
    ) -> Result<Option<u64>, StoreError> {
        let version: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.inner.sql.stream_version)))
                .bind(stream.as_str())
                .fetch_one(&mut *conn)
                .await
                .map_err(StoreError::backend)?;
        Ok(version.map(|v| v as u64))
    }

    /// Looks the append's event ids up: `None` if none is stored, the original outcome if all
    /// are with the same content, an error otherwise.
    async fn deduplicate(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        columns: &Columns,
    ) -> Result<Option<AppendOutcome>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.find_event_ids)))
            .bind(&columns.event_ids)
            .bind(stream.as_str())
            .bind(&columns.event_types)
            .bind(&columns.schema_versions)
            .bind(&columns.payloads)
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::backend)?;
        let mut stored = HashMap::with_capacity(rows.len());
        for row in &rows {
            let found = StoredId::from_row(row).map_err(StoreError::backend)?;
            if !found.same {
                return Err(StoreError::EventIdReused {
                    event_id: found.event_id,
                    stream: stream.clone(),
                    stored_stream: StreamId::new(&found.stream_id)
                        .unwrap_or_else(|_| StreamId::lossy(&found.stream_id)),
                    stored_version: found.stream_version,
                });
            }
            stored.insert(found.event_id, found);
        }
        if stored.is_empty() {
            return Ok(None);
        }
        if stored.len() < columns.event_ids.len() {
            let stored_event_id = columns
                .event_ids
                .iter()
                .find(|id| stored.contains_key(id))
                .copied()
                .unwrap_or_default();
            return Err(StoreError::PartialDuplicate {
                stream: stream.clone(),
                stored_event_id,
            });
        }
        let in_order: Vec<&StoredId> = columns
            .event_ids
            .iter()
            .filter_map(|id| stored.get(id))
            .collect();
        Ok(Some(AppendOutcome {
            stream_version: in_order.iter().map(|s| s.stream_version).max().unwrap_or(0),
            positions: in_order.iter().map(|s| s.global_position).collect(),
            recorded_at: in_order.first().map_or_else(Utc::now, |s| s.recorded_at),
            deduplicated: true,
        }))
    }

    /// Tracks whether the log is held back and warns, naming the holder, past the threshold.
    /// Returns how long it has been held back at this horizon (zero if it is not).
    async fn note_stall(&self, blocked: bool, horizon: i64) -> Duration {
        let (due, blocked_for) = {
            let mut stall = self
                .inner
                .stall
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Appends in flight keep events beyond the horizon all the time under load; the log
            // is only stalled while the horizon itself does not move.
            if !blocked || stall.is_some_and(|(_, _, seen)| seen != horizon) {
                *stall = None;
            }
            if !blocked {
                return Duration::ZERO;
            }
            let now = Instant::now();
            let (since, last_warned, _) = stall.get_or_insert((now, None, horizon));
            let threshold = self.inner.stall_warning_after;
            let due = now.duration_since(*since) >= threshold
                && last_warned.is_none_or(|at| now.duration_since(at) >= threshold);
            if due {
                *last_warned = Some(now);
            }
            let blocked_for = now.duration_since(*since);
            (due.then_some(blocked_for), blocked_for)
        };
        if let Some(blocked_for) = due {
            match self.horizon_status().await {
                Ok(status) => tracing::warn!(
                    blocked_for_ms = blocked_for.as_millis() as u64,
                    holder = ?status.holder,
                    "esframe global log held back by an open transaction; subscriptions wait until it ends"
                ),
                Err(err) => {
                    tracing::warn!(error = %err, "esframe global log held back; diagnostics failed")
                }
            }
        }
        blocked_for
    }
}

/// The envelopes of events just appended, as the global log will show them.
fn recorded_events(
    stream: &StreamId,
    events: &[NewEvent],
    outcome: &AppendOutcome,
) -> Vec<RecordedEvent> {
    let first_version = outcome.stream_version + 1 - events.len() as u64;
    events
        .iter()
        .zip(&outcome.positions)
        .enumerate()
        .map(|(i, (event, &global_position))| RecordedEvent {
            event_id: event.event_id,
            stream_id: stream.clone(),
            aggregate_type: event.aggregate_type.clone(),
            stream_version: first_version + i as u64,
            global_position,
            recorded_at: outcome.recorded_at,
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            payload: event.payload.clone(),
            metadata: event.metadata.clone(),
        })
        .collect()
}

/// Whether `err` says the connection was already dead: the socket failed, or the server ended
/// the session (`57P01` admin shutdown, `57P02` crash shutdown, `57P03` cannot connect now).
fn connection_lost(err: &StoreError) -> bool {
    let StoreError::Backend(source) = err else {
        return false;
    };
    match source.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Io(_)) => true,
        Some(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("57P01" | "57P02" | "57P03"))
        }
        _ => false,
    }
}

/// Checks an append's events and takes them apart into column arrays.
fn prepare(stream: &StreamId, events: Vec<NewEvent>) -> Result<Columns, StoreError> {
    if events.len() > MAX_EVENTS_PER_APPEND {
        return Err(StoreError::backend(PgStoreError::AppendTooLarge {
            stream: stream.to_string(),
            events: events.len(),
        }));
    }
    if events.len() > 1 {
        let mut seen = std::collections::HashSet::with_capacity(events.len());
        if let Some(dup) = events.iter().find(|e| !seen.insert(e.event_id)) {
            return Err(StoreError::DuplicateIdInBatch {
                stream: stream.clone(),
                event_id: dup.event_id,
            });
        }
    }
    Ok(Columns::new(events))
}

/// The append's parameters as column arrays, bound once per attempt.
struct Columns {
    event_ids: Vec<Uuid>,
    aggregate_types: Vec<String>,
    event_types: Vec<String>,
    schema_versions: Vec<i32>,
    payloads: Vec<Value>,
    correlation_ids: Vec<Option<Uuid>>,
    causation_ids: Vec<Option<Uuid>>,
    metadata: Vec<Value>,
}

impl Columns {
    /// Takes the events apart into one array per column (moving, not copying, the payloads).
    fn new(events: Vec<NewEvent>) -> Self {
        let n = events.len();
        let mut c = Self {
            event_ids: Vec::with_capacity(n),
            aggregate_types: Vec::with_capacity(n),
            event_types: Vec::with_capacity(n),
            schema_versions: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            correlation_ids: Vec::with_capacity(n),
            causation_ids: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
        };
        for e in events {
            c.event_ids.push(e.event_id);
            c.aggregate_types.push(e.aggregate_type.into_owned());
            c.event_types.push(e.event_type.into_owned());
            c.schema_versions
                .push(i32::try_from(e.schema_version).unwrap_or(i32::MAX));
            c.payloads.push(e.payload);
            c.correlation_ids.push(e.metadata.correlation_id);
            c.causation_ids.push(e.metadata.causation_id);
            c.metadata.push(Value::Object(e.metadata.extra));
        }
        c
    }
}

struct StoredId {
    event_id: Uuid,
    stream_id: String,
    stream_version: u64,
    global_position: u64,
    recorded_at: DateTime<Utc>,
    same: bool,
}

impl StoredId {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            event_id: row.try_get(0)?,
            stream_id: row.try_get(1)?,
            stream_version: row.try_get::<i64, _>(2)? as u64,
            global_position: row.try_get::<i64, _>(3)? as u64,
            recorded_at: row.try_get(4)?,
            same: row.try_get(5)?,
        })
    }
}

/// Reads the lean statement's rows: one per stored event, none if the expectation failed.
fn stored_rows(rows: &[PgRow]) -> Result<Appended, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Appended::Refused { actual: None });
    }
    let mut stored = Vec::with_capacity(rows.len());
    for row in rows {
        let position: i64 = row.try_get(0)?;
        let version: i64 = row.try_get(1)?;
        let recorded_at: DateTime<Utc> = row.try_get(2)?;
        stored.push((version as u64, position as u64, recorded_at));
    }
    stored.sort_unstable_by_key(|&(version, ..)| version);
    Ok(Appended::Stored(AppendOutcome {
        stream_version: stored.last().map_or(0, |s| s.0),
        positions: stored.iter().map(|s| s.1).collect(),
        recorded_at: stored[0].2,
        deduplicated: false,
    }))
}

/// Reads the summarising statement's single row.
fn summary_row(row: &PgRow, events: usize) -> Result<Appended, sqlx::Error> {
    let current = row.try_get::<i64, _>("current_version")? as u64;
    if row.try_get::<i64, _>("accepted")? == 0 {
        return Ok(Appended::Refused {
            actual: Some((current > 0).then_some(current)),
        });
    }
    let positions: Vec<i64> = row.try_get("positions")?;
    let recorded_at: Option<DateTime<Utc>> = row.try_get("recorded_at")?;
    Ok(Appended::Stored(AppendOutcome {
        stream_version: current + events as u64,
        positions: positions.into_iter().map(|p| p as u64).collect(),
        recorded_at: recorded_at.unwrap_or_else(Utc::now),
        deduplicated: false,
    }))
}

impl EventStore for PgEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        self.append_pooled(stream, expected, events, None).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let span = tracing::debug_span!("esframe.read_stream", stream = %stream, from_version, events = tracing::field::Empty);
        async {
            let events = on_connection!(self, |conn| {
                async {
                    // Rows are decoded as they arrive, so a long stream never sits in memory
                    // twice.
                    let mut rows =
                        sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.read_stream)))
                            .bind(stream.as_str())
                            .bind(i64::try_from(from_version).unwrap_or(i64::MAX))
                            .fetch(&mut *conn);
                    let mut events = Vec::new();
                    let upcasters = &self.inner.upcasters;
                    while let Some(row) = rows.try_next().await.map_err(StoreError::backend)? {
                        upcasters.apply(rows::event(&row, Some(stream))?, &mut events)?;
                    }
                    Ok(events)
                }
                .await
            })?;
            tracing::Span::current().record("events", events.len());
            Ok(events)
        }
        .instrument(span)
        .await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<u64>, StoreError> {
        let version: Option<i64> = on_connection!(self, |conn| {
            sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.inner.sql.stream_version)))
                .bind(stream.as_str())
                .fetch_one(conn)
                .await
                .map_err(StoreError::backend)
        })?;
        Ok(version.map(|v| v as u64))
    }

    async fn read_all_batch(&self, after: u64, limit: usize) -> Result<GlobalBatch, StoreError> {
        let span = tracing::debug_span!(
            "esframe.read_all",
            after,
            limit,
            events = tracing::field::Empty
        );
        async {
            let batch = on_connection!(self, |conn| {
                async {
                    let mut rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.read_all)))
                        .bind(i64::try_from(after).unwrap_or(i64::MAX))
                        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                        .fetch(&mut *conn);
                    let mut events = Vec::with_capacity(limit.min(4096));
                    let upcasters = &self.inner.upcasters;
                    let mut scanned_to = after;
                    while let Some(row) = rows.try_next().await.map_err(StoreError::backend)? {
                        let event = rows::event(&row, None)?;
                        scanned_to = event.global_position;
                        upcasters.apply(event, &mut events)?;
                    }
                    Ok(GlobalBatch { events, scanned_to })
                }
                .await
            })?;
            tracing::Span::current().record("events", batch.events.len());
            Ok(batch)
        }
        .instrument(span)
        .await
    }

    async fn head_position(&self) -> Result<Option<u64>, StoreError> {
        let head: Option<i64> = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.inner.sql.head)))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(Some(head.map_or(0, |h| u64::try_from(h).unwrap_or(0))))
    }

    async fn count_events_after(&self, after: u64) -> Result<Option<u64>, StoreError> {
        let count: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.inner.sql.count_after)))
            .bind(i64::try_from(after).unwrap_or(i64::MAX))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(Some(u64::try_from(count).unwrap_or(0)))
    }

    async fn wait_for_events(&self, after: u64) -> Result<(), StoreError> {
        // Register for wake-ups before checking, so a commit between the check and the wait
        // still wakes us.
        let mut woken: watch::Receiver<u64> = self.inner.waker.subscribe();
        let row = on_connection!(self, |conn| {
            sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.readiness)))
                .bind(i64::try_from(after).unwrap_or(i64::MAX))
                .fetch_one(conn)
                .await
                .map_err(StoreError::backend)
        })?;
        let ready: bool = row.try_get("ready").map_err(StoreError::backend)?;
        let head: Option<i64> = row.try_get("head").map_err(StoreError::backend)?;
        let horizon: i64 = row.try_get("horizon").map_err(StoreError::backend)?;
        let after_i = i64::try_from(after).unwrap_or(i64::MAX);
        let pending = head.is_some_and(|h| h > after_i && h >= horizon);
        let blocked_for = self.note_stall(pending, horizon).await;
        if ready {
            return Ok(());
        }
        // Events are stored but a transaction still running holds them back (usually another
        // append or a projection's transaction, ending within a millisecond). Its commit may
        // not notify anyone, so look again soon, backing off while the same horizon holds.
        let wait = if pending {
            (blocked_for / 4).clamp(Duration::from_micros(200), self.inner.poll_interval)
        } else {
            self.inner.poll_interval
        };
        let _ = tokio::time::timeout(wait, woken.changed()).await;
        Ok(())
    }
}

impl SnapshotStore for PgEventStore {
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.save_snapshot)))
            .bind(snapshot.stream_id.as_str())
            .bind(&snapshot.aggregate_type)
            .bind(i64::try_from(snapshot.version).unwrap_or(i64::MAX))
            .bind(i32::try_from(snapshot.schema_version).unwrap_or(i32::MAX))
            .bind(&snapshot.state)
            .bind(snapshot.taken_at)
            .execute(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(())
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.load_snapshot)))
            .bind(stream.as_str())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(row.and_then(|row| rows::snapshot(&row, stream)))
    }

    /// Appends and stores the snapshot in the same statement, hence the same transaction.
    async fn append_with_snapshot(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: Snapshot,
    ) -> Result<AppendOutcome, StoreError> {
        self.append_pooled(stream, expected, events, Some(snapshot))
            .await
    }
}
