//! A publisher split into 8 partitions, run by three OS processes at a time, while eight
//! writers append: processes are killed with SIGKILL (`kill -9`) and replaced 20 times, and
//! three are paused with SIGSTOP past their lease (others take their partitions) and resumed
//! with SIGCONT. JetStream ends with exactly one message per event, each stream's in version
//! order; every partition's checkpoint covers its events; the resumed processes' commits are
//! refused by the lease's fence.
//!
//! The children are this test binary again (`common::child`), running the partitioned
//! publisher instead of the test.

mod common;

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    TestStream, assert_exactly_once_in_order, child,
    child::{ChildPublisher, Report},
    event, eventually, settled_events, sid,
};
use esframe_core::{
    EventStore, ExpectedVersion, GlobalLog, LogPartition, Position,
    projection::{CheckpointStore, ProjectionKey},
    publish::{Backoff, Publisher},
};
use esframe_nats::JetStreamSink;
use esframe_postgres::PgEventStore;

/// This test's name, for the child to run it (`--exact`).
const TEST: &str = "a_partitioned_publisher_through_kills_and_pauses_sends_one_message_per_event";
const NAME: &str = "to_nats_partitioned";
const PARTITIONS: u16 = 8;
const RUNNERS: usize = 3;
const WRITERS: usize = 8;
const STREAMS: usize = 60;
const EVENTS: usize = 3_000;
const KILLS: usize = 20;
const PAUSES: usize = 3;
/// The children's lease time: a paused child's leases lapse quickly.
const LEASE: Duration = Duration::from_millis(500);

/// In the child: one runner of the partitioned publisher, until stdin closes.
async fn run_child() {
    let store = common::open_store(&child::setting("ESFRAME_CHILD_SCHEMA")).await;
    let js = async_nats::jetstream::new(common::nats().await);
    let running = Publisher::new(
        store.clone(),
        store.checkpoints().lease_time(LEASE),
        JetStreamSink::new(js),
        NAME,
        "/bank",
    )
    .expect("a valid publisher name")
    .partitions(PARTITIONS)
    .rebalance_interval(Duration::from_millis(100))
    .subject_prefix(child::setting("ESFRAME_CHILD_PREFIX"))
    .backoff(Backoff {
        min: Duration::from_millis(10),
        max: Duration::from_millis(200),
    })
    .batch_size(50)
    .spawn();
    child::serve(running).await
}

/// 8 writers, `EVENTS` events in appends of 1 to 3 over `STREAMS` streams they share, paced
/// while children are killed and paused, then as fast as they can.
fn spawn_writers(
    store: &PgEventStore,
    pacing: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            let pacing = Arc::clone(pacing);
            tokio::spawn(async move {
                let quota = EVENTS / WRITERS;
                let (mut written, mut n) = (0, 0u64);
                while written < quota {
                    let size = fastrand::usize(1..=3).min(quota - written);
                    let stream = sid(&format!("s{}", fastrand::usize(0..STREAMS)));
                    let events = (0..size)
                        .map(|_| {
                            n += 1;
                            event(w as u64 * 10_000 + n)
                        })
                        .collect();
                    store
                        .append(&stream, ExpectedVersion::Any, events)
                        .await
                        .unwrap();
                    written += size;
                    if pacing.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..60))).await;
                    }
                }
            })
        })
        .collect()
}

/// Partitions whose checkpoint is behind their last event, as `(partition, checkpoint, last)`.
async fn behind(store: &PgEventStore) -> Vec<(u16, Position, Position)> {
    let mut behind = Vec::new();
    for index in 0..PARTITIONS {
        let partition = LogPartition::new(index, PARTITIONS).unwrap();
        let key = ProjectionKey::new(NAME, index).unwrap();
        let at = store
            .checkpoints()
            .load(&key)
            .await
            .expect("read a checkpoint")
            .map_or(Position::START, |c| c.position);
        let (mut last, mut after) = (Position::START, Position::START);
        loop {
            let read = store
                .read_partition_batch(after, 1_000, partition)
                .await
                .expect("read a partition");
            if read.scanned_to <= after && read.events.is_empty() {
                break;
            }
            after = read.scanned_to;
            last = read.events.last().map_or(last, |e| e.global_position);
        }
        if at < last {
            behind.push((index, at, last));
        }
    }
    behind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_publisher_through_kills_and_pauses_sends_one_message_per_event() {
    if child::is_child() {
        return run_child().await;
    }
    let began = Instant::now();
    let js = async_nats::jetstream::new(common::nats().await);
    // JetStream's default duplicate window, 2 minutes: longer than the test.
    let stream = TestStream::create(&js, None).await;
    let (store, schema) = common::store("nats_partitioned_kill").await;
    let settings = [
        ("ESFRAME_CHILD_SCHEMA", schema.as_str()),
        ("ESFRAME_CHILD_PREFIX", stream.prefix.as_str()),
    ];
    let spawn = || ChildPublisher::spawn(TEST, &settings);

    let pacing = Arc::new(AtomicBool::new(true));
    let writers = spawn_writers(&store, &pacing);
    let mut children: Vec<ChildPublisher> = (0..RUNNERS).map(|_| spawn()).collect();
    let mut killed: Vec<Report> = Vec::new();
    let mut paused_fenced = 0;
    let (mut kills, mut pauses) = (0, 0);
    while kills < KILLS || pauses < PAUSES {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..400))).await;
        let at = fastrand::usize(0..children.len());
        if pauses < PAUSES && (kills >= KILLS || fastrand::usize(0..KILLS / PAUSES) == 0) {
            // Paused past its lease: the others take its partitions; resumed, it must find
            // its commits refused, and give the partitions up.
            let child = &children[at];
            let before = child.report().fenced;
            child.signal("STOP");
            tokio::time::sleep(LEASE * 3).await;
            child.signal("CONT");
            tokio::time::sleep(Duration::from_millis(700)).await;
            paused_fenced += child.report().fenced - before;
            pauses += 1;
        } else {
            killed.push(children.swap_remove(at).kill().await);
            children.push(spawn());
            kills += 1;
        }
    }
    let disrupted_for = began.elapsed();
    pacing.store(false, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let events = settled_events(&store, EVENTS).await;

    eventually(
        Duration::from_secs(60),
        || "the partitions' checkpoints did not reach their last events".to_owned(),
        || {
            let store = store.clone();
            async move { behind(&store).await.is_empty() }
        },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        || {
            let held: Vec<u64> = children.iter().map(|c| c.report().held).collect();
            format!("the {RUNNERS} runners do not hold all {PARTITIONS} partitions: {held:?}")
        },
        || {
            let held: u64 = children.iter().map(|c| c.report().held).sum();
            async move { held == u64::from(PARTITIONS) }
        },
    )
    .await;
    let mut last = Vec::new();
    for child in children {
        last.push(child.stop(Duration::from_secs(15)).await);
    }

    let messages = stream.messages().await;
    assert_exactly_once_in_order(&messages, &events);
    assert_eq!(stream.count().await, EVENTS as u64, "one message per event");
    let fenced: u64 = killed.iter().chain(&last).map(|r| r.fenced).sum();
    assert!(
        paused_fenced > 0,
        "no resumed child had a commit refused by the fence ({fenced} refusals in all)"
    );
    let resends: u64 = killed.iter().chain(&last).map(|r| r.duplicates).sum();
    // Straight to stderr, not `eprintln!`, which libtest captures.
    writeln!(
        std::io::stderr(),
        "{KILLS} SIGKILLs and {PAUSES} SIGSTOP/SIGCONT of {RUNNERS} runners of {PARTITIONS} \
         partitions in {disrupted_for:.1?}; {EVENTS} events, {} messages on JetStream; \
         {paused_fenced} commits of resumed runners refused by the fence ({fenced} in all); \
         JetStream dropped {resends} resends as duplicates; {:.1?} in all",
        messages.len(),
        began.elapsed()
    )
    .unwrap();

    stream.delete().await;
    common::drop_schema(store.pool(), &schema).await;
}
