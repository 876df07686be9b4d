//! Reads: a stream, the global log below its horizon, the head, snapshots, and the wait for new
//! events. Rows are decoded as they arrive (`fetch`, not `fetch_all`), so a long stream is
//! never held in memory twice; a connection that died while idle is replaced and the read run
//! again.

use std::{sync::Arc, time::Duration};

use esframe_core::{
    GlobalBatch, LoadedEvent, LoadedStream, LogPartition, Position, RecordedEvent, Snapshot,
    StoreError, StreamId,
};
use futures_util::TryStreamExt;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::watch;
use tracing::Instrument;

use crate::{PgEventStore, append::to_i64, error::Failure, rows};

impl PgEventStore {
    pub(crate) async fn load_stream_rows(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let span = tracing::debug_span!("esframe.read_stream", stream = %stream, from_version, events = tracing::field::Empty);
        let events = async {
            on_connection!(self, |conn| {
                async {
                    let mut rows =
                        sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.read_stream)))
                            .bind(stream.aggregate_type())
                            .bind(stream.id())
                            .bind(to_i64(from_version))
                            .fetch(&mut *conn);
                    let (mut events, mut decode) = (Vec::new(), rows::EventRows::of(stream));
                    while let Some(row) = rows.try_next().await? {
                        events.push(decode.event(&row)?);
                    }
                    Ok::<_, Failure>(events)
                }
                .await
            })
        }
        .instrument(span.clone())
        .await
        .map_err(|failure| failure.unavailable(Some(stream)))?;
        span.record("events", events.len());
        Ok(events)
    }

    /// The columns of a stream a state load reads (`sql.read_stream_for_state`).
    pub(crate) async fn load_state_rows(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> Result<Vec<LoadedEvent>, StoreError> {
        async {
            on_connection!(self, |conn| {
                async {
                    let mut rows = sqlx::query(AssertSqlSafe(Arc::clone(
                        &self.inner.sql.read_stream_for_state,
                    )))
                    .bind(stream.aggregate_type())
                    .bind(stream.id())
                    .bind(to_i64(from_version))
                    .fetch(&mut *conn);
                    let (mut events, mut decode) = (Vec::new(), rows::StateRows::new(stream, 0));
                    while let Some(row) = rows.try_next().await? {
                        events.push(decode.event(&row)?);
                    }
                    Ok::<_, Failure>(events)
                }
                .await
            })
        }
        .instrument(
            tracing::debug_span!("esframe.read_stream_for_state", stream = %stream, from_version),
        )
        .await
        .map_err(|failure| failure.unavailable(Some(stream)))
    }

    /// A cold load in one statement (`sql.load_snapshot_and_stream`): the snapshot row first,
    /// then the events from its version on. An unreadable snapshot row is ignored, and the
    /// stream read again from its start.
    pub(crate) async fn load_snapshot_and_state_rows(
        &self,
        stream: &StreamId,
    ) -> Result<LoadedStream, StoreError> {
        let (loaded, unreadable_snapshot) = async {
            on_connection!(self, |conn| {
                async {
                    let mut rows = sqlx::query(AssertSqlSafe(Arc::clone(
                        &self.inner.sql.load_snapshot_and_stream,
                    )))
                    .bind(stream.aggregate_type())
                    .bind(stream.id())
                    .fetch(&mut *conn);
                    let mut loaded = LoadedStream::default();
                    let mut unreadable_snapshot = false;
                    let mut decode = rows::StateRows::new(stream, 1);
                    while let Some(row) = rows.try_next().await? {
                        if row.try_get_unchecked::<i32, _>(0)? == 0 {
                            loaded.snapshot =
                                rows::snapshot(&row, stream, rows::COLD_LOAD_SNAPSHOT_COLUMNS);
                            unreadable_snapshot = loaded.snapshot.is_none();
                        } else {
                            loaded.events.push(decode.event(&row)?);
                        }
                    }
                    // No outer ORDER BY in the statement; a stable sort of rows already in
                    // order is one pass.
                    loaded.events.sort_by_key(|event| event.stream_version);
                    Ok::<_, Failure>((loaded, unreadable_snapshot))
                }
                .await
            })
        }
        .instrument(tracing::debug_span!("esframe.load_snapshot_and_stream", stream = %stream))
        .await
        .map_err(|failure| failure.unavailable(Some(stream)))?;
        if unreadable_snapshot {
            let events = self.load_state_rows(stream, 1).await?;
            return Ok(LoadedStream {
                snapshot: None,
                events,
            });
        }
        Ok(loaded)
    }

    pub(crate) async fn read_stream_version(
        &self,
        stream: &StreamId,
    ) -> Result<Option<u64>, StoreError> {
        on_connection!(self, |conn| self.stream_version_on(conn, stream).await)
            .map_err(|failure| failure.unavailable(Some(stream)))
    }

    pub(crate) async fn load_log_rows(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        on_connection!(self, |conn| {
            async {
                let mut rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.read_all)))
                    .bind(to_i64(after.get()))
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .fetch(&mut *conn);
                let mut events = Vec::with_capacity(limit.min(4096));
                let mut decode = rows::EventRows::new();
                while let Some(row) = rows.try_next().await? {
                    events.push(decode.event(&row)?);
                }
                Ok::<_, Failure>(events)
            }
            .await
        })
        .map_err(|failure| failure.unavailable(None))
    }

    /// One partition's events: the statement of `sql::read_partition`, one round trip. Each
    /// bucket's scan carries the limit itself, so the planner takes ordered index scans
    /// (merged) instead of bitmap scans that read every row of each bucket after `after` and
    /// sort them (it cannot tell how few the merge will take), which would make a catch-up
    /// quadratic: a read touches the rows it returns and one more per bucket.
    pub(crate) async fn load_partition_rows(
        &self,
        after: Position,
        limit: usize,
        partition: LogPartition,
    ) -> Result<GlobalBatch, StoreError> {
        let buckets: Vec<i16> = partition
            .buckets()
            .map(|b| i16::try_from(b).unwrap_or(i16::MAX))
            .collect();
        let sql = self.inner.sql.read_partition(buckets.len());
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        let read = async {
            let mut query = sqlx::query(AssertSqlSafe(Arc::clone(&sql)))
                .bind(to_i64(after.get()))
                .bind(limit);
            for bucket in &buckets {
                query = query.bind(*bucket);
            }
            let mut events = Vec::new();
            let mut horizon: Option<i64> = None;
            {
                let mut rows = query.fetch(&self.inner.pool);
                let mut decode = rows::EventRows::new();
                while let Some(row) = rows.try_next().await? {
                    horizon = Some(row.try_get_unchecked(rows::PARTITION_HORIZON_COLUMN)?);
                    if row.try_get_unchecked::<Option<i64>, _>(0)?.is_some() {
                        events.push(decode.event(&row)?);
                    }
                }
            }
            Ok::<_, Failure>((events, horizon))
        };
        let (events, horizon) = read
            .instrument(tracing::debug_span!("esframe.read_partition", partition = %partition, after = after.get()))
            .await
            .map_err(|failure| failure.unavailable(None))?;
        // All of the partition below the horizon was read unless the limit cut it.
        let last = events.last().map(|e: &RecordedEvent| e.global_position);
        let scanned_to = if events.len() as i64 >= limit {
            last.unwrap_or(after)
        } else {
            let below_horizon = horizon
                .and_then(|h| u64::try_from(h).ok())
                .map_or(after, |h| Position::new(h.saturating_sub(1)));
            below_horizon.max(last.unwrap_or(after)).max(after)
        };
        Ok(GlobalBatch { events, scanned_to })
    }

    pub(crate) async fn count_partition_after(
        &self,
        after: Position,
        partition: LogPartition,
    ) -> Result<u64, StoreError> {
        let buckets: Vec<i16> = partition
            .buckets()
            .map(|b| i16::try_from(b).unwrap_or(i16::MAX))
            .collect();
        let count: i64 = on_connection!(self, |conn| {
            async {
                Ok::<_, Failure>(
                    sqlx::query_scalar(AssertSqlSafe(Arc::clone(
                        &self.inner.sql.count_partition_after,
                    )))
                    .bind(to_i64(after.get()))
                    .bind(&buckets)
                    .fetch_one(&mut *conn)
                    .await?,
                )
            }
            .await
        })
        .map_err(|failure| failure.unavailable(None))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    pub(crate) async fn read_head(&self) -> Result<Position, StoreError> {
        let head: Option<i64> = on_connection!(self, |conn| {
            async {
                Ok::<_, Failure>(
                    sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.inner.sql.head)))
                        .fetch_one(&mut *conn)
                        .await?,
                )
            }
            .await
        })
        .map_err(|failure| failure.unavailable(None))?;
        Ok(Position::new(
            head.map_or(0, |h| u64::try_from(h).unwrap_or(0)),
        ))
    }

    pub(crate) async fn count_after(&self, after: Position) -> Result<u64, StoreError> {
        let count: i64 = on_connection!(self, |conn| {
            async {
                Ok::<_, Failure>(
                    sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.inner.sql.count_after)))
                        .bind(to_i64(after.get()))
                        .fetch_one(&mut *conn)
                        .await?,
                )
            }
            .await
        })
        .map_err(|failure| failure.unavailable(None))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    pub(crate) async fn wait_past(&self, after: Position) -> Result<(), StoreError> {
        // Register for wake-ups before checking, so a commit between the check and the wait
        // still wakes us.
        let mut woken: watch::Receiver<u64> = self.inner.waker.subscribe();
        let after_i = to_i64(after.get());
        let row = on_connection!(self, |conn| {
            async {
                Ok::<_, Failure>(
                    sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.readiness)))
                        .bind(after_i)
                        .fetch_one(&mut *conn)
                        .await?,
                )
            }
            .await
        })
        .map_err(|failure| failure.unavailable(None))?;
        let readiness = (|| -> Result<(bool, Option<i64>, i64), sqlx::Error> {
            Ok((
                row.try_get("ready")?,
                row.try_get("head")?,
                row.try_get("horizon")?,
            ))
        })();
        let (ready, head, horizon) = readiness.map_err(|err| StoreError::unavailable(None, err))?;
        let pending = head.is_some_and(|h| h > after_i && h >= horizon);
        let blocked_for = self.note_stall(pending, horizon).await;
        if ready {
            return Ok(());
        }
        // Events are stored but a transaction still running holds them back (usually another
        // append or a projection's transaction, ending within a millisecond). Its commit may
        // not notify anyone, so look again soon, backing off while the same horizon holds.
        let poll = self.inner.poll_interval;
        let wait = if pending {
            (blocked_for / 4).clamp(Duration::from_micros(200), poll)
        } else {
            poll
        };
        let _ = tokio::time::timeout(wait, woken.changed()).await;
        Ok(())
    }

    pub(crate) async fn write_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        on_connection!(self, |conn| {
            sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.save_snapshot)))
                .bind(snapshot.stream_id.aggregate_type())
                .bind(snapshot.stream_id.id())
                .bind(to_i64(snapshot.version))
                .bind(i32::try_from(snapshot.schema_version).unwrap_or(i32::MAX))
                .bind(&snapshot.state)
                .bind(snapshot.taken_at)
                .execute(&mut *conn)
                .await
                .map(drop)
                .map_err(Failure::Db)
        })
        .map_err(|failure| failure.unavailable(Some(&snapshot.stream_id)))
    }

    pub(crate) async fn read_snapshot(
        &self,
        stream: &StreamId,
    ) -> Result<Option<Snapshot>, StoreError> {
        let row = on_connection!(self, |conn| {
            async {
                Ok::<_, Failure>(
                    sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.load_snapshot)))
                        .bind(stream.aggregate_type())
                        .bind(stream.id())
                        .fetch_optional(&mut *conn)
                        .await?,
                )
            }
            .await
        })
        .map_err(|failure| failure.unavailable(Some(stream)))?;
        Ok(row.and_then(|row| rows::snapshot(&row, stream, rows::SNAPSHOT_COLUMNS)))
    }

    pub(crate) async fn remove_snapshot(
        &self,
        stream: &StreamId,
        version: u64,
    ) -> Result<bool, StoreError> {
        let deleted = on_connection!(self, |conn| {
            async {
                Ok::<_, Failure>(
                    sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.delete_snapshot)))
                        .bind(stream.aggregate_type())
                        .bind(stream.id())
                        .bind(to_i64(version))
                        .execute(&mut *conn)
                        .await?
                        .rows_affected(),
                )
            }
            .await
        })
        .map_err(|failure| failure.unavailable(Some(stream)))?;
        Ok(deleted > 0)
    }
}
