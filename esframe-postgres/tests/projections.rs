//! Exactly-once projections on PostgreSQL: the shared projection suite with a read model written
//! through the runner's transaction, and what only PostgreSQL can show: live under concurrent
//! writers with the read model checked in SQL, runners killed and connections aborted
//! mid-batch, commits the database refuses, inline projections.

mod common;

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use esframe_core::{
    EventStore, ExpectedVersion, GlobalLog, NewEvent, Position, RecordedEvent, StreamId,
    projection::{
        CheckpointStore, DeadLetterStore, HandlerError, HandlerRetry, Projection,
        ProjectionContext, ProjectionKey, ProjectionRunner, wait_for_projections,
    },
    testing::projections::{Applied, Recorded, Recorder},
};
use esframe_postgres::{PgCheckpoints, PgEventStore, PgTransaction};
use serde_json::json;
use sqlx::AssertSqlSafe;
use tokio::sync::Notify;
use uuid::Uuid;

/// Stops the handler at its `at`-th event: reports the connection's backend pid, then waits to
/// be released (or for the task to be aborted).
struct Gate {
    at: u64,
    fired: AtomicBool,
    pid: Mutex<Option<i32>>,
    reached: Notify,
    release: Notify,
}

impl Gate {
    fn new(at: u64) -> Arc<Self> {
        Arc::new(Self {
            at,
            fired: AtomicBool::new(false),
            pid: Mutex::new(None),
            reached: Notify::new(),
            release: Notify::new(),
        })
    }
}

/// A ledger read model: one row per applied event (no key, so a repeat would show) and a total
/// per stream.
#[derive(Clone)]
struct Ledger {
    schema: String,
    handled: Arc<AtomicU64>,
    poison: Arc<Mutex<HashSet<Uuid>>>,
    /// Fails on every event with this amount.
    poison_amount: Option<i64>,
    gate: Option<Arc<Gate>>,
}

impl Ledger {
    async fn new(store: &PgEventStore) -> Self {
        let schema = store.schema().to_string();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".ledger_applied (
                 event_id UUID NOT NULL, stream_id TEXT NOT NULL, amount BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS \"{schema}\".ledger_totals (
                 stream_id TEXT PRIMARY KEY, total BIGINT NOT NULL);"
        )))
        .execute(store.pool())
        .await
        .expect("create the read model");
        Self {
            schema,
            handled: Arc::default(),
            poison: Arc::default(),
            poison_amount: None,
            gate: None,
        }
    }
}

impl Projection<PgTransaction> for Ledger {
    fn name(&self) -> &str {
        "ledger"
    }

    async fn handle(
        &self,
        event: &RecordedEvent,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        let n = self.handled.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(gate) = &self.gate
            && n == gate.at
            && !gate.fired.swap(true, Ordering::SeqCst)
        {
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(ctx.tx().as_mut())
                .await?;
            *gate.pid.lock().unwrap() = Some(pid);
            gate.reached.notify_one();
            gate.release.notified().await;
        }
        if self.poison.lock().unwrap().contains(&event.event_id) {
            return Err(format!("poison event {}", event.event_id).into());
        }
        // Events without an amount (an account's opening) count as 0.
        let amount = event.payload["amount"].as_i64().unwrap_or(0);
        if self.poison_amount == Some(amount) {
            return Err(format!("poison amount {amount}").into());
        }
        let schema = &self.schema;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{schema}\".ledger_applied VALUES ($1, $2, $3)"
        )))
        .bind(event.event_id)
        .bind(event.aggregate_id())
        .bind(amount)
        .execute(ctx.tx().as_mut())
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{schema}\".ledger_totals VALUES ($1, $2)
             ON CONFLICT (stream_id) DO UPDATE SET total = ledger_totals.total + excluded.total"
        )))
        .bind(event.aggregate_id())
        .bind(amount)
        .execute(ctx.tx().as_mut())
        .await?;
        Ok(())
    }

    async fn reset(
        &self,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        let schema = &self.schema;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "TRUNCATE \"{schema}\".ledger_applied, \"{schema}\".ledger_totals"
        )))
        .execute(ctx.tx().as_mut())
        .await?;
        Ok(())
    }
}

fn deposit(amount: i64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Deposited".into(),
        schema_version: 1,
        payload: json!({ "amount": amount }),
        metadata: Default::default(),
    }
}

async fn append(store: &PgEventStore, stream: &str, amounts: &[i64]) -> (Vec<Uuid>, Position) {
    let events: Vec<NewEvent> = amounts.iter().map(|&a| deposit(a)).collect();
    let ids = events.iter().map(|e| e.event_id).collect();
    let outcome = store
        .append(
            &StreamId::new("account", stream).unwrap(),
            ExpectedVersion::Any,
            events,
        )
        .await
        .unwrap();
    (ids, *outcome.positions.last().unwrap())
}

/// (rows applied, distinct event ids applied, sum of amounts applied)
async fn applied(store: &PgEventStore) -> (i64, i64, i64) {
    let schema = store.schema();
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(*), count(DISTINCT event_id), coalesce(sum(amount), 0)::bigint
         FROM \"{schema}\".ledger_applied"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap()
}

/// Totals per stream in the read model, and computed from the events table.
async fn totals_match_events(store: &PgEventStore) {
    let schema = store.schema();
    let mismatches: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM (
             SELECT aggregate_id AS stream_id, sum((payload->>'amount')::bigint) AS total
             FROM \"{schema}\".events GROUP BY aggregate_id) e
         FULL JOIN \"{schema}\".ledger_totals t USING (stream_id)
         WHERE e.total IS DISTINCT FROM t.total"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(mismatches, 0, "read-model totals differ from the events");
}

async fn stored_events(store: &PgEventStore) -> i64 {
    let schema = store.schema();
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}\".events"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap()
}

fn ledger_key() -> ProjectionKey {
    ProjectionKey::single("ledger").unwrap()
}

fn checkpoints(store: &PgEventStore) -> PgCheckpoints {
    store.checkpoints().lease_time(Duration::from_millis(600))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_and_a_live_projection_apply_every_event_exactly_once() {
    let store = common::store("proj_live").await;
    let ledger = Ledger::new(&store).await;
    append(&store, "acc-0", &[7, 8]).await; // before the runner: caught up
    let checkpoints = checkpoints(&store);
    let running = ProjectionRunner::new(store.clone(), checkpoints.clone(), ledger.clone())
        .batch_size(50)
        .spawn();

    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut last = Position::START;
                for i in 0..40 {
                    let amounts: Vec<i64> = (0..=(i % 3)).map(|k| i * 10 + k).collect();
                    let (_, position) =
                        append(&store, &format!("acc-{}", (w * 40 + i) % 16), &amounts).await;
                    last = last.max(position);
                }
                last
            })
        })
        .collect();
    let mut last = Position::START;
    for writer in writers {
        last = last.max(writer.await.unwrap());
    }
    wait_for_projections(&checkpoints, &[ledger_key()], last, Duration::from_secs(30))
        .await
        .unwrap();
    running.shutdown().await.unwrap();

    let events = stored_events(&store).await;
    // Each writer appends 1, 2 or 3 events per call (40 calls: 14 + 13 + 13 of each).
    assert_eq!(events, 2 + 8 * (14 + 13 * 2 + 13 * 3));
    let (rows, distinct, _) = applied(&store).await;
    assert_eq!(
        (rows, distinct),
        (events, events),
        "every event applied exactly once"
    );
    totals_match_events(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_in_the_middle_of_a_batch_neither_loses_nor_repeats() {
    let store = common::store("proj_kill").await;
    for i in 0..30 {
        append(&store, &format!("k-{}", i % 4), &[1; 10]).await;
    }
    let mut ledger = Ledger::new(&store).await;
    let gate = Gate::new(150);
    ledger.gate = Some(Arc::clone(&gate));
    let checkpoints = checkpoints(&store);
    let running = ProjectionRunner::new(store.clone(), checkpoints.clone(), ledger.clone())
        .batch_size(100)
        .spawn();
    gate.reached.notified().await;
    running.abort();
    let _ = running.shutdown().await;

    // The first batch committed with its checkpoint; the second was rolled back whole.
    let (rows, distinct, _) = applied(&store).await;
    assert_eq!((rows, distinct), (100, 100));
    let first_batch = store.read_all(Position::START, 100).await.unwrap();
    let checkpoint = checkpoints.load(&ledger_key()).await.unwrap().unwrap();
    assert_eq!(
        checkpoint.position,
        first_batch.last().unwrap().global_position
    );

    let mut restarted = ledger.clone();
    restarted.gate = None;
    ProjectionRunner::new(store.clone(), checkpoints.clone(), restarted)
        .batch_size(100)
        .catch_up()
        .await
        .unwrap();
    let (rows, distinct, sum) = applied(&store).await;
    assert_eq!((rows, distinct, sum), (300, 300, 300));
    totals_match_events(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_aborted_in_the_middle_of_a_batch_neither_loses_nor_repeats() {
    let store = common::store("proj_abort").await;
    for i in 0..20 {
        append(&store, &format!("c-{}", i % 3), &[2; 10]).await;
    }
    let mut ledger = Ledger::new(&store).await;
    let gate = Gate::new(130);
    ledger.gate = Some(Arc::clone(&gate));
    let checkpoints = checkpoints(&store);
    let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), ledger.clone())
        .batch_size(100)
        .retry(HandlerRetry {
            attempts: 5,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(50),
        });
    let catch_up = tokio::spawn(async move { runner.catch_up().await });
    gate.reached.notified().await;
    let pid = gate.pid.lock().unwrap().expect("pid recorded");
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(killed);
    gate.release.notify_one();
    catch_up.await.unwrap().unwrap();

    let (rows, distinct, sum) = applied(&store).await;
    assert_eq!((rows, distinct, sum), (200, 200, 400));
    totals_match_events(&store).await;
    assert!(
        checkpoints
            .dead_letters(&ledger_key())
            .await
            .unwrap()
            .is_empty()
    );
}

/// A store in a fresh schema with the ledger table, and the same store updating the ledger
/// inline.
async fn inline_store(label: &str) -> (PgEventStore, PgEventStore, Ledger) {
    let plain = common::store(label).await;
    let ledger = Ledger::new(&plain).await;
    let inline = PgEventStore::builder(plain.pool().clone())
        .schema(plain.schema().as_str())
        .unwrap()
        .poll_interval(Duration::from_millis(200))
        .inline_projection(ledger.clone())
        .build()
        .await
        .unwrap();
    (plain, inline, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inline_projection_is_updated_in_the_append_transaction() {
    let (plain, store, _ledger) = inline_store("proj_inline").await;
    let (ids, _) = append(&store, "i-1", &[5, 6]).await;
    // Read-your-writes: visible the moment the append returns.
    assert_eq!(applied(&plain).await, (2, 2, 11));

    // Many concurrent writers, some racing on the same streams with `Any`.
    let writers: Vec<_> = (0..12)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    append(&store, &format!("i-{}", (w + i) % 3), &[1, 2]).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let events = stored_events(&plain).await;
    assert_eq!(events, 2 + 12 * 20 * 2);
    assert_eq!(applied(&plain).await, (events, events, 11 + 12 * 20 * 3));
    totals_match_events(&plain).await;

    // An idempotent retry of the first append changes nothing.
    let events_again: Vec<NewEvent> = ids
        .iter()
        .zip([5, 6])
        .map(|(id, amount)| NewEvent {
            event_id: *id,
            ..deposit(amount)
        })
        .collect();
    let outcome = store
        .append(
            &StreamId::new("account", "i-1").unwrap(),
            ExpectedVersion::NoStream,
            events_again,
        )
        .await
        .unwrap();
    assert!(outcome.deduplicated);
    assert_eq!(applied(&plain).await.0, events);
}

#[tokio::test]
async fn a_failing_inline_projection_rolls_the_append_back() {
    let (plain, store, ledger) = inline_store("proj_inline_fail").await;
    append(&store, "f", &[1]).await;
    let poison = deposit(2);
    ledger.poison.lock().unwrap().insert(poison.event_id);
    let err = store
        .append(
            &StreamId::new("account", "f").unwrap(),
            ExpectedVersion::Exact(1),
            vec![deposit(3), poison],
        )
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, esframe_core::StoreError::InlineProjection { projection, .. } if projection == "ledger"),
        "{message}"
    );
    assert!(
        message.contains("nothing was appended") && message.contains("poison"),
        "{message}"
    );
    assert_eq!(
        store
            .stream_version(&StreamId::new("account", "f").unwrap())
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(stored_events(&plain).await, 1);
    assert_eq!(applied(&plain).await, (1, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inline_projection_rebuilt_during_appends_misses_and_repeats_nothing() {
    let (plain, store, ledger) = inline_store("proj_inline_rebuild").await;
    for i in 0..50 {
        append(&store, &format!("b-{}", i % 4), &[1, 1]).await;
    }
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..60 {
                    append(&store, &format!("b-{w}"), &[2]).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = ProjectionRunner::new(plain.clone(), checkpoints(&plain), ledger.clone())
        .batch_size(16)
        .rebuild(Position::START)
        .await
        .unwrap();
    assert!(report.events >= 100, "{report:?}");
    for writer in writers {
        writer.await.unwrap();
    }
    let events = stored_events(&plain).await;
    assert_eq!(events, 100 + 4 * 60);
    assert_eq!(applied(&plain).await, (events, events, 100 + 4 * 60 * 2));
    totals_match_events(&plain).await;
}

#[tokio::test]
async fn a_store_with_inline_projections_refuses_the_callers_transaction() {
    let (plain, store, _ledger) = inline_store("proj_inline_tx").await;
    let mut tx = plain.pool().begin().await.unwrap();
    let err = store
        .append_in(
            &mut tx,
            &StreamId::new("account", "t").unwrap(),
            ExpectedVersion::Any,
            vec![deposit(1)],
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("inline projections (ledger)"),
        "{err}"
    );
    drop(tx);
    assert_eq!(stored_events(&plain).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_refused_by_an_inline_projection_fails_alone_in_a_group_commit() {
    use esframe_core::{CommandError, CommandHandler, ConcurrencyMode, StoreError};
    use esframe_examples::bank_account::{Account, AccountCommand};

    let plain = common::store("proj_inline_group").await;
    let mut ledger = Ledger::new(&plain).await;
    ledger.poison_amount = Some(13);
    let store = PgEventStore::builder(plain.pool().clone())
        .schema(plain.schema().as_str())
        .unwrap()
        .inline_projection(ledger)
        .build()
        .await
        .unwrap();
    let accounts = CommandHandler::<Account, _>::new(store.clone())
        .concurrency_mode(ConcurrencyMode::Pessimistic);
    accounts
        .execute(AccountCommand::Open {
            account_id: "g".into(),
            owner: "Ada".into(),
        })
        .await
        .unwrap();
    let commands: Vec<_> = [1, 2, 13, 4, 5, 6, 7, 8]
        .into_iter()
        .map(|amount| {
            let accounts = accounts.clone();
            tokio::spawn(async move {
                accounts
                    .execute(AccountCommand::Deposit {
                        account_id: "g".into(),
                        amount,
                    })
                    .await
            })
        })
        .collect();
    let mut failed = 0;
    for command in commands {
        match command.await.unwrap() {
            Ok(_) => {}
            Err(CommandError::Store(StoreError::InlineProjection { source, .. })) => {
                assert!(source.to_string().contains("poison amount 13"), "{source}");
                failed += 1;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(failed, 1, "only the refused command fails");
    assert_eq!(accounts.load("g").await.unwrap().state.balance, 33);
    assert_eq!(applied(&plain).await, (8, 8, 33));
}

/// An inline projection whose writes the database refuses at commit (here a handler that
/// swallowed a failed statement, which leaves the transaction aborted: PostgreSQL then answers
/// `COMMIT` with a rollback, not an error) fails the append, naming it; nothing is stored.
#[tokio::test]
async fn an_inline_append_whose_commit_the_database_refuses_stores_nothing() {
    struct Swallower;
    impl Projection<PgTransaction> for Swallower {
        fn name(&self) -> &str {
            "swallower"
        }
        async fn handle(
            &self,
            _: &RecordedEvent,
            ctx: &mut ProjectionContext<'_, PgTransaction>,
        ) -> Result<(), HandlerError> {
            let _ = sqlx::query("SELECT 1 / 0").execute(ctx.tx().as_mut()).await;
            Ok(())
        }
    }
    let plain = common::store("proj_inline_refused").await;
    let store = PgEventStore::builder(plain.pool().clone())
        .schema(plain.schema().as_str())
        .unwrap()
        .inline_projection(Swallower)
        .build()
        .await
        .unwrap();
    let err = store
        .append(
            &StreamId::new("account", "refused").unwrap(),
            ExpectedVersion::Any,
            vec![deposit(1)],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, esframe_core::StoreError::InlineProjection { projection, .. } if projection == "swallower"),
        "{err:?}"
    );
    assert_eq!(stored_events(&plain).await, 0, "nothing stored");

    // A deferred constraint of the read model fails the commit itself.
    struct Deferred(String);
    impl Projection<PgTransaction> for Deferred {
        fn name(&self) -> &str {
            "deferred"
        }
        async fn handle(
            &self,
            _: &RecordedEvent,
            ctx: &mut ProjectionContext<'_, PgTransaction>,
        ) -> Result<(), HandlerError> {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO \"{}\".once VALUES (1)",
                self.0
            )))
            .execute(ctx.tx().as_mut())
            .await?;
            Ok(())
        }
    }
    let schema = plain.schema().to_string();
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".once (k INT UNIQUE DEFERRABLE INITIALLY DEFERRED)"
    )))
    .execute(plain.pool())
    .await
    .unwrap();
    let store = PgEventStore::builder(plain.pool().clone())
        .schema(schema.as_str())
        .unwrap()
        .inline_projection(Deferred(schema.clone()))
        .build()
        .await
        .unwrap();
    let err = store
        .append(
            &StreamId::new("account", "deferred").unwrap(),
            ExpectedVersion::Any,
            vec![deposit(1), deposit(2)],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, esframe_core::StoreError::InlineProjection { projection, .. } if projection == "deferred"),
        "{err:?}"
    );
    assert_eq!(stored_events(&plain).await, 0, "nothing stored");
}

/// A commit whose reply is lost is looked up by its ids before the append runs again: even
/// when the inline guard would now refuse the append, the caller learns it is stored, and it
/// is stored and applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_append_whose_commit_reply_is_lost_is_found_by_its_ids() {
    let plain = common::store("proj_inline_lost").await;
    let ledger = Ledger::new(&plain).await;
    let proxy = common::proxy::CommitCutter::start().await;
    let through_proxy = PgEventStore::pool_options()
        .max_connections(4)
        .connect_with(proxy.options())
        .await
        .unwrap();
    let store = PgEventStore::builder(through_proxy)
        .schema(plain.schema().as_str())
        .unwrap()
        .inline_projection(ledger.clone())
        .build()
        .await
        .unwrap();
    append(&store, "lost", &[1]).await;

    proxy.arm();
    let event = deposit(7);
    let appending = tokio::spawn({
        let (store, event) = (store.clone(), event.clone());
        async move {
            store
                .append(
                    &StreamId::new("account", "lost").unwrap(),
                    ExpectedVersion::Any,
                    vec![event],
                )
                .await
        }
    });
    proxy.committed.notified().await;
    // Meanwhile the read model is marked as written by newer code: a new attempt would be
    // refused by the guard.
    let schema = plain.schema();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{schema}\".projection_checkpoints SET version = 99 WHERE projection = 'ledger'"
    )))
    .execute(plain.pool())
    .await
    .unwrap();
    proxy.cut.notify_one();
    let outcome = appending
        .await
        .unwrap()
        .expect("the committed append is reported stored");
    assert_eq!(outcome.positions.len(), 1);
    assert_eq!(stored_events(&plain).await, 2, "stored once");
    assert_eq!(applied(&plain).await, (2, 2, 8), "applied once");
    let err = store
        .append(
            &StreamId::new("account", "lost").unwrap(),
            ExpectedVersion::Any,
            vec![deposit(1)],
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("newer than this code"), "{err}");
}

#[tokio::test]
async fn an_inline_projection_whose_rebuild_was_interrupted_refuses_appends_until_rebuilt() {
    use esframe_core::projection::OnFailure;
    let (plain, store, ledger) = inline_store("proj_inline_interrupted").await;
    let (ids, _) = append(&store, "x", &[1, 2, 3]).await;
    ledger.poison.lock().unwrap().insert(ids[1]);
    let runner = ProjectionRunner::new(plain.clone(), checkpoints(&plain), ledger.clone())
        .batch_size(1)
        .retry(HandlerRetry {
            attempts: 1,
            ..HandlerRetry::default()
        });
    assert!(
        runner
            .clone()
            .on_failure(OnFailure::Stop)
            .rebuild(Position::START)
            .await
            .is_err()
    );
    let err = store
        .append(
            &StreamId::new("account", "x").unwrap(),
            ExpectedVersion::Any,
            vec![deposit(4)],
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("last rebuild was interrupted"),
        "{err}"
    );
    assert_eq!(
        stored_events(&plain).await,
        3,
        "the refused append stored nothing"
    );

    ledger.poison.lock().unwrap().clear();
    runner.rebuild(Position::START).await.unwrap();
    append(&store, "x", &[4]).await;
    assert_eq!(applied(&plain).await, (4, 4, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_of_an_inline_projection_completes_on_a_small_busy_pool() {
    // Writers that wait for the rebuild must not hold the connections it needs.
    let pool = common::pool(4).await;
    let schema = common::fresh_schema(&pool, "proj_inline_small").await;
    let plain = PgEventStore::builder(pool.clone())
        .schema(schema.as_str())
        .unwrap()
        .build()
        .await
        .unwrap();
    let ledger = Ledger::new(&plain).await;
    let store = PgEventStore::builder(pool.clone())
        .schema(schema.as_str())
        .unwrap()
        .inline_projection(ledger.clone())
        .build()
        .await
        .unwrap();
    for i in 0..20 {
        append(&store, &format!("s-{}", i % 3), &[1]).await;
    }
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..15 {
                    append(&store, &format!("s-{w}"), &[2]).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let runner = ProjectionRunner::new(plain.clone(), checkpoints(&plain), ledger).batch_size(4);
    tokio::time::timeout(Duration::from_secs(60), runner.rebuild(Position::START))
        .await
        .expect("the rebuild is not starved of connections")
        .unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let events = stored_events(&plain).await;
    assert_eq!(events, 20 + 6 * 15);
    assert_eq!(applied(&plain).await, (events, events, 20 + 6 * 15 * 2));
}

#[tokio::test]
async fn a_batch_whose_commit_the_database_refuses_is_narrowed_down_and_parked() {
    /// Swallows the error of a failing statement on its poison event, leaving the
    /// transaction aborted: only the commit can tell.
    struct Swallower(Ledger, Uuid);
    impl Projection<PgTransaction> for Swallower {
        fn name(&self) -> &str {
            "ledger"
        }
        async fn handle(
            &self,
            event: &RecordedEvent,
            ctx: &mut ProjectionContext<'_, PgTransaction>,
        ) -> Result<(), HandlerError> {
            if event.event_id == self.1 {
                let _ = sqlx::query("SELECT 1 / 0").execute(ctx.tx().as_mut()).await;
                return Ok(());
            }
            self.0.handle(event, ctx).await
        }
    }
    let store = common::store("proj_refused").await;
    let ledger = Ledger::new(&store).await;
    append(&store, "r", &[1, 2]).await;
    let (poison, _) = append(&store, "r", &[50]).await;
    append(&store, "r", &[3]).await;
    let runner = ProjectionRunner::new(
        store.clone(),
        checkpoints(&store),
        Swallower(ledger, poison[0]),
    )
    // No retry: only narrowing the refused commit down tells the poison from the events
    // committed with it (a retry of the first event alone would hide a wrong blame).
    .retry(HandlerRetry {
        attempts: 1,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
    });
    tokio::time::timeout(Duration::from_secs(30), runner.catch_up())
        .await
        .expect("no endless restart on a refused commit")
        .unwrap();
    assert_eq!(
        applied(&store).await,
        (3, 3, 6),
        "the other events, once each"
    );
    let parked = runner.dead_letters().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].event.event_id, poison[0]);
    assert!(
        parked[0].event.error.contains("refused"),
        "{}",
        parked[0].event.error
    );
}

/// The suite's read model in a table, written through the runner's transaction: what a check
/// sees is what committed.
#[derive(Clone)]
struct TableRecorder {
    pool: sqlx::PgPool,
    schema: String,
}

impl TableRecorder {
    async fn new(store: &PgEventStore) -> Self {
        let schema = store.schema().to_string();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE \"{schema}\".suite_applied (
                 seq BIGSERIAL PRIMARY KEY, projection TEXT NOT NULL, event_id UUID NOT NULL,
                 stream TEXT NOT NULL, amount BIGINT NOT NULL, replay BOOLEAN NOT NULL);
             CREATE TABLE \"{schema}\".suite_resets (
                 projection TEXT PRIMARY KEY, resets BIGINT NOT NULL);"
        )))
        .execute(store.pool())
        .await
        .expect("create the suite's read model");
        Self {
            pool: store.pool().clone(),
            schema,
        }
    }
}

impl Recorder<PgTransaction> for TableRecorder {
    async fn record(
        &self,
        tx: &mut PgTransaction,
        projection: &str,
        applied: Applied,
    ) -> Result<(), HandlerError> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".suite_applied (projection, event_id, stream, amount, replay)
             VALUES ($1, $2, $3, $4, $5)",
            self.schema
        )))
        .bind(projection)
        .bind(applied.event_id)
        .bind(applied.stream)
        .bind(applied.amount)
        .bind(applied.replay)
        .execute(tx.as_mut())
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut PgTransaction, projection: &str) -> Result<(), HandlerError> {
        let schema = &self.schema;
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM \"{schema}\".suite_applied WHERE projection = $1"
        )))
        .bind(projection)
        .execute(tx.as_mut())
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{schema}\".suite_resets VALUES ($1, 1)
             ON CONFLICT (projection) DO UPDATE SET resets = suite_resets.resets + 1"
        )))
        .bind(projection)
        .execute(tx.as_mut())
        .await?;
        Ok(())
    }

    async fn recorded(&self, projection: &str) -> Recorded {
        let schema = &self.schema;
        let rows: Vec<(Uuid, String, i64, bool)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT event_id, stream, amount, replay FROM \"{schema}\".suite_applied
             WHERE projection = $1 ORDER BY seq"
        )))
        .bind(projection)
        .fetch_all(&self.pool)
        .await
        .expect("read the suite's read model");
        let resets: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT resets FROM \"{schema}\".suite_resets WHERE projection = $1"
        )))
        .bind(projection)
        .fetch_optional(&self.pool)
        .await
        .expect("read the resets");
        Recorded {
            applied: rows
                .into_iter()
                .map(|(event_id, stream, amount, replay)| Applied {
                    event_id,
                    stream,
                    amount,
                    replay,
                })
                .collect(),
            resets: resets.map_or(0, |r| r as u64),
        }
    }
}

mod suite {
    //! The shared projection suite, exactly once.
    use super::{TableRecorder, checkpoints, common};

    esframe_core::projection_suite!(async {
        let store = common::store("suite").await;
        let recorder = TableRecorder::new(&store).await;
        let checkpoints = checkpoints(&store);
        (store, checkpoints, recorder)
    });
}

#[tokio::test]
async fn an_inline_projection_of_a_new_version_refuses_appends_until_rebuilt() {
    let (plain, store, ledger) = inline_store("proj_inline_version").await;
    append(&store, "v", &[1, 2]).await;
    // The next release changes the read model: version 2.
    struct V2(Ledger);
    impl Projection<PgTransaction> for V2 {
        fn name(&self) -> &str {
            "ledger"
        }
        fn version(&self) -> u32 {
            2
        }
        async fn handle(
            &self,
            event: &RecordedEvent,
            ctx: &mut ProjectionContext<'_, PgTransaction>,
        ) -> Result<(), HandlerError> {
            self.0.handle(event, ctx).await
        }
        async fn reset(
            &self,
            ctx: &mut ProjectionContext<'_, PgTransaction>,
        ) -> Result<(), HandlerError> {
            self.0.reset(ctx).await
        }
    }
    let upgraded = PgEventStore::builder(plain.pool().clone())
        .schema(plain.schema().as_str())
        .unwrap()
        .inline_projection(V2(ledger.clone()))
        .build()
        .await
        .unwrap();
    let err = upgraded
        .append(
            &StreamId::new("account", "v").unwrap(),
            ExpectedVersion::Any,
            vec![deposit(3)],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, esframe_core::StoreError::InlineProjection { projection, .. } if projection == "ledger"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("at version 1 and the code at version 2"),
        "{err}"
    );
    assert_eq!(
        stored_events(&plain).await,
        2,
        "the refused append stored nothing"
    );
    ProjectionRunner::new(plain.clone(), checkpoints(&plain), V2(ledger))
        .rebuild(Position::START)
        .await
        .unwrap();
    append(&upgraded, "v", &[3]).await;
    assert_eq!(applied(&plain).await, (3, 3, 6));
    // The old release, still running somewhere, is refused now: its read model is older.
    let err = store
        .append(
            &StreamId::new("account", "v").unwrap(),
            ExpectedVersion::Any,
            vec![deposit(4)],
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("newer than this code's version 1"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_inline_appends_racing_each_other_are_stored_and_applied_once() {
    let (plain, store, _ledger) = inline_store("proj_inline_race").await;
    let events = vec![deposit(5), deposit(6)];
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let (store, events) = (store.clone(), events.clone());
            tokio::spawn(async move {
                store
                    .append(
                        &StreamId::new("account", "race").unwrap(),
                        ExpectedVersion::Any,
                        events,
                    )
                    .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for racer in racers {
        outcomes.push(
            racer
                .await
                .unwrap()
                .expect("a lost race is an idempotent repeat"),
        );
    }
    let stored = outcomes.iter().filter(|o| !o.deduplicated).count();
    assert_eq!(
        stored, 1,
        "one append stored the events, the others repeated it"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o.positions == outcomes[0].positions)
    );
    assert_eq!(
        applied(&plain).await,
        (2, 2, 11),
        "the inline projection applied them once"
    );
}

#[tokio::test]
async fn an_inline_projection_gets_events_appended_at_an_old_version_upcast() {
    use esframe_core::CommandHandler;
    use esframe_examples::bank_account::{
        Account, AccountCommand, BalanceQuery, PgBalances, upcasters,
    };

    let plain = common::store("proj_inline_upcast").await;
    let balances = PgBalances::create(plain.pool().clone(), plain.schema().as_str())
        .await
        .unwrap();
    let store = PgEventStore::builder(plain.pool().clone())
        .schema(plain.schema().as_str())
        .unwrap()
        .upcasters(upcasters())
        .inline_projection(esframe_core::projection::Typed(balances.clone()))
        .build()
        .await
        .unwrap();
    CommandHandler::<Account, _>::new(store.clone())
        .execute(AccountCommand::Open {
            account_id: "old".into(),
            owner: "Ada".into(),
        })
        .await
        .unwrap();
    // What an older release wrote: `MoneyDeposited` v1, without a currency.
    let v1 = NewEvent {
        event_type: "MoneyDeposited".into(),
        schema_version: 1,
        payload: json!({ "amount": 700 }),
        ..deposit(0)
    };
    store
        .append(
            &StreamId::new("account", "old").unwrap(),
            ExpectedVersion::Exact(1),
            vec![v1],
        )
        .await
        .expect("the inline projection reads the v1 deposit as v2");
    let row = balances.balance("old").await.unwrap().unwrap();
    assert_eq!((row.balance, row.deposits), (700, 1));
}

/// The lease rows a dead worker (`dead-host:1`) left on the 4 partitions of `ledger`, lapsing
/// `lapse_in_ms` from now.
async fn leases_of_a_dead_worker(store: &PgEventStore, lapse_in_ms: u32) {
    let schema = store.schema().to_string();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "INSERT INTO {schema}.projection_partitions (projection, partitions) VALUES ('ledger', 4);
         INSERT INTO {schema}.projection_leases (projection, partition, holder, token, expires_at)
         SELECT 'ledger', p, 'dead-host:1', 1, now() + {lapse_in_ms} * interval '1 millisecond'
         FROM generate_series(0, 3) AS p"
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

/// Whether every partition has a holder other than the dead worker.
fn held_by_the_living(status: &esframe_core::projection::ProjectionStatus) -> bool {
    status.partitions.iter().all(|p| {
        p.holder
            .as_deref()
            .is_some_and(|h| !h.starts_with("dead-host"))
    })
}

/// A runner whose holder died (its lease rows stop being renewed) loses its partitions as the
/// leases lapse: the survivor looks again when the first one runs out, not an interval later.
/// Here the interval is 3 s and the dead holder's leases lapse 3.5 s after the survivor
/// starts: at its 3 s look they are not yet free, so without that it would take them at 6 s.
/// (The survivor's own lease time is 15 s, so that its membership, renewed three times per two
/// thirds of it, does not bring its rounds closer together than the interval.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_partitions_are_taken_as_its_leases_lapse() {
    let store = common::store("proj_lapse").await;
    let ledger = Ledger::new(&store).await;
    leases_of_a_dead_worker(&store, 3500).await;
    let started = tokio::time::Instant::now();
    let checkpoints = store.checkpoints().lease_time(Duration::from_secs(15));
    let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), ledger.clone())
        .partitions(4)
        .rebalance_interval(Duration::from_secs(3))
        .member_name("survivor");
    let running = runner.clone().spawn();
    let taken = loop {
        let status = runner.status().await.unwrap();
        if held_by_the_living(&status) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not taken over: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        taken >= Duration::from_millis(3400),
        "taken at {taken:?}, before the dead holder's leases lapsed"
    );
    assert!(
        taken < Duration::from_millis(5000),
        "taken at {taken:?}: the lapse was only seen at the next interval"
    );
    append(&store, "acc-1", &[5]).await;
    let last = append(&store, "acc-2", &[6]).await.1;
    let keys: Vec<_> = (0..4)
        .map(|p| ProjectionKey::new("ledger", p).unwrap())
        .collect();
    wait_for_projections(&checkpoints, &keys, last, Duration::from_secs(30))
        .await
        .unwrap();
    running.shutdown().await.unwrap();
    totals_match_events(&store).await;
}

/// The survivor keeps a dead worker's partitions once it has them: the dead worker's membership
/// (its last heartbeat) stops counting before its leases lapse, so taking them does not put
/// the survivor over its fair share, and it does not hand them back to sit free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_keeps_the_partitions_it_took_from_a_dead_worker() {
    use esframe_core::projection::LeaseStore;
    let store = common::store("proj_keep").await;
    let ledger = Ledger::new(&store).await;
    let checkpoints = store.checkpoints().lease_time(Duration::from_secs(3));
    // The dead worker's last heartbeat and its leases, renewed 0.6 s before it died (now).
    checkpoints.heartbeat("ledger", "dead").await.unwrap();
    leases_of_a_dead_worker(&store, 2400).await;
    let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), ledger.clone())
        .partitions(4)
        .rebalance_interval(Duration::from_millis(100))
        .member_name("survivor");
    let running = runner.clone().spawn();
    let started = tokio::time::Instant::now();
    loop {
        let status = runner.status().await.unwrap();
        if held_by_the_living(&status) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not taken over: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let taken = tokio::time::Instant::now();
    while taken.elapsed() < Duration::from_millis(1500) {
        let status = runner.status().await.unwrap();
        assert!(
            held_by_the_living(&status),
            "{:?} after the takeover, a partition was handed back: {status:?}",
            taken.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await.unwrap();
}

/// A rebalance interval longer than the membership lifetime does not make live members drop
/// out of each other's count: the runner renews its membership at least three times per
/// lifetime, whatever the interval. Here the interval is 20 s and the membership lasts 1 s (a
/// 1.5 s lease time): a second runner, started once the first holds every partition, has its
/// fair share within a few seconds, not after the first runner's next 20 s round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_renew_their_membership_within_its_lifetime_whatever_their_interval() {
    let store = common::store("proj_renew").await;
    let ledger = Ledger::new(&store).await;
    let checkpoints = store.checkpoints().lease_time(Duration::from_millis(1500));
    let runner = |member: &str| {
        ProjectionRunner::new(store.clone(), checkpoints.clone(), ledger.clone())
            .partitions(4)
            .rebalance_interval(Duration::from_secs(20))
            .member_name(member)
    };
    let schema = store.schema().to_string();
    let tokens = || {
        let pool = store.pool().clone();
        let sql = format!(
            "SELECT token FROM {schema}.projection_leases
             WHERE projection = 'ledger' AND expires_at > now() ORDER BY partition"
        );
        async move {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    let first = runner("first");
    let first_running = first.clone().spawn();
    let started = tokio::time::Instant::now();
    let held = loop {
        let held = tokens().await;
        if held.len() == 4 {
            break held;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the first runner did not take every partition: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Both runners are in this process, so their leases name the same holder: a partition
    // that changed hands shows by its fencing token.
    let second = runner("second");
    let second_running = second.clone().spawn();
    let joined = tokio::time::Instant::now();
    loop {
        let now = tokens().await;
        let moved = now.iter().zip(&held).filter(|(a, b)| a != b).count();
        if now.len() == 4 && moved == 2 {
            break;
        }
        assert!(
            joined.elapsed() < Duration::from_secs(8),
            "no fair share after {:?}: tokens {held:?} then {now:?}",
            joined.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second_running.shutdown().await.unwrap();
    first_running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_waits_for_an_inline_append_holding_its_lock_then_takes_it() {
    // An append that updates a projection inline holds the lease's advisory lock shared for
    // its transaction. Taking the lease tries the lock in one statement and, when it is held,
    // queues for it (up to half a second): it must take the lease once the append ends, and
    // give up, leaving the row alone, if the append outlasts the wait.
    use esframe_core::projection::LeaseStore;
    let store = common::store("lease_lock").await;
    let leases = checkpoints(&store);
    let key = |partition| ProjectionKey::new("locked", partition).unwrap();
    let lock_of =
        |partition: u16| format!("esframe.projection.{}.locked.{partition}", store.schema());
    let appenders = common::pool(2).await;
    let hold = |lock: String| {
        let appenders = appenders.clone();
        async move {
            let mut tx = appenders.begin().await.unwrap();
            sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0))")
                .bind(lock)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx
        }
    };

    // Free: taken at once.
    let free = leases.try_lease(&key(0)).await.unwrap();
    assert!(
        free.is_some(),
        "a free lease whose lock nobody holds is taken"
    );

    // Held for 150 ms: taken once it is released.
    let tx = hold(lock_of(1)).await;
    let released = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        tx.commit().await.unwrap();
    });
    let started = std::time::Instant::now();
    let waited = leases.try_lease(&key(1)).await.unwrap();
    released.await.unwrap();
    assert!(waited.is_some(), "taken once the append released the lock");
    assert!(
        started.elapsed() >= Duration::from_millis(140),
        "it waited for the lock"
    );

    // Held past the wait: not taken, and the row is not written.
    let _append = hold(lock_of(2)).await;
    let refused = leases.try_lease(&key(2)).await.unwrap();
    assert!(
        refused.is_none(),
        "not taken while an append holds the lock"
    );
    let status = leases.leases("locked").await.unwrap();
    assert!(
        status.iter().all(|l| l.partition != 2),
        "no row for the lease that was not taken: {status:?}"
    );
}
