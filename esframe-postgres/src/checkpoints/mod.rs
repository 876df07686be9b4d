//! [`PgCheckpoints`]: exactly-once projection checkpoints, leases (`lease.rs`) and dead letters
//! in PostgreSQL.

mod lease;

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use esframe_core::{
    Position, StreamId,
    projection::{
        Checkpoint, CheckpointCommit, CheckpointError, CheckpointStore, DeadLetter,
        DeadLetterStore, Delivery, NewDeadLetter, ProjectionKey,
    },
};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row, Transaction, postgres::PgRow};
use tokio::sync::watch;

pub use lease::PgLease;

use crate::SchemaName;

/// The transaction a PostgreSQL projection writes its read model through:
/// `sqlx::Transaction<'static, Postgres>`. Pass `ctx.tx().as_mut()` to sqlx queries.
pub type PgTransaction = Transaction<'static, Postgres>;

/// Projection checkpoints, leases and dead letters in the store's schema, with exactly-once
/// delivery: the handler writes its read model through the [`PgTransaction`] the runner gives
/// it, and the runner moves the checkpoint in that same transaction with a compare-and-set
/// (`UPDATE ... WHERE position = <where this runner left it>`). If the process dies at any point
/// the transaction either committed both or neither; if two runners ever overlap, the second
/// commit finds the checkpoint moved and is rolled back whole.
///
/// Leases are session-level advisory locks, each on a connection of its own that is checked
/// every [`PgCheckpoints::lease_check_interval`]: when the holder dies, PostgreSQL ends its
/// session and frees the lock, and a standing-by runner takes over.
///
/// Get one from [`PgEventStore::checkpoints`](crate::PgEventStore::checkpoints). Cheap to clone.
#[derive(Clone)]
pub struct PgCheckpoints {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    schema: SchemaName,
    sql: Queries,
    commits: watch::Sender<u64>,
    lease_check: Duration,
    poll: Duration,
}

impl std::fmt::Debug for PgCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCheckpoints")
            .field("schema", &self.inner.schema)
            .field("lease_check", &self.inner.lease_check)
            .field("poll", &self.inner.poll)
            .finish_non_exhaustive()
    }
}

struct Queries {
    load: String,
    insert: String,
    update: String,
    park: String,
    resolve: String,
    clear: String,
    list: String,
    get: String,
    discard: String,
    note_failure: String,
}

const DEAD_LETTER_COLUMNS: &str = "id, projection, partition, global_position, event_id, \
     aggregate_type, aggregate_id, stream_version, event_type, error, attempts, parked_at";

impl Queries {
    fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        let cp = format!("{s}.projection_checkpoints");
        let dl = format!("{s}.projection_dead_letters");
        Self {
            load: format!(
                "SELECT position, version, replay_until FROM {cp}
                 WHERE projection = $1 AND partition = $2"
            ),
            insert: format!(
                "INSERT INTO {cp} (projection, partition, version, position, replay_until)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (projection, partition) DO NOTHING"
            ),
            update: format!(
                "UPDATE {cp} SET version = $3, position = $4, replay_until = $5, updated_at = now()
                 WHERE projection = $1 AND partition = $2 AND position = $6 AND version = $7"
            ),
            park: format!(
                "INSERT INTO {dl} (projection, partition, global_position, event_id,
                     aggregate_type, aggregate_id, stream_version, event_type, error, attempts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ),
            resolve: format!("DELETE FROM {dl} WHERE id = $1"),
            clear: format!(
                "DELETE FROM {dl} WHERE projection = $1 AND partition = $2 AND global_position > $3"
            ),
            list: format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM {dl}
                 WHERE projection = $1 AND partition = $2 ORDER BY id"
            ),
            get: format!("SELECT {DEAD_LETTER_COLUMNS} FROM {dl} WHERE id = $1"),
            discard: format!("DELETE FROM {dl} WHERE id = $1"),
            note_failure: format!(
                "UPDATE {dl} SET attempts = attempts + 1, error = $2 WHERE id = $1"
            ),
        }
    }
}

/// A database failure: nothing was changed (or, for a commit whose connection died, the
/// checkpoint's compare-and-set tells on the next try).
fn unavailable(err: sqlx::Error) -> CheckpointError {
    CheckpointError::unavailable(err)
}

/// A failure inside a commit: an error the server answered with refuses what this
/// transaction wrote; a failure of the connection (or the server ending the session) is the
/// backend being unavailable, and the checkpoint's compare-and-set tells on the next try
/// whether it committed. A serialization failure or deadlock is no fault of the writes: the
/// same transaction may succeed when run again, so it is unavailable too.
fn refused(err: sqlx::Error) -> CheckpointError {
    if crate::error::classify(&err) == crate::error::AppendFailure::Transient
        || crate::error::connection_lost(&err)
        || err.as_database_error().is_none()
    {
        CheckpointError::unavailable(err)
    } else {
        CheckpointError::Rejected(Box::new(err))
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn position(value: i64) -> Position {
    Position::new(u64::try_from(value).unwrap_or(0))
}

fn describe(checkpoint: Option<Checkpoint>) -> String {
    checkpoint.map_or_else(
        || "no checkpoint".to_owned(),
        |c| format!("position {} (version {})", c.position, c.version),
    )
}

fn dead_letter(row: &PgRow) -> Result<DeadLetter, CheckpointError> {
    let read = || -> Result<DeadLetter, sqlx::Error> {
        let aggregate_type: String = row.try_get("aggregate_type")?;
        let id: String = row.try_get("aggregate_id")?;
        let name: String = row.try_get("projection")?;
        let partition = u16::try_from(row.try_get::<i32, _>("partition")?).unwrap_or(0);
        let key = ProjectionKey::new(&name, partition)
            .map_err(|err| sqlx::Error::Decode(Box::new(err)))?;
        Ok(DeadLetter {
            id: u64::try_from(row.try_get::<i64, _>("id")?).unwrap_or(0),
            key,
            event: NewDeadLetter {
                global_position: position(row.try_get("global_position")?),
                event_id: row.try_get("event_id")?,
                stream_id: StreamId::new(&aggregate_type, &id)
                    .unwrap_or_else(|_| StreamId::lossy(&aggregate_type, &id)),
                stream_version: u64::try_from(row.try_get::<i64, _>("stream_version")?)
                    .unwrap_or(0),
                event_type: row.try_get("event_type")?,
                error: row.try_get("error")?,
                attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
            },
            parked_at: row.try_get::<DateTime<Utc>, _>("parked_at")?,
        })
    };
    read().map_err(unavailable)
}

impl PgCheckpoints {
    pub(crate) fn new(pool: PgPool, schema: SchemaName, commits: watch::Sender<u64>) -> Self {
        Self {
            inner: Arc::new(Inner {
                sql: Queries::new(&schema),
                pool,
                schema,
                commits,
                lease_check: Duration::from_secs(1),
                poll: Duration::from_millis(5),
            }),
        }
    }

    /// How often a held lease's connection is checked (default 1 s). A runner notices a lost
    /// lease within this time; the checkpoint's compare-and-set keeps it from doing harm before.
    #[must_use]
    pub fn lease_check_interval(self, interval: Duration) -> Self {
        self.reconfigure(|inner| inner.lease_check = interval)
    }

    /// How often [`wait_for_projections`](esframe_core::projection::wait_for_projections)
    /// re-reads checkpoints moved by other processes (default 5 ms; commits in this process
    /// wake it at once).
    #[must_use]
    pub fn poll_interval(self, interval: Duration) -> Self {
        self.reconfigure(|inner| inner.poll = interval)
    }

    fn reconfigure(self, change: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Inner {
            pool: self.inner.pool.clone(),
            schema: self.inner.schema.clone(),
            sql: Queries::new(&self.inner.schema),
            commits: self.inner.commits.clone(),
            lease_check: self.inner.lease_check,
            poll: self.inner.poll,
        };
        change(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The pool, for querying read models.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    async fn current(&self, key: &ProjectionKey) -> Option<Checkpoint> {
        self.load(key).await.ok().flatten()
    }
}

impl CheckpointStore for PgCheckpoints {
    type Tx = PgTransaction;

    fn delivery(&self) -> Delivery {
        Delivery::ExactlyOnce
    }

    async fn load(&self, key: &ProjectionKey) -> Result<Option<Checkpoint>, CheckpointError> {
        let row = sqlx::query(AssertSqlSafe(self.inner.sql.load.as_str()))
            .bind(key.name())
            .bind(i32::from(key.partition()))
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        row.map(|row| -> Result<Checkpoint, sqlx::Error> {
            Ok(Checkpoint {
                position: position(row.try_get("position")?),
                version: u32::try_from(row.try_get::<i32, _>("version")?).unwrap_or(0),
                replay_until: row.try_get::<Option<i64>, _>("replay_until")?.map(position),
            })
        })
        .transpose()
        .map_err(unavailable)
    }

    async fn begin(&self) -> Result<PgTransaction, CheckpointError> {
        crate::transaction::begin(&self.inner.pool)
            .await
            .map_err(unavailable)
    }

    async fn commit(
        &self,
        mut tx: PgTransaction,
        commit: CheckpointCommit,
    ) -> Result<(), CheckpointError> {
        let sql = &self.inner.sql;
        let key = &commit.key;
        let partition = i32::from(key.partition());
        if let Some((from, to)) = commit.advance {
            let version = i32::try_from(to.version).unwrap_or(i32::MAX);
            let moved = match from {
                None => {
                    sqlx::query(AssertSqlSafe(sql.insert.as_str()))
                        .bind(key.name())
                        .bind(partition)
                        .bind(version)
                        .bind(to_i64(to.position.get()))
                        .bind(to.replay_until.map(|p| to_i64(p.get())))
                        .execute(&mut *tx)
                        .await
                }
                Some(from) => {
                    sqlx::query(AssertSqlSafe(sql.update.as_str()))
                        .bind(key.name())
                        .bind(partition)
                        .bind(version)
                        .bind(to_i64(to.position.get()))
                        .bind(to.replay_until.map(|p| to_i64(p.get())))
                        .bind(to_i64(from.position.get()))
                        .bind(i32::try_from(from.version).unwrap_or(i32::MAX))
                        .execute(&mut *tx)
                        .await
                }
            }
            .map_err(refused)?
            .rows_affected();
            if moved != 1 {
                drop(tx);
                return Err(CheckpointError::Moved {
                    expected: describe(from),
                    found: describe(self.current(key).await),
                    key: commit.key,
                });
            }
        }
        if let Some(id) = commit.resolve {
            let deleted = sqlx::query(AssertSqlSafe(sql.resolve.as_str()))
                .bind(to_i64(id))
                .execute(&mut *tx)
                .await
                .map_err(refused)?
                .rows_affected();
            if deleted != 1 {
                return Err(CheckpointError::DeadLetterGone {
                    key: commit.key,
                    id,
                });
            }
        }
        if let Some(after) = commit.clear_dead_letters_after {
            sqlx::query(AssertSqlSafe(sql.clear.as_str()))
                .bind(key.name())
                .bind(partition)
                .bind(to_i64(after.get()))
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
        }
        if let Some(letter) = &commit.park {
            sqlx::query(AssertSqlSafe(sql.park.as_str()))
                .bind(key.name())
                .bind(partition)
                .bind(to_i64(letter.global_position.get()))
                .bind(letter.event_id)
                .bind(letter.stream_id.aggregate_type())
                .bind(letter.stream_id.id())
                .bind(to_i64(letter.stream_version))
                .bind(&letter.event_type)
                .bind(&letter.error)
                .bind(i32::try_from(letter.attempts).unwrap_or(i32::MAX))
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
        }
        tx.commit().await.map_err(refused)?;
        self.inner.commits.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    async fn rollback(&self, tx: PgTransaction) {
        if let Err(err) = tx.rollback().await {
            tracing::debug!(error = %err, "projection transaction rollback failed; the connection is discarded");
        }
    }

    fn changed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut commits = self.inner.commits.subscribe();
        let poll = self.inner.poll;
        async move {
            let _ = tokio::time::timeout(poll, commits.changed()).await;
        }
    }
}

impl DeadLetterStore for PgCheckpoints {
    async fn dead_letters(&self, key: &ProjectionKey) -> Result<Vec<DeadLetter>, CheckpointError> {
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.list.as_str()))
            .bind(key.name())
            .bind(i32::from(key.partition()))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(dead_letter).collect()
    }

    async fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, CheckpointError> {
        let row = sqlx::query(AssertSqlSafe(self.inner.sql.get.as_str()))
            .bind(to_i64(id))
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(dead_letter).transpose()
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, CheckpointError> {
        let deleted = sqlx::query(AssertSqlSafe(self.inner.sql.discard.as_str()))
            .bind(to_i64(id))
            .execute(&self.inner.pool)
            .await
            .map_err(unavailable)?
            .rows_affected();
        Ok(deleted == 1)
    }

    async fn note_retry_failure(&self, id: u64, error: &str) -> Result<(), CheckpointError> {
        sqlx::query(AssertSqlSafe(self.inner.sql.note_failure.as_str()))
            .bind(to_i64(id))
            .bind(error)
            .execute(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
