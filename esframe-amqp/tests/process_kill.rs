//! The publisher as an OS process of its own, killed with SIGKILL (`kill -9`) fifty times at
//! random points while eight writers append: RabbitMQ gets every event at least once, each
//! stream's versions first arrive in order, and the consumer's inbox applies every event
//! exactly once, in stream order.
//!
//! The child process is this test binary again, run with `ESFRAME_PUBLISHER_CHILD` set
//! (`common::child`): the test function then runs the publisher instead of the test.

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    Broker, Recorder, amqp_url, child,
    child::{ChildPublisher, Report},
    event, sid, wait_for,
};
use esframe_amqp::{AmqpInbox, AmqpSink};
use esframe_core::{
    EventStore, ExpectedVersion, GlobalLog, Position,
    projection::{CheckpointStore, ProjectionKey},
    publish::Publisher,
};
use esframe_postgres::{PgEventStore, PgInbox};
use uuid::Uuid;

/// This test's name, for the child to run it (`--exact`).
const TEST: &str = "every_event_applied_once_through_fifty_publisher_process_kills";
const NAME: &str = "to_rabbitmq";
const WRITERS: usize = 8;
const STREAMS: usize = 60;
const EVENTS: usize = 3_000;
const KILLS: usize = 50;

/// In the child: the publisher of the parent's schema to the parent's exchange, until stdin
/// closes.
async fn run_child() {
    let store = common::open_store(&child::setting("ESFRAME_CHILD_SCHEMA")).await;
    let sink = AmqpSink::new(amqp_url(), child::setting("ESFRAME_CHILD_EXCHANGE"))
        .connection_name(child::setting("ESFRAME_CHILD_CONNECTION"));
    let running = Publisher::new(
        store.clone(),
        store
            .checkpoints()
            // A killed publisher's lease lapses quickly, so the next one takes over at once.
            .lease_time(std::time::Duration::from_millis(500)),
        sink,
        NAME,
        "/bank",
    )
    .expect("a valid publisher name")
    .backoff(common::quick())
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
        match report {
            Report { active: false, .. } => self.before_lease += 1,
            Report { published: 0, .. } => self.before_ack += 1,
            Report { pending: 1.., .. } => self.mid_batch += 1,
            _ => self.between_batches += 1,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_applied_once_through_fifty_publisher_process_kills() {
    if child::is_child() {
        return run_child().await;
    }
    let began = Instant::now();
    let pool = common::pool(30).await;
    let store = common::store(&pool, "process_kill").await;
    let consumer_schema = common::schema_name("process_kill_c");
    let broker = Broker::new().await;
    let tap = broker.tap("raw").await;
    let connection = broker.connection_name("sink");
    let settings = [
        ("ESFRAME_CHILD_SCHEMA", store.schema().as_str()),
        ("ESFRAME_CHILD_EXCHANGE", broker.name.as_str()),
        ("ESFRAME_CHILD_CONNECTION", connection.as_str()),
    ];

    // The consumer, all along.
    let recorder = Recorder::create(&pool, &consumer_schema).await;
    let inbox = PgInbox::open(pool.clone(), &consumer_schema, "ledger")
        .await
        .unwrap();
    let consumer = AmqpInbox::new(amqp_url(), &broker.name, inbox.clone(), recorder.clone())
        .connection_name(broker.connection_name("inbox"))
        .backoff(common::quick())
        .early_delay(Duration::from_millis(20))
        .spawn();

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
    wait_for(
        Duration::from_secs(60),
        "the last publisher to catch up",
        async || checkpoint(&store).await >= head,
        || format!("{:?}", last.report()),
    )
    .await;
    let final_report = last.stop(Duration::from_secs(15)).await;
    assert_eq!(tally.kills, KILLS);
    assert!(
        tally.mid_batch + tally.between_batches >= KILLS / 4,
        "too few children were killed while publishing: {tally:?}"
    );

    // The broker got every event at least once; per stream, the first copy of each version
    // came after the first copy of the one before.
    let stored = common::read_log(&store, EVENTS).await;
    assert_eq!(stored.len(), EVENTS);
    let raw = broker.drain(&tap).await;
    let mut copies: HashMap<Uuid, usize> = HashMap::new();
    let mut first_seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let by_id: HashMap<Uuid, &esframe_core::RecordedEvent> =
        stored.iter().map(|e| (e.event_id, e)).collect();
    for message in &raw {
        let id = message.properties.message_id().as_ref().unwrap().as_str();
        let id = Uuid::parse_str(id).unwrap();
        let seen = copies.entry(id).or_default();
        *seen += 1;
        if *seen == 1 {
            let e = by_id[&id];
            first_seen
                .entry(e.stream_id.to_string())
                .or_default()
                .push(e.stream_version);
        }
    }
    let expected: HashSet<Uuid> = stored.iter().map(|e| e.event_id).collect();
    let got: HashSet<Uuid> = copies.keys().copied().collect();
    assert_eq!(
        got, expected,
        "every event reached the broker, nothing else"
    );
    assert!(raw.len() >= EVENTS);
    for (stream, versions) in &first_seen {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(
            versions, &expected,
            "{stream}: first copies in version order"
        );
    }
    let duplicates = raw.len() - EVENTS;
    let most_copies = copies.values().max().copied().unwrap_or(0);

    // The consumer's queue got the same copies: it handles every one of them.
    wait_for(
        Duration::from_secs(90),
        "the consumer to handle every message",
        async || {
            let s = consumer.status();
            s.applied + s.duplicates >= raw.len() as u64
        },
        || format!("{:?}", consumer.status()),
    )
    .await;
    let applied = consumer.status();
    consumer.shutdown().await;

    // Each event applied exactly once, in order per stream.
    assert_eq!(
        recorder.count(&pool).await,
        EVENTS as i64,
        "each event once"
    );
    assert_eq!(
        recorder.out_of_order.load(Ordering::Relaxed),
        0,
        "the handler never saw a version out of order"
    );
    let mut want: HashMap<String, (i64, i64, i64)> = HashMap::new();
    for e in &stored {
        let entry = want.entry(e.stream_id.to_string()).or_default();
        entry.0 += 1;
        entry.1 += e.payload.value().unwrap()["n"].as_i64().unwrap();
        entry.2 = entry.2.max(i64::try_from(e.stream_version).unwrap());
    }
    assert_eq!(
        recorder.per_stream(&pool).await,
        want,
        "per stream: events, sum of n, last version"
    );
    assert_eq!(applied.applied, EVENTS as u64);
    assert_eq!(applied.parked, 0);
    assert!(applied.delivered >= raw.len() as u64);
    assert!(inbox.dead_letters().await.unwrap().is_empty());
    assert_eq!(
        applied.duplicates, duplicates as u64,
        "every extra copy was recognised as a duplicate"
    );
    let (median, longest) = tally.first_ack();
    // Straight to stderr, not `eprintln!`, which libtest captures: the figures show in the
    // log of a passing run too.
    writeln!(
        std::io::stderr(),
        "{} SIGKILLs ({} before the lease, {} before the first confirm, {} mid-batch, {} \
         between batches) in {killed_at:.1?}; a restarted child's first confirm after \
         {median:.0?} (median; longest {longest:.0?}); {EVENTS} events, {} messages on RabbitMQ \
         ({duplicates} duplicates, at most {most_copies} copies of one event); consumer: \
         {applied:?}; last publisher: {final_report:?}; {:.1?} in all",
        tally.kills,
        tally.before_lease,
        tally.before_ack,
        tally.mid_batch,
        tally.between_batches,
        raw.len(),
        began.elapsed()
    )
    .unwrap();

    broker.finish(&[tap]).await;
    common::drop_schema(&pool, store.schema().as_str()).await;
    common::drop_schema(&pool, &consumer_schema).await;
}
