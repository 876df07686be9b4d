//! Test support: the real broker at `AMQP_URL`, a fresh PostgreSQL schema per test at
//! `DATABASE_URL`, and a handler that records what it applies; a private RabbitMQ node for the
//! tests that stop the broker ([`private_broker`]).

#![allow(dead_code, unreachable_pub)]

pub mod child;
pub mod private_broker;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use esframe_amqp::{
    Topology,
    lapin::{Channel, Connection, options::BasicGetOptions},
};
use esframe_core::{
    EventMetadata, NewEvent, StreamId, projection::HandlerError, publish::Backoff,
    publish::IncomingEvent,
};
use esframe_postgres::{InboxHandler, PgEventStore, PgTransaction};
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

/// The broker the tests use; this default fits the local RabbitMQ.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| esframe_amqp::LOCAL_URI.to_owned())
}

/// The database the tests use; this default fits the local server.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Waits short: tests should not sit in a backoff.
pub fn quick() -> Backoff {
    Backoff {
        min: Duration::from_millis(10),
        max: Duration::from_millis(200),
    }
}

/// A pool on the test database; fails the test with a clear message if PostgreSQL is down.
/// The first call in a process also drops this crate's test schemas more than an hour old,
/// left by runs that died.
pub async fn pool(max_connections: u32) -> PgPool {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    let pool = connect_pool(max_connections).await;
    let mut first = false;
    SWEPT.call_once(|| first = true);
    if first {
        drop_old_schemas(&pool).await;
    }
    pool
}

async fn drop_old_schemas(pool: &PgPool) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 't\\_amqp\\_%'",
    )
    .fetch_all(pool)
    .await
    .expect("list test schemas");
    for name in names {
        // t_amqp_<label>_<secs>_<pid>_<hex>: the creation time is the third field from the end.
        let created = name.rsplit('_').nth(2).and_then(|s| s.parse::<u64>().ok());
        if created.is_some_and(|secs| now.saturating_sub(secs) > 3600) {
            drop_schema(pool, &name).await;
        }
    }
}

async fn connect_pool(max_connections: u32) -> PgPool {
    let url = database_url();
    PgEventStore::pool_options()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&url)
        .await
        .unwrap_or_else(|err| {
            panic!(
                "cannot reach PostgreSQL at {url} ({err}). The esframe-amqp tests need a running \
                 server: start it (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) \
                 or point DATABASE_URL at one."
            )
        })
}

/// A unique schema name for one test: `t_<label>_<unix seconds>_<pid>_<uuid>`.
pub fn schema_name(label: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(20)
        .collect();
    format!(
        "t_amqp_{label}_{now}_{}_{}",
        std::process::id(),
        &Uuid::now_v7().simple().to_string()[20..]
    )
}

/// Drops `schema` and everything in it.
pub async fn drop_schema(pool: &PgPool, schema: &str) {
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(pool)
    .await
    .expect("drop the test schema");
}

/// The producer's store, in a fresh schema of its own (`store.schema()`).
pub async fn store(pool: &PgPool, label: &str) -> PgEventStore {
    PgEventStore::builder(pool.clone())
        .schema(schema_name(label))
        .expect("valid schema name")
        .poll_interval(Duration::from_millis(100))
        .build()
        .await
        .expect("open the store")
}

/// A store on `schema`, which another process (a test's parent) created: for a child process.
pub async fn open_store(schema: &str) -> PgEventStore {
    PgEventStore::builder(connect_pool(10).await)
        .schema(schema)
        .expect("valid schema name")
        .poll_interval(Duration::from_millis(100))
        .build()
        .await
        .expect("open the store")
}

/// Every event in `store`'s log once `count` are readable. The global log shows an event only
/// once every transaction older than its own has ended (anywhere on the server), so a read
/// right after an append may not see it yet.
pub async fn read_log(store: &PgEventStore, count: usize) -> Vec<esframe_core::RecordedEvent> {
    use esframe_core::GlobalLog;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = store
            .read_all(esframe_core::Position::START, usize::MAX)
            .await
            .expect("read the log");
        if events.len() >= count {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} events readable in the log after 30 s",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An event of type `Deposited` whose payload carries `n`, with a correlation id.
pub fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Deposited".into(),
        schema_version: 1,
        payload: serde_json::json!({ "n": n }),
        metadata: EventMetadata {
            correlation_id: Some(Uuid::now_v7()),
            ..EventMetadata::default()
        },
    }
}

/// An account stream.
pub fn sid(id: &str) -> StreamId {
    StreamId::new("account", id).expect("valid test stream id")
}

/// The test's own exchange and queue, `esft.<uuid>`, on the broker, with an admin connection
/// (named `esft.<uuid>.admin`) to look at them. They expire when unused for ten minutes, should a
/// test die before [`Broker::finish`] deletes them.
pub struct Broker {
    /// `esft.<uuid>`: the exchange, the queue, and the prefix of every connection name.
    pub name: String,
    pub topology: Topology,
    pub connection: Connection,
    pub channel: Channel,
}

impl Broker {
    /// Connects (failing the test with a clear message if the broker is down) and declares
    /// the exchange and the queue, bound with `#`.
    pub async fn new() -> Self {
        Self::with_topology(|t| t).await
    }

    /// As [`Broker::new`], with changes to the topology.
    pub async fn with_topology(change: impl FnOnce(Topology) -> Topology) -> Self {
        let name = format!("esft.{}", Uuid::now_v7());
        let topology = change(
            Topology::new(&name, &name)
                .transient()
                .expires(Duration::from_secs(600)),
        );
        let url = amqp_url();
        let connection = esframe_amqp::connect(&url, &format!("{name}.admin"))
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "cannot reach RabbitMQ at {url} ({err}). The esframe-amqp tests need a \
                     running broker: start it (`rabbitmq-server -detached`) or point AMQP_URL at \
                     one (amqp://user:password@host:port/vhost)."
                )
            });
        let channel = connection.create_channel().await.expect("open a channel");
        topology
            .declare(&channel)
            .await
            .expect("declare the topology");
        Self {
            name,
            topology,
            connection,
            channel,
        }
    }

    /// A connection name of this test's: `esft.<uuid>.<role>`.
    pub fn connection_name(&self, role: &str) -> String {
        format!("{}.{role}", self.name)
    }

    /// Another queue on the exchange, bound with `#`: a tap that keeps a copy of every message.
    pub async fn tap(&self, suffix: &str) -> String {
        let queue = format!("{}.{suffix}", self.name);
        self.topology
            .declare_queue(&self.channel, &queue, "#")
            .await
            .expect("declare the tap queue");
        queue
    }

    /// Takes every message from `queue` (acknowledged on the way).
    pub async fn drain(&self, queue: &str) -> Vec<esframe_amqp::lapin::message::Delivery> {
        let mut messages = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            messages.push(message.delivery);
        }
        messages
    }

    /// Deletes the queues (`extra` too) and the exchanges, and closes the admin connection.
    pub async fn finish(self, extra: &[String]) {
        for queue in extra {
            let _ = self
                .channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
        self.topology
            .delete(&self.channel)
            .await
            .expect("delete the topology");
        let _ = self.connection.close(200, "test done".into()).await;
    }

    /// Closes, on the broker's side (`rabbitmqctl close_connection`), this test's connections of
    /// the given roles (named `esft.<uuid>.<role>`): as a broker restart or a network failure
    /// would, for this test's clients alone. `rabbitmqctl close_all_connections` would close
    /// every client of the shared broker, other tests' included; the broker itself keeps
    /// running either way. Returns how many it closed.
    pub async fn kill_connections(&self, roles: &[&str]) -> usize {
        let names: Vec<String> = roles.iter().map(|r| self.connection_name(r)).collect();
        // One line per connection: the pid (`<rabbit@host.N.N.N>`), a tab, the client
        // properties as an Erlang term, where the name shows as `<<"esft.<uuid>.<role>">>`.
        let listed = tokio::process::Command::new("rabbitmqctl")
            .args([
                "list_connections",
                "pid",
                "client_properties",
                "-q",
                "--no-table-headers",
            ])
            .output()
            .await
            .expect("run rabbitmqctl (it must be on PATH)");
        assert!(
            listed.status.success(),
            "rabbitmqctl list_connections failed: {}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
        let mut closed = 0;
        for line in listed.lines() {
            let Some((pid, properties)) = line.split_once('\t') else {
                continue;
            };
            if !names
                .iter()
                .any(|name| properties.contains(&format!("\"{name}\"")))
            {
                continue;
            }
            let status = tokio::process::Command::new("rabbitmqctl")
                .args(["close_connection", pid.trim(), "test", "-q"])
                .status()
                .await
                .expect("run rabbitmqctl");
            if status.success() {
                closed += 1;
            }
        }
        assert!(
            closed > 0,
            "none of the connections {names:?} was found to close among:\n{listed}"
        );
        closed
    }
}

/// Waits until `done` holds, failing with `what` (and the state `describe` gives) after
/// `limit`.
pub async fn wait_for<F, D>(limit: Duration, what: &str, mut done: F, describe: D)
where
    F: AsyncFnMut() -> bool,
    D: Fn() -> String,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}: {}",
            describe()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A consumer's effect, in the consumer's own table `applied (stream, version, n)`: one row per
/// event, written in the inbox's transaction. It checks the order itself: a version must follow
/// the last one it wrote for the stream (a miss is counted in `out_of_order` and fails). It
/// fails on purpose for the message `poison`, and, for any event, on data that is not JSON
/// with a number `n`.
#[derive(Clone)]
pub struct Recorder {
    pub table: String,
    pub poison: Option<Uuid>,
    pub out_of_order: Arc<AtomicU64>,
    pub calls: Arc<Mutex<HashMap<Uuid, u32>>>,
    pub runs: Arc<AtomicU32>,
}

impl Recorder {
    /// Creates the table `"{schema}".applied`.
    pub async fn create(pool: &PgPool, schema: &str) -> Self {
        let table = format!("\"{schema}\".applied");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE {table} (stream TEXT NOT NULL, version BIGINT NOT NULL, n BIGINT NOT NULL)"
        )))
        .execute(pool)
        .await
        .expect("create the consumer's table");
        Self {
            table,
            poison: None,
            out_of_order: Arc::default(),
            calls: Arc::default(),
            runs: Arc::default(),
        }
    }

    /// How often the handler ran for `message_id`.
    pub fn calls(&self, message_id: Uuid) -> u32 {
        self.calls
            .lock()
            .unwrap()
            .get(&message_id)
            .copied()
            .unwrap_or(0)
    }

    /// Rows written.
    pub async fn count(&self, pool: &PgPool) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            self.table
        )))
        .fetch_one(pool)
        .await
        .expect("count the consumer's rows")
    }

    /// Per stream: (rows, sum of n, highest version).
    pub async fn per_stream(&self, pool: &PgPool) -> HashMap<String, (i64, i64, i64)> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT stream, count(*), sum(n)::BIGINT, max(version) FROM {} GROUP BY stream",
            self.table
        )))
        .fetch_all(pool)
        .await
        .expect("sum the consumer's rows");
        rows.into_iter()
            .map(|(stream, count, sum, max)| (stream, (count, sum, max)))
            .collect()
    }
}

impl InboxHandler for Recorder {
    async fn handle(
        &self,
        tx: &mut PgTransaction,
        event: &IncomingEvent,
    ) -> Result<(), HandlerError> {
        self.runs.fetch_add(1, Ordering::Relaxed);
        *self
            .calls
            .lock()
            .unwrap()
            .entry(event.message_id)
            .or_default() += 1;
        if self.poison == Some(event.message_id) {
            return Err(format!("poison: refusing message {}", event.message_id).into());
        }
        let data: serde_json::Value = serde_json::from_str(&event.cloud_event.data)?;
        let n = data["n"].as_i64().ok_or("the data has no number `n`")?;
        let stream = event.stream_id.to_string();
        let version = i64::try_from(event.stream_version)?;
        let last: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT max(version) FROM {} WHERE stream = $1",
            self.table
        )))
        .bind(&stream)
        .fetch_one(tx.as_mut())
        .await?;
        if last.unwrap_or(0) + 1 != version {
            self.out_of_order.fetch_add(1, Ordering::Relaxed);
            return Err(format!("{stream}: version {version} after {}", last.unwrap_or(0)).into());
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (stream, version, n) VALUES ($1, $2, $3)",
            self.table
        )))
        .bind(&stream)
        .bind(version)
        .bind(n)
        .execute(tx.as_mut())
        .await?;
        Ok(())
    }
}
