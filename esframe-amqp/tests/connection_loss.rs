//! The broker closes the clients' connections while events are being published and consumed:
//! the publisher reports the failure, reconnects and catches up, the consumer reconnects, and
//! every event is applied exactly once.

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::{Broker, Recorder, amqp_url, event, sid, wait_for};
use esframe_amqp::{AmqpInbox, AmqpSink};
use esframe_core::{EventStore, ExpectedVersion, GlobalLog, Position, publish::Publisher};
use esframe_postgres::PgInbox;

const WRITERS: usize = 4;
const STREAMS: usize = 20;
const MAX_PER_WRITER: usize = 1_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_closed_by_the_broker_are_reopened_and_nothing_is_lost_or_applied_twice() {
    let pool = common::pool(20).await;
    let store = common::store(&pool, "conn_loss").await;
    let consumer_schema = common::schema_name("conn_loss_c");
    let broker = Broker::new().await;

    let recorder = Recorder::create(&pool, &consumer_schema).await;
    let inbox = PgInbox::open(pool.clone(), &consumer_schema, "ledger")
        .await
        .unwrap();
    let consumer = AmqpInbox::new(amqp_url(), &broker.name, inbox.clone(), recorder.clone())
        .connection_name(broker.connection_name("inbox"))
        .backoff(common::quick())
        .early_delay(Duration::from_millis(20))
        .spawn();
    let sink =
        AmqpSink::new(amqp_url(), &broker.name).connection_name(broker.connection_name("sink"));
    let publisher = Publisher::new(
        store.clone(),
        store.checkpoints(),
        sink,
        "to_rabbitmq",
        "/bank",
    )
    .unwrap()
    .backoff(common::quick())
    .spawn();

    // Writers append steadily until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, stop) = (store.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < MAX_PER_WRITER {
                    n += 1;
                    let stream = sid(&format!("s{}", fastrand::usize(0..STREAMS)));
                    store
                        .append(
                            &stream,
                            ExpectedVersion::Any,
                            vec![event((w * 1000 + n) as u64)],
                        )
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(5..15))).await;
                }
            })
        })
        .collect();

    // While they write, the broker closes the sink's and the consumer's connections. The
    // publisher notices at its next publish (or at once, with messages in flight).
    let mut kills = 0;
    let mut reported = None;
    while reported.is_none() && kills < 3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let closed = broker.kill_connections(&["sink", "inbox"]).await;
        assert!(closed >= 1, "no connection of this test to close");
        kills += 1;
        // Watch the publisher's status for the failure.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            let status = publisher.status();
            if status.failures > 0 && status.last_error.is_some() {
                reported = Some(status);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let reported = reported.unwrap_or_else(|| {
        panic!(
            "after {kills} closes the publisher never reported a failure: {:?}",
            publisher.status()
        )
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }

    // The publisher catches up, and says the broker is fine again.
    let head = store.head_position().await.unwrap();
    wait_for(
        Duration::from_secs(60),
        "the publisher to catch up",
        async || {
            let s = publisher.status();
            s.position >= head && s.last_error.is_none() && s.broker_reachable
        },
        || format!("{:?}", publisher.status()),
    )
    .await;
    let caught_up = publisher.status();
    publisher.shutdown().await;

    // The consumer applies every event once.
    let stored = store.read_all(Position::START, usize::MAX).await.unwrap();
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
    assert_eq!(applied.applied, total as u64);
    assert_eq!(recorder.out_of_order.load(Ordering::Relaxed), 0);
    let mut want: HashMap<String, (i64, i64, i64)> = HashMap::new();
    for e in &stored {
        let entry = want.entry(e.stream_id.to_string()).or_default();
        entry.0 += 1;
        entry.1 += e.payload.value().unwrap()["n"].as_i64().unwrap();
        entry.2 = entry.2.max(i64::try_from(e.stream_version).unwrap());
    }
    assert_eq!(recorder.per_stream(&pool).await, want);
    assert_eq!(applied.parked, 0);
    assert!(
        applied.connections >= 2,
        "the consumer reconnected: {applied:?}"
    );
    eprintln!(
        "{total} events, {kills} closes; publisher when it reported: {reported:?}; \
         caught up: {caught_up:?}; consumer: {applied:?}"
    );

    broker.finish(&[]).await;
    common::drop_schema(&pool, store.schema().as_str()).await;
    common::drop_schema(&pool, &consumer_schema).await;
}
