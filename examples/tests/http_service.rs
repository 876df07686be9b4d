//! The HTTP service over real HTTP: the server on an ephemeral port, a real HTTP client, every
//! scenario on the in-memory store and on PostgreSQL (a fresh schema per test, dropped once the
//! test passes).
//!
//! PostgreSQL is the one at `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! the PostgreSQL tests fail, with a message saying so, if it cannot be reached.

use std::{
    io::Write,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use axum::{
    body::Bytes,
    http::{HeaderMap, Method, Request, StatusCode, header},
};
use esframe_core::{
    EventStore, GlobalLog,
    projection::{ProjectionStore, TypedProjection},
};
use esframe_examples::{
    bank_account::BalanceQuery,
    http_service::{Backend, DEFAULT_READ_TIMEOUT, HttpService},
};
use esframe_postgres::PgEventStore;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use uuid::Uuid;

type ServeResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A running service, a client for it, and the store it writes to.
struct TestApp<S> {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    store: S,
    stop: oneshot::Sender<()>,
    server: JoinHandle<ServeResult>,
    /// The PostgreSQL schema the test created, dropped by [`TestApp::stop`].
    schema: Option<(PgPool, String)>,
}

/// An answer: status, headers, and the body as JSON (`null` if empty).
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The error body's `code`, checking the body has an `error` message too.
    fn code(&self) -> &str {
        assert!(
            self.body["error"].as_str().is_some_and(|m| !m.is_empty()),
            "an error body has a message: {self:?}"
        );
        self.body["code"].as_str().unwrap_or_default()
    }
}

impl TestApp<esframe_memory::MemoryStore> {
    async fn memory() -> Self {
        Self::memory_with(DEFAULT_READ_TIMEOUT).await
    }

    async fn memory_with(read_timeout: Duration) -> Self {
        let backend = Backend::memory();
        start(backend, read_timeout, None).await
    }
}

impl TestApp<PgEventStore> {
    /// The service on PostgreSQL, in a fresh schema `t_http_<label>_<secs>_<pid>_<n>` (the
    /// naming the esframe-postgres tests use, so one left by a failed test is dropped by them
    /// after an hour).
    async fn postgres(label: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let pool = PgEventStore::pool_options()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "cannot reach PostgreSQL at {url} ({err}). These tests need a running server: \
                     start it (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) \
                     or point DATABASE_URL at one."
                )
            });
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let label: String = label.chars().take(24).collect();
        let schema = format!("t_http_{label}_{secs}_{}_{n}", std::process::id());
        let backend = Backend::postgres(pool.clone(), &schema)
            .await
            .expect("the service's tables in a fresh schema");
        start(backend, DEFAULT_READ_TIMEOUT, Some((pool, schema))).await
    }
}

/// Starts the service on `backend` at `127.0.0.1:0` and serves it on a task of its own.
async fn start<S, C, B>(
    backend: Backend<S, C, B>,
    read_timeout: Duration,
    schema: Option<(PgPool, String)>,
) -> TestApp<S>
where
    S: GlobalLog,
    C: ProjectionStore,
    B: TypedProjection<C::Tx> + BalanceQuery + Clone,
{
    captured_log();
    let store = backend.store.clone();
    let service = HttpService::start(backend, read_timeout).expect("the service starts");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel();
    let server = tokio::spawn(service.serve(listener, async {
        let _ = stopped.await;
    }));
    TestApp {
        base,
        client: Client::builder(TokioExecutor::new()).build_http(),
        store,
        stop,
        server,
        schema,
    }
}

impl<S: EventStore> TestApp<S> {
    /// Sends a request with `headers` and a raw `body` (sent as JSON when given).
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = Full::new(Bytes::from(body.unwrap_or_default().to_owned()));
        let response = self
            .client
            .request(request.body(body).unwrap())
            .await
            .unwrap_or_else(|err| panic!("{path}: {err}"));
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                panic!(
                    "{path}: not JSON ({err}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.post_with(path, &[], body).await
    }

    async fn post_with(&self, path: &str, headers: &[(&str, &str)], body: Value) -> Reply {
        self.send(Method::POST, path, headers, Some(&body.to_string()))
            .await
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], None).await
    }

    /// Opens an account for `owner`; its id.
    async fn open(&self, owner: &str) -> String {
        let reply = self.post("/accounts", json!({ "owner": owner })).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        reply.body["id"].as_str().unwrap().to_owned()
    }

    /// The account as the read model shows it once it has seen the write `written`.
    async fn read_after(&self, id: &str, written: &Reply) -> Reply {
        let position = written.body["position"]
            .as_u64()
            .expect("a write's position");
        self.get(&format!("/accounts/{id}?min_position={position}"))
            .await
    }

    /// Stops the server (and its projection), then drops the test's schema.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.server
            .await
            .unwrap()
            .expect("the server and its projection stop cleanly");
        if let Some((pool, schema)) = self.schema {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA \"{schema}\" CASCADE"
            )))
            .execute(&pool)
            .await
            .expect("drop the test's schema");
        }
    }
}

/// The correlation ids stored on an account's events, oldest first: the one place these tests
/// touch stream ids and recorded events.
async fn stored_correlation_ids(store: &impl EventStore, account: &str) -> Vec<Option<Uuid>> {
    let stream = esframe_core::StreamId::new("account", account).unwrap();
    let events = store.read_stream(&stream, 1).await.unwrap();
    events.iter().map(|e| e.metadata.correlation_id).collect()
}

/// What the service has logged, in every test of this binary (one global subscriber).
fn captured_log() -> String {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let log = LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || LogSink(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        log
    });
    let bytes = log.lock().unwrap_or_else(PoisonError::into_inner);
    String::from_utf8_lossy(&bytes).into_owned()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        log.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Each scenario once on the in-memory store (`memory::name`) and once on PostgreSQL
/// (`postgres::name`).
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let app = super::TestApp::memory().await;
                    super::$scenario(&app).await;
                    app.stop().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let app = super::TestApp::postgres(stringify!($scenario)).await;
                    super::$scenario(&app).await;
                    app.stop().await;
                }
            )*
        }
    };
}

on_both_stores!(
    open_deposit_withdraw_and_read_the_balance,
    a_read_after_a_write_sees_it,
    the_correlation_id_reaches_the_events_the_log_and_the_answer,
    bad_input_is_400,
    unknown_accounts_are_404,
    refusals_by_the_rules_are_422,
    conflicts_are_409,
    of_concurrent_writes_expecting_one_version_exactly_one_wins,
);

async fn open_deposit_withdraw_and_read_the_balance<S: EventStore>(app: &TestApp<S>) {
    let opened = app.post("/accounts", json!({ "owner": "Ada" })).await;
    assert_eq!(opened.status, StatusCode::CREATED, "{opened:?}");
    let id = opened.body["id"].as_str().unwrap().to_owned();
    assert_eq!(opened.header("location"), Some(&*format!("/accounts/{id}")));
    assert_eq!(opened.body["version"], 1);
    assert!(opened.body["position"].as_u64().unwrap() > 0, "{opened:?}");

    let deposited = app
        .post(
            &format!("/accounts/{id}/deposits"),
            json!({ "amount": 10_000 }),
        )
        .await;
    assert_eq!(deposited.status, StatusCode::OK, "{deposited:?}");
    assert_eq!(deposited.body["id"], id.as_str());
    assert_eq!(deposited.body["version"], 2);
    let withdrawn = app
        .post(
            &format!("/accounts/{id}/withdrawals"),
            json!({ "amount": 2_500 }),
        )
        .await;
    assert_eq!(withdrawn.status, StatusCode::OK, "{withdrawn:?}");
    assert_eq!(withdrawn.body["version"], 3);
    assert!(
        withdrawn.body["position"].as_u64() > deposited.body["position"].as_u64(),
        "positions grow: {deposited:?} {withdrawn:?}"
    );

    let read = app.read_after(&id, &withdrawn).await;
    assert_eq!(read.status, StatusCode::OK, "{read:?}");
    assert_eq!(
        read.body,
        json!({ "id": id, "owner": "Ada", "balance": 7_500, "deposits": 1, "withdrawals": 1 })
    );

    // A client may name the account.
    let named = format!("acct-{}", Uuid::now_v7());
    let opened = app
        .post("/accounts", json!({ "owner": "Bob", "id": named }))
        .await;
    assert_eq!(opened.status, StatusCode::CREATED, "{opened:?}");
    assert_eq!(opened.body["id"], named.as_str());
    let read = app.read_after(&named, &opened).await;
    assert_eq!(read.body["owner"], "Bob", "{read:?}");
    assert_eq!(read.body["balance"], 0, "{read:?}");
}

async fn a_read_after_a_write_sees_it<S: EventStore>(app: &TestApp<S>) {
    let id = app.open("Ada").await;
    let mut balance = 0;
    for i in 1..=40_u64 {
        let (route, change) = if i % 4 == 0 {
            ("withdrawals", -(i as i64))
        } else {
            ("deposits", 2 * i as i64)
        };
        let written = app
            .post(
                &format!("/accounts/{id}/{route}"),
                json!({ "amount": change.unsigned_abs() }),
            )
            .await;
        assert_eq!(written.status, StatusCode::OK, "{written:?}");
        balance += change;
        // Right after the write, the read model already shows it.
        let read = app.read_after(&id, &written).await;
        assert_eq!(read.status, StatusCode::OK, "{read:?}");
        assert_eq!(read.body["balance"], balance, "after write {i}: {read:?}");
        assert_eq!(read.body["deposits"], i - i / 4, "after write {i}");
        assert_eq!(read.body["withdrawals"], i / 4, "after write {i}");
    }
}

async fn the_correlation_id_reaches_the_events_the_log_and_the_answer<S: EventStore>(
    app: &TestApp<S>,
) {
    let correlation = Uuid::now_v7().to_string();
    let with_id = [("x-correlation-id", correlation.as_str())];
    let opened = app
        .post_with("/accounts", &with_id, json!({ "owner": "Ada" }))
        .await;
    assert_eq!(opened.status, StatusCode::CREATED, "{opened:?}");
    assert_eq!(opened.header("x-correlation-id"), Some(&*correlation));
    let id = opened.body["id"].as_str().unwrap().to_owned();
    let deposits = format!("/accounts/{id}/deposits");
    let deposited = app
        .post_with(&deposits, &with_id, json!({ "amount": 5 }))
        .await;
    assert_eq!(deposited.header("x-correlation-id"), Some(&*correlation));

    // Without the header, the service makes an id and answers with it.
    let anonymous = app.post(&deposits, json!({ "amount": 7 })).await;
    assert_eq!(anonymous.status, StatusCode::OK, "{anonymous:?}");
    let generated: Uuid = anonymous
        .header("x-correlation-id")
        .and_then(|v| v.parse().ok())
        .expect("a generated UUID in the answer");
    assert_ne!(generated.to_string(), correlation);

    // Every stored event carries its request's id.
    let correlation_id: Uuid = correlation.parse().unwrap();
    assert_eq!(
        stored_correlation_ids(&app.store, &id).await,
        [Some(correlation_id), Some(correlation_id), Some(generated)]
    );

    // Errors echo it too; an id that is not a UUID is refused.
    let refused = app
        .post_with(
            &format!("/accounts/{id}/withdrawals"),
            &with_id,
            json!({ "amount": 1_000 }),
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused.header("x-correlation-id"), Some(&*correlation));
    let invalid = app
        .post_with(
            &deposits,
            &[("x-correlation-id", "order-42")],
            json!({ "amount": 1 }),
        )
        .await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST, "{invalid:?}");
    assert_eq!(invalid.code(), "invalid_correlation_id");
    assert_eq!(stored_correlation_ids(&app.store, &id).await.len(), 3);

    // The request's span carries the id: its log lines show it.
    let log = captured_log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(&format!("correlation_id={correlation}")))
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("answered status=201"))
            && lines.iter().any(|l| l.contains("answered status=422")),
        "the request span's lines: {lines:#?}"
    );
}

async fn bad_input_is_400<S: EventStore>(app: &TestApp<S>) {
    let id = app.open("Ada").await;
    let deposits = format!("/accounts/{id}/deposits");
    for body in [
        r#"{"amount": "#,
        r#"{"amount": -5}"#,
        r#"{"amount": 1.5}"#,
        r#"{"amount": "5"}"#,
        r#"{"amount": 5, "currency": "USD"}"#,
        r#"{}"#,
        "[]",
    ] {
        let reply = app.send(Method::POST, &deposits, &[], Some(body)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}: {reply:?}");
        assert_eq!(reply.code(), "invalid_body", "{body}");
    }
    let negative = app.post(&deposits, json!({ "amount": -5 })).await;
    assert!(
        negative.body["error"].as_str().unwrap().contains("amount"),
        "the message names the field: {negative:?}"
    );
    let missing_owner = app.post("/accounts", json!({ "id": "x" })).await;
    assert_eq!(missing_owner.status, StatusCode::BAD_REQUEST);

    // An id no account can have: too long, or with a control character.
    let long = "x".repeat(600);
    for path in [
        format!("/accounts/{long}/deposits"),
        "/accounts/a%01b/deposits".to_owned(),
    ] {
        let reply = app.post(&path, json!({ "amount": 5 })).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path}: {reply:?}");
        assert_eq!(reply.code(), "invalid_id", "{path}");
    }
    let read = app.get(&format!("/accounts/{long}")).await;
    assert_eq!(
        (read.status, read.code()),
        (StatusCode::BAD_REQUEST, "invalid_id")
    );
    let opened = app
        .post("/accounts", json!({ "owner": "Eve", "id": long }))
        .await;
    assert_eq!(opened.status, StatusCode::BAD_REQUEST, "{opened:?}");

    // Bad headers and query strings.
    let reply = app
        .post_with(
            &deposits,
            &[("expected-version", "two")],
            json!({ "amount": 5 }),
        )
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::BAD_REQUEST, "invalid_expected_version")
    );
    let reply = app.get(&format!("/accounts/{id}?min_position=soon")).await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::BAD_REQUEST, "invalid_query")
    );
    let reply = app
        .send(
            Method::POST,
            &deposits,
            &[("content-type", "text/plain")],
            None,
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{reply:?}"
    );

    // None of it was stored.
    assert_eq!(stored_correlation_ids(&app.store, &id).await.len(), 1);
}

async fn unknown_accounts_are_404<S: EventStore>(app: &TestApp<S>) {
    let nobody = format!("nobody-{}", Uuid::now_v7());
    let read = app.get(&format!("/accounts/{nobody}")).await;
    assert_eq!(read.status, StatusCode::NOT_FOUND, "{read:?}");
    assert_eq!(read.code(), "account_not_found");
    for route in ["deposits", "withdrawals"] {
        let reply = app
            .post(
                &format!("/accounts/{nobody}/{route}"),
                json!({ "amount": 5 }),
            )
            .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{route}: {reply:?}");
        assert_eq!(reply.code(), "account_not_found");
    }
    assert!(stored_correlation_ids(&app.store, &nobody).await.is_empty());
    let reply = app.get("/nowhere").await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::NOT_FOUND, "no_route")
    );
    let reply = app.get("/accounts").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{reply:?}");
}

async fn refusals_by_the_rules_are_422<S: EventStore>(app: &TestApp<S>) {
    let id = app.open("Ada").await;
    let deposited = app
        .post(
            &format!("/accounts/{id}/deposits"),
            json!({ "amount": 100 }),
        )
        .await;
    assert_eq!(deposited.status, StatusCode::OK);
    let overdraft = app
        .post(
            &format!("/accounts/{id}/withdrawals"),
            json!({ "amount": 101 }),
        )
        .await;
    assert_eq!(
        overdraft.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{overdraft:?}"
    );
    assert_eq!(overdraft.code(), "insufficient_funds");
    assert_eq!(
        (&overdraft.body["balance"], &overdraft.body["requested"]),
        (&json!(100), &json!(101))
    );
    assert!(
        overdraft.body["error"]
            .as_str()
            .unwrap()
            .contains("insufficient funds")
    );
    let zero = app
        .post(&format!("/accounts/{id}/deposits"), json!({ "amount": 0 }))
        .await;
    assert_eq!(
        (zero.status, zero.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "zero_amount")
    );
    // Nothing refused was stored; the read model agrees.
    assert_eq!(stored_correlation_ids(&app.store, &id).await.len(), 2);
    let read = app.read_after(&id, &deposited).await;
    assert_eq!(read.body["balance"], 100);
}

async fn conflicts_are_409<S: EventStore>(app: &TestApp<S>) {
    let id = format!("acct-{}", Uuid::now_v7());
    let open = json!({ "owner": "Ada", "id": id });
    assert_eq!(
        app.post("/accounts", open.clone()).await.status,
        StatusCode::CREATED
    );
    let again = app.post("/accounts", open).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "account_exists")
    );

    let deposits = format!("/accounts/{id}/deposits");
    let at_1 = [("expected-version", "1")];
    let first = app
        .post_with(&deposits, &at_1, json!({ "amount": 10 }))
        .await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(first.body["version"], 2);
    // The client saw version 1, but the account has moved on: refused, not applied twice.
    let stale = app
        .post_with(&deposits, &at_1, json!({ "amount": 10 }))
        .await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "{stale:?}");
    assert_eq!(stale.code(), "version_mismatch");
    assert_eq!(
        (
            &stale.body["expected_version"],
            &stale.body["actual_version"]
        ),
        (&json!(1), &json!(2))
    );
    let withdrawn = app
        .post_with(
            &format!("/accounts/{id}/withdrawals"),
            &[("expected-version", "2")],
            json!({ "amount": 4 }),
        )
        .await;
    assert_eq!(withdrawn.status, StatusCode::OK, "{withdrawn:?}");
    assert_eq!(withdrawn.body["version"], 3);
    assert_eq!(stored_correlation_ids(&app.store, &id).await.len(), 3);
    let read = app.read_after(&id, &withdrawn).await;
    assert_eq!(read.body["balance"], 6);
}

async fn of_concurrent_writes_expecting_one_version_exactly_one_wins<S: EventStore>(
    app: &TestApp<S>,
) {
    let id = app.open("Ada").await;
    let deposits = format!("/accounts/{id}/deposits");
    let replies = futures_util::future::join_all((0..8).map(|_| {
        app.post_with(
            &deposits,
            &[("expected-version", "1")],
            json!({ "amount": 10 }),
        )
    }))
    .await;
    let won: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .collect();
    assert_eq!(won.len(), 1, "{replies:#?}");
    assert_eq!(won[0].body["version"], 2);
    for lost in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_eq!(
            (lost.status, lost.code()),
            (StatusCode::CONFLICT, "version_mismatch"),
            "{lost:?}"
        );
    }
    assert_eq!(stored_correlation_ids(&app.store, &id).await.len(), 2);
    let read = app.read_after(&id, won[0]).await;
    assert_eq!(read.body["balance"], 10);
}

/// A read model that has not caught up within the read timeout is 503, to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_behind_the_requested_position_is_503() {
    let app = TestApp::memory_with(Duration::from_millis(100)).await;
    let id = app.open("Ada").await;
    let reply = app
        .get(&format!("/accounts/{id}?min_position=1000000"))
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(reply.code(), "read_model_behind");
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.body["min_position"], 1_000_000);
    app.stop().await;
}
