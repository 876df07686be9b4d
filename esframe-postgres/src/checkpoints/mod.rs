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
/// Leases are rows of `projection_leases` with an expiry ([`PgCheckpoints::lease_time`],
/// default 10 s) renewed in the background, and a fencing token that every checkpoint commit
/// carries: when the holder dies, its lease expires and a standing-by runner takes over with a
/// new token, which refuses any later commit of the old holder (paused, or cut off from the
/// database). Nothing is kept in a session, so checkpoints and leases work through a
/// connection pooler.
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
    lease_time: Duration,
    /// Who this process is, in the lease rows it writes.
    holder: Arc<str>,
    poll: Duration,
}

impl std::fmt::Debug for PgCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCheckpoints")
            .field("schema", &self.inner.schema)
            .field("lease_time", &self.inner.lease_time)
            .field("holder", &self.inner.holder)
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
    lease_acquire: String,
    lease_try_acquire: String,
    lease_renew: String,
    lease_release: String,
    fence: String,
    fenced_update: String,
    heartbeat: String,
    leave: String,
    leases: String,
    note_error: String,
    partition_count: String,
    repartition_delete: String,
    repartition_insert: String,
    repartition_count: String,
    repartition_clear: String,
}

const DEAD_LETTER_COLUMNS: &str = "id, projection, partition, global_position, event_id, \
     aggregate_type, aggregate_id, stream_version, event_type, error, attempts, parked_at";

impl Queries {
    fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        let cp = format!("{s}.projection_checkpoints");
        let dl = format!("{s}.projection_dead_letters");
        let leases = format!("{s}.projection_leases");
        let members = format!("{s}.projection_members");
        let partitions = format!("{s}.projection_partitions");
        // The lease row of `$1` (projection), `$2` (partition) for `$3` (holder) for `$4` ms,
        // from `row`, if it is free or expired: its new token.
        let take_lease = |row: &str| {
            format!(
                "INSERT INTO {leases} AS l (projection, partition, holder, token, expires_at)
                 {row}
                 ON CONFLICT (projection, partition) DO UPDATE SET
                     holder = excluded.holder, token = l.token + 1,
                     expires_at = excluded.expires_at
                 WHERE l.holder IS NULL OR l.expires_at < now()
                 RETURNING token"
            )
        };
        Self {
            lease_acquire: take_lease(
                "VALUES ($1, $2, $3, 1, now() + $4 * interval '1 millisecond')",
            ),
            // `lease_acquire` with the lease's advisory lock tried in the same statement
            // (`$5`, the lock's key), outside any transaction: one round trip. Taken before
            // the insert, as the insert's row comes from it; held until the statement ends.
            lease_try_acquire: format!(
                "WITH lock AS MATERIALIZED (
                     SELECT pg_try_advisory_xact_lock(hashtextextended($5, 0)) AS got
                 ), taken AS ({})
                 SELECT (SELECT got FROM lock) AS got, (SELECT token FROM taken) AS token",
                take_lease(
                    "SELECT $1, $2, $3, 1, now() + $4 * interval '1 millisecond'
                     FROM lock WHERE lock.got"
                )
            ),
            lease_renew: format!(
                "UPDATE {leases} SET expires_at = now() + $4 * interval '1 millisecond'
                 WHERE projection = $1 AND partition = $2 AND token = $3 AND holder IS NOT NULL"
            ),
            lease_release: format!(
                "UPDATE {leases} SET holder = NULL, expires_at = now()
                 WHERE projection = $1 AND partition = $2 AND token = $3"
            ),
            fence: format!(
                "SELECT token FROM {leases} WHERE projection = $1 AND partition = $2 FOR SHARE"
            ),
            heartbeat: format!(
                "WITH beat AS (
                     INSERT INTO {members} (projection, member, expires_at)
                     VALUES ($1, $2, now() + $3 * interval '1 millisecond')
                     ON CONFLICT (projection, member) DO UPDATE SET expires_at = excluded.expires_at
                 ), gone AS (
                     DELETE FROM {members}
                     WHERE projection = $1 AND expires_at < now() - interval '1 minute'
                 )
                 SELECT count(*) FROM {members}
                 WHERE projection = $1 AND member <> $2 AND expires_at >= now()"
            ),
            leave: format!("DELETE FROM {members} WHERE projection = $1 AND member = $2"),
            leases: format!(
                "SELECT partition, token, last_error,
                        CASE WHEN holder IS NOT NULL AND expires_at > now() THEN holder END AS holder,
                        CASE WHEN holder IS NOT NULL AND expires_at > now()
                             THEN extract(epoch FROM expires_at - now())::float8 END AS expires_in,
                        holder IS NOT NULL AND expires_at <= now() AS expired
                 FROM {leases} WHERE projection = $1 ORDER BY partition"
            ),
            note_error: format!(
                "UPDATE {leases} SET last_error = $3 WHERE projection = $1 AND partition = $2"
            ),
            partition_count: format!(
                "WITH stored AS (SELECT partitions FROM {partitions} WHERE projection = $1),
                 added AS (
                     INSERT INTO {partitions} (projection, partitions)
                     SELECT $1, CASE WHEN EXISTS (SELECT 1 FROM {cp} WHERE projection = $1)
                                     THEN 1 ELSE $2 END
                     WHERE NOT EXISTS (SELECT 1 FROM stored)
                     ON CONFLICT (projection) DO NOTHING
                     RETURNING partitions
                 )
                 SELECT partitions FROM stored UNION ALL SELECT partitions FROM added"
            ),
            repartition_delete: format!(
                "DELETE FROM {cp} WHERE projection = $1 AND partition <> $2"
            ),
            repartition_insert: format!(
                "INSERT INTO {cp} (projection, partition, version, position, replay_until)
                 SELECT $1, p, $3, $4, $5 FROM generate_series(0, $6 - 1) AS p WHERE p <> $2"
            ),
            repartition_count: format!(
                "INSERT INTO {partitions} (projection, partitions) VALUES ($1, $2)
                 ON CONFLICT (projection) DO UPDATE SET partitions = excluded.partitions"
            ),
            repartition_clear: format!(
                "DELETE FROM {dl} WHERE projection = $1 AND global_position > $2"
            ),
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
            // The fence check and the move in one statement (one round trip): the lease row is
            // locked first (the CTE, materialized for its lock), and the checkpoint moves only
            // if its token is the committer's ($8). Returns the token found and the rows moved.
            fenced_update: format!(
                "WITH lease AS (
                     SELECT token FROM {leases} WHERE projection = $1 AND partition = $2 FOR SHARE
                 ), moved AS (
                     UPDATE {cp} SET version = $3, position = $4, replay_until = $5,
                                     updated_at = now()
                     WHERE projection = $1 AND partition = $2 AND position = $6 AND version = $7
                       AND (SELECT token FROM lease) = $8
                     RETURNING 1
                 )
                 SELECT (SELECT token FROM lease), (SELECT count(*) FROM moved)"
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

/// How long a lease lasts without renewal, by default.
pub const DEFAULT_LEASE_TIME: Duration = Duration::from_secs(10);

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
                lease_time: DEFAULT_LEASE_TIME,
                holder: Arc::from(esframe_core::projection::this_process()),
                poll: Duration::from_millis(5),
            }),
        }
    }

    /// How long a lease (and a partitioned runner's membership) lasts without being renewed
    /// (default [`DEFAULT_LEASE_TIME`], 10 s; at least 30 ms). Held leases are renewed every
    /// third of it. When a runner dies, another takes its partitions over after about this
    /// long; a runner whose renewals fail for this long gives its lease up.
    #[must_use]
    pub fn lease_time(self, lease_time: Duration) -> Self {
        self.reconfigure(|inner| inner.lease_time = lease_time.max(Duration::from_millis(30)))
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
            lease_time: self.inner.lease_time,
            holder: Arc::clone(&self.inner.holder),
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

    async fn partition_count(&self, name: &str, proposed: u16) -> Result<u16, CheckpointError> {
        // Two first callers race: the loser's statement sees neither row; the next sees the
        // winner's.
        for _ in 0..3 {
            let count: Option<i32> =
                sqlx::query_scalar(AssertSqlSafe(self.inner.sql.partition_count.as_str()))
                    .bind(name)
                    .bind(i32::from(proposed))
                    .fetch_optional(&self.inner.pool)
                    .await
                    .map_err(unavailable)?;
            if let Some(count) = count {
                return Ok(u16::try_from(count).unwrap_or(1));
            }
        }
        Err(CheckpointError::unavailable(format!(
            "the partition count of projection `{name}` could not be read"
        )))
    }

    /// A transaction the server ends if it sits idle for the lease time: a runner paused in
    /// the middle of a batch (past its lease, so another runner takes the partition over)
    /// does not keep the batch's locks, nor the lease row its commit locks, for the whole
    /// pause. A handler that waits longer than the lease time between two statements fails
    /// its batch, which is retried.
    async fn begin(&self) -> Result<PgTransaction, CheckpointError> {
        crate::transaction::begin_bounded(&self.inner.pool, self.inner.lease_time)
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
        // The common case, a fenced move of a stored checkpoint: one statement.
        let mut advance = commit.advance;
        if let (Some(token), Some((Some(from), to))) = (commit.fence, advance) {
            let (current, moved): (Option<i64>, i64) =
                sqlx::query_as(AssertSqlSafe(sql.fenced_update.as_str()))
                    .bind(key.name())
                    .bind(partition)
                    .bind(i32::try_from(to.version).unwrap_or(i32::MAX))
                    .bind(to_i64(to.position.get()))
                    .bind(to.replay_until.map(|p| to_i64(p.get())))
                    .bind(to_i64(from.position.get()))
                    .bind(i32::try_from(from.version).unwrap_or(i32::MAX))
                    .bind(i64::try_from(token).unwrap_or(i64::MAX))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(refused)?;
            if current != i64::try_from(token).ok() {
                drop(tx);
                return Err(fenced(commit.key, token, current));
            }
            if moved != 1 {
                drop(tx);
                return Err(CheckpointError::Moved {
                    expected: describe(Some(from)),
                    found: describe(self.current(key).await),
                    key: commit.key,
                });
            }
            // Moved: the rest of the commit (a repartition included) goes on without it.
            advance = None;
        } else if let Some(token) = commit.fence {
            // Locks the lease row against a takeover until this commit ends.
            let current: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql.fence.as_str()))
                .bind(key.name())
                .bind(partition)
                .fetch_optional(&mut *tx)
                .await
                .map_err(refused)?;
            if current != i64::try_from(token).ok() {
                drop(tx);
                return Err(fenced(commit.key, token, current));
            }
        }
        if let Some((from, to)) = advance {
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
        if let (Some(count), Some((_, to))) = (commit.repartition, commit.advance) {
            let version = i32::try_from(to.version).unwrap_or(i32::MAX);
            sqlx::query(AssertSqlSafe(sql.repartition_delete.as_str()))
                .bind(key.name())
                .bind(partition)
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
            sqlx::query(AssertSqlSafe(sql.repartition_insert.as_str()))
                .bind(key.name())
                .bind(partition)
                .bind(version)
                .bind(to_i64(to.position.get()))
                .bind(to.replay_until.map(|p| to_i64(p.get())))
                .bind(i32::from(count))
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
            sqlx::query(AssertSqlSafe(sql.repartition_count.as_str()))
                .bind(key.name())
                .bind(i32::from(count))
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
            sqlx::query(AssertSqlSafe(sql.repartition_clear.as_str()))
                .bind(key.name())
                .bind(to_i64(
                    commit.clear_dead_letters_after.unwrap_or_default().get(),
                ))
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
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

/// A commit refused by the fence: the committer's `token`, and the lease row's now.
fn fenced(key: ProjectionKey, token: u64, current: Option<i64>) -> CheckpointError {
    CheckpointError::Fenced {
        key,
        token,
        current: current.map_or_else(|| "free".to_owned(), |t| t.to_string()),
    }
}
