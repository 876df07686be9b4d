//! Structured content mode against the real broker and PostgreSQL: what a structured sink puts
//! on the wire (checked on the raw AMQP messages), and an `AmqpInbox` applying structured
//! messages, and binary and structured ones mixed in one queue, each event once.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{Broker, Recorder, amqp_url, event, sid, wait_for};
use esframe_amqp::{
    AmqpInbox, AmqpInboxStatus, AmqpSink, RunningAmqpInbox,
    binding::{self, CLOUD_EVENTS_PREFIX, POSITION_HEADER, STREAM_HEADER, STREAM_VERSION_HEADER},
    lapin::{
        BasicProperties,
        message::Delivery,
        options::BasicPublishOptions,
        types::{AMQPValue, FieldTable, ShortString},
    },
};
use esframe_core::{
    EventStore, ExpectedVersion, RecordedEvent,
    projection::HandlerError,
    publish::{CloudEvent, IncomingEvent, Publisher, STRUCTURED_CONTENT_TYPE},
};
use esframe_postgres::{InboxHandler, PgEventStore, PgInbox, PgTransaction};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

fn publisher(
    store: &PgEventStore,
    sink: AmqpSink,
    name: &str,
) -> Publisher<PgEventStore, esframe_postgres::PgCheckpoints, AmqpSink> {
    Publisher::new(store.clone(), store.checkpoints(), sink, name, "/bank")
        .unwrap()
        .backoff(common::quick())
}

fn sink(broker: &Broker, role: &str) -> AmqpSink {
    AmqpSink::new(amqp_url(), &broker.name).connection_name(broker.connection_name(role))
}

/// The common [`Recorder`] (one row per event, in order per stream, checked), and the data's
/// text each message id was applied with.
#[derive(Clone)]
struct Keeper {
    recorder: Recorder,
    data: Arc<Mutex<HashMap<Uuid, Vec<String>>>>,
}

impl InboxHandler for Keeper {
    async fn handle(
        &self,
        tx: &mut PgTransaction,
        event: &IncomingEvent,
    ) -> Result<(), HandlerError> {
        self.recorder.handle(tx, event).await?;
        self.data
            .lock()
            .unwrap()
            .entry(event.message_id)
            .or_default()
            .push(event.cloud_event.data.clone());
        Ok(())
    }
}

async fn consume(
    pool: &PgPool,
    broker: &Broker,
    schema: &str,
) -> (Keeper, PgInbox, RunningAmqpInbox) {
    let keeper = Keeper {
        recorder: Recorder::create(pool, schema).await,
        data: Arc::default(),
    };
    let inbox = PgInbox::open(pool.clone(), schema, "ledger").await.unwrap();
    let running = AmqpInbox::new(amqp_url(), &broker.name, inbox.clone(), keeper.clone())
        .connection_name(broker.connection_name("inbox"))
        .backoff(common::quick())
        .early_delay(Duration::from_millis(20))
        .spawn();
    (keeper, inbox, running)
}

async fn settle(
    running: &RunningAmqpInbox,
    done: impl Fn(&AmqpInboxStatus) -> bool,
) -> AmqpInboxStatus {
    wait_for(
        Duration::from_secs(30),
        "the consumer to get through",
        async || done(&running.status()),
        || format!("{:?}", running.status()),
    )
    .await;
    // Long enough for anything delivered twice to come again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.status()
}

/// Each event applied exactly once, in its stream's order (the [`Recorder`] checks the order
/// as it writes), with the data's text exactly as the producer's store gave it.
async fn assert_applied_once(keeper: &Keeper, pool: &PgPool, events: &[RecordedEvent]) {
    assert_eq!(
        keeper.recorder.count(pool).await,
        events.len() as i64,
        "one row per event"
    );
    assert_eq!(
        keeper
            .recorder
            .out_of_order
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let mut want: HashMap<String, (i64, i64, i64)> = HashMap::new();
    for e in events {
        let entry = want.entry(e.stream_id.to_string()).or_default();
        entry.0 += 1;
        entry.1 += e.payload["n"].as_i64().unwrap();
        entry.2 = entry.2.max(e.stream_version as i64);
        assert_eq!(keeper.recorder.calls(e.event_id), 1, "the handler ran once");
    }
    assert_eq!(keeper.recorder.per_stream(pool).await, want);
    let data = keeper.data.lock().unwrap();
    for e in events {
        assert_eq!(
            data[&e.event_id],
            [e.payload.to_json_text().into_owned()],
            "the data's text as stored"
        );
    }
}

/// Whether `m` went out in structured mode, checking that it is all one or all the other.
fn is_structured(m: &Delivery) -> bool {
    let headers = m.properties.headers().as_ref().expect("headers");
    let has_ce = headers
        .inner()
        .keys()
        .any(|k| k.as_str().starts_with(CLOUD_EVENTS_PREFIX));
    let structured = m
        .properties
        .content_type()
        .as_ref()
        .map(ShortString::as_str)
        == Some(STRUCTURED_CONTENT_TYPE);
    assert_ne!(
        has_ce, structured,
        "cloudEvents: headers in binary mode only: {headers:?}"
    );
    assert_eq!(structured, binding::is_structured(&m.properties));
    structured
}

fn version(m: &Delivery) -> i64 {
    match m.properties.headers().as_ref().unwrap().inner()[STREAM_VERSION_HEADER] {
        AMQPValue::LongLongInt(v) => v,
        ref other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_sink_sends_the_json_format_and_the_inbox_applies_each_event_once() {
    let pool = common::pool(10).await;
    let store = common::store(&pool, "structured").await;
    let consumer_schema = common::schema_name("structured_c");
    let broker = Broker::new().await;
    let tap = broker.tap("raw").await;
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
    let events = common::read_log(&store, 5).await;
    let structured = sink(&broker, "sink").structured(true);
    publisher(&store, structured.clone(), "to_rabbitmq")
        .catch_up()
        .await
        .unwrap();

    // On the wire: the body is the JSON format; the properties and esframe's headers as in
    // binary mode, without any `cloudEvents:` header.
    let raw = broker.drain(&tap).await;
    assert_eq!(raw.len(), events.len(), "one message per event");
    for m in &raw {
        let p = &m.properties;
        assert!(is_structured(m));
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/cloudevents+json"
        );
        let id = p.message_id().as_ref().expect("a message id").as_str();
        let e = events
            .iter()
            .find(|e| e.event_id.to_string() == id)
            .expect("the message of a stored event");
        assert_eq!(*p.delivery_mode(), Some(2), "persistent");
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "Deposited.v1");
        assert_eq!(
            *p.timestamp(),
            Some(u64::try_from(e.recorded_at.timestamp()).unwrap())
        );
        let correlation = e.metadata.correlation_id.unwrap().to_string();
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), correlation);
        let h = p.headers().as_ref().unwrap().inner();
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [POSITION_HEADER, STREAM_HEADER, STREAM_VERSION_HEADER],
            "esframe's headers only"
        );
        assert_eq!(
            binding::header_text(&h[STREAM_HEADER]).unwrap(),
            e.stream_id.to_string()
        );
        assert_eq!(
            h[STREAM_VERSION_HEADER],
            AMQPValue::LongLongInt(e.stream_version as i64)
        );
        assert_eq!(
            h[POSITION_HEADER],
            AMQPValue::LongLongInt(e.global_position.get() as i64)
        );

        let body: Value = serde_json::from_slice(&m.data).expect("the body is JSON");
        assert_eq!(body["specversion"], "1.0");
        assert_eq!(body["id"], e.event_id.to_string());
        assert_eq!(body["source"], "/bank");
        assert_eq!(body["type"], "Deposited.v1");
        assert_eq!(body["subject"], e.stream_id.to_string());
        assert_eq!(body["datacontenttype"], "application/json");
        assert_eq!(body["sequence"], format!("{:020}", e.global_position.get()));
        assert_eq!(body["esframeversion"], e.stream_version.to_string());
        assert_eq!(body["correlationid"], correlation);
        assert_eq!(
            body["data"],
            serde_json::json!({ "n": e.payload["n"] }),
            "data as JSON"
        );
        assert!(body.get("data_base64").is_none());
        let back = binding::cloud_event(p, &m.data).unwrap();
        assert_eq!(back, CloudEvent::from_event(e, e.event_id, "/bank"));
    }

    // A message that says structured mode and is not a CloudEvent in the JSON format.
    let junk = BasicProperties::default()
        .with_content_type(STRUCTURED_CONTENT_TYPE.into())
        .with_headers(FieldTable::default());
    broker
        .channel
        .basic_publish(
            broker.name.as_str().into(),
            "junk".into(),
            BasicPublishOptions::default(),
            br#"{"specversion":"1.0","source":"/x","type":"T.v1"}"#,
            junk,
        )
        .await
        .unwrap();

    // The consumer reads them and applies each once; the junk is parked.
    let (keeper, inbox, running) = consume(&pool, &broker, &consumer_schema).await;
    let status = settle(&running, |s| s.applied == 5 && s.parked == 1).await;
    running.shutdown().await;
    assert_eq!(
        (status.applied, status.duplicates, status.parked),
        (5, 0, 1),
        "{status:?}"
    );
    assert_applied_once(&keeper, &pool, &events).await;
    let letters = inbox.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0].error.contains("structured") && letters[0].error.contains("`id`"),
        "{}",
        letters[0].error
    );

    structured.close().await;
    broker.finish(&[tap]).await;
    common::drop_schema(&pool, store.schema().as_str()).await;
    common::drop_schema(&pool, &consumer_schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_structured_messages_mixed_in_one_queue_are_all_applied_once() {
    let pool = common::pool(10).await;
    let store = common::store(&pool, "mixed").await;
    let consumer_schema = common::schema_name("mixed_c");
    let broker = Broker::new().await;
    let tap = broker.tap("raw").await;
    let append = async |from: u64| {
        for s in ["ada", "bob"] {
            let events = (from..from + 2).map(event).collect();
            store
                .append(&sid(s), ExpectedVersion::Any, events)
                .await
                .unwrap();
        }
    };
    // Versions 1 and 2 of each stream go out in binary mode; then the publisher is switched
    // to structured mode (same name, same checkpoint) and sends versions 3 and 4; then a
    // publisher of another name sends everything again in binary mode (RabbitMQ keeps every
    // copy): versions 3 and 4 come a second time in the other mode.
    let binary = sink(&broker, "binary");
    let structured = sink(&broker, "structured").structured(true);
    append(1).await;
    common::read_log(&store, 4).await;
    publisher(&store, binary.clone(), "to_rabbitmq")
        .catch_up()
        .await
        .unwrap();
    append(3).await;
    let events = common::read_log(&store, 8).await;
    assert_eq!(events.len(), 8);
    publisher(&store, structured.clone(), "to_rabbitmq")
        .catch_up()
        .await
        .unwrap();
    publisher(&store, binary.clone(), "again")
        .catch_up()
        .await
        .unwrap();

    let raw = broker.drain(&tap).await;
    assert_eq!(raw.len(), 16);
    let structured_versions: Vec<i64> = raw
        .iter()
        .filter(|m| is_structured(m))
        .map(version)
        .collect();
    assert_eq!(
        structured_versions.len(),
        4,
        "versions 3 and 4 of each stream"
    );
    assert!(structured_versions.iter().all(|v| *v >= 3));
    for m in raw.iter().filter(|m| !is_structured(m)) {
        assert_eq!(
            m.properties.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
    }

    let (keeper, inbox, running) = consume(&pool, &broker, &consumer_schema).await;
    let status = settle(&running, |s| s.applied == 8 && s.duplicates == 8).await;
    running.shutdown().await;
    assert_eq!(
        (status.applied, status.duplicates, status.parked),
        (8, 8, 0),
        "{status:?}"
    );
    assert_applied_once(&keeper, &pool, &events).await;
    assert!(inbox.dead_letters().await.unwrap().is_empty());

    binary.close().await;
    structured.close().await;
    broker.finish(&[tap]).await;
    common::drop_schema(&pool, store.schema().as_str()).await;
    common::drop_schema(&pool, &consumer_schema).await;
}
