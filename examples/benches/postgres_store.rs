//! esframe-postgres against the raw ceiling of the same server, side by side in one run.
//!
//! `cargo bench -p esframe-examples --bench postgres_store` (PostgreSQL at `DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`; needs `pgbench` on the PATH).
//! `ESFRAME_BENCH_SECONDS` sets the length of each measurement (default 5),
//! `ESFRAME_BENCH_ROUNDS` the number of paired rounds (default 3), and
//! `ESFRAME_BENCH_ONLY=writers1` or `writers8` runs only that comparison.
//!
//! The raw ceiling is pgbench inserting into a table created by esframe's own migration, so it
//! has exactly the events table's shape and indexes: one row per transaction with 1 and 8
//! clients, and 100 rows per transaction with 1 client.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use esframe_core::{
    CachePolicy, CommandError, CommandHandler, ConcurrencyMode, EventStore, ExpectedVersion,
    NewEvent, RetryPolicy, SnapshotPolicy, StreamId,
};
use esframe_examples::bank_account::{Account, AccountCommand, AccountEvent};
use esframe_postgres::PgEventStore;
use futures_util::TryStreamExt;
use sqlx::{AssertSqlSafe, PgPool, Row};

type Error = Box<dyn std::error::Error + Send + Sync>;

const RAW_SCHEMA: &str = "esframe_bench_raw";
const SCHEMA: &str = "esframe_bench";

fn main() -> Result<(), Error> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let seconds: u64 = std::env::var("ESFRAME_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let window = Duration::from_secs(seconds);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(&url, window))
}

async fn run(url: &str, window: Duration) -> Result<(), Error> {
    let pool = PgEventStore::pool_options()
        .max_connections(12)
        .connect(url)
        .await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await?;
    println!(
        "esframe-postgres benchmark: PostgreSQL {version} at {url}, {} s per measurement",
        window.as_secs()
    );

    // The raw ceiling, in a table of the same shape.
    reset_schema(&pool, RAW_SCHEMA).await?;
    PgEventStore::builder(pool.clone())
        .schema(RAW_SCHEMA)?
        .build()
        .await?;
    let one_row = format!(
        "INSERT INTO {RAW_SCHEMA}.events (global_position, event_id, stream_id, stream_version, aggregate_type, \
         event_type, schema_version, payload, correlation_id, causation_id, metadata) VALUES \
         ((pg_current_xact_id()::text::bigint << 16), gen_random_uuid(), gen_random_uuid()::text, 1, 'account', \
         'MoneyDeposited', 1, '{{\"amount\": 1}}', gen_random_uuid(), gen_random_uuid(), '{{}}');\n"
    );
    let hundred_rows = format!(
        "INSERT INTO {RAW_SCHEMA}.events (global_position, event_id, stream_id, stream_version, aggregate_type, \
         event_type, schema_version, payload, correlation_id, causation_id, metadata) \
         SELECT (pg_current_xact_id()::text::bigint << 16) + g, gen_random_uuid(), s.id, g + 1, 'account', \
         'MoneyDeposited', 1, '{{\"amount\": 1}}', gen_random_uuid(), gen_random_uuid(), '{{}}' \
         FROM generate_series(0, 99) g, (SELECT gen_random_uuid()::text AS id) s;\n"
    );
    reset_schema(&pool, SCHEMA).await?;
    let store = PgEventStore::builder(pool.clone())
        .schema(SCHEMA)?
        .build()
        .await?;
    let rounds: usize = std::env::var("ESFRAME_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!(
        "\nEach ratio pairs an esframe measurement with a pgbench run made just before it; \
         {rounds} rounds, median ratio (min..max)."
    );

    let only = std::env::var("ESFRAME_BENCH_ONLY").ok();
    if let Some(writers) = only.as_deref().and_then(|o| o.strip_prefix("writers")) {
        // Only the one- or eight-writer comparison (Trust), for quick experiments on it.
        let writers: u32 = writers
            .parse()
            .map_err(|_| "ESFRAME_BENCH_ONLY=writers1 or writers8")?;
        let handler = CommandHandler::<Account, _>::new(store.clone())
            .snapshot_policy(SnapshotPolicy::every(100))
            .cache_policy(CachePolicy::Trust);
        let mut pairs = Vec::new();
        for _ in 0..rounds {
            let raw = pgbench(url, &one_row, writers, window)?;
            pairs.push((
                deposits(&handler, writers as usize, false, window).await?,
                raw,
            ));
        }
        report(&format!("{writers} writer(s), Trust"), &pairs, "commands/s");
        reset_schema(&pool, RAW_SCHEMA).await?;
        reset_schema(&pool, SCHEMA).await?;
        return Ok(());
    }

    println!(
        "\ndeposit command round trip (load, handle, append), 1 writer, vs one-row INSERT with 1 client"
    );
    for (label, policy, cache) in [
        ("state cache, CachePolicy::Trust ", CachePolicy::Trust, true),
        (
            "state cache, CachePolicy::Verify",
            CachePolicy::Verify,
            true,
        ),
        (
            "no state cache (snapshot + tail)",
            CachePolicy::Verify,
            false,
        ),
    ] {
        let mut handler = CommandHandler::<Account, _>::new(store.clone())
            .snapshot_policy(SnapshotPolicy::every(100))
            .cache_policy(policy);
        if !cache {
            handler = handler.without_state_cache();
        }
        let mut pairs = Vec::new();
        for _ in 0..rounds {
            let raw = pgbench(url, &one_row, 1, window)?;
            pairs.push((deposits(&handler, 1, false, window).await?, raw));
        }
        report(label, &pairs, "commands/s");
    }

    println!("\ndeposit commands, 8 writers on 8 streams, vs one-row INSERT with 8 clients");
    for (label, policy) in [
        ("CachePolicy::Trust ", CachePolicy::Trust),
        ("CachePolicy::Verify", CachePolicy::Verify),
    ] {
        let handler = CommandHandler::<Account, _>::new(store.clone())
            .snapshot_policy(SnapshotPolicy::every(100))
            .cache_policy(policy);
        let mut pairs = Vec::new();
        for _ in 0..rounds {
            let raw = pgbench(url, &one_row, 8, window)?;
            pairs.push((deposits(&handler, 8, false, window).await?, raw));
        }
        report(label, &pairs, "commands/s");
    }

    println!("\nappends of 100 events per call, 1 writer, vs 100-row INSERT with 1 client");
    let mut pairs = Vec::new();
    for _ in 0..rounds {
        let raw = pgbench(url, &hundred_rows, 1, window)? * 100.0;
        pairs.push((batch_appends(&store, window).await?, raw));
    }
    report("events appended", &pairs, "events/s");
    reset_schema(&pool, RAW_SCHEMA).await?;

    println!("\nloading a 10,000-event stream without a snapshot (median of 15)");
    let (esframe, bare) = load_10k(&store, &pool).await?;
    println!(
        "  CommandHandler::load {:>8.2} ms   bare sqlx query of the same rows (faster of fetch_all and fetch) {:>8.2} ms   ratio {:.2}x",
        esframe.as_secs_f64() * 1e3,
        bare.as_secs_f64() * 1e3,
        esframe.as_secs_f64() / bare.as_secs_f64()
    );

    upcast_load(&pool).await?;

    println!("\ndeposit commands, 8 writers on ONE stream");
    for (label, mode) in [
        (
            "optimistic, retry on conflict     ",
            ConcurrencyMode::Optimistic,
        ),
        (
            "pessimistic (per-stream queue)    ",
            ConcurrencyMode::Pessimistic,
        ),
    ] {
        let handler = CommandHandler::<Account, _>::new(store.clone())
            .snapshot_policy(SnapshotPolicy::every(100))
            .cache_policy(CachePolicy::Trust)
            .concurrency_mode(mode)
            .retry_policy(
                RetryPolicy::attempts(10_000)
                    .backoff(Duration::from_micros(200), Duration::from_millis(20)),
            );
        let rate = deposits(&handler, 8, true, window).await?;
        println!("  {label} {rate:>10.0} commands/s, no deposit lost (balance checked)");
    }
    reset_schema(&pool, SCHEMA).await?;
    Ok(())
}

/// Prints the median esframe rate, the median raw rate and the median ratio of the pairs.
fn report(label: &str, pairs: &[(f64, f64)], unit: &str) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = pairs.iter().map(|(ours, raw)| 100.0 * ours / raw).collect();
    let (min, max) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    println!(
        "  {label:<34} {:>8.0} {unit:<11} raw {:>8.0}   {:>5.1}% of raw ({min:.1}..{max:.1})",
        median(pairs.iter().map(|p| p.0).collect()),
        median(pairs.iter().map(|p| p.1).collect()),
        median(ratios),
    );
}

async fn reset_schema(pool: &PgPool, schema: &str) -> Result<(), Error> {
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// Runs pgbench with `script` and returns its transactions per second.
fn pgbench(url: &str, script: &str, clients: u32, window: Duration) -> Result<f64, Error> {
    let path = std::env::temp_dir().join(format!("esframe-pgbench-{}.sql", std::process::id()));
    std::fs::write(&path, script)?;
    // sqlx is built here without TLS, so pgbench must not use it either (libpq's default
    // `sslmode=prefer` would encrypt whenever the server offers it): same transport, same cost.
    let separator = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{separator}sslmode=disable");
    let output = Command::new("pgbench")
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
        ])
        .args(["-T", &window.as_secs().to_string(), "-f"])
        .arg(&path)
        .arg(&url)
        .output()
        .map_err(|err| {
            format!("cannot run pgbench ({err}); install the PostgreSQL client tools")
        })?;
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            format!(
                "pgbench failed: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            )
            .into()
        })
}

/// `writers` tasks deposit for `window`, each on its own account or all on one; returns
/// commands/s after checking that the balances add up to the successful deposits.
async fn deposits(
    handler: &CommandHandler<Account, PgEventStore>,
    writers: usize,
    one_stream: bool,
    window: Duration,
) -> Result<f64, Error> {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let ids: Vec<String> = (0..writers)
        .map(|w| {
            if one_stream {
                format!("hot-{run}")
            } else {
                format!("acc-{run}-{w}")
            }
        })
        .collect();
    for id in ids.iter().collect::<std::collections::BTreeSet<_>>() {
        handler
            .execute(AccountCommand::Open {
                account_id: id.clone(),
                owner: "bench".into(),
            })
            .await?;
        handler
            .execute(AccountCommand::Deposit {
                account_id: id.clone(),
                amount: 1,
            })
            .await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let (handler, stop, done, id) = (
                handler.clone(),
                Arc::clone(&stop),
                Arc::clone(&done),
                id.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match handler
                        .execute(AccountCommand::Deposit {
                            account_id: id.clone(),
                            amount: 1,
                        })
                        .await
                    {
                        Ok(_) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(CommandError::Conflict { .. }) => {}
                        Err(err) => return Err(err.to_string()),
                    }
                }
                Ok(())
            })
        })
        .collect();
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let count = done.load(Ordering::Relaxed);
    let mut balance = 0;
    for id in ids.iter().collect::<std::collections::BTreeSet<_>>() {
        balance += handler.load(id).await?.state.balance;
    }
    let expected = count + ids.iter().collect::<std::collections::BTreeSet<_>>().len() as u64;
    if balance != expected {
        return Err(format!("lost deposits: balance {balance}, expected {expected}").into());
    }
    Ok(count as f64 / elapsed.as_secs_f64())
}

fn deposit_events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|_| {
            NewEvent::from_event(
                "account",
                &AccountEvent::MoneyDeposited {
                    amount: 1,
                    currency: "EUR".into(),
                },
            )
            .expect("encodes")
        })
        .collect()
}

async fn batch_appends(store: &PgEventStore, window: Duration) -> Result<f64, Error> {
    let stream = StreamId::new(format!("batch-{}", uuid::Uuid::now_v7()))?;
    let started = Instant::now();
    let mut events = 0u64;
    while started.elapsed() < window {
        store
            .append(&stream, ExpectedVersion::Any, deposit_events(100))
            .await?;
        events += 100;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

async fn load_10k(store: &PgEventStore, pool: &PgPool) -> Result<(Duration, Duration), Error> {
    let id = format!("long-{}", uuid::Uuid::now_v7());
    let stream = StreamId::new(&id)?;
    let mut first = NewEvent::from_event(
        "account",
        &AccountEvent::AccountOpened {
            owner: "bench".into(),
        },
    )?;
    first.aggregate_type = "account".into();
    store
        .append(&stream, ExpectedVersion::NoStream, vec![first])
        .await?;
    for _ in 0..100 {
        store
            .append(&stream, ExpectedVersion::Any, deposit_events(100))
            .await?;
    }
    let handler = CommandHandler::<Account, _>::new(store.clone())
        .without_state_cache()
        .snapshot_policy(SnapshotPolicy::Never);
    let bare_sql = format!(
        "SELECT global_position, event_id, stream_id, stream_version, aggregate_type, event_type, schema_version, \
         payload, correlation_id, causation_id, metadata, recorded_at FROM {SCHEMA}.events \
         WHERE stream_id = $1 AND stream_version >= $2 ORDER BY stream_version"
    );
    let (mut ours, mut bare_all, mut bare_stream) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..15 {
        let started = Instant::now();
        let loaded = handler.load(&id).await?;
        ours.push(started.elapsed());
        assert_eq!(loaded.version, 10_001);
        assert_eq!(loaded.state.balance, 10_000);

        // The bare query, both ways sqlx offers: all rows at once, and as a stream.
        let started = Instant::now();
        let rows = sqlx::query(AssertSqlSafe(bare_sql.clone()))
            .bind(&id)
            .bind(1i64)
            .fetch_all(pool)
            .await?;
        let sum: i64 = rows
            .iter()
            .map(bare_row)
            .sum::<Result<i64, sqlx::Error>>()?;
        bare_all.push(started.elapsed());
        assert_eq!(sum, 10_000);

        let started = Instant::now();
        let mut stream = sqlx::query(AssertSqlSafe(bare_sql.clone()))
            .bind(&id)
            .bind(1i64)
            .fetch(pool);
        let mut sum = 0;
        while let Some(row) = stream.try_next().await? {
            sum += bare_row(&row)?;
        }
        bare_stream.push(started.elapsed());
        assert_eq!(sum, 10_000);
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    Ok((median(ours), median(bare_all).min(median(bare_stream))))
}

/// Reads every column of a row the way a hand-written loader would; returns the amount.
fn bare_row(row: &sqlx::postgres::PgRow) -> Result<i64, sqlx::Error> {
    let _: (i64, uuid::Uuid, String, i64, String, String, i32) = (
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get(5)?,
        row.try_get(6)?,
    );
    let payload: serde_json::Value = row.try_get(7)?;
    let _: (
        Option<uuid::Uuid>,
        Option<uuid::Uuid>,
        serde_json::Value,
        chrono::DateTime<chrono::Utc>,
    ) = (
        row.try_get(8)?,
        row.try_get(9)?,
        row.try_get(10)?,
        row.try_get(11)?,
    );
    Ok(payload["amount"].as_i64().unwrap_or(0))
}

/// Loads a 10,000-deposit account stored at the current version, then one stored as v1 and
/// upcast on read.
async fn upcast_load(pool: &PgPool) -> Result<(), Error> {
    println!(
        "\nloading 10,000 deposits without a snapshot: current vs one upcast step each (median of 15)"
    );
    let store = PgEventStore::builder(pool.clone())
        .schema(SCHEMA)?
        .upcasters(esframe_examples::bank_account::upcasters())
        .build()
        .await?;
    let mut medians = Vec::new();
    for (label, schema_version) in [
        ("stored at the current version (v2)", 2),
        ("stored as v1, one upcast step each", 1),
    ] {
        let id = format!("upcast-{schema_version}-{}", uuid::Uuid::now_v7());
        let stream = StreamId::new(&id)?;
        let opened = NewEvent::from_event(
            "account",
            &AccountEvent::AccountOpened {
                owner: "bench".into(),
            },
        )?;
        store
            .append(&stream, ExpectedVersion::NoStream, vec![opened])
            .await?;
        for _ in 0..100 {
            let mut events = deposit_events(100);
            if schema_version == 1 {
                for event in &mut events {
                    event.schema_version = 1;
                    event.payload = serde_json::json!({ "amount": 1 });
                }
            }
            store.append(&stream, ExpectedVersion::Any, events).await?;
        }
        let handler = CommandHandler::<Account, _>::new(store.clone())
            .without_state_cache()
            .snapshot_policy(SnapshotPolicy::Never);
        let mut times = Vec::new();
        for _ in 0..15 {
            let started = Instant::now();
            let loaded = handler.load(&id).await?;
            times.push(started.elapsed());
            assert_eq!(loaded.state.balance, 10_000);
        }
        times.sort();
        let median = times[times.len() / 2];
        println!("  {label:<38} {:>8.2} ms", median.as_secs_f64() * 1e3);
        medians.push(median);
    }
    println!(
        "  ratio {:.2}x",
        medians[1].as_secs_f64() / medians[0].as_secs_f64()
    );
    Ok(())
}
