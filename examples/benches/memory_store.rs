//! Throughput of the in-memory store on one core, and whether it stays flat as streams grow.
//!
//! `cargo bench -p esframe-examples --bench memory_store` prints, for consecutive windows of a
//! growing run, the rate in that window: single-event appends/s to one stream (and spread over
//! 1,000 streams), and bank-account deposit commands/s through the `CommandHandler` (with the
//! default state cache, and without it, loading from snapshots). Set `ESFRAME_BENCH_QUICK=1` for
//! a short smoke run.

use std::{hint::black_box, time::Instant};

use esframe_core::{
    CommandHandler, EventStore, ExpectedVersion, NewEvent, SnapshotPolicy, StreamId,
};
use esframe_examples::bank_account::{Account, AccountCommand, AccountEvent};
use esframe_memory::MemoryStore;

fn main() {
    let quick = std::env::var_os("ESFRAME_BENCH_QUICK").is_some();
    let scale = if quick { 20 } else { 1 };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!("esframe-memory benchmark: one thread (current-thread tokio runtime)");
    runtime.block_on(async {
        appends_one_stream(200_000 / scale, 10, true).await;
        appends_one_stream(200_000 / scale, 10, false).await;
        appends_many_streams(200_000 / scale, 1_000).await;
        deposits(
            "deposit commands, state cache on (default)",
            100_000 / scale,
            true,
        )
        .await;
        deposits(
            "deposit commands, no state cache, snapshot every 100",
            50_000 / scale,
            false,
        )
        .await;
        upcast_load(10_000 / scale).await;
    });
}

fn report_header(title: &str) {
    println!("\n{title}");
    println!("  {:>22}  {:>14}", "stream length", "per second");
}

fn report_window(from: usize, to: usize, ops: usize, started: Instant) {
    let rate = ops as f64 / started.elapsed().as_secs_f64();
    println!("  {:>10} .. {:>8}  {:>14.0}", from, to, rate);
}

fn deposit_event() -> NewEvent {
    NewEvent::from_event(&AccountEvent::MoneyDeposited {
        amount: 1,
        currency: "EUR".into(),
    })
    .expect("encodes")
}

/// `prebuilt`: events (UUIDv7 id, encoded payload) are made before the clock starts, so the
/// figure is the store's own; otherwise making each event is timed too.
async fn appends_one_stream(total: usize, windows: usize, prebuilt: bool) {
    report_header(if prebuilt {
        "single-event appends, one stream (store only: events built beforehand)"
    } else {
        "single-event appends, one stream (building each event, UUIDv7 id included)"
    });
    let store = MemoryStore::new();
    let stream = StreamId::new("account", "bench-stream").expect("valid id");
    let per_window = total / windows;
    for w in 0..windows {
        let mut ready: Vec<Vec<NewEvent>> = if prebuilt {
            (0..per_window).map(|_| vec![deposit_event()]).collect()
        } else {
            Vec::new()
        };
        let started = Instant::now();
        for _ in 0..per_window {
            let batch = ready.pop().unwrap_or_else(|| vec![deposit_event()]);
            let outcome = store
                .append(&stream, ExpectedVersion::Any, batch)
                .await
                .expect("append");
            black_box(outcome);
        }
        report_window(w * per_window, (w + 1) * per_window, per_window, started);
    }
}

async fn appends_many_streams(total: usize, streams: usize) {
    report_header(&format!(
        "single-event appends, round robin over {streams} streams"
    ));
    let store = MemoryStore::new();
    let ids: Vec<StreamId> = (0..streams)
        .map(|i| StreamId::new("account", format!("bench-{i}")).expect("valid id"))
        .collect();
    let windows = 5;
    let per_window = total / windows;
    let mut n = 0usize;
    for w in 0..windows {
        let started = Instant::now();
        for _ in 0..per_window {
            let stream = &ids[n % streams];
            n += 1;
            let outcome = store
                .append(stream, ExpectedVersion::Any, vec![deposit_event()])
                .await
                .expect("append");
            black_box(outcome);
        }
        let per_stream = |count: usize| count / streams;
        report_window(
            per_stream(w * per_window),
            per_stream((w + 1) * per_window),
            per_window,
            started,
        );
    }
}

async fn deposits(title: &str, total: usize, cache: bool) {
    report_header(title);
    let store = MemoryStore::new();
    let mut handler =
        CommandHandler::<Account, _>::new(store).snapshot_policy(SnapshotPolicy::every(100));
    if !cache {
        handler = handler.without_state_cache();
    }
    handler
        .execute(AccountCommand::Open {
            account_id: "acc".into(),
            owner: "bench".into(),
        })
        .await
        .expect("open");
    let windows = 10;
    let per_window = total / windows;
    for w in 0..windows {
        let started = Instant::now();
        for _ in 0..per_window {
            let outcome = handler
                .execute(AccountCommand::Deposit {
                    account_id: "acc".into(),
                    amount: 1,
                })
                .await
                .expect("deposit");
            black_box(outcome);
        }
        report_window(w * per_window, (w + 1) * per_window, per_window, started);
    }
    let balance = handler.load("acc").await.expect("load").state.balance;
    assert_eq!(
        balance,
        (per_window * windows) as u64,
        "every deposit counted"
    );
}

/// Loads an account of `n` deposits stored at the current version, then one whose deposits were
/// all stored as v1 and are upcast on read.
async fn upcast_load(n: usize) {
    println!("\nloading an account of {n} deposits without snapshot or cache (median of 15)");
    let mut medians = Vec::new();
    for (label, schema_version) in [
        ("stored at the current version (v2)", 2),
        ("stored as v1, one upcast step each", 1),
    ] {
        let store = MemoryStore::with_upcasters(esframe_examples::bank_account::upcasters());
        let stream = StreamId::new("account", "upcast").expect("valid id");
        let opened = NewEvent::from_event(&AccountEvent::AccountOpened {
            owner: "bench".into(),
        })
        .expect("encodes");
        store
            .append(&stream, ExpectedVersion::NoStream, vec![opened])
            .await
            .expect("append");
        let events: Vec<NewEvent> = (0..n)
            .map(|_| {
                let mut event = deposit_event();
                if schema_version == 1 {
                    event.schema_version = 1;
                    event.payload = serde_json::json!({ "amount": 1 });
                }
                event
            })
            .collect();
        store
            .append(&stream, ExpectedVersion::Exact(1), events)
            .await
            .expect("append");
        let handler = CommandHandler::<Account, _>::new(store)
            .without_state_cache()
            .snapshot_policy(SnapshotPolicy::Never);
        let mut times = Vec::new();
        for _ in 0..15 {
            let started = Instant::now();
            let loaded = handler.load("upcast").await.expect("load");
            times.push(started.elapsed());
            assert_eq!(loaded.state.balance, n as u64);
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
}
