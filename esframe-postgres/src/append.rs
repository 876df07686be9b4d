//! Appends: one statement in its own transaction (the common case), or inside the caller's
//! transaction ([`PgEventStore::append_in`]). Appends that update inline projections are in
//! `inline.rs`.
//!
//! The statement checks the expectation and inserts every event; the
//! `(aggregate_type, aggregate_id, stream_version)` and `event_id` unique constraints settle races. Idempotency is
//! decided by esframe-core's [`resolve_stored_ids`] on the stored rows of the batch's ids, which
//! are only looked up when the statement did not store the batch.

use std::{collections::HashMap, sync::Arc};

use chrono::{DateTime, Utc};
use esframe_core::{
    AppendBatch, AppendOutcome, Conflict, ExpectedVersion, Position, RecordedEvent, Snapshot,
    StoreError, StreamId, resolve_stored_ids,
};
use futures_util::TryStreamExt;
use serde_json::{Map, Value};
use sqlx::{AssertSqlSafe, PgConnection, Row, postgres::PgRow, types::Json};
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    PgEventStore,
    error::{AppendFailure, Failure, classify},
    rows,
};

/// How often an `Any` append is retried when a concurrent writer takes the version it computed.
pub(crate) const ANY_RETRIES: u32 = 100;

/// Where an append statement runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppendMode {
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
pub(crate) enum Appended {
    Stored(AppendOutcome),
    /// The expectation did not hold; `actual` is the version if the statement reported it
    /// (`Some(None)`: no stream).
    Refused {
        actual: Option<Option<u64>>,
    },
    /// The statement failed (the caller's transaction is then aborted, unless a savepoint
    /// undoes it); classified.
    Failed(AppendFailure, sqlx::Error),
}

/// The append's parameters as column arrays, borrowed from the batch, bound once per attempt.
pub(crate) struct Columns<'a> {
    pub(crate) event_ids: Vec<Uuid>,
    event_types: Vec<&'a str>,
    schema_versions: Vec<i32>,
    payloads: Vec<&'a Value>,
    correlation_ids: Vec<Option<Uuid>>,
    causation_ids: Vec<Option<Uuid>>,
    metadata: Vec<Json<&'a Map<String, Value>>>,
}

impl<'a> Columns<'a> {
    /// One array per column. The batch is checked, so every schema version fits an `int4`.
    pub(crate) fn new(batch: &'a AppendBatch) -> Self {
        let n = batch.len();
        let mut c = Self {
            event_ids: Vec::with_capacity(n),
            event_types: Vec::with_capacity(n),
            schema_versions: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            correlation_ids: Vec::with_capacity(n),
            causation_ids: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
        };
        for e in batch.events() {
            c.event_ids.push(e.event_id);
            c.event_types.push(&e.event_type);
            c.schema_versions
                .push(i32::try_from(e.schema_version).unwrap_or(i32::MAX));
            c.payloads.push(&e.payload);
            c.correlation_ids.push(e.metadata.correlation_id);
            c.causation_ids.push(e.metadata.causation_id);
            c.metadata.push(Json(&e.metadata.extra));
        }
        c
    }
}

/// A checked version or position as a `BIGINT` (the limits keep them in range).
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The `CASE` code of an expectation in the append statements, and its exact version.
fn expectation(expected: ExpectedVersion) -> (i32, i64) {
    match expected {
        ExpectedVersion::Any => (0, 0),
        ExpectedVersion::NoStream => (1, 0),
        ExpectedVersion::StreamExists => (2, 0),
        ExpectedVersion::Exact(v) => (3, to_i64(v)),
    }
}

impl PgEventStore {
    /// An append in a transaction of its own: one statement in autocommit mode, or the inline
    /// projections' transaction. Run again on another connection when one dies, which is safe
    /// because appends are idempotent by event id.
    pub(crate) async fn append_own(
        &self,
        batch: AppendBatch,
        snapshot: Option<Snapshot>,
    ) -> Result<AppendOutcome, StoreError> {
        let span = tracing::debug_span!(
            "esframe.append",
            stream = %batch.stream(),
            expected = %batch.expected(),
            events = batch.len(),
            version = tracing::field::Empty,
        );
        async {
            let outcome = if self.inner.inline.is_empty() {
                self.append_autocommit(&batch, snapshot.as_ref()).await?
            } else {
                self.append_with_inline(&batch, snapshot.as_ref()).await?
            };
            tracing::Span::current().record("version", outcome.stream_version);
            Ok(outcome)
        }
        .instrument(span)
        .await
    }

    async fn append_autocommit(
        &self,
        batch: &AppendBatch,
        snapshot: Option<&Snapshot>,
    ) -> Result<AppendOutcome, StoreError> {
        let columns = Columns::new(batch);
        let mut reconnect = self.reconnect();
        let outcome = on_connection!(self, reconnect, |conn| {
            self.append_on(conn, batch, &columns, snapshot, AppendMode::Autocommit)
                .await
        })
        .map_err(|failure| failure.of_append(batch.stream(), reconnect.interrupted))?;
        // A deduplicated outcome after a lost connection may be this append's own commit,
        // whose wake-up was never sent.
        if !outcome.positions.is_empty() && (!outcome.deduplicated || reconnect.interrupted) {
            self.appended();
        }
        Ok(outcome)
    }

    /// Appends inside the caller's transaction, e.g. to update a read model atomically with the
    /// events.
    ///
    /// - The append must be the first write of the transaction (checked: an earlier write would
    ///   give the transaction an id older than the events it must follow):
    ///   [`StoreError::AppendNotFirstWrite`].
    /// - It runs under a savepoint, so a refused append ([`StoreError::Conflict`] with the
    ///   stream's actual version, a reused id, ...) leaves the caller's transaction usable; it
    ///   may then have written, so another `append_in` in it can be refused: roll back and start
    ///   again to retry. Under `REPEATABLE READ` or `SERIALIZABLE`, whose snapshot may be older
    ///   than the stream, the actual version is read outside the transaction, and a snapshot
    ///   too old to append although the expectation holds is
    ///   [`StoreError::StaleSnapshot`].
    /// - A store with inline projections refuses it
    ///   ([`StoreError::InlineProjectionsNeedOwnTransaction`]): they run in the store's own
    ///   transaction.
    ///
    /// The input is checked like any append ([`AppendBatch::new`]). Listeners are notified when
    /// the transaction commits.
    pub async fn append_in(
        &self,
        tx: &mut PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<esframe_core::NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        if !self.inner.inline.is_empty() {
            return Err(StoreError::InlineProjectionsNeedOwnTransaction {
                stream: stream.clone(),
                projections: self
                    .inner
                    .inline
                    .iter()
                    .map(|p| p.name().to_owned())
                    .collect(),
            });
        }
        let batch = AppendBatch::new(stream, expected, events)?;
        let span = tracing::debug_span!("esframe.append_in", stream = %stream, expected = %expected, events = batch.len());
        self.append_in_transaction(tx, &batch)
            .instrument(span)
            .await
            .map_err(|failure| failure.unavailable(Some(stream)))
    }

    async fn append_in_transaction(
        &self,
        tx: &mut PgConnection,
        batch: &AppendBatch,
    ) -> Result<AppendOutcome, Failure> {
        let stream = batch.stream();
        // One round trip: whether the transaction has written, its isolation, and the savepoint.
        let rows = sqlx::raw_sql(
            "SELECT pg_current_xact_id_if_assigned() IS NULL AS first_write,
                    current_setting('transaction_isolation') <> 'read committed' AS old_snapshot;
             SAVEPOINT esframe_append",
        )
        .fetch_all(&mut *tx)
        .await?;
        let row = rows.first().ok_or_else(|| {
            sqlx::Error::Protocol("the transaction check returned no row".to_owned())
        })?;
        let first_write: bool = row.try_get("first_write")?;
        let old_snapshot: bool = row.try_get("old_snapshot")?;
        if !first_write {
            sqlx::query("RELEASE SAVEPOINT esframe_append")
                .execute(&mut *tx)
                .await?;
            return Err(StoreError::AppendNotFirstWrite {
                stream: stream.clone(),
            }
            .into());
        }
        let columns = Columns::new(batch);
        let appended = self
            .statement(tx, batch, &columns, None, AppendMode::CallerTransaction)
            .await;
        let undo = matches!(appended, Ok(Appended::Failed(..)));
        sqlx::query(if undo {
            "ROLLBACK TO SAVEPOINT esframe_append"
        } else {
            "RELEASE SAVEPOINT esframe_append"
        })
        .execute(&mut *tx)
        .await?;
        let refused = match appended? {
            Appended::Stored(outcome) => return Ok(outcome),
            Appended::Refused { actual } => actual,
            Appended::Failed(AppendFailure::VersionTaken | AppendFailure::Transient, _) => None,
            Appended::Failed(AppendFailure::EventIdTaken, err) => {
                // Another transaction committed one of these ids first.
                return match self.stored_ids(tx, batch, old_snapshot).await? {
                    Some(original) => Ok(original),
                    None => Err(Failure::Db(err)),
                };
            }
            Appended::Failed(_, err) => return Err(Failure::Db(err)),
        };
        if let Some(original) = self.stored_ids(tx, batch, old_snapshot).await? {
            return Ok(original);
        }
        let actual = match refused {
            Some(actual) if !old_snapshot => actual,
            // A snapshot older than the stream saw an older version (or none): ask outside it.
            _ if old_snapshot => self.fresh_stream_version(stream).await?,
            _ => self.stream_version_on(tx, stream).await?,
        };
        if old_snapshot && batch.expected().accepts(actual) {
            // The expectation holds; only this transaction's snapshot is behind.
            return Err(StoreError::StaleSnapshot {
                stream: stream.clone(),
                expected: batch.expected(),
                actual,
            }
            .into());
        }
        Err(conflict(batch, actual).into())
    }

    /// The batch's ids looked up in the transaction, or outside it when its snapshot is old.
    async fn stored_ids(
        &self,
        tx: &mut PgConnection,
        batch: &AppendBatch,
        old_snapshot: bool,
    ) -> Result<Option<AppendOutcome>, Failure> {
        if !old_snapshot {
            return self.deduplicate(tx, batch).await;
        }
        on_connection!(self, |conn| self.deduplicate(conn, batch).await)
    }

    async fn fresh_stream_version(&self, stream: &StreamId) -> Result<Option<u64>, Failure> {
        on_connection!(self, |conn| self.stream_version_on(conn, stream).await)
    }

    /// The append on a connection in one of the [`AppendMode`]s, with the idempotency and
    /// expectation verdicts, retrying races in autocommit mode.
    pub(crate) async fn append_on(
        &self,
        conn: &mut PgConnection,
        batch: &AppendBatch,
        columns: &Columns<'_>,
        snapshot: Option<&Snapshot>,
        mode: AppendMode,
    ) -> Result<AppendOutcome, Failure> {
        let retry = mode == AppendMode::Autocommit;
        let expected = batch.expected();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let refused_with = match self.statement(conn, batch, columns, snapshot, mode).await? {
                Appended::Stored(outcome) => return Ok(outcome),
                Appended::Refused { actual } => actual,
                Appended::Failed(AppendFailure::VersionTaken, _)
                    if retry
                        && matches!(
                            expected,
                            ExpectedVersion::Any | ExpectedVersion::StreamExists
                        )
                        && attempt < ANY_RETRIES =>
                {
                    // Another writer took the version this one computed: a new statement (and
                    // transaction) computes the next.
                    tokio::task::yield_now().await;
                    continue;
                }
                Appended::Failed(AppendFailure::VersionTaken, err) => {
                    if !retry {
                        // The failed statement ended the transaction: nothing more can be read
                        // in it. The caller decides on a fresh connection.
                        return Err(Failure::Db(err));
                    }
                    // Read on the connection already held: asking the pool for a second one
                    // could wait forever when every connection is held by a conflicting writer.
                    None
                }
                Appended::Failed(AppendFailure::EventIdTaken, err) => {
                    if !retry {
                        return Err(Failure::Db(err));
                    }
                    if let Some(original) = self.deduplicate(conn, batch).await? {
                        return Ok(original);
                    }
                    // The other writer of that id rolled back: try again.
                    if attempt >= ANY_RETRIES {
                        return Err(Failure::Db(err));
                    }
                    continue;
                }
                Appended::Failed(AppendFailure::Transient, _) if retry && attempt < ANY_RETRIES => {
                    continue;
                }
                Appended::Failed(_, err) => return Err(Failure::Db(err)),
            };
            // A retry of an append that already landed carries a stale expectation: idempotency
            // is decided before the conflict.
            if let Some(original) = self.deduplicate(conn, batch).await? {
                return Ok(original);
            }
            let actual = match refused_with {
                Some(actual) => actual,
                None => self.stream_version_on(conn, batch.stream()).await?,
            };
            return Err(conflict(batch, actual).into());
        }
    }

    /// Runs the append statement once.
    async fn statement(
        &self,
        conn: &mut PgConnection,
        batch: &AppendBatch,
        columns: &Columns<'_>,
        snapshot: Option<&Snapshot>,
        mode: AppendMode,
    ) -> Result<Appended, Failure> {
        let stream = batch.stream();
        let expected = batch.expected();
        if batch.is_empty() {
            let current = self.stream_version_on(conn, stream).await?;
            if !expected.accepts(current) {
                return Ok(Appended::Refused {
                    actual: Some(current),
                });
            }
            return Ok(Appended::Stored(AppendOutcome {
                stream_version: current.unwrap_or(0),
                positions: Vec::new(),
                recorded_at: Utc::now(),
                deduplicated: false,
            }));
        }
        let (kind, exact) = expectation(expected);
        let sql = &self.inner.sql;
        // The lean statement for the common case; the summarising one when a snapshot or an
        // in-transaction NOTIFY rides along.
        let lean =
            snapshot.is_none() && (mode != AppendMode::CallerTransaction || !self.inner.notify);
        let one = lean && batch.len() == 1;
        let text = match (snapshot, lean) {
            (None, true) if one => &sql.append_one,
            (Some(_), _) => &sql.append_with_snapshot,
            (None, true) => &sql.append,
            (None, false) => &sql.append_notify,
        };
        let query = sqlx::query(AssertSqlSafe(Arc::clone(text))).bind(stream.id());
        let query = if one {
            query
                .bind(columns.event_ids[0])
                .bind(stream.aggregate_type())
                .bind(columns.event_types[0])
                .bind(columns.schema_versions[0])
                .bind(columns.payloads[0])
                .bind(columns.correlation_ids[0])
                .bind(columns.causation_ids[0])
                .bind(columns.metadata[0])
        } else {
            query
                .bind(&columns.event_ids)
                .bind(stream.aggregate_type())
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
        if let Some(snapshot) = snapshot {
            query = query
                .bind(to_i64(snapshot.version))
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
                .map(|row| summary_row(&row, batch.len()))
        };
        match result {
            Ok(appended) => Ok(appended?),
            Err(err) if crate::error::connection_lost(&err) => Err(Failure::Db(err)),
            Err(err) => Ok(Appended::Failed(classify(&err), err)),
        }
    }

    /// The stream's version, read on `conn`.
    pub(crate) async fn stream_version_on(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
    ) -> Result<Option<u64>, Failure> {
        let version: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.inner.sql.stream_version)))
                .bind(stream.aggregate_type())
                .bind(stream.id())
                .fetch_one(&mut *conn)
                .await?;
        Ok(version.map(|v| u64::try_from(v).unwrap_or(0)))
    }

    /// Looks the batch's event ids up and lets esframe-core decide ([`resolve_stored_ids`]):
    /// `None` if none is stored, the original outcome if all are with the same content.
    pub(crate) async fn deduplicate(
        &self,
        conn: &mut PgConnection,
        batch: &AppendBatch,
    ) -> Result<Option<AppendOutcome>, Failure> {
        let ids: Vec<Uuid> = batch.events().iter().map(|e| e.event_id).collect();
        let mut found = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.find_event_ids)))
            .bind(&ids)
            .fetch(&mut *conn);
        let mut stored: HashMap<Uuid, RecordedEvent> = HashMap::new();
        let mut decode = rows::EventRows::new();
        while let Some(row) = found.try_next().await? {
            let event = decode.event(&row)?;
            stored.insert(event.event_id, event);
        }
        if stored.is_empty() {
            return Ok(None);
        }
        Ok(resolve_stored_ids(batch, |id| stored.get(id))?)
    }
}

/// The conflict of a refused batch.
fn conflict(batch: &AppendBatch, actual: Option<u64>) -> StoreError {
    Conflict {
        stream: batch.stream().clone(),
        expected: batch.expected(),
        actual,
    }
    .into()
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
        positions: stored.iter().map(|s| Position::new(s.1)).collect(),
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
        positions: positions
            .into_iter()
            .map(|p| Position::new(p as u64))
            .collect(),
        recorded_at: recorded_at.unwrap_or_else(Utc::now),
        deduplicated: false,
    }))
}
