//! The broker itself is stopped while events are being published and consumed, and started
//! again on the same ports and data directory: the publisher reports the broker unreachable,
//! retries with its backoff (no busy loop), and resumes once the broker is back; every event
//! reaches the queue at least once, and the consumer applies each exactly once, in stream order.
//!
//! The broker is a private RabbitMQ node of this test's own ([`common::private_broker`]), never
//! the shared one on 5672, which other tests use. `connection_loss.rs` covers connections closed
//! by a broker that keeps running; here the whole server goes away (`rabbitmqctl shutdown`), so
//! nothing at all answers on its port while it is down, and what survives is what it wrote to
//! disk: the durable exchange, queues and bindings, and the persistent messages it confirmed.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Recorder, event, private_broker::PrivateBroker, sid, wait_for};
use esframe_amqp::{
    AmqpInbox, AmqpSink, Topology, binding,
    lapin::{Channel, Connection, options::BasicGetOptions},
};
use esframe_core::{
    EventStore, ExpectedVersion, GlobalLog, Position, RecordedEvent,
    publish::{Backoff, IncomingEvent, Publisher, PublisherStatus, RunningPublisher},
};
use esframe_postgres::PgInbox;
use uuid::Uuid;

const WRITERS: usize = 4;
const STREAMS: usize = 12;
const MAX_PER_WRITER: usize = 1_000;
/// How long the broker stays down (after its shutdown, before it is started again).
const DOWN: Duration = Duration::from_secs(2);
/// The publisher's backoff: long enough to count its retries, short enough for a quick test.
const BACKOFF: Backoff = Backoff {
    min: Duration::from_millis(50),
    max: Duration::from_millis(500),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_publisher_resumes_after_the_broker_is_stopped_and_started_and_nothing_is_lost() {
    let began = Instant::now();
    let mut broker = PrivateBroker::start().await;
    let booted_in = began.elapsed();
    let url = broker.url();

    // Durable exchange and queues (the default), without expiry: the broker and everything on
    // it go away with the test. The tap is a second queue on the exchange that nobody consumes:
    // it keeps every message that reached the broker.
    let name = format!("esft.{}", Uuid::now_v7());
    let topology = Topology::new(&name, &name);
    let tap = format!("{name}.tap");
    let (admin, channel) = connect_admin(&url, &name).await;
    topology
        .declare(&channel)
        .await
        .expect("declare the topology");
    topology
        .declare_queue(&channel, &tap, "#")
        .await
        .expect("declare the tap queue");
    let _ = admin.close(200, "declared".into()).await;

    let pool = common::pool(20).await;
    let store = common::store(&pool, "broker_restart").await;
    let consumer_schema = common::schema_name("broker_restart_c");
    let recorder = Recorder::create(&pool, &consumer_schema).await;
    let inbox = PgInbox::open(pool.clone(), &consumer_schema, "ledger")
        .await
        .unwrap();
    let consumer = AmqpInbox::new(url.clone(), &name, inbox, recorder.clone())
        .connection_name(format!("{name}.inbox"))
        .backoff(common::quick())
        .early_delay(Duration::from_millis(20))
        .spawn();
    let sink = AmqpSink::new(url.clone(), &name)
        .connection_name(format!("{name}.sink"))
        .connect_timeout(Duration::from_secs(2))
        .confirm_timeout(Duration::from_secs(5));
    let publisher = Publisher::new(
        store.clone(),
        store.checkpoints(),
        sink,
        "to_rabbitmq",
        "/bank",
    )
    .unwrap()
    .backoff(BACKOFF)
    .spawn();

    // Writers append steadily, through the outage, until told to stop.
    let stop_writing = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, stop) = (store.clone(), Arc::clone(&stop_writing));
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < MAX_PER_WRITER {
                    n += 1;
                    let stream = sid(&format!("s{}", fastrand::usize(0..STREAMS)));
                    store
                        .append(
                            &stream,
                            ExpectedVersion::Any,
                            vec![event((w * 100_000 + n) as u64)],
                        )
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(15..35))).await;
                }
            })
        })
        .collect();

    // Publishing and consuming are under way.
    wait_for(
        Duration::from_secs(30),
        "the publisher and the consumer to get going",
        async || publisher.status().published >= 100 && consumer.status().applied >= 20,
        || format!("{:?} / {:?}", publisher.status(), consumer.status()),
    )
    .await;
    let before = publisher.status();
    assert!(before.broker_reachable, "{before:?}");

    // The broker is stopped: the publisher notices (while the node shuts down) and says so.
    let reported_down = |s: &PublisherStatus| !s.broker_reachable && s.last_error.is_some();
    let noticing = watch(
        &publisher,
        Duration::from_secs(30),
        "notice the stop",
        reported_down,
    );
    let stopping = Instant::now();
    let stop = async {
        broker.stop().await;
        stopping.elapsed()
    };
    let (stopped_in, noticed) = tokio::join!(stop, noticing);
    let noticed_after = noticed.at.duration_since(stopping);
    let down = noticed.status;
    // Nothing is acknowledged while nothing runs on the port (a confirm read just after the
    // shutdown returned is allowed for by waiting a little first).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quiet = publisher.status();
    tokio::time::sleep(DOWN).await;
    let still_down = publisher.status();
    assert!(
        !still_down.broker_reachable && still_down.last_error.is_some(),
        "the status says the broker is down while it is: {still_down:?}"
    );
    assert_eq!(
        still_down.published, quiet.published,
        "nothing acknowledged while the broker is down"
    );
    assert!(
        still_down.failures > before.failures,
        "failures counted: {still_down:?}"
    );

    // Started again on the same ports and data: the publisher resumes by itself.
    let starting = Instant::now();
    broker.start_again().await;
    let ready = Instant::now();
    let restarted_in = ready.duration_since(starting);
    let resumed = watch(&publisher, Duration::from_secs(30), "resume", |s| {
        s.broker_reachable && s.published > still_down.published
    })
    .await;
    let resumed_after = resumed.at.duration_since(ready);
    let outage = resumed.at.duration_since(stopping);

    // A little more live publishing, then the writers stop and the publisher catches up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_writing.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let head = store.head_position().await.unwrap();
    wait_for(
        Duration::from_secs(60),
        "the publisher to catch up",
        async || {
            let s = publisher.status();
            s.position >= head && s.pending == 0 && s.last_error.is_none() && s.broker_reachable
        },
        || format!("{:?}", publisher.status()),
    )
    .await;
    let caught_up = publisher.status();
    let caught_up_after = ready.elapsed();
    publisher.shutdown().await;

    // No busy loop: while the broker was away, each publisher step failed at most once per
    // stream in flight, and the steps were spaced by the backoff (50, 100, 200, 400 ms, then
    // 500 ms), so the failures are bounded by the outage's length. A spinning publisher would
    // fail thousands of times a second.
    let failures = caught_up.failures - before.failures;
    let max_steps = steps_within(outage, BACKOFF) + 2;
    let bound = STREAMS as u64 * max_steps;
    assert!(
        failures >= 1 && failures <= bound,
        "{failures} failures in an outage of {outage:?}: expected 1..={bound} ({STREAMS} \
         streams × {max_steps} steps of backoff {BACKOFF:?})"
    );

    // The consumer applies every event once, in each stream's order.
    let stored = store.read_all(Position::START, usize::MAX).await.unwrap();
    assert_eq!(
        stored.last().map(|e| e.global_position),
        Some(head),
        "the log, read to the head the publisher reached"
    );
    let total = stored.len() as i64;
    wait_for(
        Duration::from_secs(60),
        "the consumer to apply every event",
        async || recorder.count(&pool).await >= total,
        || format!("{:?}", consumer.status()),
    )
    .await;
    // Give duplicates still queued a moment to arrive (they must change nothing).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let applied = consumer.status();
    consumer.shutdown().await;

    assert_eq!(recorder.count(&pool).await, total, "each event once");
    assert_eq!(applied.applied, total as u64, "{applied:?}");
    assert_eq!(recorder.out_of_order.load(Ordering::Relaxed), 0);
    let mut want: HashMap<String, (i64, i64, i64)> = HashMap::new();
    for e in &stored {
        let entry = want.entry(e.stream_id.to_string()).or_default();
        entry.0 += 1;
        entry.1 += e.payload.value().unwrap()["n"].as_i64().unwrap();
        entry.2 = entry.2.max(i64::try_from(e.stream_version).unwrap());
    }
    assert_eq!(recorder.per_stream(&pool).await, want);
    assert_eq!(applied.parked, 0, "{applied:?}");
    assert!(
        applied.connections >= 2,
        "the consumer reconnected: {applied:?}"
    );

    // Every event reached the broker's queue at least once, and each stream's first copies
    // came in version order (a resend may repeat events already there, after a lost confirm or
    // from the checkpoint of a partly acknowledged batch).
    let (admin, channel) = connect_admin(&url, &name).await;
    let copies = drain(&channel, &tap).await;
    let duplicates = assert_all_arrived_in_order(&copies, &stored);
    let _ = admin.close(200, "test done".into()).await;

    eprintln!(
        "{total} events in {STREAMS} streams; private broker {}: booted in {booted_in:?}, \
         stopped in {stopped_in:?}, down {DOWN:?}, started again in {restarted_in:?}\n\
         publisher noticed {noticed_after:?} after the stop began: {down:?}\n\
         errors it reported until then: {:?}\n\
         after {DOWN:?} down: {still_down:?}\n\
         resumed {resumed_after:?} after the broker accepted connections (outage {outage:?}, \
         {failures} failures, at most {bound} allowed): {:?}\n\
         caught up {caught_up_after:?} after the restart: {caught_up:?}\n\
         tap: {} copies, {duplicates} duplicates; consumer: {applied:?}",
        broker.node,
        noticed.errors,
        resumed.status,
        copies.len()
    );

    broker.stop().await;
    drop(broker);
    common::drop_schema(&pool, store.schema().as_str()).await;
    common::drop_schema(&pool, &consumer_schema).await;
}

/// A connection to the private broker and a channel on it, to declare and look.
async fn connect_admin(url: &str, name: &str) -> (Connection, Channel) {
    let connection = esframe_amqp::connect(url, &format!("{name}.admin"))
        .await
        .unwrap_or_else(|err| panic!("connect to the private broker at {url}: {err}"));
    let channel = connection.create_channel().await.expect("open a channel");
    (connection, channel)
}

/// When a publisher's status first met a condition.
struct Seen {
    at: Instant,
    status: PublisherStatus,
    /// The distinct errors the status showed until then, in order.
    errors: Vec<String>,
}

/// Polls the publisher's status every 2 ms until `done` holds.
async fn watch(
    publisher: &RunningPublisher,
    limit: Duration,
    what: &str,
    done: impl Fn(&PublisherStatus) -> bool,
) -> Seen {
    let deadline = Instant::now() + limit;
    let mut errors: Vec<String> = Vec::new();
    loop {
        let status = publisher.status();
        if let Some(error) = &status.last_error
            && !errors.contains(error)
        {
            errors.push(error.clone());
        }
        if done(&status) {
            return Seen {
                at: Instant::now(),
                status,
                errors,
            };
        }
        assert!(
            Instant::now() < deadline,
            "the publisher did not {what} within {limit:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The most publisher steps that fit in `time` when the waits between them follow `backoff`
/// (each step after the first waits `backoff.wait(attempt)`).
fn steps_within(time: Duration, backoff: Backoff) -> u64 {
    let mut steps = 1;
    let mut waited = Duration::ZERO;
    loop {
        waited += backoff.wait(steps as u32);
        if waited > time {
            return steps;
        }
        steps += 1;
    }
}

/// Takes every message from `queue`: (message id, the stream and version it says it is).
async fn drain(channel: &Channel, queue: &str) -> Vec<(Uuid, String, u64)> {
    let mut copies = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let delivery = message.delivery;
        let cloud = binding::cloud_event(&delivery.properties, &delivery.data)
            .expect("a CloudEvent in the queue");
        let incoming = IncomingEvent::from_cloud_event(cloud).expect("an esframe event");
        copies.push((
            incoming.message_id,
            incoming.stream_id.to_string(),
            incoming.stream_version,
        ));
    }
    copies
}

/// Checks that every stored event is among `copies` and that, per stream, the first copy of
/// each version comes after the first copy of the one before; returns how many copies were
/// repeats.
fn assert_all_arrived_in_order(copies: &[(Uuid, String, u64)], stored: &[RecordedEvent]) -> usize {
    let by_id: HashMap<Uuid, &RecordedEvent> = stored.iter().map(|e| (e.event_id, e)).collect();
    let mut highest: BTreeMap<&str, u64> = BTreeMap::new();
    let mut duplicates = 0;
    for (id, stream, version) in copies {
        let event = by_id
            .get(id)
            .unwrap_or_else(|| panic!("message {id} is no stored event"));
        assert_eq!(
            (event.stream_id.to_string().as_str(), event.stream_version),
            (stream.as_str(), *version),
            "message {id} names its event"
        );
        let seen = highest.entry(stream).or_default();
        if *version <= *seen {
            duplicates += 1;
        } else {
            assert_eq!(
                *version,
                *seen + 1,
                "{stream}: version {version} reached the queue before version {}",
                *seen + 1
            );
            *seen = *version;
        }
    }
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for e in stored {
        let last = want.entry(e.stream_id.to_string()).or_default();
        *last = (*last).max(e.stream_version);
    }
    let got: BTreeMap<String, u64> = highest
        .into_iter()
        .map(|(stream, version)| (stream.to_owned(), version))
        .collect();
    assert_eq!(got, want, "every event of every stream reached the queue");
    assert_eq!(copies.len() - duplicates, stored.len());
    duplicates
}
