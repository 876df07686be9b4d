//! [`PgLease`]: a projection partition's lease, a row of `projection_leases` with an expiry and
//! a fencing token, renewed by a background task. No session state: every statement runs on
//! any pooled connection, so leases work through a connection pooler.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use esframe_core::projection::{CheckpointError, LeaseInfo, LeaseStore, ProjectionKey};
use sqlx::{AssertSqlSafe, PgPool, Row};
use tokio::{sync::oneshot, task::JoinHandle, time::Instant};

use crate::{error::sqlstate, inline::lease_key};

use super::{PgCheckpoints, unavailable};

/// A projection partition's lease: its row in `projection_leases`, renewed every third of the
/// lease time by a background task. Dropping it gives it up (the task clears the row's
/// holder); if the process dies, the row expires after the lease time and another runner takes
/// it, with a new token, which refuses any later commit of this one.
#[derive(Debug)]
pub struct PgLease {
    token: u64,
    held: Arc<AtomicBool>,
    release: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for PgLease {
    fn drop(&mut self) {
        // The keep-alive clears the row and ends; if it cannot, the row expires.
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
    }
}

/// How long a group member counts after its heartbeat: the lease time less one renewal period
/// (two thirds of it). A holder renews its leases every third of the lease time, so a member
/// that dies stops counting before its last lease lapses: the survivors' fair share already
/// counts it out when they take its partitions as orphans, and they do not hand them back.
fn member_lifetime(lease_time: Duration) -> Duration {
    lease_time - renewal_period(lease_time)
}

/// How often a lease is renewed: every third of the lease time.
fn renewal_period(lease_time: Duration) -> Duration {
    lease_time / 3
}

/// Milliseconds as a bound parameter.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

impl PgCheckpoints {
    /// Takes the lease's row if it is free or expired, waiting up to `wait` for the lease's
    /// advisory lock, which appends updating the projection inline hold shared (so they and a
    /// rebuild never interleave; PostgreSQL queues the lock fairly, so a steady flow of such
    /// appends does not starve a rebuild). The lock is transaction-scoped.
    async fn lease(
        &self,
        key: &ProjectionKey,
        wait: Duration,
    ) -> Result<Option<PgLease>, CheckpointError> {
        let sql = &self.inner.sql;
        // Most of the time the lock is free: try it and the row in one statement. Only when an
        // append holds it, queue for it in a transaction (fairly, see above).
        let tried = sqlx::query(AssertSqlSafe(sql.lease_try_acquire.as_str()))
            .bind(key.name())
            .bind(i32::from(key.partition()))
            .bind(self.inner.holder.as_ref())
            .bind(millis(self.inner.lease_time))
            .bind(lease_key(&self.inner.schema, key))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        let got: bool = tried.try_get("got").map_err(unavailable)?;
        let token: Option<i64> = if got {
            tried.try_get("token").map_err(unavailable)?
        } else {
            self.lease_queued(key, wait).await?
        };
        let Some(token) = token else {
            return Ok(None);
        };
        Ok(Some(self.keep(key, token)))
    }

    /// The lease's row taken in a transaction that queues for its advisory lock up to `wait`;
    /// the row's new token, `None` if the lock or the row was not to be had.
    async fn lease_queued(
        &self,
        key: &ProjectionKey,
        wait: Duration,
    ) -> Result<Option<i64>, CheckpointError> {
        let sql = &self.inner.sql;
        let mut tx = crate::transaction::begin(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        sqlx::query(AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = {}",
            millis(wait).min(i64::from(i32::MAX))
        )))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let locked = sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(lease_key(&self.inner.schema, key))
            .execute(&mut *tx)
            .await;
        match locked {
            Ok(_) => {}
            Err(sqlx::Error::Database(err))
                if err.code().as_deref() == Some(sqlstate::LOCK_NOT_AVAILABLE) =>
            {
                return Ok(None);
            }
            Err(err) => return Err(unavailable(err)),
        }
        let token: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql.lease_acquire.as_str()))
            .bind(key.name())
            .bind(i32::from(key.partition()))
            .bind(self.inner.holder.as_ref())
            .bind(millis(self.inner.lease_time))
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(token)
    }

    /// A lease of token `token`, just taken: its keep-alive task starts renewing it.
    fn keep(&self, key: &ProjectionKey, token: i64) -> PgLease {
        let sql = &self.inner.sql;
        let token = u64::try_from(token).unwrap_or(0);
        let held = Arc::new(AtomicBool::new(true));
        let (release, released) = oneshot::channel();
        let task = tokio::spawn(keep_lease(
            KeepAlive {
                pool: self.inner.pool.clone(),
                renew: sql.lease_renew.clone(),
                free: sql.lease_release.clone(),
                key: key.clone(),
                token,
                held: Arc::clone(&held),
                lease_time: self.inner.lease_time,
            },
            released,
        ));
        PgLease {
            token,
            held,
            release: Some(release),
            task,
        }
    }
}

/// What the keep-alive task needs.
struct KeepAlive {
    pool: PgPool,
    renew: String,
    free: String,
    key: ProjectionKey,
    token: u64,
    held: Arc<AtomicBool>,
    lease_time: Duration,
}

impl KeepAlive {
    /// Extends the row's expiry; `false` if the row has another token now.
    async fn renew(&self) -> Result<bool, sqlx::Error> {
        let renewed = sqlx::query(AssertSqlSafe(self.renew.as_str()))
            .bind(self.key.name())
            .bind(i32::from(self.key.partition()))
            .bind(i64::try_from(self.token).unwrap_or(i64::MAX))
            .bind(millis(self.lease_time))
            .execute(&self.pool)
            .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Clears the row's holder, if it still has this token.
    async fn free(&self) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.free.as_str()))
            .bind(self.key.name())
            .bind(i32::from(self.key.partition()))
            .bind(i64::try_from(self.token).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Renews the lease every third of the lease time; on release, clears the row's holder. Gives
/// the lease up (the `held` flag) when the row has another token, or when no renewal has
/// succeeded for the lease time (it may have expired and been taken).
async fn keep_lease(lease: KeepAlive, mut release: oneshot::Receiver<()>) {
    let every = renewal_period(lease.lease_time);
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            _ = &mut release => {
                lease.held.store(false, Ordering::SeqCst);
                let _ = tokio::time::timeout(Duration::from_secs(5), lease.free()).await;
                return;
            }
            () = tokio::time::sleep(every) => {
                match tokio::time::timeout(every.max(Duration::from_millis(100)), lease.renew()).await {
                    Ok(Ok(true)) => renewed = Instant::now(),
                    Ok(Ok(false)) => {
                        tracing::warn!(projection = %lease.key, token = lease.token, "projection lease taken over by another runner; giving it up");
                        lease.held.store(false, Ordering::SeqCst);
                        return;
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(projection = %lease.key, error = %err, "cannot renew the projection lease; retrying");
                    }
                    Err(_) => {
                        tracing::warn!(projection = %lease.key, "renewing the projection lease timed out; retrying");
                    }
                }
                if renewed.elapsed() + every >= lease.lease_time {
                    tracing::warn!(projection = %lease.key, "projection lease not renewed within its lease time; giving it up");
                    lease.held.store(false, Ordering::SeqCst);
                    // The row may still be this lease's (nobody took it): clear it on release,
                    // as a clean release would, instead of leaving it to expire. Clearing is
                    // token-checked, so a lease taken meanwhile is left alone.
                    let _ = (&mut release).await;
                    let _ = tokio::time::timeout(Duration::from_secs(5), lease.free()).await;
                    return;
                }
            }
        }
    }
}

impl LeaseStore for PgCheckpoints {
    type Lease = PgLease;

    async fn try_lease(&self, key: &ProjectionKey) -> Result<Option<PgLease>, CheckpointError> {
        // Appends updating the projection inline hold its lock for a moment only.
        self.lease(key, Duration::from_millis(500)).await
    }

    /// Queues for the lease's advisory lock (up to `wait`) and then takes the row if it is free,
    /// checking again every 10 ms until `wait` has passed.
    async fn wait_lease(
        &self,
        key: &ProjectionKey,
        wait: Duration,
    ) -> Result<Option<PgLease>, CheckpointError> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(lease) = self.lease(key, left.max(Duration::from_millis(1))).await? {
                return Ok(Some(lease));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn lease_held(&self, lease: &PgLease) -> bool {
        lease.held.load(Ordering::SeqCst) && !lease.task.is_finished()
    }

    async fn release(&self, mut lease: PgLease) {
        if let Some(release) = lease.release.take()
            && release.send(()).is_ok()
        {
            // Wait for the row to be cleared, briefly: if it cannot be, it expires.
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut lease.task).await;
        }
    }

    fn fence(&self, lease: &PgLease) -> Option<u64> {
        Some(lease.token)
    }

    async fn heartbeat(&self, group: &str, member: &str) -> Result<u32, CheckpointError> {
        let others: i64 = sqlx::query_scalar(AssertSqlSafe(self.inner.sql.heartbeat.as_str()))
            .bind(group)
            .bind(member)
            .bind(millis(member_lifetime(self.inner.lease_time)))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        Ok(u32::try_from(others + 1).unwrap_or(u32::MAX))
    }

    fn membership_lifetime(&self) -> Option<Duration> {
        Some(member_lifetime(self.inner.lease_time))
    }

    async fn leave(&self, group: &str, member: &str) {
        let left = sqlx::query(AssertSqlSafe(self.inner.sql.leave.as_str()))
            .bind(group)
            .bind(member)
            .execute(&self.inner.pool)
            .await;
        if let Err(err) = left {
            tracing::debug!(error = %err, group, member, "cannot leave the group; the membership expires");
        }
    }

    async fn leases(&self, name: &str) -> Result<Vec<LeaseInfo>, CheckpointError> {
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.leases.as_str()))
            .bind(name)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|row| -> Result<LeaseInfo, sqlx::Error> {
                let expires_in: Option<f64> = row.try_get("expires_in")?;
                Ok(LeaseInfo {
                    partition: u16::try_from(row.try_get::<i32, _>("partition")?).unwrap_or(0),
                    holder: row.try_get("holder")?,
                    expires_in: expires_in.map(|s| Duration::from_secs_f64(s.max(0.0))),
                    expired: row.try_get("expired")?,
                    token: u64::try_from(row.try_get::<i64, _>("token")?).ok(),
                    last_error: row.try_get("last_error")?,
                })
            })
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn note_error(&self, key: &ProjectionKey, error: Option<&str>) {
        let noted = sqlx::query(AssertSqlSafe(self.inner.sql.note_error.as_str()))
            .bind(key.name())
            .bind(i32::from(key.partition()))
            .bind(error)
            .execute(&self.inner.pool)
            .await;
        if let Err(err) = noted {
            tracing::debug!(projection = %key, error = %err, "cannot record the partition's last error");
        }
    }
}
