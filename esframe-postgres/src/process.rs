//! [`PgProcessStore`]: process-manager instances and timers in PostgreSQL, written in one
//! transaction with the commands' events and the checkpoint: exactly once.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use esframe_core::{
    AppendBatch, ExpectedVersion, Position, RecordedEvent, StoreError,
    process::{
        InstanceRecord, InstanceStatus, ProcessStore, ProcessStoreError, ProcessWrite, TimerRecord,
    },
};
use sqlx::{AssertSqlSafe, PgConnection, Row, postgres::PgRow, types::Json};
use uuid::Uuid;

use crate::{
    PgCheckpoints, PgEventStore, PgStoreError, PgTransaction,
    append::to_i64,
    rows::EventRows,
    sql::{EVENT_COLUMNS, HORIZON, POSITION_SHIFT},
};

/// Process-manager instances and timers in the store's schema (tables `process_instances` and
/// `process_timers`, migration 6), for a
/// [`ProcessRunner`](esframe_core::process::ProcessRunner).
///
/// A batch's write runs in the runner's checkpoint transaction: first the events of every
/// command the batch decided, in one `INSERT` over all their streams (each stream expecting the
/// version its command was decided on, so a concurrent writer makes the whole batch decide
/// again; being the transaction's first write keeps the log in stream order), then the
/// instances (each a compare-and-set on its version), the timers, the fired timers (each
/// deleted by id, so a timer is taken once), and the checkpoint. All commit or none do.
#[derive(Debug, Clone)]
pub struct PgProcessStore {
    store: PgEventStore,
    checkpoints: PgCheckpoints,
    sql: Arc<Sql>,
}

#[derive(Debug)]
struct Sql {
    append: String,
    load: String,
    one: String,
    by_status: String,
    insert: String,
    update: String,
    fire: String,
    cancel_all: String,
    cancel: String,
    schedule: String,
    due: String,
    next_due: String,
    timers: String,
    trace: String,
    flow_head: String,
}

const INSTANCE_COLUMNS: &str = "process, instance_id, status, state, state_version, version, \
     correlation_id, events, last_position, held, error, attempts, ignored, updated_at";

const TIMER_COLUMNS: &str = "t.process, t.instance_id, t.name, t.due_at, t.payload, t.timer_id";

impl Sql {
    fn new(s: &str) -> Self {
        let active_timer = format!(
            "FROM {s}.process_timers t JOIN {s}.process_instances i
               ON i.process = t.process AND i.instance_id = t.instance_id AND i.status = 'active'"
        );
        Self {
            append: format!(
                "WITH e AS (
                     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::uuid[],
                                          $5::text[], $6::int4[], $7::jsonb[], $8::uuid[],
                                          $9::uuid[], $10::jsonb[])
                         WITH ORDINALITY AS e(aggregate_type, aggregate_id, expected, event_id,
                                              event_type, schema_version, payload,
                                              correlation_id, causation_id, metadata, ord)
                 ), cur AS (
                     SELECT s.aggregate_type, s.aggregate_id, s.expected,
                            (SELECT coalesce(max(x.stream_version), 0) FROM {s}.events x
                             WHERE x.aggregate_type = s.aggregate_type
                               AND x.aggregate_id = s.aggregate_id) AS v
                     FROM (SELECT DISTINCT ON (aggregate_type, aggregate_id)
                                  aggregate_type, aggregate_id, expected
                           FROM e ORDER BY aggregate_type, aggregate_id, ord) s
                 )
                 INSERT INTO {s}.events (global_position, event_id, aggregate_id,
                     stream_version, aggregate_type, event_type, schema_version, payload,
                     correlation_id, causation_id, metadata)
                 SELECT (pg_current_xact_id()::text::bigint << {POSITION_SHIFT}) + e.ord - 1,
                        e.event_id, e.aggregate_id,
                        cur.v + row_number() OVER (PARTITION BY e.aggregate_type, e.aggregate_id
                                                   ORDER BY e.ord),
                        e.aggregate_type, e.event_type, e.schema_version, e.payload,
                        e.correlation_id, e.causation_id, e.metadata
                 FROM e JOIN cur USING (aggregate_type, aggregate_id)
                 WHERE NOT EXISTS (
                     SELECT 1 FROM cur
                     WHERE NOT CASE cur.expected WHEN -1 THEN true WHEN -2 THEN cur.v > 0
                                                 ELSE cur.v = cur.expected END)
                 RETURNING global_position"
            ),
            load: format!(
                "SELECT {INSTANCE_COLUMNS} FROM {s}.process_instances
                 WHERE process = $1 AND instance_id = ANY($2::text[])"
            ),
            one: format!(
                "SELECT {INSTANCE_COLUMNS} FROM {s}.process_instances
                 WHERE process = $1 AND instance_id = $2"
            ),
            by_status: format!(
                "SELECT {INSTANCE_COLUMNS} FROM {s}.process_instances
                 WHERE process = $1 AND status = $2 ORDER BY instance_id LIMIT $3"
            ),
            insert: format!(
                "INSERT INTO {s}.process_instances ({INSTANCE_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                 ON CONFLICT (process, instance_id) DO NOTHING"
            ),
            update: format!(
                "UPDATE {s}.process_instances SET status = $3, state = $4, state_version = $5,
                     version = $6, correlation_id = $7, events = $8, last_position = $9,
                     held = $10, error = $11, attempts = $12, ignored = $13, updated_at = $14
                 WHERE process = $1 AND instance_id = $2 AND version = $15"
            ),
            fire: format!(
                "DELETE FROM {s}.process_timers
                 WHERE process = $1 AND instance_id = $2 AND name = $3 AND timer_id = $4"
            ),
            cancel_all: format!(
                "DELETE FROM {s}.process_timers WHERE process = $1 AND instance_id = ANY($2::text[])"
            ),
            cancel: format!(
                "DELETE FROM {s}.process_timers WHERE process = $1 AND instance_id = $2 AND name = $3"
            ),
            schedule: format!(
                "INSERT INTO {s}.process_timers (process, instance_id, name, due_at, payload, timer_id)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (process, instance_id, name)
                 DO UPDATE SET due_at = EXCLUDED.due_at, payload = EXCLUDED.payload,
                               timer_id = EXCLUDED.timer_id"
            ),
            due: format!(
                "SELECT {TIMER_COLUMNS} {active_timer}
                 WHERE t.process = $1 AND t.due_at <= $2
                 ORDER BY t.due_at, t.instance_id, t.name LIMIT $3"
            ),
            next_due: format!("SELECT min(t.due_at) {active_timer} WHERE t.process = $1"),
            timers: format!(
                "SELECT {TIMER_COLUMNS} FROM {s}.process_timers t
                 WHERE t.process = $1 AND t.instance_id = $2 ORDER BY t.name"
            ),
            flow_head: format!(
                "SELECT max(global_position) FROM {s}.events WHERE correlation_id = $1"
            ),
            trace: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events
                 WHERE correlation_id = $1 AND global_position < {HORIZON}
                 ORDER BY global_position"
            ),
        }
    }
}

impl PgProcessStore {
    /// Instances and timers in `store`'s schema, checkpointed in `store.checkpoints()`. A store
    /// with inline projections is refused: the process manager's transaction stores its
    /// commands' events, and inline projections need the store's own.
    pub fn new(store: &PgEventStore) -> Result<Self, PgStoreError> {
        if !store.inner.inline.is_empty() {
            return Err(PgStoreError::InlineProjectionsWithProcessManagers {
                projections: store
                    .inner
                    .inline
                    .iter()
                    .map(|p| p.name().to_owned())
                    .collect(),
            });
        }
        Ok(Self {
            checkpoints: store.checkpoints(),
            sql: Arc::new(Sql::new(&store.schema().quoted())),
            store: store.clone(),
        })
    }

    /// The runner's lease time (default [`DEFAULT_LEASE_TIME`](crate::DEFAULT_LEASE_TIME));
    /// see [`PgCheckpoints::lease_time`](crate::PgCheckpoints::lease_time). A standby runner
    /// takes over about this long after the active one dies.
    #[must_use]
    pub fn lease_time(mut self, lease_time: std::time::Duration) -> Self {
        self.checkpoints = self.checkpoints.lease_time(lease_time);
        self
    }

    /// The event store.
    pub fn store(&self) -> &PgEventStore {
        &self.store
    }

    /// Stores every batch in one statement; `Moved` if a stream's expectation failed or a
    /// concurrent writer took a version.
    async fn append(
        &self,
        tx: &mut PgConnection,
        appends: &[AppendBatch],
    ) -> Result<(), ProcessStoreError> {
        let n: usize = appends.iter().map(AppendBatch::len).sum();
        let mut types = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut expected = Vec::with_capacity(n);
        let mut event_ids = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut schema_versions = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut correlation_ids = Vec::with_capacity(n);
        let mut causation_ids = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        for batch in appends {
            let (aggregate_type, aggregate_id) = batch.stream().parts();
            let expect = match batch.expected() {
                ExpectedVersion::Any => -1,
                ExpectedVersion::StreamExists => -2,
                ExpectedVersion::NoStream => 0,
                ExpectedVersion::Exact(v) => to_i64(v),
            };
            for e in batch.events() {
                types.push(aggregate_type);
                ids.push(aggregate_id);
                expected.push(expect);
                event_ids.push(e.event_id);
                event_types.push(e.event_type.as_ref());
                schema_versions.push(i32::try_from(e.schema_version).unwrap_or(i32::MAX));
                payloads.push(&e.payload);
                correlation_ids.push(e.metadata.correlation_id);
                causation_ids.push(e.metadata.causation_id);
                metadata.push(Json(&e.metadata.extra));
            }
        }
        let result = sqlx::query(AssertSqlSafe(self.sql.append.as_str()))
            .bind(&types)
            .bind(&ids)
            .bind(&expected)
            .bind(&event_ids)
            .bind(&event_types)
            .bind(&schema_versions)
            .bind(&payloads)
            .bind(&correlation_ids)
            .bind(&causation_ids)
            .bind(&metadata)
            .execute(&mut *tx)
            .await;
        let streams = || {
            appends
                .iter()
                .map(|b| b.stream().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match result {
            Ok(done) if done.rows_affected() == n as u64 => Ok(()),
            Ok(_) => Err(ProcessStoreError::Moved {
                what: format!("one of the streams {}", streams()),
            }),
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505") => {
                Err(ProcessStoreError::Moved {
                    what: format!(
                        "one of the streams {} (constraint {})",
                        streams(),
                        db.constraint().unwrap_or("?")
                    ),
                })
            }
            Err(err) => Err(db_error(err)),
        }
    }
}

/// A database failure: unavailable (retry) when the connection or the server failed or the
/// transaction lost a race; refused when the server answered that it will not store what was
/// written (a value it cannot hold, a constraint), which retrying cannot mend.
fn db_error(err: sqlx::Error) -> ProcessStoreError {
    let refused = match &err {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            !["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
                && code.as_ref() != "55P03"
        }),
        _ => false,
    };
    if refused && !crate::error::connection_lost(&err) {
        ProcessStoreError::Refused {
            message: err.to_string(),
        }
    } else {
        ProcessStoreError::Store(StoreError::unavailable(None, err))
    }
}

fn position(raw: i64) -> Position {
    Position::new(u64::try_from(raw).unwrap_or(0))
}

fn positions(raw: Vec<i64>) -> Vec<Position> {
    raw.into_iter().map(position).collect()
}

fn raw_positions(positions: &[Position]) -> Vec<i64> {
    positions.iter().map(|p| to_i64(p.get())).collect()
}

fn instance(row: &PgRow) -> Result<InstanceRecord, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let id: String = row.try_get("instance_id")?;
    Ok(InstanceRecord {
        process: row.try_get("process")?,
        status: InstanceStatus::parse(&status).ok_or_else(|| {
            sqlx::Error::Decode(format!("instance `{id}` has the unknown status `{status}`").into())
        })?,
        id,
        state: row.try_get("state")?,
        state_version: u32::try_from(row.try_get::<i32, _>("state_version")?).unwrap_or(0),
        version: u64::try_from(row.try_get::<i64, _>("version")?).unwrap_or(0),
        correlation_id: row.try_get("correlation_id")?,
        events: positions(row.try_get("events")?),
        last_position: position(row.try_get("last_position")?),
        held: positions(row.try_get("held")?),
        error: row.try_get("error")?,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
        ignored: u64::try_from(row.try_get::<i64, _>("ignored")?).unwrap_or(0),
        updated_at: row.try_get("updated_at")?,
    })
}

fn timer(row: &PgRow) -> Result<TimerRecord, sqlx::Error> {
    Ok(TimerRecord {
        process: row.try_get("process")?,
        instance: row.try_get("instance_id")?,
        name: row.try_get("name")?,
        due: row.try_get("due_at")?,
        payload: row.try_get("payload")?,
        id: row.try_get("timer_id")?,
    })
}

fn bind_instance<'q>(
    sql: &'q str,
    r: &'q InstanceRecord,
    events: &'q [i64],
    held: &'q [i64],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(sql))
        .bind(&r.process)
        .bind(&r.id)
        .bind(r.status.as_str())
        .bind(&r.state)
        .bind(i32::try_from(r.state_version).unwrap_or(i32::MAX))
        .bind(to_i64(r.version))
        .bind(r.correlation_id)
        .bind(events)
        .bind(to_i64(r.last_position.get()))
        .bind(held)
        .bind(&r.error)
        .bind(i32::try_from(r.attempts).unwrap_or(i32::MAX))
        .bind(to_i64(r.ignored))
        .bind(r.updated_at)
}

impl ProcessStore for PgProcessStore {
    type Log = PgEventStore;
    type Checkpoints = PgCheckpoints;

    fn log(&self) -> &PgEventStore {
        &self.store
    }

    fn checkpoints(&self) -> &PgCheckpoints {
        &self.checkpoints
    }

    async fn load_instances(
        &self,
        tx: &mut PgTransaction,
        process: &str,
        ids: &[String],
    ) -> Result<Vec<InstanceRecord>, ProcessStoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query(AssertSqlSafe(self.sql.load.as_str()))
            .bind(process)
            .bind(ids)
            .try_map(|row: PgRow| instance(&row))
            .fetch_all(&mut **tx)
            .await
            .map_err(db_error)
    }

    async fn write(
        &self,
        tx: &mut PgTransaction,
        write: ProcessWrite,
    ) -> Result<(), ProcessStoreError> {
        let conn: &mut PgConnection = tx;
        if !write.appends.is_empty() {
            self.append(conn, &write.appends).await?;
        }
        for (record, previous) in &write.instances {
            let (events, held) = (raw_positions(&record.events), raw_positions(&record.held));
            let done = match previous {
                None => {
                    bind_instance(&self.sql.insert, record, &events, &held)
                        .execute(&mut *conn)
                        .await
                }
                Some(previous) => {
                    bind_instance(&self.sql.update, record, &events, &held)
                        .bind(to_i64(*previous))
                        .execute(&mut *conn)
                        .await
                }
            }
            .map_err(db_error)?;
            if done.rows_affected() != 1 {
                return Err(ProcessStoreError::Moved {
                    what: format!(
                        "instance `{}` of process manager `{}`",
                        record.id, record.process
                    ),
                });
            }
        }
        for t in &write.fired {
            let done = sqlx::query(AssertSqlSafe(self.sql.fire.as_str()))
                .bind(&t.process)
                .bind(&t.instance)
                .bind(&t.name)
                .bind(t.id)
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
            if done.rows_affected() != 1 {
                return Err(ProcessStoreError::Moved {
                    what: format!("timer `{}` of instance `{}`", t.name, t.instance),
                });
            }
        }
        if !write.cancel_all.is_empty() {
            sqlx::query(AssertSqlSafe(self.sql.cancel_all.as_str()))
                .bind(&write.process)
                .bind(&write.cancel_all)
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
        }
        for (instance, name) in &write.cancel {
            sqlx::query(AssertSqlSafe(self.sql.cancel.as_str()))
                .bind(&write.process)
                .bind(instance)
                .bind(name)
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
        }
        for t in &write.schedule {
            sqlx::query(AssertSqlSafe(self.sql.schedule.as_str()))
                .bind(&t.process)
                .bind(&t.instance)
                .bind(&t.name)
                .bind(t.due)
                .bind(&t.payload)
                .bind(t.id)
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
        }
        Ok(())
    }

    fn committed(&self) {
        self.store.appended();
    }

    async fn instance(
        &self,
        process: &str,
        id: &str,
    ) -> Result<Option<InstanceRecord>, ProcessStoreError> {
        let row = sqlx::query(AssertSqlSafe(self.sql.one.as_str()))
            .bind(process)
            .bind(id)
            .fetch_optional(self.store.pool())
            .await
            .map_err(db_error)?;
        row.as_ref().map(instance).transpose().map_err(db_error)
    }

    async fn instances(
        &self,
        process: &str,
        status: InstanceStatus,
        limit: usize,
    ) -> Result<Vec<InstanceRecord>, ProcessStoreError> {
        sqlx::query(AssertSqlSafe(self.sql.by_status.as_str()))
            .bind(process)
            .bind(status.as_str())
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .try_map(|row: PgRow| instance(&row))
            .fetch_all(self.store.pool())
            .await
            .map_err(db_error)
    }

    async fn due_timers(
        &self,
        process: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TimerRecord>, ProcessStoreError> {
        sqlx::query(AssertSqlSafe(self.sql.due.as_str()))
            .bind(process)
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .try_map(|row: PgRow| timer(&row))
            .fetch_all(self.store.pool())
            .await
            .map_err(db_error)
    }

    async fn next_due(&self, process: &str) -> Result<Option<DateTime<Utc>>, ProcessStoreError> {
        sqlx::query_scalar(AssertSqlSafe(self.sql.next_due.as_str()))
            .bind(process)
            .fetch_one(self.store.pool())
            .await
            .map_err(db_error)
    }

    async fn timers(
        &self,
        process: &str,
        instance: &str,
    ) -> Result<Vec<TimerRecord>, ProcessStoreError> {
        sqlx::query(AssertSqlSafe(self.sql.timers.as_str()))
            .bind(process)
            .bind(instance)
            .try_map(|row: PgRow| timer(&row))
            .fetch_all(self.store.pool())
            .await
            .map_err(db_error)
    }

    async fn flow_head(&self, correlation_id: Uuid) -> Result<Option<Position>, StoreError> {
        let head: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.flow_head.as_str()))
            .bind(correlation_id)
            .fetch_one(self.store.pool())
            .await
            .map_err(|e| StoreError::unavailable(None, e))?;
        Ok(head.map(position))
    }

    async fn trace(&self, correlation_id: Uuid) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(self.sql.trace.as_str()))
            .bind(correlation_id)
            .fetch_all(self.store.pool())
            .await
            .map_err(|e| StoreError::unavailable(None, e))?;
        let mut decode = EventRows::new();
        rows.iter().map(|row| decode.event(row)).collect()
    }
}
