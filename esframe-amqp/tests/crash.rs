//! A publisher killed again and again while writers append: the broker gets every event at
//! least once, and the consumer applies every event exactly once, in stream order.

mod common;

use std::{collections::HashMap, collections::HashSet, time::Duration};

use common::{Broker, Recorder, amqp_url, event, sid, wait_for};
use esframe_amqp::{AmqpInbox, AmqpSink};
use esframe_core::{
    EventStore, ExpectedVersion, GlobalLog,
    publish::{Publisher, PublisherStatus},
};
use esframe_postgres::{PgEventStore, PgInbox};
use uuid::Uuid;

const WRITERS: usize = 8;
const STREAMS: usize = 50;
const EVENTS_PER_WRITER: usize = 250;
const KILLS: usize = 20;

fn publisher(
    store: &PgEventStore,
    broker: &Broker,
) -> Publisher<PgEventStore, esframe_postgres::PgCheckpoints, AmqpSink> {
    // A new sink each time, as a restarted process would have.
    let sink =
        AmqpSink::new(amqp_url(), &broker.name).connection_name(broker.connection_name("sink"));
    Publisher::new(
        store.clone(),
        store.checkpoints(),
        sink,
        "to_rabbitmq",
        "/bank",
    )
    .unwrap()
    .backoff(common::quick())
    .batch_size(50)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publisher_killed_twenty_times_loses_nothing_and_the_inbox_applies_each_event_once() {
    let pool = common::pool(30).await;
    let store = common::store(&pool, "crash").await;
    let consumer_schema = common::schema_name("crash_c");
    let broker = Broker::new().await;
    let tap = broker.tap("raw").await;

    let recorder = Recorder::create(&pool, &consumer_schema).await;
    let inbox = PgInbox::open(pool.clone(), &consumer_schema, "ledger")
        .await
        .unwrap();
    let consumer = AmqpInbox::new(amqp_url(), &broker.name, inbox.clone(), recorder.clone())
        .connection_name(broker.connection_name("inbox"))
        .backoff(common::quick())
        .early_delay(Duration::from_millis(20))
        .spawn();

    // 8 writers, 2,000 events in appends of 1 to 3 events, over 50 streams they share.
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut written = 0;
                let mut n = 0u64;
                while written < EVENTS_PER_WRITER {
                    let size = fastrand::usize(1..=3).min(EVENTS_PER_WRITER - written);
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
                    if fastrand::u8(0..4) == 0 {
                        tokio::time::sleep(Duration::from_millis(fastrand::u64(1..8))).await;
                    }
                }
            })
        })
        .collect();

    // Meanwhile: a publisher starts, publishes for a random while (0 to 60 ms after its first
    // confirm, or dies before it ever connects), then dies (aborted, as by a crash), with
    // messages in flight and its checkpoint behind; and another one starts, twenty times over.
    let mut killed_publishing = 0;
    for kill in 0..KILLS {
        let running = publisher(&store, &broker).spawn();
        if kill % 5 == 4 {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..30))).await;
        } else {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while running.status().published == 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..60))).await;
        }
        if running.status().published > 0 {
            killed_publishing += 1;
        }
        running.abort();
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let total = WRITERS * EVENTS_PER_WRITER;
    let head = store.head_position().await.unwrap();

    // The last publisher catches up.
    let running = publisher(&store, &broker).spawn();
    wait_for(
        Duration::from_secs(60),
        "the last publisher to catch up",
        async || running.status().position >= head,
        || format!("{:?}", running.status()),
    )
    .await;
    let status: PublisherStatus = running.status();
    running.shutdown().await;
    assert!(
        killed_publishing >= KILLS / 2,
        "only {killed_publishing} of the killed publishers were publishing"
    );

    // The broker got every event at least once.
    let stored = common::read_log(&store, total).await;
    assert_eq!(stored.len(), total);
    let raw = broker.drain(&tap).await;
    let ids: HashSet<Uuid> = raw
        .iter()
        .map(|m| Uuid::parse_str(m.properties.message_id().as_ref().unwrap().as_str()).unwrap())
        .collect();
    let expected: HashSet<Uuid> = stored.iter().map(|e| e.event_id).collect();
    assert_eq!(
        ids, expected,
        "every event reached the broker, and nothing else"
    );
    assert!(raw.len() >= total);

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

    // The consumer applied each exactly once, in order per stream.
    assert_eq!(recorder.count(&pool).await, total as i64, "each event once");
    assert_eq!(
        recorder
            .out_of_order
            .load(std::sync::atomic::Ordering::Relaxed),
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
    assert_eq!(applied.applied, total as u64);
    assert_eq!(applied.parked, 0);
    assert!(inbox.dead_letters().await.unwrap().is_empty());
    assert_eq!(
        applied.duplicates,
        raw.len() as u64 - total as u64,
        "every extra copy was recognised as a duplicate"
    );
    eprintln!(
        "{total} events, {killed_publishing} publishers killed while publishing, {} messages on \
         the broker ({} resent); consumer: {applied:?}; last publisher: {status:?}",
        raw.len(),
        raw.len() - total
    );

    broker.finish(&[tap]).await;
    common::drop_schema(&pool, store.schema().as_str()).await;
    common::drop_schema(&pool, &consumer_schema).await;
}
