//! Test support: the NATS server at `NATS_URL` with a JetStream stream of its own per test, a
//! fresh PostgreSQL schema per test in the database at `DATABASE_URL`, and a private
//! `nats-server` for the tests that kill one.

#![allow(dead_code, unreachable_pub)]

pub mod child;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream::{self, stream::Stream};
use esframe_core::{EventMetadata, GlobalLog, NewEvent, Position, RecordedEvent, StreamId};
use esframe_nats::{StreamSpec, ensure_stream, headers};
use esframe_postgres::PgEventStore;
use futures_util::StreamExt;
use sqlx::PgPool;
use uuid::Uuid;

// ---- NATS ----------------------------------------------------------------------------------

/// The server the tests use; this default fits the local server.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A client of the test server; fails the test with a clear message if NATS is down.
pub async fn nats() -> async_nats::Client {
    let url = nats_url();
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(&url),
    )
    .await;
    match connected {
        Ok(Ok(client)) => client,
        Ok(Err(err)) => panic!("{}", unreachable_nats(&url, &err.to_string())),
        Err(_) => panic!("{}", unreachable_nats(&url, "timed out")),
    }
}

fn unreachable_nats(url: &str, err: &str) -> String {
    format!(
        "cannot reach NATS at {url} ({err}). The esframe-nats tests need a running nats-server with \
         JetStream: start one (`nats-server -js`) or point NATS_URL at one."
    )
}

/// A JetStream stream of one test's own: `ESF_T_<uuid>` for the subjects `esft.<uuid>.>`.
#[derive(Debug, Clone)]
pub struct TestStream {
    pub context: jetstream::Context,
    pub name: String,
    pub prefix: String,
}

impl TestStream {
    /// Creates it with `duplicate_window` (JetStream's default 2 minutes if `None`).
    pub async fn create(context: &jetstream::Context, duplicate_window: Option<Duration>) -> Self {
        drop_old_test_streams(context).await;
        let id = Uuid::now_v7().simple().to_string();
        let name = format!("ESF_T_{id}");
        let prefix = format!("esft.{id}");
        let mut spec = StreamSpec::new(&name, &prefix);
        if let Some(window) = duplicate_window {
            spec = spec.duplicate_window(window);
        }
        ensure_stream(context, &spec)
            .await
            .unwrap_or_else(|err| panic!("create the test stream: {err}"));
        Self {
            context: context.clone(),
            name,
            prefix,
        }
    }

    pub async fn stream(&self) -> Stream {
        self.context
            .get_stream(&self.name)
            .await
            .expect("the test stream")
    }

    /// How many messages the stream holds.
    pub async fn count(&self) -> u64 {
        self.stream()
            .await
            .info()
            .await
            .expect("stream info")
            .state
            .messages
    }

    /// Every message of the stream, in stream order.
    pub async fn messages(&self) -> Vec<RawMessage> {
        let stream = self.stream().await;
        let last = stream.cached_info().state.last_sequence;
        let mut all = Vec::new();
        for sequence in 1..=last {
            let message = stream
                .get_raw_message(sequence)
                .await
                .unwrap_or_else(|err| panic!("message {sequence}: {err}"));
            let mut raw_headers = HashMap::new();
            for (name, values) in message.headers.iter() {
                let value = values
                    .iter()
                    .map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(",");
                raw_headers.insert(name.to_string(), value);
            }
            all.push(RawMessage {
                sequence,
                subject: message.subject.to_string(),
                decoded: headers::incoming(Some(&message.headers))
                    .into_iter()
                    .collect(),
                raw_headers,
                body: String::from_utf8(message.payload.to_vec()).expect("a UTF-8 body"),
            });
        }
        all
    }

    pub async fn delete(self) {
        self.context
            .delete_stream(&self.name)
            .await
            .expect("delete the test stream");
    }
}

/// A message as JetStream stored it.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub sequence: u64,
    pub subject: String,
    /// Header names as sent, values as sent.
    pub raw_headers: HashMap<String, String>,
    /// Lowercase names, percent-decoded values.
    pub decoded: HashMap<String, String>,
    pub body: String,
}

impl RawMessage {
    pub fn header(&self, name: &str) -> &str {
        self.decoded
            .get(name)
            .unwrap_or_else(|| panic!("no header {name} in {:?}", self.raw_headers))
    }

    pub fn stream_and_version(&self) -> (String, u64) {
        (
            self.header("esframe-stream").to_owned(),
            self.header("esframe-stream-version")
                .parse()
                .expect("a version"),
        )
    }
}

/// Deletes `ESF_T_` streams more than an hour old, left by runs that failed.
async fn drop_old_test_streams(context: &jetstream::Context) {
    static ONCE: AtomicU32 = AtomicU32::new(0);
    if ONCE.fetch_add(1, Ordering::Relaxed) != 0 {
        return;
    }
    let now = unix_now() as i64;
    let mut streams = context.streams();
    let mut old = Vec::new();
    while let Some(Ok(info)) = streams.next().await {
        if info.config.name.starts_with("ESF_T_") && now - info.created.unix_timestamp() > 3600 {
            old.push(info.config.name.clone());
        }
    }
    for name in old {
        let _ = context.delete_stream(&name).await;
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A `nats-server` of the test's own, with JetStream, on a free port and a temporary store
/// directory, so that it can be killed and started again.
#[derive(Debug)]
pub struct PrivateServer {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<tokio::process::Child>,
}

impl PrivateServer {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("its address")
            .port();
        let dir = std::env::temp_dir().join(format!("esframe-nats-test-{}", Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("create the store directory");
        let mut server = Self {
            port,
            dir,
            child: None,
        };
        server.run().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("the server's log");
        let child = tokio::process::Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.dir)
            .stdout(log.try_clone().expect("the log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start nats-server (is it on PATH?)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the private nats-server did not start; see {}",
                self.dir.join("server.log").display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("SIGKILL the server");
            let _ = child.wait().await;
        }
    }

    /// Starts it again on the same port and directory.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.run().await;
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- PostgreSQL ----------------------------------------------------------------------------

/// The database the tests use; `.ci/run` exports it, and this default fits the local server.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A pool on the test database; fails the test with a clear message if PostgreSQL is down.
pub async fn pool(max_connections: u32) -> PgPool {
    let url = database_url();
    PgEventStore::pool_options()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&url)
        .await
        .unwrap_or_else(|err| {
            panic!(
                "cannot reach PostgreSQL at {url} ({err}). The esframe-nats tests need a running \
                 server: start it (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) \
                 or point DATABASE_URL at one."
            )
        })
}

/// A unique schema name for one test: `t_<label>_<unix seconds>_<pid>_<n>`. The first call in a
/// process also drops test schemas more than an hour old, left by earlier runs.
pub async fn fresh_schema(pool: &PgPool, label: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let now = unix_now();
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
    format!("t_{label}_{now}_{}_{n}", std::process::id())
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
            drop_schema(pool, &name).await;
        }
    }
}

pub async fn drop_schema(pool: &PgPool, schema: &str) {
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(pool)
    .await;
}

/// A store in its own fresh schema, and the schema's name.
pub async fn store(label: &str) -> (PgEventStore, String) {
    let pool = pool(20).await;
    let schema = fresh_schema(&pool, label).await;
    let store = PgEventStore::builder(pool)
        .schema(schema.clone())
        .expect("valid schema name")
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("open the store");
    (store, schema)
}

/// A store on `schema`, which another process (a test's parent) created: for a child process.
pub async fn open_store(schema: &str) -> PgEventStore {
    PgEventStore::builder(pool(10).await)
        .schema(schema)
        .expect("valid schema name")
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("open the store")
}

pub async fn all_events(store: &PgEventStore) -> Vec<RecordedEvent> {
    store
        .read_all(Position::START, usize::MAX)
        .await
        .expect("read the log")
}

/// The whole log once `count` events are readable: the never-skip log holds back events while
/// an older transaction anywhere in the cluster (another test's) is still open.
pub async fn settled_events(store: &PgEventStore, count: usize) -> Vec<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = all_events(store).await;
        if events.len() >= count {
            assert_eq!(events.len(), count, "no more events than appended");
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} events readable",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Each esframe stream's versions in stream order must be 1, 2, 3, ...: one message per event,
/// in order, nothing missing.
pub fn assert_exactly_once_in_order(messages: &[RawMessage], events: &[RecordedEvent]) {
    let ids: HashSet<&str> = messages.iter().map(|m| m.header("nats-msg-id")).collect();
    assert_eq!(ids.len(), messages.len(), "no message id is stored twice");
    assert_eq!(messages.len(), events.len(), "one message per event");
    let expected: HashSet<String> = events.iter().map(|e| e.event_id.to_string()).collect();
    let got: HashSet<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(got, expected, "the messages are the events");
    let mut per_stream: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for m in messages {
        let (stream, version) = m.stream_and_version();
        per_stream.entry(stream).or_default().push(version);
    }
    let mut stored: BTreeMap<String, u64> = BTreeMap::new();
    for e in events {
        *stored.entry(e.stream_id.to_string()).or_default() += 1;
    }
    for (stream, versions) in &per_stream {
        let expected: Vec<u64> = (1..=stored[stream]).collect();
        assert_eq!(
            versions, &expected,
            "{stream}: every version once, in order"
        );
    }
    assert_eq!(per_stream.len(), stored.len(), "every stream arrived");
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
pub fn sid(s: &str) -> StreamId {
    StreamId::new("account", s).expect("valid test stream id")
}

/// Polls `done` every 10 ms until it holds, failing after `within` with `what`.
pub async fn eventually<F, Fut>(within: Duration, what: impl Fn() -> String, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {}",
            what()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
