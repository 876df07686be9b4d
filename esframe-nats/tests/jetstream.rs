//! esframe-nats against a real nats-server (JetStream) and PostgreSQL: what goes on the wire,
//! exactly one stored message per event through crashes of the publisher and of the broker, and
//! exactly one application per event beyond JetStream's duplicate window.

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{TestStream, assert_exactly_once_in_order, event, eventually, settled_events, sid};
use esframe_core::{
    EventStore, ExpectedVersion, GlobalLog, RecordedEvent,
    projection::HandlerError,
    publish::{
        Backoff, CloudEvent, IncomingEvent, MessageSink, OutgoingMessage, Publisher, SinkError,
    },
};
use esframe_nats::{JetStreamInbox, JetStreamSink, headers::CE_PREFIX};
use esframe_postgres::{InboxHandler, PgEventStore, PgInbox, PgTransaction};
use uuid::Uuid;

fn quick() -> Backoff {
    Backoff {
        min: Duration::from_millis(10),
        max: Duration::from_millis(200),
    }
}

fn publisher(
    store: &PgEventStore,
    sink: &JetStreamSink,
    stream: &TestStream,
    name: &str,
) -> Publisher<PgEventStore, esframe_postgres::PgCheckpoints, JetStreamSink> {
    Publisher::new(
        store.clone(),
        store.checkpoints(),
        sink.clone(),
        name,
        "/bank",
    )
    .expect("a valid publisher name")
    .subject_prefix(stream.prefix.clone())
    .backoff(quick())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_attributes_on_the_wire() {
    let js = async_nats::jetstream::new(common::nats().await);
    let stream = TestStream::create(&js, None).await;
    let (store, schema) = common::store("nats_wire").await;
    for (s, n) in [("ada", 3u64), ("zoë", 2)] {
        store
            .append(
                &sid(s),
                ExpectedVersion::NoStream,
                (1..=n).map(event).collect(),
            )
            .await
            .unwrap();
    }
    let events = settled_events(&store, 5).await;
    let sink = JetStreamSink::new(js.clone());
    let reached = publisher(&store, &sink, &stream, "to_nats")
        .catch_up()
        .await
        .unwrap();
    assert_eq!(reached, events.last().unwrap().global_position);

    let messages = stream.messages().await;
    assert_exactly_once_in_order(&messages, &events);
    let by_id: HashMap<String, &RecordedEvent> =
        events.iter().map(|e| (e.event_id.to_string(), e)).collect();
    for m in &messages {
        let e = by_id[m.header("nats-msg-id")];
        let raw = |name: &str| -> &str {
            m.raw_headers
                .get(name)
                .unwrap_or_else(|| panic!("no header {name:?} sent: {:?}", m.raw_headers))
        };
        assert_eq!(
            m.subject,
            format!("{}.account.Deposited", stream.prefix),
            "the subject is the prefix, aggregate type and event type"
        );
        assert_eq!(raw("Nats-Msg-Id"), e.event_id.to_string());
        assert_eq!(raw("ce-id"), e.event_id.to_string());
        assert_eq!(raw("ce-source"), "/bank");
        assert_eq!(raw("ce-specversion"), "1.0");
        assert_eq!(raw("ce-type"), "Deposited.v1");
        assert_eq!(raw("ce-datacontenttype"), "application/json");
        assert_eq!(raw("content-type"), "application/json");
        assert_eq!(
            raw("ce-time"),
            e.recorded_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .as_str()
        );
        assert_eq!(
            raw("ce-sequence"),
            format!("{:020}", e.global_position.get())
        );
        assert_eq!(raw("ce-sequence").len(), 20, "zero-padded to 20 digits");
        assert_eq!(raw("ce-sequencetype"), "Integer");
        assert_eq!(raw("ce-esframeaggregate"), "account");
        assert_eq!(raw("ce-esframeversion"), e.stream_version.to_string());
        let correlation = e.metadata.correlation_id.unwrap();
        assert_eq!(raw("ce-correlationid"), correlation.to_string());
        assert!(
            raw("ce-traceparent").starts_with(&format!("00-{}-", correlation.simple())),
            "the trace is the correlation: {}",
            raw("ce-traceparent")
        );
        assert_eq!(raw("esframe-stream-version"), e.stream_version.to_string());
        assert_eq!(raw("esframe-position"), e.global_position.get().to_string());
        // Values outside printable ASCII are percent-encoded (NATS binding, 3.1.3.2).
        if e.stream_id.id() == "zoë" {
            assert_eq!(raw("ce-subject"), "account/zo%C3%AB");
            assert_eq!(raw("ce-esframestream"), "zo%C3%AB");
            assert_eq!(raw("ce-partitionkey"), "account/zo%C3%AB");
            assert_eq!(raw("esframe-stream"), "account/zo%C3%AB");
        } else {
            assert_eq!(raw("ce-subject"), "account/ada");
            assert_eq!(raw("esframe-stream"), "account/ada");
        }
        assert_eq!(m.header("ce-subject"), e.stream_id.to_string(), "decoded");
        let body: serde_json::Value = serde_json::from_str(&m.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({ "n": e.payload["n"] }),
            "the body is the data"
        );

        // And a consumer reads the same event back.
        let cloud = CloudEvent::from_binary(m.decoded.clone(), CE_PREFIX, m.body.clone()).unwrap();
        let incoming = IncomingEvent::from_cloud_event(cloud).unwrap();
        assert_eq!(
            (
                incoming.message_id,
                &incoming.stream_id,
                incoming.stream_version,
                incoming.position,
                incoming.event_type.as_str(),
            ),
            (
                e.event_id,
                &e.stream_id,
                e.stream_version,
                e.global_position,
                "Deposited",
            )
        );
        assert_eq!(incoming.cloud_event.datacontenttype, "application/json");
    }

    // A second publisher of the same log, within the window: every message is a duplicate.
    let again = publisher(&store, &sink, &stream, "again");
    again.catch_up().await.unwrap();
    let status = again.status();
    assert_eq!(
        (status.published, status.duplicates),
        (events.len() as u64, events.len() as u64),
        "the PubAck's duplicate flag: {status:?}"
    );
    assert_eq!(stream.count().await, events.len() as u64);

    // No stream for the subject: refused, not retried as unreachable.
    let mut lost = OutgoingMessage {
        id: Uuid::now_v7(),
        subject: format!("esft-nostream.{}", Uuid::now_v7().simple()),
        stream_id: events[0].stream_id.clone(),
        stream_version: 1,
        position: events[0].global_position,
        event: CloudEvent::from_event(&events[0], events[0].event_id, "/bank"),
    };
    lost.event.id = lost.id;
    let refused = sink.publish(&lost).await.unwrap_err();
    assert!(
        matches!(refused, SinkError::Refused { .. }) && !refused.is_transient(),
        "{refused:?}"
    );

    stream.delete().await;
    common::drop_schema(store.pool(), &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_message_per_event_through_fifty_publisher_aborts() {
    const STREAMS: usize = 50;
    const WRITERS: usize = 8;
    const EVENTS: usize = 2_000;
    let js = async_nats::jetstream::new(common::nats().await);
    let stream = TestStream::create(&js, None).await;
    let (store, schema) = common::store("nats_crashes").await;
    let sink = JetStreamSink::new(js.clone());

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mine: Vec<usize> = (w..STREAMS).step_by(WRITERS).collect();
                let mut n = 0u64;
                let mut written = 0;
                while written < EVENTS / WRITERS {
                    let s = mine[fastrand::usize(..mine.len())];
                    let count = fastrand::usize(1..=3).min(EVENTS / WRITERS - written);
                    let batch = (0..count).map(|_| {
                        n += 1;
                        event(n)
                    });
                    store
                        .append(
                            &sid(&format!("s{s}")),
                            ExpectedVersion::Any,
                            batch.collect(),
                        )
                        .await
                        .unwrap();
                    written += count;
                    if fastrand::u8(..4) == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            })
        })
        .collect();

    let began = std::time::Instant::now();
    let mut aborts = 0;
    let mut duplicates_seen = 0;
    let mut running = publisher(&store, &sink, &stream, "to_nats").spawn();
    while aborts < 50 {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(20..120))).await;
        duplicates_seen += running.status().duplicates;
        running.abort();
        aborts += 1;
        running = publisher(&store, &sink, &stream, "to_nats").spawn();
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let head = store.head_position().await.unwrap();
    eventually(
        Duration::from_secs(60),
        || {
            format!(
                "the publisher did not catch up to {head}: {:?}",
                running.status()
            )
        },
        || async { running.status().position >= head },
    )
    .await;
    duplicates_seen += running.status().duplicates;
    running.shutdown().await;

    let events = settled_events(&store, EVENTS).await;
    let messages = stream.messages().await;
    assert_exactly_once_in_order(&messages, &events);
    assert_eq!(stream.count().await, EVENTS as u64);
    eprintln!(
        "{aborts} aborts; JetStream dropped {duplicates_seen} resends as duplicates; {:.1?}",
        began.elapsed()
    );

    stream.delete().await;
    common::drop_schema(store.pool(), &schema).await;
}

/// The consumer's effect: per producer stream, events counted, payloads summed, and whether
/// the versions came in order, in a table of the consumer's schema.
#[derive(Clone)]
struct Counter {
    schema: String,
    /// Events whose handler fails on the first attempt (by event id).
    fail_once: Arc<Mutex<HashSet<Uuid>>>,
    /// Events whose handler always fails.
    poison: HashSet<Uuid>,
}

impl Counter {
    async fn create(pool: &sqlx::PgPool, schema: &str) -> Self {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE \"{schema}\".counts (
                 stream TEXT PRIMARY KEY, events BIGINT NOT NULL, total BIGINT NOT NULL,
                 last_version BIGINT NOT NULL, out_of_order BIGINT NOT NULL
             );"
        )))
        .execute(pool)
        .await
        .unwrap();
        Self {
            schema: schema.to_owned(),
            fail_once: Arc::default(),
            poison: HashSet::new(),
        }
    }

    async fn counts(&self, pool: &sqlx::PgPool) -> BTreeMap<String, (i64, i64, i64, i64)> {
        let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT stream, events, total, last_version, out_of_order FROM \"{}\".counts",
            self.schema
        )))
        .fetch_all(pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(s, e, t, v, o)| (s, (e, t, v, o)))
            .collect()
    }
}

impl InboxHandler for Counter {
    async fn handle(
        &self,
        tx: &mut PgTransaction,
        event: &IncomingEvent,
    ) -> Result<(), HandlerError> {
        if self.poison.contains(&event.message_id) {
            return Err("poison".into());
        }
        if self.fail_once.lock().unwrap().remove(&event.message_id) {
            return Err("failing once".into());
        }
        let data: serde_json::Value = serde_json::from_str(&event.cloud_event.data)?;
        let n = data["n"].as_i64().ok_or("no n")?;
        let version = i64::try_from(event.stream_version)?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO \"{s}\".counts AS c (stream, events, total, last_version, out_of_order)
             VALUES ($1, 1, $2, $3, CASE WHEN $3 = 1 THEN 0 ELSE 1 END)
             ON CONFLICT (stream) DO UPDATE SET events = c.events + 1, total = c.total + $2,
                 last_version = $3,
                 out_of_order = c.out_of_order + CASE WHEN c.last_version + 1 = $3 THEN 0 ELSE 1 END",
            s = self.schema
        )))
        .bind(event.stream_id.to_string())
        .bind(n)
        .bind(version)
        .execute(tx.as_mut())
        .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_dedup_window_the_inbox_applies_each_event_once() {
    const STREAMS: u64 = 10;
    const PER_STREAM: u64 = 30;
    let js = async_nats::jetstream::new(common::nats().await);
    let stream = TestStream::create(&js, Some(Duration::from_secs(1))).await;
    let (store, schema) = common::store("nats_window").await;
    for round in 0..PER_STREAM / 3 {
        for s in 0..STREAMS {
            let events = (1..=3).map(|i| event(round * 3 + i)).collect();
            store
                .append(&sid(&format!("s{s}")), ExpectedVersion::Any, events)
                .await
                .unwrap();
        }
    }
    let events = settled_events(&store, (STREAMS * PER_STREAM) as usize).await;
    let total = events.len() as u64;
    let sink = JetStreamSink::new(js.clone());
    publisher(&store, &sink, &stream, "first")
        .catch_up()
        .await
        .unwrap();
    assert_eq!(stream.count().await, total);
    // Past the 1 s window, a publisher whose checkpoint is behind (a second name here) sends
    // everything again, and JetStream stores it again.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let second = publisher(&store, &sink, &stream, "second");
    second.catch_up().await.unwrap();
    assert_eq!(second.status().duplicates, 0, "{:?}", second.status());
    assert_eq!(
        stream.count().await,
        2 * total,
        "the stream holds every event twice"
    );

    // The consumer, in a schema of its own.
    let consumer_pool = common::pool(10).await;
    let consumer_schema = common::fresh_schema(&consumer_pool, "nats_consumer").await;
    let counter = Counter::create(&consumer_pool, &consumer_schema).await;
    // Some handlers fail once: their messages come again, and their streams' next events come
    // early meanwhile.
    counter
        .fail_once
        .lock()
        .unwrap()
        .extend(events.iter().step_by(37).map(|e| e.event_id));
    let inbox = PgInbox::open(consumer_pool.clone(), &consumer_schema, "ledger")
        .await
        .unwrap();
    let running = JetStreamInbox::new(js.clone(), &stream.name, "ledger", inbox, counter.clone())
        .backoff(quick())
        .early_delay(Duration::from_millis(20))
        .max_ack_pending(64)
        .spawn();
    eventually(
        Duration::from_secs(60),
        || format!("the consumer did not get through: {:?}", running.status()),
        || async {
            let s = running.status();
            s.applied == total && s.duplicates >= total
        },
    )
    .await;
    let status = running.status();
    running.shutdown().await;
    assert_eq!(status.parked, 0, "{status:?}");
    assert_eq!(status.applied, total, "{status:?}");
    assert!(status.delivered >= 2 * total, "{status:?}");
    let counts = counter.counts(&consumer_pool).await;
    assert_eq!(counts.len() as u64, STREAMS);
    let per_stream_total: i64 = (1..=PER_STREAM as i64).sum();
    for (stream_name, (events, sum, last, out_of_order)) in &counts {
        assert_eq!(
            (*events, *sum, *last, *out_of_order),
            (PER_STREAM as i64, per_stream_total, PER_STREAM as i64, 0),
            "{stream_name}: each event applied once, in order"
        );
    }
    eprintln!("consumer: {status:?}");

    stream.delete().await;
    common::drop_schema(store.pool(), &schema).await;
    common::drop_schema(&consumer_pool, &consumer_schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_parked_with_its_stream_behind_it() {
    let js = async_nats::jetstream::new(common::nats().await);
    let stream = TestStream::create(&js, None).await;
    let (store, schema) = common::store("nats_poison").await;
    for s in ["ada", "bob"] {
        store
            .append(
                &sid(s),
                ExpectedVersion::NoStream,
                (1..=4).map(event).collect(),
            )
            .await
            .unwrap();
    }
    let events = settled_events(&store, 8).await;
    let poison = events
        .iter()
        .find(|e| e.stream_id == sid("ada") && e.stream_version == 2)
        .unwrap()
        .event_id;
    let sink = JetStreamSink::new(js.clone());
    publisher(&store, &sink, &stream, "to_nats")
        .catch_up()
        .await
        .unwrap();
    // Not an esframe message at all.
    js.publish(format!("{}.junk", stream.prefix), "not a cloudevent".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let consumer_pool = common::pool(5).await;
    let consumer_schema = common::fresh_schema(&consumer_pool, "nats_poison_c").await;
    let mut counter = Counter::create(&consumer_pool, &consumer_schema).await;
    counter.poison.insert(poison);
    let inbox = PgInbox::open(consumer_pool.clone(), &consumer_schema, "ledger")
        .await
        .unwrap();
    let running = JetStreamInbox::new(
        js.clone(),
        &stream.name,
        "ledger",
        inbox.clone(),
        counter.clone(),
    )
    .backoff(quick())
    .early_delay(Duration::from_millis(10))
    .max_deliveries(3)
    .spawn();
    // ada 1 and bob 1..4 applied; ada 2 parked after 3 attempts, ada 3 and 4 behind it; the
    // junk parked.
    eventually(
        Duration::from_secs(30),
        || format!("not settled: {:?}", running.status()),
        || async {
            let s = running.status();
            s.applied == 5 && s.parked == 4
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = running.status();
    running.shutdown().await;
    assert_eq!((status.applied, status.parked), (5, 4), "{status:?}");
    let letters = inbox.dead_letters().await.unwrap();
    let summary: Vec<(Option<&str>, Option<i64>)> = letters
        .iter()
        .map(|l| (l.stream.as_deref(), l.stream_version))
        .collect();
    assert!(summary.contains(&(None, None)), "the junk: {letters:?}");
    let ada: Vec<Option<i64>> = summary
        .iter()
        .filter(|(s, _)| *s == Some("account/ada"))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(
        ada,
        [Some(2), Some(3), Some(4)],
        "the poison first, then its stream: {letters:?}"
    );
    let parked = letters
        .iter()
        .find(|l| l.message_id == Some(poison))
        .unwrap();
    assert!(parked.error.contains("failed 3 times"), "{}", parked.error);
    assert_eq!(parked.headers["Nats-Msg-Id"], poison.to_string());
    let counts = counter.counts(&consumer_pool).await;
    assert_eq!(counts["account/ada"].0, 1);
    assert_eq!(counts["account/bob"].0, 4);

    // The poison's cause fixed: ada's parked tail applied from the dead letters, and ada's
    // next event, sent after, goes through the inbox as usual.
    let mut fixed = counter.clone();
    fixed.poison.clear();
    let retried = inbox.retry_parked(&sid("ada"), &fixed).await.unwrap();
    assert_eq!(
        (retried.applied, retried.still_parked),
        (3, 0),
        "{retried:?}"
    );
    store
        .append(&sid("ada"), ExpectedVersion::Exact(4), vec![event(5)])
        .await
        .unwrap();
    publisher(&store, &sink, &stream, "to_nats")
        .catch_up()
        .await
        .unwrap();
    let running = JetStreamInbox::new(js.clone(), &stream.name, "ledger", inbox.clone(), fixed)
        .backoff(quick())
        .early_delay(Duration::from_millis(10))
        .spawn();
    eventually(
        Duration::from_secs(30),
        || format!("ada 5 not applied: {:?}", running.status()),
        || async { running.status().applied == 1 },
    )
    .await;
    running.shutdown().await;
    let counts = counter.counts(&consumer_pool).await;
    // (events, total, last version, out of order)
    assert_eq!(counts["account/ada"].0, 5);
    assert_eq!(counts["account/ada"].2, 5);
    assert_eq!(counts["account/ada"].3, 0);
    assert_eq!(
        inbox.dead_letters().await.unwrap().len(),
        1,
        "the junk is left"
    );

    stream.delete().await;
    common::drop_schema(store.pool(), &schema).await;
    common::drop_schema(&consumer_pool, &consumer_schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_publisher_resumes_after_the_broker_is_killed_and_restarted() {
    const EVENTS: u64 = 600;
    let mut server = common::PrivateServer::start().await;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .max_reconnects(None)
        .connect(server.url())
        .await
        .expect("connect to the private server");
    let js = async_nats::jetstream::new(client);
    let stream = TestStream::create(&js, None).await;
    let (store, schema) = common::store("nats_restart").await;
    let sink = JetStreamSink::new(js.clone()).ack_timeout(Duration::from_millis(500));
    let running = publisher(&store, &sink, &stream, "to_nats").spawn();

    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for n in 1..=EVENTS {
                store
                    .append(
                        &sid(&format!("s{}", n % 12)),
                        ExpectedVersion::Any,
                        vec![event(n)],
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        })
    };
    eventually(
        Duration::from_secs(20),
        || format!("nothing published: {:?}", running.status()),
        || async { running.status().published >= 50 },
    )
    .await;
    assert!(running.status().broker_reachable);
    server.kill().await;
    eventually(
        Duration::from_secs(20),
        || format!("the publisher did not notice: {:?}", running.status()),
        || async { !running.status().broker_reachable },
    )
    .await;
    let down = running.status();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart().await;
    eventually(
        Duration::from_secs(30),
        || format!("the publisher did not resume: {:?}", running.status()),
        || async {
            let s = running.status();
            s.broker_reachable && s.published > down.published
        },
    )
    .await;
    writer.await.unwrap();
    let head = store.head_position().await.unwrap();
    eventually(
        Duration::from_secs(60),
        || {
            format!(
                "the publisher did not catch up to {head}: {:?}",
                running.status()
            )
        },
        || async { running.status().position >= head },
    )
    .await;
    let status = running.status();
    running.shutdown().await;
    assert!(status.failures > 0, "{status:?}");
    assert!(
        status.broker_reachable && status.last_error.is_none(),
        "{status:?}"
    );

    let events = settled_events(&store, EVENTS as usize).await;
    let messages = stream.messages().await;
    assert_exactly_once_in_order(&messages, &events);
    eprintln!("while down: {down:?}\nat the end: {status:?}");

    stream.delete().await;
    common::drop_schema(store.pool(), &schema).await;
}
