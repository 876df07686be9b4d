//! Dropping a test's schemas once the test has passed.
//!
//! [`drop_when_passed`] hands a schema to a guard owned by a task on the test's tokio runtime. A
//! `#[tokio::test]` drops its runtime as the test function ends, whether the test passed or
//! panicked, and every task with it, so the guard runs before the test's result is reported. It
//! drops the schema if the test passed; if it failed, it keeps the schema for debugging and
//! prints its name (shown with the failed test's output). `ESFRAME_KEEP_TEST_SCHEMAS=1` keeps
//! them all.
//!
//! Whether the test failed: a test fails by a panic on its own thread (an assertion, an
//! `unwrap`, a task's panic raised again through its `JoinHandle`) that nothing catches before
//! it leaves the test function. A panic hook keeps the backtrace of the last panic on each thread
//! that made a schema. When the guard runs, the test failed if that panic has no `catch_unwind`
//! between where it happened and the test harness (`__rust_begin_short_backtrace`), so panics
//! that a test provokes and that esframe or tokio catch (a panicking projection handler, say) do
//! not count. A `#[should_panic]` test counts as failed: none of the PostgreSQL tests is one.

use std::{
    backtrace::Backtrace,
    collections::{HashMap, HashSet},
    sync::{Arc, LazyLock, Mutex, MutexGuard, Once, PoisonError},
    thread::{self, ThreadId},
};

use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, postgres::PgConnectOptions};

/// Threads that made a schema: the tests' own threads.
static OWNERS: LazyLock<Mutex<HashSet<ThreadId>>> = LazyLock::new(Default::default);

/// The last panic on each owner thread, and once looked at, whether it left the test.
static PANICS: LazyLock<Mutex<HashMap<ThreadId, LastPanic>>> = LazyLock::new(Default::default);

enum LastPanic {
    Unseen(Backtrace),
    Seen { left_the_test: bool },
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Drops `schema` (made on `pool`'s server) when the current runtime ends, if the test passed.
pub fn drop_when_passed(pool: &PgPool, schema: &str) {
    record_panics();
    let owner = thread::current().id();
    lock(&OWNERS).insert(owner);
    let guard = Guard {
        schema: schema.to_owned(),
        options: pool.connect_options(),
        owner,
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            });
        }
        Err(_) => {
            eprintln!("no tokio runtime to end with the test: schema {schema} is left behind");
            std::mem::forget(guard);
        }
    }
}

fn record_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let me = thread::current().id();
            if lock(&OWNERS).contains(&me) {
                let trace = LastPanic::Unseen(Backtrace::force_capture());
                lock(&PANICS).insert(me, trace);
            }
            previous(info);
        }));
    });
}

/// Whether the last panic on `owner` (if any) left the test function uncaught.
fn failed(owner: ThreadId) -> bool {
    let mut panics = lock(&PANICS);
    let Some(last) = panics.get_mut(&owner) else {
        return false;
    };
    if let LastPanic::Unseen(trace) = last {
        let trace = trace.to_string();
        let inside_the_test = trace
            .split("__rust_begin_short_backtrace")
            .next()
            .unwrap_or_default();
        let caught =
            inside_the_test.contains("catch_unwind") || inside_the_test.contains("panicking::try");
        *last = LastPanic::Seen {
            left_the_test: !caught,
        };
    }
    matches!(
        last,
        LastPanic::Seen {
            left_the_test: true
        }
    )
}

struct Guard {
    schema: String,
    options: Arc<PgConnectOptions>,
    owner: ThreadId,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let schema = &self.schema;
        if failed(self.owner) {
            eprintln!(
                "the test failed: its schema {schema} is kept for debugging \
                 (DROP SCHEMA \"{schema}\" CASCADE removes it)"
            );
            return;
        }
        if std::env::var_os("ESFRAME_KEEP_TEST_SCHEMAS").is_some_and(|v| v == "1") {
            eprintln!("ESFRAME_KEEP_TEST_SCHEMAS=1: schema {schema} is kept");
            return;
        }
        // The runtime is shutting down around this guard: run the statements on a thread and a
        // runtime of their own, and wait, so that the schema is gone before the test ends.
        let (options, name) = (Arc::clone(&self.options), schema.clone());
        let dropped = thread::spawn(move || drop_schema(&options, &name))
            .join()
            .unwrap_or_else(|_| Err("the thread dropping it panicked".to_owned()));
        if let Err(err) = dropped {
            eprintln!("could not drop the test schema {schema}: {err}");
        }
    }
}

fn drop_schema(options: &PgConnectOptions, schema: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| err.to_string())?;
    runtime.block_on(async {
        let mut conn = PgConnection::connect_with(options)
            .await
            .map_err(|err| err.to_string())?;
        sqlx::raw_sql("SET lock_timeout = '2s'")
            .execute(&mut conn)
            .await
            .map_err(|err| err.to_string())?;
        let drop = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
        let mut last_error = String::new();
        for _ in 0..5 {
            match sqlx::raw_sql(AssertSqlSafe(drop.as_str()))
                .execute(&mut conn)
                .await
            {
                Ok(_) => return Ok(()),
                // Lock timeout or deadlock: connections of the finished test, whose tasks are
                // dropped with its runtime, still hold locks in the schema. End them; nothing
                // else uses a test's schema.
                Err(sqlx::Error::Database(err))
                    if matches!(err.code().as_deref(), Some("55P03" | "40P01")) =>
                {
                    last_error = err.to_string();
                    sqlx::query(
                        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l \
                         JOIN pg_class c ON c.oid = l.relation \
                         WHERE c.relnamespace = $1::text::regnamespace \
                           AND l.pid <> pg_backend_pid()",
                    )
                    .bind(schema)
                    .execute(&mut conn)
                    .await
                    .map_err(|err| err.to_string())?;
                }
                Err(err) => return Err(err.to_string()),
            }
        }
        Err(last_error)
    })
}
