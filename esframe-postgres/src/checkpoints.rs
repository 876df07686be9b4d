//! [`PgCheckpoints`]: exactly-once projection checkpoints, leases and dead letters in PostgreSQL.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use esframe_core::{
    StreamId,
    projection::{
        Checkpoint, CheckpointCommit, CheckpointError, CheckpointStore, DeadLetter, Delivery,
        NewDeadLetter,
    },
};
use sqlx::{
    AssertSqlSafe, Connection, PgConnection, PgPool, Postgres, Row, Transaction, postgres::PgRow,
};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};

use crate::{SchemaName, inline::lease_key};

/// SQLSTATE `lock_not_available`: `lock_timeout` expired.
const LOCK_NOT_AVAILABLE: &str = "55P03";

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

const DEAD_LETTER_COLUMNS: &str = "id, projection, global_position, event_id, stream_id, \
     stream_version, event_type, error, attempts, parked_at";

impl Queries {
    fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        let cp = format!("{s}.projection_checkpoints");
        let dl = format!("{s}.projection_dead_letters");
        Self {
            load: format!("SELECT position, version, replay_until FROM {cp} WHERE projection = $1"),
            insert: format!(
                "INSERT INTO {cp} (projection, version, position, replay_until)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (projection) DO NOTHING"
            ),
            update: format!(
                "UPDATE {cp} SET version = $2, position = $3, replay_until = $4, updated_at = now()
                 WHERE projection = $1 AND position = $5 AND version = $6"
            ),
            park: format!(
                "INSERT INTO {dl} (projection, global_position, event_id, stream_id,
                     stream_version, event_type, error, attempts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ),
            resolve: format!("DELETE FROM {dl} WHERE id = $1"),
            clear: format!("DELETE FROM {dl} WHERE projection = $1 AND global_position > $2"),
            list: format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM {dl} WHERE projection = $1 ORDER BY id"
            ),
            get: format!("SELECT {DEAD_LETTER_COLUMNS} FROM {dl} WHERE id = $1"),
            discard: format!("DELETE FROM {dl} WHERE id = $1"),
            note_failure: format!(
                "UPDATE {dl} SET attempts = attempts + 1, error = $2 WHERE id = $1"
            ),
        }
    }
}

/// A projection's lease: an advisory lock held by a connection of its own, which a background
/// task checks. Dropping it closes that connection, which frees the lock.
#[derive(Debug)]
pub struct PgLease {
    held: Arc<AtomicBool>,
    release: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for PgLease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn backend(err: sqlx::Error) -> CheckpointError {
    CheckpointError::backend(err)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn describe(checkpoint: Option<Checkpoint>) -> String {
    checkpoint.map_or_else(
        || "no checkpoint".to_owned(),
        |c| format!("position {} (version {})", c.position, c.version),
    )
}

fn dead_letter(row: &PgRow) -> Result<DeadLetter, sqlx::Error> {
    let stream: String = row.try_get("stream_id")?;
    Ok(DeadLetter {
        id: to_u64(row.try_get("id")?),
        projection: row.try_get("projection")?,
        event: NewDeadLetter {
            global_position: to_u64(row.try_get("global_position")?),
            event_id: row.try_get("event_id")?,
            stream_id: StreamId::new(&stream).unwrap_or_else(|_| StreamId::lossy(&stream)),
            stream_version: to_u64(row.try_get("stream_version")?),
            event_type: row.try_get("event_type")?,
            error: row.try_get("error")?,
            attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
        },
        parked_at: row.try_get::<DateTime<Utc>, _>("parked_at")?,
    })
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

    async fn current(&self, projection: &str) -> Option<Checkpoint> {
        self.load(projection).await.ok().flatten()
    }

    /// Takes the lease's advisory lock on a new connection: at once or not at all (`wait`
    /// `None`), or waiting in the lock queue for up to `wait`.
    async fn lease(
        &self,
        projection: &str,
        wait: Option<Duration>,
    ) -> Result<Option<PgLease>, CheckpointError> {
        let options = self.inner.pool.connect_options();
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(backend)?;
        // If the holder's host dies without closing the connection, the server must notice
        // within seconds, not the operating system's default two hours, to free the lock.
        sqlx::raw_sql(
            "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
             SET tcp_keepalives_count = 3",
        )
        .execute(&mut conn)
        .await
        .map_err(backend)?;
        let key = lease_key(&self.inner.schema, projection);
        let taken = match wait {
            None => sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(&key)
                .fetch_one(&mut conn)
                .await
                .map_err(backend)?,
            Some(wait) => {
                let millis = wait.as_millis().clamp(1, i32::MAX as u128);
                sqlx::query(AssertSqlSafe(format!("SET lock_timeout = {millis}")))
                    .execute(&mut conn)
                    .await
                    .map_err(backend)?;
                let locked = sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
                    .bind(&key)
                    .execute(&mut conn)
                    .await;
                match locked {
                    Ok(_) => {
                        sqlx::query("RESET lock_timeout")
                            .execute(&mut conn)
                            .await
                            .map_err(backend)?;
                        true
                    }
                    Err(sqlx::Error::Database(err))
                        if err.code().as_deref() == Some(LOCK_NOT_AVAILABLE) =>
                    {
                        false
                    }
                    Err(err) => return Err(backend(err)),
                }
            }
        };
        if !taken {
            let _ = conn.close().await;
            return Ok(None);
        }
        let held = Arc::new(AtomicBool::new(true));
        let (release, released) = oneshot::channel();
        let task = tokio::spawn(keep_lease(
            conn,
            key,
            Arc::clone(&held),
            released,
            self.lease_check(),
        ));
        Ok(Some(PgLease {
            held,
            release: Some(release),
            task,
        }))
    }

    fn lease_check(&self) -> Duration {
        self.inner.lease_check
    }

    /// The commit; errors are classified by [`CheckpointStore::commit`].
    async fn commit_in(
        &self,
        mut tx: PgTransaction,
        commit: CheckpointCommit,
    ) -> Result<(), CheckpointError> {
        let sql = &self.inner.sql;
        if let Some((from, to)) = commit.advance {
            let version = i32::try_from(to.version).unwrap_or(i32::MAX);
            let moved = match from {
                None => {
                    sqlx::query(AssertSqlSafe(sql.insert.as_str()))
                        .bind(&commit.projection)
                        .bind(version)
                        .bind(to_i64(to.position))
                        .bind(to.replay_until.map(to_i64))
                        .execute(&mut *tx)
                        .await
                }
                Some(from) => {
                    sqlx::query(AssertSqlSafe(sql.update.as_str()))
                        .bind(&commit.projection)
                        .bind(version)
                        .bind(to_i64(to.position))
                        .bind(to.replay_until.map(to_i64))
                        .bind(to_i64(from.position))
                        .bind(i32::try_from(from.version).unwrap_or(i32::MAX))
                        .execute(&mut *tx)
                        .await
                }
            }
            .map_err(backend)?
            .rows_affected();
            if moved != 1 {
                drop(tx);
                return Err(CheckpointError::Moved {
                    expected: describe(from),
                    found: describe(self.current(&commit.projection).await),
                    projection: commit.projection,
                });
            }
        }
        if let Some(id) = commit.resolve {
            let deleted = sqlx::query(AssertSqlSafe(sql.resolve.as_str()))
                .bind(to_i64(id))
                .execute(&mut *tx)
                .await
                .map_err(backend)?
                .rows_affected();
            if deleted != 1 {
                return Err(CheckpointError::DeadLetterGone {
                    projection: commit.projection,
                    id,
                });
            }
        }
        if let Some(after) = commit.clear_dead_letters_after {
            sqlx::query(AssertSqlSafe(sql.clear.as_str()))
                .bind(&commit.projection)
                .bind(to_i64(after))
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        if let Some(letter) = &commit.park {
            sqlx::query(AssertSqlSafe(sql.park.as_str()))
                .bind(&commit.projection)
                .bind(to_i64(letter.global_position))
                .bind(letter.event_id)
                .bind(letter.stream_id.as_str())
                .bind(to_i64(letter.stream_version))
                .bind(&letter.event_type)
                .bind(&letter.error)
                .bind(i32::try_from(letter.attempts).unwrap_or(i32::MAX))
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        self.inner.commits.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }
}

/// The lease's keep-alive: checks the connection, and on release unlocks and closes it.
async fn keep_lease(
    mut conn: PgConnection,
    key: String,
    held: Arc<AtomicBool>,
    mut release: oneshot::Receiver<()>,
    every: Duration,
) {
    loop {
        tokio::select! {
            _ = &mut release => {
                let _ = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
                    .bind(&key)
                    .execute(&mut conn)
                    .await;
                held.store(false, Ordering::SeqCst);
                let _ = conn.close().await;
                return;
            }
            () = tokio::time::sleep(every) => {
                let alive = tokio::time::timeout(every.max(Duration::from_secs(1)), conn.ping()).await;
                if !matches!(alive, Ok(Ok(()))) {
                    tracing::warn!(lease = key, "projection lease connection lost; the lease is given up");
                    held.store(false, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

impl CheckpointStore for PgCheckpoints {
    type Tx = PgTransaction;
    type Lease = PgLease;

    fn delivery(&self) -> Delivery {
        Delivery::ExactlyOnce
    }

    async fn try_lease(&self, projection: &str) -> Result<Option<PgLease>, CheckpointError> {
        self.lease(projection, None).await
    }

    /// Queues for the lock (up to `wait`, by `lock_timeout`) instead of polling: PostgreSQL
    /// grants locks in order, so a waiting rebuild is not starved by a steady flow of appends
    /// that update the projection inline, which wait behind it instead.
    async fn wait_lease(
        &self,
        projection: &str,
        wait: Duration,
    ) -> Result<Option<PgLease>, CheckpointError> {
        self.lease(projection, Some(wait)).await
    }

    fn lease_held(&self, lease: &PgLease) -> bool {
        lease.held.load(Ordering::SeqCst) && !lease.task.is_finished()
    }

    async fn release(&self, mut lease: PgLease) {
        if let Some(release) = lease.release.take()
            && release.send(()).is_ok()
        {
            // Wait for the unlock, briefly: if the connection hangs, dropping the lease closes
            // it anyway.
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut lease.task).await;
        }
    }

    async fn load(&self, projection: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        let row = sqlx::query(AssertSqlSafe(self.inner.sql.load.as_str()))
            .bind(projection)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(backend)?;
        row.map(|row| -> Result<Checkpoint, sqlx::Error> {
            Ok(Checkpoint {
                position: to_u64(row.try_get("position")?),
                version: u32::try_from(row.try_get::<i32, _>("version")?).unwrap_or(0),
                replay_until: row.try_get::<Option<i64>, _>("replay_until")?.map(to_u64),
            })
        })
        .transpose()
        .map_err(backend)
    }

    async fn begin(&self) -> Result<PgTransaction, CheckpointError> {
        self.inner.pool.begin().await.map_err(backend)
    }

    async fn commit(
        &self,
        tx: PgTransaction,
        commit: CheckpointCommit,
    ) -> Result<(), CheckpointError> {
        // An error the server answered with refuses this transaction; anything else (the
        // connection) is the backend failing.
        self.commit_in(tx, commit).await.map_err(|err| match err {
            CheckpointError::Backend(source) => match source.downcast::<sqlx::Error>() {
                Ok(sql) if sql.as_database_error().is_some() => CheckpointError::Rejected(sql),
                Ok(sql) => CheckpointError::Backend(sql),
                Err(other) => CheckpointError::Backend(other),
            },
            other => other,
        })
    }

    async fn rollback(&self, tx: PgTransaction) {
        if let Err(err) = tx.rollback().await {
            tracing::debug!(error = %err, "projection transaction rollback failed; the connection is discarded");
        }
    }

    async fn dead_letters(&self, projection: &str) -> Result<Vec<DeadLetter>, CheckpointError> {
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.list.as_str()))
            .bind(projection)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(dead_letter)
            .collect::<Result<_, _>>()
            .map_err(backend)
    }

    async fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, CheckpointError> {
        let row = sqlx::query(AssertSqlSafe(self.inner.sql.get.as_str()))
            .bind(to_i64(id))
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(backend)?;
        row.as_ref().map(dead_letter).transpose().map_err(backend)
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, CheckpointError> {
        let deleted = sqlx::query(AssertSqlSafe(self.inner.sql.discard.as_str()))
            .bind(to_i64(id))
            .execute(&self.inner.pool)
            .await
            .map_err(backend)?
            .rows_affected();
        Ok(deleted == 1)
    }

    async fn note_retry_failure(&self, id: u64, error: &str) -> Result<(), CheckpointError> {
        sqlx::query(AssertSqlSafe(self.inner.sql.note_failure.as_str()))
            .bind(to_i64(id))
            .bind(error)
            .execute(&self.inner.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    fn changed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut commits = self.inner.commits.subscribe();
        let poll = self.inner.poll;
        async move {
            let _ = tokio::time::timeout(poll, commits.changed()).await;
        }
    }
}
