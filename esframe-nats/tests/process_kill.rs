//! The publisher as an OS process of its own, killed with SIGKILL (`kill -9`) fifty times at
//! random points while eight writers append: JetStream ends with exactly one message per event
//! (its deduplication by `Nats-Msg-Id` drops the resends), in stream order.
//!
//! The child process is this test binary again, run with `ESFRAME_PUBLISHER_CHILD` set
//! (`common::child`): the test function then runs the publisher instead of the test.

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
    EventStore, ExpectedVersion, GlobalLog, Position,
    projection::{CheckpointStore, ProjectionKey},
    publish::{Backoff, Publisher},
};
use esframe_nats::JetStreamSink;
use esframe_postgres::PgEventStore;

/// This test's name, for the child to run it (`--exact`).
const TEST: &str = "one_message_per_event_through_fifty_publisher_process_kills";
const NAME: &str = "to_nats";
const WRITERS: usize = 8;
const STREAMS: usize = 60;
const EVENTS: usize = 3_000;
const KILLS: usize = 50;

/// In the child: the publisher of the parent's schema to the parent's JetStream stream, until
/// stdin closes.
async fn run_child() {
    let store = common::open_store(&child::setting("ESFRAME_CHILD_SCHEMA")).await;
    let js = async_nats::jetstream::new(common::nats().await);
    let running = Publisher::new(
        store.clone(),
        store
            .checkpoints()
            // A killed publisher's lease lapses quickly, so the next one takes over at once.
            .lease_time(std::time::Duration::from_millis(500)),
        JetStreamSink::new(js),
        NAME,
        "/bank",
    )
    .expect("a valid publisher name")
    .subject_prefix(child::setting("ESFRAME_CHILD_PREFIX"))
    .backoff(Backoff {
        min: Duration::from_millis(10),
        max: Duration::from_millis(200),
    })
    .batch_size(100)
    .spawn();
    child::serve(running).await
}

/// 8 writers, `EVENTS` events in appends of 1 to 3 over `STREAMS` streams they share, paced
/// while the publishers are being killed, then as fast as they can.
fn spawn_writers(
    store: &PgEventStore,
    killing: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            let killing = Arc::clone(killing);
            tokio::spawn(async move {
                let quota = EVENTS / WRITERS;
                let mut written = 0;
                let mut n = 0u64;
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
                    if killing.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..70))).await;
                    }
                }
            })
        })
        .collect()
}

/// The publisher's checkpoint, read from the database.
async fn checkpoint(store: &PgEventStore) -> Position {
    let key = ProjectionKey::single(NAME).unwrap();
    store
        .checkpoints()
        .load(&key)
        .await
        .expect("read the checkpoint")
        .map_or(Position::START, |c| c.position)
}

/// What the killed children had done, by their last reports.
#[derive(Debug, Default)]
struct Tally {
    kills: usize,
    before_lease: usize,
    before_ack: usize,
    mid_batch: usize,
    between_batches: usize,
    published: u64,
    /// From the start of a child to its first acknowledged message (when it was waited for).
    first_acks: Vec<Duration>,
    duplicates: u64,
}

impl Tally {
    /// The median and the longest time from a child's start to its first acknowledgement.
    fn first_ack(&self) -> (Duration, Duration) {
        let mut times = self.first_acks.clone();
        times.sort();
        let median = times.get(times.len() / 2).copied().unwrap_or_default();
        (median, times.last().copied().unwrap_or_default())
    }

    fn add(&mut self, report: Report) {
        self.kills += 1;
        self.published += report.published;
        self.duplicates += report.duplicates;
        match report {
            Report { active: false, .. } => self.before_lease += 1,
            Report { published: 0, .. } => self.before_ack += 1,
            Report { pending: 1.., .. } => self.mid_batch += 1,
            _ => self.between_batches += 1,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_message_per_event_through_fifty_publisher_process_kills() {
    if child::is_child() {
        return run_child().await;
    }
    let began = Instant::now();
    let js = async_nats::jetstream::new(common::nats().await);
    // JetStream's default duplicate window, 2 minutes: longer than the test.
    let stream = TestStream::create(&js, None).await;
    let (store, schema) = common::store("nats_process_kill").await;
    let settings = [
        ("ESFRAME_CHILD_SCHEMA", schema.as_str()),
        ("ESFRAME_CHILD_PREFIX", stream.prefix.as_str()),
    ];

    let killing = Arc::new(AtomicBool::new(true));
    let writers = spawn_writers(&store, &killing);
    let mut tally = Tally::default();
    for kill in 0..KILLS {
        let child = ChildPublisher::spawn(TEST, &settings);
        match kill % 5 {
            // Right after it started: before it connected, or while it takes its lease.
            0 => tokio::time::sleep(Duration::from_millis(fastrand::u64(0..15))).await,
            // Once it publishes: in the middle of a batch, messages in flight, the checkpoint
            // behind them.
            1 | 2 => {
                let deadline = Instant::now() + Duration::from_secs(5);
                while child.report().published == 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if child.report().published > 0 {
                    tally.first_acks.push(child.started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..30))).await;
            }
            // Anywhere from 20 to 300 ms after it started.
            _ => {
                let at = child.started + Duration::from_millis(fastrand::u64(20..300));
                tokio::time::sleep_until(at.into()).await;
            }
        }
        tally.add(child.kill().await);
    }
    let killed_at = began.elapsed();
    killing.store(false, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let head = store.head_position().await.unwrap();

    // A last publisher, left to catch up, then stopped.
    let last = ChildPublisher::spawn(TEST, &settings);
    eventually(
        Duration::from_secs(60),
        || {
            format!(
                "the last publisher did not reach {head}: {:?}",
                last.report()
            )
        },
        || {
            let store = store.clone();
            async move { checkpoint(&store).await >= head }
        },
    )
    .await;
    let final_report = last.stop(Duration::from_secs(15)).await;

    let events = settled_events(&store, EVENTS).await;
    let messages = stream.messages().await;
    assert_exactly_once_in_order(&messages, &events);
    assert_eq!(stream.count().await, EVENTS as u64, "one message per event");
    assert_eq!(tally.kills, KILLS);
    assert!(
        tally.mid_batch + tally.between_batches >= KILLS / 4,
        "too few children were killed while publishing: {tally:?}"
    );
    let resends = tally.duplicates + final_report.duplicates;
    assert!(
        resends > 0,
        "no resend was seen: the kills did not catch a message in flight: {tally:?}"
    );
    let (median, longest) = tally.first_ack();
    // Straight to stderr, not `eprintln!`, which libtest captures: the figures show in the
    // log of a passing run too.
    writeln!(
        std::io::stderr(),
        "{} SIGKILLs ({} before the lease, {} before the first ack, {} mid-batch, {} between \
         batches) in {killed_at:.1?}; a restarted child's first ack after {median:.0?} \
         (median; longest {longest:.0?}); {EVENTS} events, {} messages on JetStream; \
         JetStream dropped {resends} resends as duplicates (as last reported by the \
         children); last publisher: {final_report:?}; {:.1?} in all",
        tally.kills,
        tally.before_lease,
        tally.before_ack,
        tally.mid_batch,
        tally.between_batches,
        messages.len(),
        began.elapsed()
    )
    .unwrap();

    stream.delete().await;
    common::drop_schema(store.pool(), &schema).await;
}
