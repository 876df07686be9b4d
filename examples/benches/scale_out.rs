//! Partitioned projections on PostgreSQL, run by 1, 2 and 4 worker processes (this binary run
//! again as a worker).
//!
//! `cargo bench -p esframe-examples --bench scale_out` (PostgreSQL at `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). `ESFRAME_BENCH_EVENTS` sets the events in the
//! log (default 100,000), `ESFRAME_BENCH_ROUNDS` the paired rounds (default 5).
//!
//! 1. **Remote-write handler**: a `BatchTally` that waits 1 ms per batch of 100 and stores one
//!    row, over 16 partitions, each worker processing one partition at a time
//!    (`concurrency(1)`, a worker of fixed capacity). Each round runs 1, 2 and 4 workers over
//!    the same stored log, each under a projection name of its own; the rate is events over
//!    the time from the first batch's commit to the last's. Then the same with the default
//!    concurrency (every partition a worker holds at once).
//! 2. **The ledger** (balances per account, two statements per event): CPU-bound here.
//! 3. **Rows read per event delivered**: the events table's index fetches during the 4-worker
//!    catch-up, divided by the events delivered.
//! 4. **Failover**: two workers (lease time 2 s) under a steady write load; one is killed with
//!    SIGKILL; the time until every one of its partitions has a new holder and has moved past
//!    where it was, and how much of it was the killed worker's leases running out.
//!    `ESFRAME_BENCH_ONLY=failover` runs only this part.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use esframe_core::{EventStore, ExpectedVersion, StreamId, projection::ProjectionStatus};
use esframe_examples::scale_out::{self, BatchTally, Ledger, WorkerConfig};
use esframe_postgres::PgEventStore;
use sqlx::{AssertSqlSafe, PgPool};

const SCHEMA: &str = "esframe_bench_scale";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn range(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

struct Worker(Child);

impl Worker {
    fn start(config: &WorkerConfig) -> Self {
        let child = Command::new(std::env::current_exe().expect("this binary"))
            .envs(config.to_env())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a worker");
        Self(child)
    }

    fn stop(mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }

    fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(delay: Duration) -> WorkerConfig {
    WorkerConfig {
        url: database_url(),
        schema: SCHEMA.to_owned(),
        partitions: 16,
        lease_time: Duration::from_secs(2),
        rebalance: Duration::from_millis(100),
        batch_size: 100,
        delay,
        listen: true,
        poll: Duration::from_millis(100),
        connections: 8,
        tally: None,
        concurrency: None,
    }
}

async fn open_store(pool: PgPool) -> PgEventStore {
    PgEventStore::builder(pool)
        .schema(SCHEMA)
        .expect("schema")
        .build()
        .await
        .expect("open the store")
}

/// `events` deposits in appends of 100 to 1,000 accounts.
async fn fill(store: &PgEventStore, events: usize) {
    let appends = events.div_ceil(100);
    let mut tasks = Vec::new();
    for writer in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for n in (writer..appends).step_by(4) {
                let stream = StreamId::new("account", format!("acc-{}", n % 1000)).expect("id");
                let batch = (0..100).map(|i| scale_out::deposit(i % 9 + 1)).collect();
                store
                    .append(&stream, ExpectedVersion::Any, batch)
                    .await
                    .expect("append");
            }
        }));
    }
    for task in tasks {
        task.await.expect("a filler");
    }
}

/// Events the tally `name` has applied, and the time between its first and last batch.
async fn tally_of(pool: &PgPool, name: &str) -> (i64, f64) {
    let (events, seconds): (Option<i64>, Option<f64>) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT sum(events)::bigint, extract(epoch FROM max(at) - min(at))::float8
         FROM \"{SCHEMA}\".tally_batches WHERE projection = $1"
    )))
    .bind(name)
    .fetch_one(pool)
    .await
    .expect("tally");
    (events.unwrap_or(0), seconds.unwrap_or(0.0))
}

/// The machine's CPU time so far, from the first line of `/proc/stat`: (busy, all) in clock
/// ticks, summed over the cores. Zeros where it cannot be read.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is within user).
    let at = |n: usize| fields.get(n).copied().unwrap_or(0);
    let idle = at(3) + at(4);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    (busy, busy + idle)
}

/// One run of the tally: its rate, and how busy the machine was meanwhile.
struct TallyRun {
    /// Events per second between the first batch's commit and the last's.
    rate: f64,
    /// Cores busy on average (workers, PostgreSQL and everything else) during the run.
    cores_busy: f64,
    /// CPU of the whole machine per batch of 100, in milliseconds.
    cpu_per_batch_ms: f64,
}

/// Runs `workers` workers of the tally `name` until it has applied `events`.
async fn run_tally(
    pool: &PgPool,
    mut config: WorkerConfig,
    name: &str,
    workers: usize,
    events: i64,
) -> TallyRun {
    config.tally = Some(name.to_owned());
    let (busy_before, all_before) = machine_ticks();
    let started: Vec<_> = (0..workers).map(|_| Worker::start(&config)).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (done, _) = tally_of(pool, name).await;
        if done >= events {
            assert_eq!(done, events, "{name}: every event once");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: stuck at {done} of {events}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (busy_after, all_after) = machine_ticks();
    for worker in started {
        worker.stop();
    }
    let (done, seconds) = tally_of(pool, name).await;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (busy, all) = (
        busy_after.saturating_sub(busy_before) as f64,
        all_after.saturating_sub(all_before).max(1) as f64,
    );
    // A tick is 10 ms of one core.
    let batches = (done as f64 / 100.0).max(1.0);
    TallyRun {
        rate: done as f64 / seconds.max(1e-3),
        cores_busy: busy / all * cores,
        cpu_per_batch_ms: busy * 10.0 / batches,
    }
}

/// Index fetches of the events table so far (`pg_stat_user_tables.idx_tup_fetch`).
async fn index_fetches(pool: &PgPool) -> i64 {
    // Statistics reach the shared counters within a second of a transaction's end.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    sqlx::query_scalar(
        "SELECT coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables
         WHERE schemaname = $1 AND relname = 'events'",
    )
    .bind(SCHEMA)
    .fetch_one(pool)
    .await
    .expect("statistics")
}

fn holders(status: &ProjectionStatus) -> BTreeMap<u16, Option<String>> {
    status
        .partitions
        .iter()
        .map(|p| (p.key.partition(), p.holder.clone()))
        .collect()
}

/// One failover: seconds from a SIGKILL of one of two workers until all its partitions had a new
/// holder (`taken`) and had moved past where they were (`moved`), and how much lease time the
/// killed worker's partitions had left (`lease_left`: the longest of them).
struct Failover {
    taken: f64,
    moved: f64,
    lease_left: f64,
}

/// Kills one of two workers with SIGKILL and waits for its partitions to move again.
async fn failover(store: &PgEventStore, round: usize) -> Failover {
    let mut cfg = config(Duration::ZERO);
    let name = format!("failover_{round}");
    cfg.tally = Some(name.clone());
    let runner = cfg.tally_runner(store, &name);
    let victim = Worker::start(&cfg);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let survivor = Worker::start(&cfg);
    let writing = {
        let store = store.clone();
        tokio::spawn(async move {
            for n in 0u64.. {
                let stream = StreamId::new("account", format!("acc-{}", n % 1000)).expect("id");
                let _ = store
                    .append(&stream, ExpectedVersion::Any, vec![scale_out::deposit(1)])
                    .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Wait for an even split.
    let status = loop {
        let status = runner.status().await.expect("status");
        let by_holder = holders(&status)
            .into_values()
            .fold(BTreeMap::new(), |mut m, h| {
                *m.entry(h).or_insert(0) += 1;
                m
            });
        if by_holder.len() == 2 && !by_holder.contains_key(&None) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let victim_pid = victim.0.id();
    let is_victim = |h: &Option<String>| {
        h.as_deref()
            .is_some_and(|h| h.ends_with(&format!(":{victim_pid}")))
    };
    let victims: Vec<(u16, esframe_core::Position)> = status
        .partitions
        .iter()
        .filter(|p| is_victim(&p.holder))
        .map(|p| (p.key.partition(), p.position))
        .collect();
    let killed = Instant::now();
    victim.kill9();
    // The victim's leases run out this long after the kill at the latest: it renews no more.
    // Read after the kill, not before: a renewal just before it would make them last longer.
    let after_kill = runner.status().await.expect("status");
    let expiry = killed.elapsed()
        + after_kill
            .partitions
            .iter()
            .filter(|p| victims.iter().any(|(v, _)| *v == p.key.partition()))
            .filter_map(|p| p.lease_expires_in)
            .max()
            .unwrap_or_default();
    let mut taken = None;
    loop {
        let status = runner.status().await.expect("status");
        let held = victims.iter().all(|(partition, _)| {
            let p = &status.partitions[usize::from(*partition)];
            p.holder.is_some() && !is_victim(&p.holder)
        });
        if held && taken.is_none() {
            taken = Some(killed.elapsed());
        }
        let moved = held
            && victims
                .iter()
                .all(|(partition, at)| status.partitions[usize::from(*partition)].position > *at);
        if moved {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let moved = killed.elapsed().as_secs_f64();
    writing.abort();
    survivor.stop();
    Failover {
        taken: taken.unwrap_or_default().as_secs_f64(),
        moved,
        lease_left: expiry.as_secs_f64(),
    }
}

/// Runs `rounds` failovers and prints the medians and ranges.
async fn report_failover(store: &PgEventStore, rounds: usize) {
    let mut runs = Vec::new();
    for round in 0..rounds {
        let run = failover(store, round).await;
        eprintln!(
            "  failover round {round}: lease time left {:.3} s, taken after {:.3} s, moved after {:.3} s",
            run.lease_left, run.taken, run.moved
        );
        runs.push(run);
    }
    let show = |what: &str, mut values: Vec<f64>| {
        let (lo, hi) = range(&values);
        println!(
            "  {what}: {:.2} s (range {lo:.2}-{hi:.2} s)",
            median(&mut values)
        );
    };
    println!(
        "\nfailover after SIGKILL of one of two workers, lease time 2 s, rebalance every 100 ms (target under 2.1 s):"
    );
    show(
        "until all its partitions moved again",
        runs.iter().map(|r| r.moved).collect(),
    );
    show(
        "  of which its leases' time left",
        runs.iter().map(|r| r.lease_left).collect(),
    );
    show(
        "from the lapse until taken",
        runs.iter().map(|r| r.taken - r.lease_left).collect(),
    );
    show(
        "from the lapse until moved",
        runs.iter().map(|r| r.moved - r.lease_left).collect(),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Some(config) = WorkerConfig::from_env() {
        let stdin_closed = async {
            let _ = tokio::task::spawn_blocking(|| {
                use std::io::Read;
                let mut byte = [0u8; 1];
                while std::io::stdin().read(&mut byte).is_ok_and(|n| n > 0) {}
            })
            .await;
        };
        scale_out::run_worker(&config, stdin_closed).await;
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let events: usize = env_or("ESFRAME_BENCH_EVENTS", 100_000);
    let rounds: usize = env_or("ESFRAME_BENCH_ROUNDS", 5).max(1);
    let pool = PgEventStore::pool_options()
        .max_connections(16)
        .connect(&database_url())
        .await
        .expect("PostgreSQL at DATABASE_URL");
    drop_schema(&pool).await;
    let store = open_store(pool.clone()).await;
    BatchTally::create_table(&pool, SCHEMA)
        .await
        .expect("tally table");
    Ledger::new(SCHEMA, Duration::ZERO)
        .create_tables(&pool)
        .await
        .expect("ledger tables");
    if std::env::var("ESFRAME_BENCH_ONLY").is_ok_and(|only| only == "failover") {
        report_failover(&store, rounds).await;
        drop_schema(&pool).await;
        return;
    }
    let filled = Instant::now();
    fill(&store, events).await;
    let events = events.div_ceil(100) as i64 * 100;
    println!(
        "scale_out: {events} events in the log ({:.1} s to append), 16 partitions, batches of 100, {}",
        filled.elapsed().as_secs_f64(),
        chrono::Utc::now().format("%Y-%m-%d")
    );

    for (label, concurrency) in [
        ("one partition at a time per worker", Some(1)),
        ("every held partition at once", None),
    ] {
        let mut rates: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut ratios: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut rows_per_event = Vec::new();
        let mut busy: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
        for round in 0..rounds {
            let mut base = 0.0;
            for workers in [1, 2, 4] {
                let mut cfg = config(Duration::from_millis(1));
                cfg.concurrency = concurrency;
                let name = format!("tally_{}_{round}_{workers}", concurrency.map_or(0, |c| c));
                let before = index_fetches(&pool).await;
                let run = run_tally(&pool, cfg, &name, workers, events).await;
                busy.entry(workers)
                    .or_default()
                    .push((run.cores_busy, run.cpu_per_batch_ms));
                let rate = run.rate;
                if workers == 4 {
                    let after = index_fetches(&pool).await;
                    rows_per_event.push((after - before) as f64 / events as f64);
                }
                if workers == 1 {
                    base = rate;
                } else {
                    ratios.entry(workers).or_default().push(rate / base);
                }
                rates.entry(workers).or_default().push(rate);
            }
        }
        println!("\n1 ms remote write per batch, {label}:");
        for (workers, rates) in &mut rates {
            println!(
                "  {workers} worker(s): {:>9.0} events/s (median of {rounds})",
                median(rates)
            );
        }
        for (workers, ratios) in &mut ratios {
            let (lo, hi) = range(ratios);
            println!(
                "  {workers} workers over 1: {:.2}x (range {lo:.2}-{hi:.2}x)",
                median(ratios)
            );
        }
        for (workers, runs) in &busy {
            let mut cores: Vec<f64> = runs.iter().map(|r| r.0).collect();
            let mut per_batch: Vec<f64> = runs.iter().map(|r| r.1).collect();
            println!(
                "  {workers} worker(s): {:.2} of the machine's cores busy, {:.2} ms of CPU per batch (medians; from worker start to the last batch)",
                median(&mut cores),
                median(&mut per_batch)
            );
        }
        let (lo, hi) = range(&rows_per_event);
        println!(
            "  rows read per event delivered (4 workers): {:.3} (range {lo:.3}-{hi:.3})",
            median(&mut rows_per_event)
        );
    }

    // The ledger: two statements per event, CPU-bound on a small machine.
    let mut ledger: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for round in 0..rounds.min(3) {
        for workers in [1, 2, 4] {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "TRUNCATE \"{SCHEMA}\".ledger_balances, \"{SCHEMA}\".ledger_applied;
                 DELETE FROM \"{SCHEMA}\".projection_checkpoints WHERE projection = 'ledger';
                 DELETE FROM \"{SCHEMA}\".projection_partitions WHERE projection = 'ledger';
                 DELETE FROM \"{SCHEMA}\".projection_leases WHERE projection = 'ledger';"
            )))
            .execute(&pool)
            .await
            .expect("reset the ledger");
            let cfg = config(Duration::ZERO);
            let started_at = Instant::now();
            let started: Vec<_> = (0..workers).map(|_| Worker::start(&cfg)).collect();
            loop {
                let check = scale_out::check(&pool, SCHEMA).await.expect("check");
                if check.applied >= events {
                    assert!(check.exact(), "round {round}: {check:?}");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let seconds = started_at.elapsed().as_secs_f64();
            for worker in started {
                worker.stop();
            }
            ledger
                .entry(workers)
                .or_default()
                .push(events as f64 / seconds);
        }
    }
    println!("\nthe ledger (two statements per event, exact), including worker start-up:");
    let base = median(&mut ledger.get(&1).cloned().unwrap_or_default());
    for (workers, rates) in &mut ledger {
        let rate = median(rates);
        println!(
            "  {workers} worker(s): {rate:>9.0} events/s ({:.2}x of 1)",
            rate / base
        );
    }

    report_failover(&store, rounds).await;
    drop_schema(&pool).await;
}

/// Drops the bench's schema, before a run and after it.
async fn drop_schema(pool: &PgPool) {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{SCHEMA}\" CASCADE"
    )))
    .execute(pool)
    .await
    .expect("drop the bench schema");
}
