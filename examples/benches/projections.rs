//! Projections on PostgreSQL: catch-up speed into a read model with checkpoints, and live
//! latency from an append's commit to the projection's handler.
//!
//! `cargo bench -p esframe-examples --bench projections` (PostgreSQL at `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). `ESFRAME_BENCH_SECONDS` sets the length of the
//! live-latency run (default 10), `ESFRAME_BENCH_EVENTS` the number of events caught up (default
//! 100,000), `ESFRAME_BENCH_ROUNDS` the catch-up rounds (default 3; the median is reported).
//!
//! - **Catch-up:** the bank account's balances read model (`PgBalances`, one upsert statement
//!   per batch) rebuilt from the stored events: every batch commits its read-model writes and
//!   its checkpoint in one transaction. Also measured with the same projection writing event by
//!   event (`handle` only), to show what batching buys.
//! - **Live latency:** deposits at a steady rate from one store instance, the projection on a
//!   second instance with its own pool, so it learns of new events only through
//!   `LISTEN/NOTIFY`, as another process would. Latency is from the moment the append returned
//!   (committed) to the moment the handler was called with the event.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use esframe_core::{
    CommandHandler, EventStore, ExpectedVersion, NewEvent, Position, SnapshotPolicy, StreamId,
    projection::{
        HandlerError, Interest, ProjectedEvent, ProjectionContext, ProjectionKey, ProjectionRunner,
        Typed, TypedProjection, wait_for_projections,
    },
};
use esframe_examples::bank_account::{Account, AccountCommand, AccountEvent, PgBalances};
use esframe_postgres::{PgEventStore, PgTransaction};
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

type Error = Box<dyn std::error::Error + Send + Sync>;

const SCHEMA: &str = "esframe_bench_projections";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Error> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(&url))
}

async fn run(url: &str) -> Result<(), Error> {
    let events = env_number("ESFRAME_BENCH_EVENTS", 100_000);
    let rounds = env_number("ESFRAME_BENCH_ROUNDS", 3).max(1);
    let seconds = env_number("ESFRAME_BENCH_SECONDS", 10);
    let pool = PgEventStore::pool_options()
        .max_connections(8)
        .connect(url)
        .await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await?;
    println!("esframe projections benchmark: PostgreSQL {version} at {url}");

    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"
    )))
    .execute(&pool)
    .await?;
    let store = PgEventStore::builder(pool.clone())
        .schema(SCHEMA)?
        .build()
        .await?;
    fill(&store, events).await?;

    // Catch-up into the balances read model, one statement per batch.
    let balances = PgBalances::create(pool.clone(), SCHEMA).await?;
    let runner = ProjectionRunner::new(store.clone(), store.checkpoints(), Typed(balances));
    let mut rates = Vec::new();
    for _ in 0..rounds {
        let report = runner.rebuild(Position::START).await?;
        rates.push(report.events as f64 / report.elapsed.as_secs_f64());
    }
    check_balances(&pool, events).await?;
    rates.sort_by(f64::total_cmp);
    println!(
        "catch-up of {events} events into a PostgreSQL read model, batched upserts: {:.0} events/s (median of {rounds}; range {:.0}-{:.0}) [target >= 400,000]",
        rates[rates.len() / 2],
        rates[0],
        rates[rates.len() - 1]
    );

    // The same read model written event by event.
    let per_event = Typed(PerEvent(PgBalances::create(pool.clone(), SCHEMA).await?));
    let report = ProjectionRunner::new(store.clone(), store.checkpoints(), per_event)
        .rebuild(Position::START)
        .await?;
    println!(
        "catch-up of {events} events, one upsert per event (default handle_batch): {:.0} events/s",
        report.events as f64 / report.elapsed.as_secs_f64()
    );

    live_latency(url, &store, Duration::from_secs(seconds)).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"
    )))
    .execute(&pool)
    .await?;
    Ok(())
}

/// Stores `events` account events: 1,000 accounts, each opened and then given deposits and
/// withdrawals, appended 100 events per call.
async fn fill(store: &PgEventStore, events: u64) -> Result<(), Error> {
    let accounts = 1000;
    let per_account = (events / accounts).max(1);
    for a in 0..accounts {
        let stream = StreamId::new("account", format!("bench-{a}"))?;
        let mut version = 0;
        let mut written = 0;
        while written < per_account {
            let n = (per_account - written).min(100);
            let batch: Vec<NewEvent> = (0..n)
                .map(|i| {
                    let event = match written + i {
                        0 => AccountEvent::AccountOpened {
                            owner: format!("owner {a}"),
                        },
                        k if k % 4 == 3 => AccountEvent::MoneyWithdrawn { amount: 1 },
                        _ => AccountEvent::MoneyDeposited {
                            amount: 2,
                            currency: "EUR".into(),
                        },
                    };
                    NewEvent::from_event(&event)
                })
                .collect::<Result<_, _>>()?;
            store
                .append(&stream, ExpectedVersion::Exact(version), batch)
                .await?;
            version += n;
            written += n;
        }
    }
    Ok(())
}

/// Checks the read model against the events: every account's balance.
async fn check_balances(pool: &PgPool, events: u64) -> Result<(), Error> {
    let per_account = (events / 1000).max(1) as i64;
    let withdrawals = (0..per_account).filter(|k| k % 4 == 3).count() as i64;
    let deposits = per_account - 1 - withdrawals;
    let expected = deposits * 2 - withdrawals;
    let wrong: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {SCHEMA}.account_balances WHERE balance <> $1"
    )))
    .bind(expected)
    .fetch_one(pool)
    .await?;
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {SCHEMA}.account_balances"
    )))
    .fetch_one(pool)
    .await?;
    if wrong != 0 || rows != 1000 {
        return Err(format!("read model wrong: {rows} rows, {wrong} with a wrong balance").into());
    }
    Ok(())
}

/// The balances projection without its batched `apply_batch`.
struct PerEvent(PgBalances);

impl TypedProjection<PgTransaction> for PerEvent {
    type Event = AccountEvent;

    fn name(&self) -> &str {
        "balances_per_event"
    }

    fn interest(&self) -> Interest {
        self.0.interest()
    }

    async fn apply(
        &self,
        event: ProjectedEvent<'_, AccountEvent>,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        self.0.apply(event, ctx).await
    }

    async fn reset(
        &self,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        self.0.reset(ctx).await
    }
}

/// When each event's append returned and when the handler first saw it.
#[derive(Default)]
struct Timings {
    committed: HashMap<Uuid, Instant>,
    handled: HashMap<Uuid, Instant>,
}

/// The balances projection, timing when it sees each event.
struct Timed {
    balances: PgBalances,
    timings: Arc<Mutex<Timings>>,
}

impl TypedProjection<PgTransaction> for Timed {
    type Event = AccountEvent;

    fn name(&self) -> &str {
        "balances_live"
    }

    fn interest(&self) -> Interest {
        self.balances.interest()
    }

    async fn apply(
        &self,
        event: ProjectedEvent<'_, AccountEvent>,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        self.apply_batch(vec![event], ctx).await
    }

    async fn apply_batch(
        &self,
        events: Vec<ProjectedEvent<'_, AccountEvent>>,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        let now = Instant::now();
        {
            let mut timings = self.timings.lock().unwrap();
            for event in &events {
                timings.handled.entry(event.event_id()).or_insert(now);
            }
        }
        self.balances.apply_batch(events, ctx).await
    }

    async fn reset(
        &self,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        self.balances.reset(ctx).await
    }
}

async fn live_latency(url: &str, store: &PgEventStore, window: Duration) -> Result<(), Error> {
    // The projection's own store instance and pool: woken only by NOTIFY, like another process.
    let reader_pool = PgEventStore::pool_options()
        .max_connections(4)
        .connect(url)
        .await?;
    let reader = PgEventStore::builder(reader_pool.clone())
        .schema(SCHEMA)?
        .build()
        .await?;
    let timings = Arc::new(Mutex::new(Timings::default()));
    let projection = Timed {
        balances: PgBalances::create(reader_pool, SCHEMA).await?,
        timings: Arc::clone(&timings),
    };
    let checkpoints = reader.checkpoints();
    let runner = ProjectionRunner::new(reader.clone(), checkpoints.clone(), Typed(projection));
    // Starts from a read model rebuilt from the stored events, like a deployed projection.
    runner.rebuild(Position::START).await?;
    let running = runner.spawn();
    // Time for the runner to start listening, and for the writer's store to notice (it only
    // sends NOTIFY while another store listens, and looks every 250 ms).
    tokio::time::sleep(Duration::from_millis(600)).await;

    let accounts = CommandHandler::<Account, PgEventStore>::new(store.clone())
        .snapshot_policy(SnapshotPolicy::every(100));
    let rate = 300.0;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut last = Position::START;
    let mut commands = 0u64;
    while started.elapsed() < window {
        ticker.tick().await;
        let done = accounts
            .execute(AccountCommand::Deposit {
                account_id: format!("bench-{}", commands % 1000),
                amount: 1,
            })
            .await?;
        let at = Instant::now();
        commands += 1;
        let mut timings = timings.lock().unwrap();
        for event in &done.events {
            timings.committed.insert(event.event_id, at);
            last = last.max(event.global_position);
        }
    }
    let achieved = commands as f64 / started.elapsed().as_secs_f64();
    wait_for_projections(
        &checkpoints,
        &[ProjectionKey::single("balances_live")?],
        last,
        Duration::from_secs(30),
    )
    .await?;
    running.shutdown().await?;

    let timings = timings.lock().unwrap();
    let mut latencies: Vec<Duration> = timings
        .committed
        .iter()
        .map(|(id, committed)| {
            timings.handled.get(id).map_or(Duration::MAX, |handled| {
                handled.saturating_duration_since(*committed)
            })
        })
        .collect();
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "live latency, commit to handler, via NOTIFY, {achieved:.0} commands/s for {} s ({} events): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms [target p99 < 3 ms]",
        window.as_secs(),
        latencies.len(),
        pick(0.5).as_secs_f64() * 1000.0,
        pick(0.99).as_secs_f64() * 1000.0,
        pick(1.0).as_secs_f64() * 1000.0,
    );
    Ok(())
}
