//! [`PgLease`]: a projection partition's lease, a session advisory lock held by a connection of
//! its own and checked by a background task.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use esframe_core::projection::{CheckpointError, LeaseStore, ProjectionKey};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::{error::sqlstate, inline::lease_key};

use super::{PgCheckpoints, unavailable};

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

impl PgCheckpoints {
    /// Takes the lease's advisory lock on a new connection: at once or not at all (`wait`
    /// `None`), or waiting in the lock queue for up to `wait`.
    async fn lease(
        &self,
        key: &ProjectionKey,
        wait: Option<Duration>,
    ) -> Result<Option<PgLease>, CheckpointError> {
        let options = self.inner.pool.connect_options();
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(unavailable)?;
        // If the holder's host dies without closing the connection, the server must notice
        // within seconds, not the operating system's default two hours, to free the lock.
        sqlx::raw_sql(
            "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
             SET tcp_keepalives_count = 3",
        )
        .execute(&mut conn)
        .await
        .map_err(unavailable)?;
        let lock = lease_key(&self.inner.schema, key);
        let taken = match wait {
            None => sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(&lock)
                .fetch_one(&mut conn)
                .await
                .map_err(unavailable)?,
            Some(wait) => {
                let millis = wait.as_millis().clamp(1, i32::MAX as u128);
                sqlx::query(AssertSqlSafe(format!("SET lock_timeout = {millis}")))
                    .execute(&mut conn)
                    .await
                    .map_err(unavailable)?;
                let locked = sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
                    .bind(&lock)
                    .execute(&mut conn)
                    .await;
                match locked {
                    Ok(_) => {
                        sqlx::query("RESET lock_timeout")
                            .execute(&mut conn)
                            .await
                            .map_err(unavailable)?;
                        true
                    }
                    Err(sqlx::Error::Database(err))
                        if err.code().as_deref() == Some(sqlstate::LOCK_NOT_AVAILABLE) =>
                    {
                        false
                    }
                    Err(err) => return Err(unavailable(err)),
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
            lock,
            Arc::clone(&held),
            released,
            self.inner.lease_check,
        ));
        Ok(Some(PgLease {
            held,
            release: Some(release),
            task,
        }))
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

impl LeaseStore for PgCheckpoints {
    type Lease = PgLease;

    async fn try_lease(&self, key: &ProjectionKey) -> Result<Option<PgLease>, CheckpointError> {
        self.lease(key, None).await
    }

    /// Queues for the lock (up to `wait`, by `lock_timeout`) instead of polling: PostgreSQL
    /// grants locks in order, so a waiting rebuild is not starved by a steady flow of appends
    /// that update the projection inline, which wait behind it instead.
    async fn wait_lease(
        &self,
        key: &ProjectionKey,
        wait: Duration,
    ) -> Result<Option<PgLease>, CheckpointError> {
        self.lease(key, Some(wait)).await
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
}
