//! Inline projections: read models updated in the append's own transaction.
//!
//! `BEGIN; take every inline projection's lease lock shared, check it is not being rebuilt, was
//! not left half rebuilt and is at the code's version; append; handle the appended events;
//! COMMIT`. A rebuild holds the lease exclusively, so appends wait for it (without holding a
//! connection) and the rebuilt read model misses and repeats nothing.

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use esframe_core::{
    AppendBatch, AppendOutcome, Conflict, ExpectedVersion, RecordedEvent, Snapshot, StoreError,
    StreamId,
    projection::{HandlerError, Interest, Projection, ProjectionContext, ProjectionKey},
};
use futures_util::FutureExt;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};

use crate::{
    PgEventStore, PgTransaction, SchemaName,
    append::{ANY_RETRIES, AppendMode, Columns},
    error::{AppendFailure, Failure, classify, connection_lost},
    sql::Queries,
};

/// How long an append that updates inline projections waits for a rebuild of one of them.
const INLINE_REBUILD_WAIT: Duration = Duration::from_secs(30);

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A projection registered with
/// [`PgEventStoreBuilder::inline_projection`](crate::PgEventStoreBuilder::inline_projection),
/// behind a trait object.
pub(crate) trait InlineProjection: Send + Sync {
    fn key(&self) -> &ProjectionKey;
    fn name(&self) -> &str {
        self.key().name()
    }
    fn version(&self) -> u32;
    fn interest(&self) -> &Interest;
    fn apply<'a>(
        &'a self,
        events: &'a [RecordedEvent],
        tx: &'a mut PgTransaction,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// A projection with its key, version and interest, asked for once.
pub(crate) struct Registered<P> {
    projection: P,
    key: ProjectionKey,
    version: u32,
    interest: Interest,
}

impl<P: Projection<PgTransaction>> Registered<P> {
    pub(crate) fn boxed(
        projection: P,
    ) -> Result<Arc<dyn InlineProjection>, esframe_core::projection::InvalidProjectionKey> {
        Ok(Arc::new(Self {
            key: ProjectionKey::single(projection.name())?,
            version: projection.version(),
            interest: projection.interest(),
            projection,
        }))
    }
}

impl<P: Projection<PgTransaction>> InlineProjection for Registered<P> {
    fn key(&self) -> &ProjectionKey {
        &self.key
    }

    fn version(&self) -> u32 {
        self.version
    }

    fn interest(&self) -> &Interest {
        &self.interest
    }

    fn apply<'a>(
        &'a self,
        events: &'a [RecordedEvent],
        tx: &'a mut PgTransaction,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let mut ctx = ProjectionContext::new(tx, false, 1);
            // A panicking projection fails the append like an erring one, instead of the
            // caller's task.
            match AssertUnwindSafe(self.projection.handle_batch(events, &mut ctx))
                .catch_unwind()
                .await
            {
                Ok(result) => result,
                Err(_) => Err("the projection's handler panicked".into()),
            }
        })
    }
}

/// The advisory-lock key of a projection partition's lease, taken exclusively by a runner's
/// transaction that takes the lease and shared by inline appends' transactions (both
/// transaction-scoped), so that a rebuild of an inline projection and appends that update it
/// never interleave: PostgreSQL queues the lock fairly, and the appends also read the lease
/// row, so they wait while it is held.
pub(crate) fn lease_key(schema: &SchemaName, key: &ProjectionKey) -> String {
    format!(
        "esframe.projection.{schema}.{}.{}",
        key.name(),
        key.partition()
    )
}

/// Records each inline projection's version in its checkpoint row, if it has none yet (at the
/// log's head: an inline projection added to a store with history starts from now; rebuild it
/// to include the history). Appends compare the row with the code's version.
pub(crate) async fn register(
    pool: &PgPool,
    sql: &Queries,
    projections: &[Arc<dyn InlineProjection>],
) -> Result<(), sqlx::Error> {
    for projection in projections {
        sqlx::query(AssertSqlSafe(Arc::clone(&sql.register_inline)))
            .bind(projection.name())
            .bind(i32::from(projection.key().partition()))
            .bind(i32::try_from(projection.version()).unwrap_or(i32::MAX))
            .execute(pool)
            .await?;
        sqlx::query(AssertSqlSafe(Arc::clone(&sql.register_inline_lease)))
            .bind(projection.name())
            .bind(i32::from(projection.key().partition()))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// What one try of an inline append did.
enum Attempt {
    Done(AppendOutcome),
    /// One of the projections is being rebuilt: wait and try again.
    Rebuilding(String),
    /// A race (another writer took the version or the id, then rolled back): try again.
    Retry,
    /// No connection could be had: nothing was sent.
    NoConnection(sqlx::Error),
}

/// The envelopes of events just appended, as the global log will show them.
fn recorded_events(batch: &AppendBatch, outcome: &AppendOutcome) -> Vec<RecordedEvent> {
    let first_version = outcome.stream_version + 1 - batch.len() as u64;
    batch
        .events()
        .iter()
        .zip(&outcome.positions)
        .enumerate()
        .map(|(i, (event, &global_position))| RecordedEvent {
            event_id: event.event_id,
            stream_id: batch.stream().clone(),
            stream_version: first_version + i as u64,
            global_position,
            recorded_at: outcome.recorded_at,
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            payload: event.payload.clone().into(),
            metadata: event.metadata.clone(),
        })
        .collect()
}

impl PgEventStore {
    /// The append in a transaction of its own that also updates the inline projections.
    pub(crate) async fn append_with_inline(
        &self,
        batch: &AppendBatch,
        snapshot: Option<&Snapshot>,
    ) -> Result<AppendOutcome, StoreError> {
        let stream = batch.stream();
        let columns = Columns::new(batch);
        let mut reconnect = self.reconnect();
        let rebuild_wait = Instant::now();
        let mut backoff = Duration::from_millis(1);
        let mut races = 0;
        loop {
            match self.inline_attempt(batch, &columns, snapshot).await {
                Ok(Attempt::Done(outcome)) => {
                    if !outcome.positions.is_empty()
                        && (!outcome.deduplicated || reconnect.interrupted)
                    {
                        self.appended();
                    }
                    return Ok(outcome);
                }
                Ok(Attempt::Rebuilding(projection)) => {
                    // Wait without holding a connection, which the rebuild may need.
                    if rebuild_wait.elapsed() >= INLINE_REBUILD_WAIT {
                        return Err(StoreError::InlineProjection {
                            projection,
                            stream: stream.clone(),
                            source: format!(
                                "it is being rebuilt, and appends that update it waited {} s for the rebuild to end",
                                INLINE_REBUILD_WAIT.as_secs()
                            )
                            .into(),
                        });
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
                Ok(Attempt::Retry) if races < ANY_RETRIES => {
                    races += 1;
                    tokio::task::yield_now().await;
                }
                Ok(Attempt::Retry) => {
                    return Err(StoreError::unavailable(
                        Some(stream),
                        format!("the append lost {ANY_RETRIES} races in a row to other writers"),
                    ));
                }
                Ok(Attempt::NoConnection(err)) => {
                    let failure = Failure::Db(err);
                    if !(failure.connection_lost() && reconnect.wait().await) {
                        return Err(failure.of_append(stream, reconnect.interrupted));
                    }
                }
                // The transaction died with its connection (or at its commit). If it
                // committed, the ids say so: look them up before anything else, since the
                // guard of the next attempt could refuse (a rebuild started meanwhile) an
                // append that is in fact stored. If not, run it again.
                Err(failure) if failure.connection_lost() => {
                    reconnect.interrupted = true;
                    if !reconnect.wait().await {
                        return Err(failure.of_append(stream, true));
                    }
                    let stored =
                        on_connection!(self, reconnect, |conn| self.deduplicate(conn, batch).await)
                            .map_err(|failure| failure.of_append(stream, true))?;
                    if let Some(original) = stored {
                        if !original.positions.is_empty() {
                            self.appended();
                        }
                        return Ok(original);
                    }
                }
                Err(failure) => return Err(failure.of_append(stream, reconnect.interrupted)),
            }
        }
    }

    async fn inline_attempt(
        &self,
        batch: &AppendBatch,
        columns: &Columns<'_>,
        snapshot: Option<&Snapshot>,
    ) -> Result<Attempt, Failure> {
        let stream = batch.stream();
        let mut tx = match crate::transaction::begin(&self.inner.pool).await {
            Ok(tx) => tx,
            Err(err) => return Ok(Attempt::NoConnection(err)),
        };
        // Shared with other appends, exclusive with a rebuild holding the lease. Taking it
        // writes nothing, so the append stays the transaction's first write.
        if let Some(rebuilding) = self.lock_inline_projections(&mut tx, stream).await? {
            return Ok(Attempt::Rebuilding(rebuilding));
        }
        let outcome = match self
            .append_on(
                &mut tx,
                batch,
                columns,
                snapshot,
                AppendMode::OwnTransaction,
            )
            .await
        {
            Ok(outcome) => outcome,
            Err(Failure::Db(err)) if !connection_lost(&err) => {
                // A failed statement ended the transaction; decide on another connection
                // whether this was an idempotent retry, a race to retry, or a conflict.
                drop(tx);
                return on_connection!(self, |conn| self.after_race(conn, batch, &err).await);
            }
            Err(failure) => return Err(failure),
        };
        if outcome.deduplicated || outcome.positions.is_empty() {
            return Ok(Attempt::Done(outcome));
        }
        // As the log will show them: through the store's upcasters, like every read (an event
        // appended at an old schema version reaches the projection at its current one).
        let recorded = self
            .inner
            .upcasters
            .apply_all(recorded_events(batch, &outcome))?;
        let mut writers = Vec::new();
        for projection in &self.inner.inline {
            let wanted: Vec<RecordedEvent> = recorded
                .iter()
                .filter(|e| projection.interest().matches(e))
                .cloned()
                .collect();
            if wanted.is_empty() {
                continue;
            }
            if let Err(source) = projection.apply(&wanted, &mut tx).await {
                return Err(StoreError::InlineProjection {
                    projection: projection.name().to_owned(),
                    stream: stream.clone(),
                    source,
                }
                .into());
            }
            writers.push(projection.name());
        }
        // A handler that swallowed a failed statement leaves the transaction aborted, and
        // PostgreSQL answers the `COMMIT` of an aborted transaction with a rollback, not an
        // error: one more statement finds out first.
        let committed = if writers.is_empty() {
            tx.commit().await
        } else {
            match sqlx::query("SELECT 1").execute(&mut *tx).await {
                Ok(_) => tx.commit().await,
                Err(err) => Err(err),
            }
        };
        match committed {
            Ok(()) => Ok(Attempt::Done(outcome)),
            Err(err) if connection_lost(&err) => Err(err.into()),
            Err(err) if classify(&err) == AppendFailure::Transient => Ok(Attempt::Retry),
            // The server refused what the projections wrote (a deferred constraint of a read
            // model, or the aborted transaction): nothing was stored.
            Err(err) if err.as_database_error().is_some() => Err(StoreError::InlineProjection {
                projection: writers.join(", "),
                stream: stream.clone(),
                source: format!("the database refused the commit of their writes: {err}").into(),
            }
            .into()),
            Err(err) => Err(err.into()),
        }
    }

    /// After the append statement failed on a race in the inline transaction.
    async fn after_race(
        &self,
        conn: &mut PgConnection,
        batch: &AppendBatch,
        err: &sqlx::Error,
    ) -> Result<Attempt, Failure> {
        if let Some(original) = self.deduplicate(conn, batch).await? {
            return Ok(Attempt::Done(original));
        }
        match classify(err) {
            AppendFailure::VersionTaken => {
                let actual = self.stream_version_on(conn, batch.stream()).await?;
                if matches!(
                    batch.expected(),
                    ExpectedVersion::Any | ExpectedVersion::StreamExists
                ) && batch.expected().accepts(actual)
                {
                    return Ok(Attempt::Retry);
                }
                Err(StoreError::Conflict(Conflict {
                    stream: batch.stream().clone(),
                    expected: batch.expected(),
                    actual,
                })
                .into())
            }
            // The other writer of the id rolled back, or a serialization failure: again.
            AppendFailure::EventIdTaken | AppendFailure::Transient => Ok(Attempt::Retry),
            AppendFailure::PositionTaken | AppendFailure::Other => Err(StoreError::unavailable(
                Some(batch.stream()),
                format!("the append statement failed: {err}"),
            )
            .into()),
        }
    }

    /// Takes every inline projection's shared lease lock for `tx`; the name of one held
    /// exclusively (being rebuilt) if any could not be taken. A projection whose rebuild was
    /// left unfinished, or whose stored version is not the code's, refuses the append: its read
    /// model would be missing events or be of another shape.
    async fn lock_inline_projections(
        &self,
        tx: &mut PgConnection,
        stream: &StreamId,
    ) -> Result<Option<String>, Failure> {
        for projection in &self.inner.inline {
            let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.inline_guard)))
                .bind(lease_key(&self.inner.schema, projection.key()))
                .bind(projection.name())
                .bind(i32::from(projection.key().partition()))
                .fetch_one(&mut *tx)
                .await?;
            let free: bool = row.try_get("free")?;
            let mut unfinished: bool = row.try_get("unfinished")?;
            let mut stored: Option<i32> = row.try_get("version")?;
            if !free {
                return Ok(Some(projection.name().to_owned()));
            }
            let code = projection.version();
            if unfinished || stored.is_some_and(|v| u32::try_from(v).ok() != Some(code)) {
                // The row was read with the statement's snapshot, taken before the lock: a
                // rebuild that ended in between is only seen by a new statement.
                let again = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.inline_recheck)))
                    .bind(projection.name())
                    .bind(i32::from(projection.key().partition()))
                    .fetch_optional(&mut *tx)
                    .await?;
                (unfinished, stored) = match again {
                    Some(row) => (row.try_get("unfinished")?, row.try_get("version")?),
                    None => (false, None),
                };
            }
            let refuse = |reason: String| -> Result<Option<String>, Failure> {
                Err(StoreError::InlineProjection {
                    projection: projection.name().to_owned(),
                    stream: stream.clone(),
                    source: reason.into(),
                }
                .into())
            };
            if unfinished {
                return refuse(
                    "its last rebuild was interrupted, so its read model is missing events; \
                     run `ProjectionRunner::rebuild` for it again"
                        .to_owned(),
                );
            }
            match stored.map(|v| u32::try_from(v).unwrap_or(0)) {
                Some(stored) if stored < code => {
                    return refuse(format!(
                        "its read model is at version {stored} and the code at version {code}: \
                         rebuild it (`ProjectionRunner::rebuild`) before appends can update it"
                    ));
                }
                Some(stored) if stored > code => {
                    return refuse(format!(
                        "its read model is at version {stored}, newer than this code's version \
                         {code}: appends that update it must run the newer code"
                    ));
                }
                _ => {}
            }
        }
        Ok(None)
    }
}
