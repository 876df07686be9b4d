//! [`PgEventStore`]: the `EventStore` and `SnapshotStore` on PostgreSQL.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use esframe_core::{
    AppendOutcome, Conflict, EventStore, ExpectedVersion, NewEvent, RecordedEvent, Snapshot,
    SnapshotStore, StoreError, StreamId,
};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row, postgres::PgRow};
use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    PgStoreError, SchemaName,
    diagnostics::{self, HorizonStatus},
    error::{AppendFailure, classify},
    listener::Waker,
    rows,
    schema::migrate,
    sql::{MAX_EVENTS_PER_APPEND, Queries},
};

/// How often an `Any` append is retried when a concurrent writer takes the version it computed.
const ANY_RETRIES: u32 = 100;

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
    waker: Waker,
    poll_interval: Duration,
    stall_warning_after: Duration,
    /// When the global log was first seen held back by an open transaction, and when that was
    /// last reported.
    stall: Mutex<Option<(Instant, Option<Instant>)>>,
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
#[derive(Debug)]
#[must_use]
pub struct PgEventStoreBuilder {
    pool: PgPool,
    schema: SchemaName,
    notify: bool,
    poll_interval: Duration,
    stall_warning_after: Duration,
}

impl PgEventStoreBuilder {
    /// The Postgres schema holding esframe's tables (default `esframe`).
    pub fn schema(mut self, name: impl Into<String>) -> Result<Self, PgStoreError> {
        self.schema = SchemaName::new(name)?;
        Ok(self)
    }

    /// Whether appends send `NOTIFY` to wake subscriptions at once (default `true`). Without it,
    /// subscriptions see new events after at most the poll interval.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
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

    /// Applies pending migrations and opens the store.
    pub async fn build(self) -> Result<PgEventStore, PgStoreError> {
        migrate(&self.pool, &self.schema).await?;
        let channel = format!("esframe_{}", self.schema.as_str().to_ascii_lowercase());
        Ok(PgEventStore {
            inner: Arc::new(Inner {
                sql: Queries::new(&self.schema, self.notify),
                waker: Waker::new(self.pool.clone(), channel.clone()),
                pool: self.pool,
                schema: self.schema,
                channel,
                poll_interval: self.poll_interval,
                stall_warning_after: self.stall_warning_after,
                stall: Mutex::new(None),
            }),
        })
    }
}

/// What the single append statement reported.
struct AppendRow {
    current_version: u64,
    duplicates: i64,
    accepted: bool,
    positions: Vec<i64>,
    recorded_at: Option<DateTime<Utc>>,
}

impl PgEventStore {
    /// A builder over `pool` with the default schema `esframe`.
    pub fn builder(pool: PgPool) -> PgEventStoreBuilder {
        PgEventStoreBuilder {
            pool,
            schema: SchemaName::default(),
            notify: true,
            poll_interval: Duration::from_secs(1),
            stall_warning_after: Duration::from_secs(10),
        }
    }

    /// Connects to `url` and opens the store in the default schema.
    pub async fn connect(url: &str) -> Result<Self, PgStoreError> {
        Self::builder(PgPool::connect(url).await?).build().await
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
    /// failed statement ends the transaction.
    pub async fn append_in(
        &self,
        tx: &mut PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
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
        self.append_on(tx, stream, expected, events, None, false)
            .await
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
            let mut conn = self
                .inner
                .pool
                .acquire()
                .await
                .map_err(StoreError::backend)?;
            let outcome = self
                .append_on(&mut conn, stream, expected, events, snapshot, true)
                .await?;
            tracing::Span::current().record("version", outcome.stream_version);
            Ok(outcome)
        }
        .instrument(span)
        .await
    }

    /// The append, on a connection that is either in autocommit mode (`retry`: each statement is
    /// its own transaction, so a statement that lost a race can run again with a new
    /// transaction id) or inside the caller's transaction.
    async fn append_on(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: Option<Snapshot>,
        retry: bool,
    ) -> Result<AppendOutcome, StoreError> {
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
        let columns = Columns::new(&events);
        let (kind, exact) = match expected {
            ExpectedVersion::Any => (0, 0),
            ExpectedVersion::NoStream => (1, 0),
            ExpectedVersion::StreamExists => (2, 0),
            ExpectedVersion::Exact(v) => (3, i64::try_from(v).unwrap_or(i64::MAX)),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sql = if snapshot.is_some() {
                &self.inner.sql.append_with_snapshot
            } else {
                &self.inner.sql.append
            };
            let mut query = sqlx::query(AssertSqlSafe(Arc::clone(sql)))
                .bind(stream.as_str())
                .bind(&columns.event_ids)
                .bind(&columns.aggregate_types)
                .bind(&columns.event_types)
                .bind(&columns.schema_versions)
                .bind(&columns.payloads)
                .bind(&columns.correlation_ids)
                .bind(&columns.causation_ids)
                .bind(&columns.metadata)
                .bind(kind)
                .bind(exact)
                .bind(&self.inner.channel);
            if let Some(snapshot) = &snapshot {
                query = query
                    .bind(&snapshot.aggregate_type)
                    .bind(i64::try_from(snapshot.version).unwrap_or(i64::MAX))
                    .bind(i32::try_from(snapshot.schema_version).unwrap_or(i32::MAX))
                    .bind(&snapshot.state)
                    .bind(snapshot.taken_at);
            }
            let failure = match query.fetch_one(&mut *conn).await {
                Ok(row) => {
                    let row = append_row(&row).map_err(StoreError::backend)?;
                    if row.duplicates > 0 {
                        return self.deduplicate(conn, stream, &columns).await;
                    }
                    let actual = (row.current_version > 0).then_some(row.current_version);
                    if !row.accepted {
                        return Err(Conflict {
                            stream: stream.clone(),
                            expected,
                            actual,
                        }
                        .into());
                    }
                    return Ok(AppendOutcome {
                        stream_version: row.current_version + events.len() as u64,
                        positions: row.positions.into_iter().map(|p| p as u64).collect(),
                        recorded_at: row.recorded_at.unwrap_or_else(Utc::now),
                        deduplicated: false,
                    });
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
                    let actual = if retry {
                        self.stream_version(stream).await?
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
                (AppendFailure::EventIdTaken | AppendFailure::Transient, _)
                    if retry && attempt < ANY_RETRIES => {}
                (_, err) => return Err(StoreError::backend(err)),
            }
        }
    }

    /// Some event ids are stored already: the original outcome if all are, with the same content.
    async fn deduplicate(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        columns: &Columns,
    ) -> Result<AppendOutcome, StoreError> {
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
        Ok(AppendOutcome {
            stream_version: in_order.iter().map(|s| s.stream_version).max().unwrap_or(0),
            positions: in_order.iter().map(|s| s.global_position).collect(),
            recorded_at: in_order.first().map_or_else(Utc::now, |s| s.recorded_at),
            deduplicated: true,
        })
    }

    /// Tracks whether the log is held back and warns, naming the holder, past the threshold.
    async fn note_stall(&self, blocked: bool) {
        let due = {
            let mut stall = self
                .inner
                .stall
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !blocked {
                *stall = None;
                return;
            }
            let now = Instant::now();
            let (since, last_warned) = stall.get_or_insert((now, None));
            let threshold = self.inner.stall_warning_after;
            let due = now.duration_since(*since) >= threshold
                && last_warned.is_none_or(|at| now.duration_since(at) >= threshold);
            if due {
                *last_warned = Some(now);
            }
            due.then_some(now.duration_since(*since))
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
    }
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
    fn new(events: &[NewEvent]) -> Self {
        let mut c = Self {
            event_ids: Vec::with_capacity(events.len()),
            aggregate_types: Vec::with_capacity(events.len()),
            event_types: Vec::with_capacity(events.len()),
            schema_versions: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            correlation_ids: Vec::with_capacity(events.len()),
            causation_ids: Vec::with_capacity(events.len()),
            metadata: Vec::with_capacity(events.len()),
        };
        for e in events {
            c.event_ids.push(e.event_id);
            c.aggregate_types.push(e.aggregate_type.to_string());
            c.event_types.push(e.event_type.to_string());
            c.schema_versions
                .push(i32::try_from(e.schema_version).unwrap_or(i32::MAX));
            c.payloads.push(e.payload.clone());
            c.correlation_ids.push(e.metadata.correlation_id);
            c.causation_ids.push(e.metadata.causation_id);
            c.metadata.push(Value::Object(e.metadata.extra.clone()));
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

fn append_row(row: &PgRow) -> Result<AppendRow, sqlx::Error> {
    Ok(AppendRow {
        current_version: row.try_get::<i64, _>("current_version")? as u64,
        duplicates: row.try_get("duplicates")?,
        accepted: row.try_get::<i64, _>("accepted")? > 0,
        positions: row.try_get("positions")?,
        recorded_at: row.try_get("recorded_at")?,
    })
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
            let rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.read_stream)))
                .bind(stream.as_str())
                .bind(i64::try_from(from_version).unwrap_or(i64::MAX))
                .fetch_all(&self.inner.pool)
                .await
                .map_err(StoreError::backend)?;
            tracing::Span::current().record("events", rows.len());
            rows.iter()
                .map(|row| rows::event(row, Some(stream)))
                .collect()
        }
        .instrument(span)
        .await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<u64>, StoreError> {
        let version: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.inner.sql.stream_version)))
                .bind(stream.as_str())
                .fetch_one(&self.inner.pool)
                .await
                .map_err(StoreError::backend)?;
        Ok(version.map(|v| v as u64))
    }

    async fn read_all(&self, after: u64, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        let span = tracing::debug_span!(
            "esframe.read_all",
            after,
            limit,
            events = tracing::field::Empty
        );
        async {
            let rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.read_all)))
                .bind(i64::try_from(after).unwrap_or(i64::MAX))
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.inner.pool)
                .await
                .map_err(StoreError::backend)?;
            tracing::Span::current().record("events", rows.len());
            rows.iter().map(|row| rows::event(row, None)).collect()
        }
        .instrument(span)
        .await
    }

    async fn wait_for_events(&self, after: u64) -> Result<(), StoreError> {
        // Register for wake-ups before checking, so a commit between the check and the wait
        // still wakes us.
        let mut woken: watch::Receiver<u64> = self.inner.waker.subscribe();
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.readiness)))
            .bind(i64::try_from(after).unwrap_or(i64::MAX))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        let ready: bool = row.try_get("ready").map_err(StoreError::backend)?;
        let head: Option<i64> = row.try_get("head").map_err(StoreError::backend)?;
        let horizon: i64 = row.try_get("horizon").map_err(StoreError::backend)?;
        let after_i = i64::try_from(after).unwrap_or(i64::MAX);
        self.note_stall(head.is_some_and(|h| h > after_i && h >= horizon))
            .await;
        if ready {
            return Ok(());
        }
        let _ = tokio::time::timeout(self.inner.poll_interval, woken.changed()).await;
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
