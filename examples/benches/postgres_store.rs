//! esframe-postgres against the raw ceiling of the same server, side by side in one run.
//!
//! `cargo bench -p esframe-examples --bench postgres_store` (PostgreSQL at `DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`; needs `pgbench` on the PATH).
//! `ESFRAME_BENCH_SECONDS` sets the length of each measurement (default 5),
//! `ESFRAME_BENCH_ROUNDS` the number of paired rounds (default 5), and
//! `ESFRAME_BENCH_ONLY` one section: `commands`, `appends`, `load`, `global` or `contention`.
//!
//! Every ratio pairs an esframe measurement with its baseline run on the same server just
//! before it, round by round; the median ratio and the range are printed. Baselines, all on a
//! table made by esframe's own migration (the events table's shape and indexes):
//! - commands: pgbench, one-row `INSERT` per transaction, 1 and 8 clients; and, paired with
//!   that, pgbench running esframe's own append statement, which shows how much of the gap is
//!   the statement's server work (its version check) rather than esframe's client;
//! - 100-event appends: pgbench, a 100-row `INSERT ... SELECT generate_series(..)` per
//!   transaction, every column computed cheaply in the server (ids are md5 hashes cast to uuid);
//! - stream load: a bare sqlx query of the stream's payloads in version order, each taken as an
//!   owned string, no serde;
//! - global read: the same bare query over the global order, in batches of 1,000.

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
    GlobalLog, NewEvent, Position, RetryPolicy, SnapshotPolicy, StreamId,
};
use esframe_examples::bank_account::{Account, AccountCommand, AccountEvent};
use esframe_postgres::PgEventStore;
use futures_util::StreamExt;
use sqlx::{AssertSqlSafe, PgPool, Row};

type Error = Box<dyn std::error::Error + Send + Sync>;

const RAW_SCHEMA: &str = "esframe_bench_raw";
const SCHEMA: &str = "esframe_bench";
/// Events in the global log for the global-read comparison.
const GLOBAL_EVENTS: usize = 50_000;
/// Rows per batch of every global read.
const GLOBAL_BATCH: usize = 1_000;

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
        "INSERT INTO {RAW_SCHEMA}.events (global_position, event_id, aggregate_id, stream_version, aggregate_type, \
         event_type, schema_version, payload, correlation_id, causation_id, metadata) VALUES \
         ((pg_current_xact_id()::text::bigint << 16), gen_random_uuid(), gen_random_uuid()::text, 1, 'account', \
         'MoneyDeposited', 1, '{{\"amount\": 1}}', gen_random_uuid(), gen_random_uuid(), '{{}}');\n"
    );
    // Ids from the series (md5 of the transaction id and row number): cheap, unlike one
    // gen_random_uuid() per row, so this measures the table's own write cost.
    let hundred_rows = format!(
        "INSERT INTO {RAW_SCHEMA}.events (global_position, event_id, aggregate_id, stream_version, aggregate_type, \
         event_type, schema_version, payload, correlation_id, causation_id, metadata) \
         SELECT (x.id << 16) + g, md5(x.id::text || '-' || g)::uuid, x.id::text, g + 1, 'account', \
         'MoneyDeposited', 2, '{{\"amount\": 1, \"currency\": \"EUR\"}}', NULL, NULL, '{{}}' \
         FROM (SELECT pg_current_xact_id()::text::bigint AS id) x, generate_series(0, 99) g;\n"
    );
    // esframe's own one-event append statement (`append_one` in esframe-postgres's `sql.rs`,
    // expecting `Exact(0)` of a new stream, whose version it checks with the same index
    // lookup as any `Exact`; the stream and the expectation are bound, as esframe binds
    // them), run by pgbench: the server's work of an append without
    // esframe's client, so that the gap to the one-row INSERT shows as the statement's own
    // cost (its version check, its RETURNING) apart from the client's.
    let own_statement = format!(
        "\\set n random(1, 2000000000)\n\\set kind 3\n\\set exact 0\n\
         INSERT INTO {RAW_SCHEMA}.events (global_position, event_id, aggregate_id, stream_version, \
         aggregate_type, event_type, schema_version, payload, correlation_id, causation_id, metadata) \
         SELECT pg_current_xact_id()::text::bigint << 16, gen_random_uuid(), 'own-' || :n, cur.v + 1, \
         'account', 'MoneyDeposited', 1, '{{\"amount\": 1}}', gen_random_uuid(), gen_random_uuid(), '{{}}' \
         FROM (SELECT coalesce(max(stream_version), 0) AS v FROM {RAW_SCHEMA}.events \
               WHERE aggregate_type = 'account' AND aggregate_id = 'own-' || :n) cur \
         WHERE CASE :kind::int4 WHEN 0 THEN true WHEN 1 THEN cur.v = 0 WHEN 2 THEN cur.v > 0 ELSE cur.v = :exact::int8 END \
         RETURNING global_position, stream_version, recorded_at;\n"
    );
    reset_schema(&pool, SCHEMA).await?;
    let store = PgEventStore::builder(pool.clone())
        .schema(SCHEMA)?
        .build()
        .await?;
    let rounds: usize = std::env::var("ESFRAME_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(1);
    println!(
        "\nEach ratio pairs an esframe measurement with its baseline run just before it; \
         {rounds} rounds, median ratio (min..max)."
    );
    let only = std::env::var("ESFRAME_BENCH_ONLY").ok();
    let wanted = |section: &str| only.as_deref().is_none_or(|o| o == section);

    if wanted("commands") {
        println!(
            "\ndeposit command round trip (load, handle, append), 1 writer, vs one-row INSERT with 1 client"
        );
        for (label, policy, cache) in [
            ("default (CachePolicy::Verify)", CachePolicy::Verify, true),
            ("CachePolicy::Trust", CachePolicy::Trust, true),
            (
                "cold: no cache, snapshot every 100",
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
        own_statement_line(url, &one_row, &own_statement, 1, rounds, window)?;

        println!("\ndeposit commands, 8 writers on 8 streams, vs one-row INSERT with 8 clients");
        for (label, policy) in [
            ("default (CachePolicy::Verify)", CachePolicy::Verify),
            ("CachePolicy::Trust", CachePolicy::Trust),
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
        own_statement_line(url, &one_row, &own_statement, 8, rounds, window)?;
    }

    if wanted("appends") {
        println!(
            "\nappends of 100 events per call, 1 writer, vs a server-side 100-row INSERT with 1 client"
        );
        let mut pairs = Vec::new();
        for _ in 0..rounds {
            let raw = pgbench(url, &hundred_rows, 1, window)? * 100.0;
            pairs.push((batch_appends(&store, window).await?, raw));
        }
        report("events appended", &pairs, "events/s");
    }
    reset_schema(&pool, RAW_SCHEMA).await?;

    if wanted("load") {
        println!(
            "\nloading a 10,000-event stream without a snapshot, vs a bare fetch of its payloads (median of 15 per round)"
        );
        let id = long_stream(&store).await?;
        let mut pairs = Vec::new();
        for _ in 0..rounds {
            let bare = bare_stream_fetch(&pool, &id).await?;
            let ours = handler_load(&store, &id).await?;
            // As rates (loads/s), so that higher is better like every other line.
            pairs.push((1.0 / ours.as_secs_f64(), 1.0 / bare.as_secs_f64()));
        }
        report_times("CommandHandler::load", &pairs);
        upcast_load(&pool).await?;
    }

    if wanted("global") {
        println!(
            "\nreading the global log ({GLOBAL_EVENTS} events, batches of {GLOBAL_BATCH}), vs the bare query in batches"
        );
        fill_log(&store, GLOBAL_EVENTS).await?;
        let (mut read_all, mut subscription) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let bare = bare_global_read(&pool).await?;
            read_all.push((read_all_rate(&store).await?, bare));
            let bare = bare_global_read(&pool).await?;
            subscription.push((subscription_rate(&store).await?, bare));
        }
        report("read_all", &read_all, "events/s");
        report("Subscription, counting handler", &subscription, "events/s");
    }

    if wanted("contention") {
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
                .concurrency_mode(mode)
                .retry_policy(
                    RetryPolicy::attempts(10_000)
                        .backoff(Duration::from_micros(200), Duration::from_millis(20)),
                );
            let rate = deposits(&handler, 8, true, window).await?;
            println!("  {label} {rate:>10.0} commands/s, no deposit lost (balance checked)");
        }
    }
    reset_schema(&pool, SCHEMA).await?;
    Ok(())
}

/// Prints esframe's append statement run by pgbench with `clients` clients, paired with the
/// one-row INSERT: the ceiling of a command set by the statement alone.
fn own_statement_line(
    url: &str,
    one_row: &str,
    own_statement: &str,
    clients: u32,
    rounds: usize,
    window: Duration,
) -> Result<(), Error> {
    let mut pairs = Vec::new();
    for _ in 0..rounds {
        let raw = pgbench(url, one_row, clients, window)?;
        pairs.push((pgbench(url, own_statement, clients, window)?, raw));
    }
    report("its append statement, by pgbench", &pairs, "tx/s");
    Ok(())
}

/// [`report`] for load times given as rates: prints the median times and the median ratio of
/// esframe's time to the baseline's.
fn report_times(label: &str, pairs: &[(f64, f64)]) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = pairs.iter().map(|(ours, bare)| bare / ours).collect();
    let (min, max) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    println!(
        "  {label:<34} {:>8.2} ms   bare {:>8.2} ms   {:.2}x the bare fetch ({min:.2}..{max:.2})",
        1e3 / median(pairs.iter().map(|p| p.0).collect()),
        1e3 / median(pairs.iter().map(|p| p.1).collect()),
        median(ratios),
    );
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
            NewEvent::from_event(&AccountEvent::MoneyDeposited {
                amount: 1,
                currency: "EUR".into(),
            })
            .expect("encodes")
        })
        .collect()
}

async fn batch_appends(store: &PgEventStore, window: Duration) -> Result<f64, Error> {
    let stream = StreamId::new("account", format!("batch-{}", uuid::Uuid::now_v7()))?;
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

/// A stream of one opening and 10,000 deposits; returns its id.
async fn long_stream(store: &PgEventStore) -> Result<String, Error> {
    let id = format!("long-{}", uuid::Uuid::now_v7());
    let stream = StreamId::new("account", &id)?;
    let first = NewEvent::from_event(&AccountEvent::AccountOpened {
        owner: "bench".into(),
    })?;
    store
        .append(&stream, ExpectedVersion::NoStream, vec![first])
        .await?;
    for _ in 0..100 {
        store
            .append(&stream, ExpectedVersion::Any, deposit_events(100))
            .await?;
    }
    Ok(id)
}

fn median_duration(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// The median of 15 loads through the handler, without cache or snapshot.
async fn handler_load(store: &PgEventStore, id: &str) -> Result<Duration, Error> {
    let handler = CommandHandler::<Account, _>::new(store.clone())
        .without_state_cache()
        .snapshot_policy(SnapshotPolicy::Never);
    let mut times = Vec::new();
    for _ in 0..15 {
        let started = Instant::now();
        let loaded = handler.load(id).await?;
        times.push(started.elapsed());
        assert_eq!(loaded.version, 10_001);
        assert_eq!(loaded.state.balance, 10_000);
    }
    Ok(median_duration(times))
}

/// The median of 15 bare fetches of the stream's payloads, each taken as an owned string.
async fn bare_stream_fetch(pool: &PgPool, id: &str) -> Result<Duration, Error> {
    let sql = format!(
        "SELECT payload FROM {SCHEMA}.events
         WHERE aggregate_type = 'account' AND aggregate_id = $1 ORDER BY stream_version"
    );
    let mut times = Vec::new();
    for _ in 0..15 {
        let started = Instant::now();
        let rows = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(id)
            .fetch_all(pool)
            .await?;
        let payloads: Vec<String> = rows.iter().map(payload_text).collect::<Result<_, _>>()?;
        times.push(started.elapsed());
        assert_eq!(payloads.len(), 10_001);
    }
    Ok(median_duration(times))
}

/// A `jsonb` column as an owned string: its binary form is a version byte and the JSON text.
fn payload_text(row: &sqlx::postgres::PgRow) -> Result<String, Error> {
    let raw = row.try_get_raw(0)?;
    let bytes = raw.as_bytes().map_err(|e| e.to_string())?;
    Ok(String::from_utf8(
        bytes.get(1..).unwrap_or_default().to_vec(),
    )?)
}

/// Appends `events` deposits over 100 accounts, 100 per append.
async fn fill_log(store: &PgEventStore, events: usize) -> Result<(), Error> {
    for i in 0..events / 100 {
        let stream = StreamId::new("account", format!("global-{}", i % 100))?;
        store
            .append(&stream, ExpectedVersion::Any, deposit_events(100))
            .await?;
    }
    Ok(())
}

/// Events/s of the bare query over the global order, in batches, payloads as owned strings.
async fn bare_global_read(pool: &PgPool) -> Result<f64, Error> {
    let sql = format!(
        "SELECT global_position, payload FROM {SCHEMA}.events WHERE global_position > $1 \
         ORDER BY global_position LIMIT $2"
    );
    let started = Instant::now();
    let (mut after, mut count) = (0i64, 0usize);
    loop {
        let rows = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(after)
            .bind(GLOBAL_BATCH as i64)
            .fetch_all(pool)
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.try_get(0)?;
        for row in &rows {
            let raw = row.try_get_raw(1)?;
            let bytes = raw.as_bytes().map_err(|e| e.to_string())?;
            std::hint::black_box(String::from_utf8(
                bytes.get(1..).unwrap_or_default().to_vec(),
            )?);
        }
        count += rows.len();
    }
    assert!(count >= GLOBAL_EVENTS);
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Events/s of `read_all` over the whole log, in batches.
async fn read_all_rate(store: &PgEventStore) -> Result<f64, Error> {
    let started = Instant::now();
    let (mut after, mut count) = (Position::START, 0usize);
    loop {
        let events = store.read_all(after, GLOBAL_BATCH).await?;
        let Some(last) = events.last() else { break };
        after = last.global_position;
        count += events.len();
    }
    assert!(count >= GLOBAL_EVENTS);
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Events/s of a subscription caught up to the head, to a handler that counts deposits.
async fn subscription_rate(store: &PgEventStore) -> Result<f64, Error> {
    let started = Instant::now();
    let mut events = store
        .subscribe(Position::START)
        .batch_size(GLOBAL_BATCH)
        .until_head();
    let mut count = 0usize;
    while let Some(event) = events.next().await {
        let event = event?;
        if event.event_type == "MoneyDeposited" {
            count += 1;
        }
    }
    assert!(count >= GLOBAL_EVENTS);
    Ok(count as f64 / started.elapsed().as_secs_f64())
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
        let stream = StreamId::new("account", &id)?;
        let opened = NewEvent::from_event(&AccountEvent::AccountOpened {
            owner: "bench".into(),
        })?;
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
