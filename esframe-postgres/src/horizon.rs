//! Why the global log is not moving: which transaction holds the read horizon back, and the
//! warning logged when it has been held back too long.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use esframe_core::Position;
use sqlx::{AssertSqlSafe, PgPool, Row};

use crate::{PgEventStore, sql::Queries};

/// The state of the global log's read horizon.
///
/// Readers of the global log only see events whose transaction is older than every transaction
/// still running in the cluster; a long-open transaction anywhere (any database, any client)
/// therefore holds back every subscription and projection until it ends.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HorizonStatus {
    /// Committed events exist that readers cannot see yet.
    pub blocked: bool,
    /// The highest position stored, if any.
    pub head: Option<Position>,
    /// Positions below this are readable.
    pub horizon: Position,
    /// The oldest running transaction, which defines the horizon.
    pub holder: Option<HorizonHolder>,
}

/// A transaction holding the horizon back.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HorizonHolder {
    /// Backend process id (`pg_stat_activity.pid`), or `None` for a prepared transaction.
    pub pid: Option<i32>,
    /// Database it is connected to.
    pub database: Option<String>,
    /// Role running it.
    pub user: Option<String>,
    /// `application_name` of the client.
    pub application: Option<String>,
    /// `active`, `idle in transaction`, ... (`prepared` for a prepared transaction).
    pub state: Option<String>,
    /// When the transaction began.
    pub since: Option<DateTime<Utc>>,
    /// The start of its current or last statement, or the prepared transaction's id.
    pub query: Option<String>,
}

const HOLDER_SQL: &str = "
    SELECT pid, datname::text, usename::text, application_name, state, xact_start,
           left(query, 200) AS query
    FROM pg_stat_activity
    WHERE backend_xid IS NOT NULL
    ORDER BY age(backend_xid) DESC
    LIMIT 1";

const PREPARED_SQL: &str = "
    SELECT database::text, owner::text, prepared, gid
    FROM pg_prepared_xacts
    ORDER BY age(transaction) DESC
    LIMIT 1";

pub(crate) async fn horizon_status(
    pool: &PgPool,
    sql: &Queries,
) -> Result<HorizonStatus, sqlx::Error> {
    let row = sqlx::query(AssertSqlSafe(std::sync::Arc::clone(&sql.readiness)))
        .bind(i64::MAX)
        .fetch_one(pool)
        .await?;
    let head: Option<i64> = row.try_get("head")?;
    let horizon: i64 = row.try_get("horizon")?;
    let holder = match sqlx::query(HOLDER_SQL).fetch_optional(pool).await? {
        Some(row) => Some(HorizonHolder {
            pid: row.try_get("pid")?,
            database: row.try_get("datname")?,
            user: row.try_get("usename")?,
            application: row.try_get("application_name")?,
            state: row.try_get("state")?,
            since: row.try_get("xact_start")?,
            query: row.try_get("query")?,
        }),
        None => sqlx::query(PREPARED_SQL)
            .fetch_optional(pool)
            .await?
            .map(|row| -> Result<HorizonHolder, sqlx::Error> {
                Ok(HorizonHolder {
                    pid: None,
                    database: row.try_get("database")?,
                    user: row.try_get("owner")?,
                    application: None,
                    state: Some("prepared".to_owned()),
                    since: row.try_get("prepared")?,
                    query: row.try_get("gid")?,
                })
            })
            .transpose()?,
    };
    Ok(HorizonStatus {
        blocked: head.is_some_and(|h| h >= horizon),
        head: head.map(|h| Position::new(u64::try_from(h).unwrap_or(0))),
        horizon: Position::new(u64::try_from(horizon).unwrap_or(0)),
        holder,
    })
}

/// When the global log was first seen held back by an open transaction, when that was last
/// reported, and the horizon it was stuck at.
#[derive(Debug, Default)]
pub(crate) struct Stall(Mutex<Option<(Instant, Option<Instant>, i64)>>);

impl PgEventStore {
    /// Tracks whether the log is held back and warns, naming the holder, past the threshold.
    /// Returns how long it has been held back at this horizon (zero if it is not).
    pub(crate) async fn note_stall(&self, blocked: bool, horizon: i64) -> Duration {
        let (due, blocked_for) = {
            let mut stall = self
                .inner
                .stall
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Appends in flight keep events beyond the horizon all the time under load; the log
            // is only stalled while the horizon itself does not move.
            if !blocked || stall.is_some_and(|(_, _, seen)| seen != horizon) {
                *stall = None;
            }
            if !blocked {
                return Duration::ZERO;
            }
            let now = Instant::now();
            let (since, last_warned, _) = stall.get_or_insert((now, None, horizon));
            let threshold = self.inner.stall_warning_after;
            let due = now.duration_since(*since) >= threshold
                && last_warned.is_none_or(|at| now.duration_since(at) >= threshold);
            if due {
                *last_warned = Some(now);
            }
            let blocked_for = now.duration_since(*since);
            (due.then_some(blocked_for), blocked_for)
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
        blocked_for
    }
}
