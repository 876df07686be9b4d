//! Why the global log is not moving: which transaction holds the read horizon back.

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgPool, Row};

use crate::sql::Queries;

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
    pub head: Option<u64>,
    /// Positions below this are readable.
    pub horizon: u64,
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
        head: head.map(|h| h as u64),
        horizon: horizon.max(0) as u64,
        holder,
    })
}
