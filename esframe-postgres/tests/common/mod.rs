//! Test support: a fresh schema per test in the database named by `DATABASE_URL`, dropped again
//! when the test passes (kept, and named in the test's output, when it fails: see `cleanup`).

#![allow(dead_code, unreachable_pub)]

mod cleanup;
pub mod proxy;

use std::sync::atomic::{AtomicU32, Ordering};

use esframe_core::{NewEvent, StreamId};
use esframe_postgres::PgEventStore;
use sqlx::{Connection, PgConnection, PgPool};

/// The server the tests use; `.ci/run` exports it, and this default fits the local server.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A pool on the test database; fails the test with a clear message if PostgreSQL is down.
pub async fn pool(max_connections: u32) -> PgPool {
    let url = database_url();
    PgEventStore::pool_options()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(30))
        .connect(&url)
        .await
        .unwrap_or_else(|err| {
            panic!(
                "cannot reach PostgreSQL at {url} ({err}). The esframe-postgres tests need a running \
                 server: start it (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) \
                 or point DATABASE_URL at one."
            )
        })
}

/// A unique schema name for one test: `t_<label>_<unix seconds>_<pid>_<n>`, or
/// `t_<tag>_<label>_...` when `ESFRAME_TEST_SCHEMA_TAG` is set (up to 8 letters and digits;
/// `.ci/run` tags its run, to find the schemas it left behind among other runs' in the same
/// database). The schema is dropped when the test's runtime ends, if the test passed (see
/// `cleanup`). The first call in a process also drops test schemas more than an hour old, left by
/// earlier runs.
pub async fn fresh_schema(pool: &PgPool, label: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    if n == 0 {
        drop_old_test_schemas(pool, now).await;
    }
    let label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    let tag: String = std::env::var("ESFRAME_TEST_SCHEMA_TAG")
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(8)
        .collect();
    let tag = if tag.is_empty() { tag } else { tag + "_" };
    let schema = format!("t_{tag}{label}_{now}_{}_{n}", std::process::id());
    cleanup::drop_when_passed(pool, &schema);
    schema
}

async fn drop_old_test_schemas(pool: &PgPool, now: u64) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 't\\_%'")
            .fetch_all(pool)
            .await
            .expect("list test schemas");
    for name in names {
        // t_<label>_<secs>_<pid>_<n>: the creation time is the third field from the end.
        let created = name
            .rsplit('_')
            .nth(2)
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|secs| now.saturating_sub(secs) > 3600) {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
            )))
            .execute(pool)
            .await;
        }
    }
}

/// A store in its own fresh schema.
pub async fn store(label: &str) -> PgEventStore {
    let pool = pool(20).await;
    let schema = fresh_schema(&pool, label).await;
    PgEventStore::builder(pool)
        .schema(schema)
        .expect("valid schema name")
        .poll_interval(std::time::Duration::from_millis(200))
        .build()
        .await
        .expect("open the store")
}

/// An event of type `Happened` whose payload carries `n`.
pub fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "Happened".into(),
        schema_version: 1,
        payload: serde_json::json!({ "n": n }),
        metadata: Default::default(),
    }
}

/// A stream id the test knows is valid.
pub fn sid(s: &str) -> StreamId {
    StreamId::new("account", s).expect("valid test stream id")
}

/// A connection of its own to the test database (for the caller's transactions).
pub async fn connect() -> PgConnection {
    PgConnection::connect(&database_url())
        .await
        .expect("connect to the test database")
}
