//! Structured content mode against a real nats-server (JetStream) and PostgreSQL: what a
//! structured sink puts on the wire, and a `JetStreamInbox` applying structured messages, and
//! binary and structured ones mixed in one stream, each event once.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use common::{RawMessage, TestStream, event, eventually, sid};
use esframe_core::{
    EventStore, ExpectedVersion, GlobalLog, Position, RecordedEvent,
    projection::HandlerError,
    publish::{Backoff, CloudEvent, IncomingEvent, Publisher, STRUCTURED_CONTENT_TYPE},
};
use esframe_nats::{InboxStatus, JetStreamInbox, JetStreamSink, RunningInbox};
use esframe_postgres::{InboxHandler, PgEventStore, PgInbox, PgTransaction};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

fn quick() -> Backoff {
    Backoff {
        min: Duration::from_millis(10),
        max: Duration::from_millis(200),
    }
}

fn publisher(
    store: &PgEventStore,
    sink: JetStreamSink,
    stream: &TestStream,
    name: &str,
) -> Publisher<PgEventStore, esframe_postgres::PgCheckpoints, JetStreamSink> {
    Publisher::new(store.clone(), store.checkpoints(), sink, name, "/bank")
        .expect("a valid publisher name")
        .subject_prefix(stream.prefix.clone())
        .backoff(quick())
}

/// The whole log once `count` events are readable (the never-skip log holds back events while
/// an older transaction elsewhere on the server is open).
async fn settled_events(store: &PgEventStore, count: usize) -> Vec<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = store
            .read_all(Position::START, usize::MAX)
            .await
            .expect("read the log");
        if events.len() >= count {
            assert_eq!(events.len(), count, "no more events than appended");
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} events readable",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The consumer's effect: one row per handler run (message id, stream, version, the data's
/// text as received), in the order the handler ran, in a table of the consumer's schema.
#[derive(Clone)]
struct Recorder {
    table: String,
}

impl Recorder {
    async fn create(pool: &PgPool, schema: &str) -> Self {
        let table = format!("\"{schema}\".applied");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE {table} (
                 seq BIGSERIAL PRIMARY KEY, message_id UUID NOT NULL, stream TEXT NOT NULL,
                 version BIGINT NOT NULL, data TEXT NOT NULL
             );"
        )))
        .execute(pool)
        .await
        .expect("create the consumer's table");
        Self { table }
    }

    /// Every row, in the order written.
    async fn rows(&self, pool: &PgPool) -> Vec<(Uuid, String, i64, String)> {
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT message_id, stream, version, data FROM {} ORDER BY seq",
            self.table
        )))
        .fetch_all(pool)
        .await
        .expect("read the consumer's rows")
    }
}

impl InboxHandler for Recorder {
    async fn handle(
        &self,
        tx: &mut PgTransaction,
        event: &IncomingEvent,
    ) -> Result<(), HandlerError> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (message_id, stream, version, data) VALUES ($1, $2, $3, $4)",
            self.table
        )))
        .bind(event.message_id)
        .bind(event.stream_id.to_string())
        .bind(i64::try_from(event.stream_version)?)
        .bind(&event.cloud_event.data)
        .execute(tx.as_mut())
        .await?;
        Ok(())
    }
}

/// Each event applied exactly once, in its stream's order, with the data's text exactly as the
/// producer's store gave it.
async fn assert_applied_once_in_order(
    recorder: &Recorder,
    pool: &PgPool,
    events: &[RecordedEvent],
) {
    let rows = recorder.rows(pool).await;
    assert_eq!(
        rows.len(),
        events.len(),
        "one handler run per event: {rows:?}"
    );
    let by_id: HashMap<Uuid, &RecordedEvent> = events.iter().map(|e| (e.event_id, e)).collect();
    let mut per_stream: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (id, stream, version, data) in &rows {
        let e = by_id
            .get(id)
            .unwrap_or_else(|| panic!("{id} is not an event"));
        assert_eq!(
            (stream.as_str(), *version),
            (e.stream_id.to_string().as_str(), e.stream_version as i64)
        );
        assert_eq!(*data, e.payload.to_json_text(), "the data's text as stored");
        per_stream.entry(stream.clone()).or_default().push(*version);
    }
    for (stream, versions) in &per_stream {
        let expected: Vec<i64> = (1..=versions.len() as i64).collect();
        assert_eq!(
            versions, &expected,
            "{stream}: every version once, in order"
        );
    }
}

fn consume(
    js: &async_nats::jetstream::Context,
    stream: &TestStream,
    inbox: PgInbox,
    recorder: &Recorder,
) -> RunningInbox {
    JetStreamInbox::new(js.clone(), &stream.name, "ledger", inbox, recorder.clone())
        .backoff(quick())
        .early_delay(Duration::from_millis(20))
        .spawn()
}

async fn settle(running: &RunningInbox, done: impl Fn(&InboxStatus) -> bool) -> InboxStatus {
    eventually(
        Duration::from_secs(30),
        || format!("the consumer did not get through: {:?}", running.status()),
        || async { done(&running.status()) },
    )
    .await;
    // Long enough for anything delivered twice to come again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.status()
}

/// Whether `m` went out in structured mode, checking that it is all one or all the other.
fn is_structured(m: &RawMessage) -> bool {
    let has_ce = m
        .raw_headers
        .keys()
        .any(|n| n.to_ascii_lowercase().starts_with("ce-"));
    let structured = m.header("content-type") == STRUCTURED_CONTENT_TYPE;
    assert_ne!(
        has_ce, structured,
        "ce- headers in binary mode only: {:?}",
        m.raw_headers
    );
    structured
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_sink_sends_the_json_format_and_the_inbox_applies_each_event_once() {
    let js = async_nats::jetstream::new(common::nats().await);
    let stream = TestStream::create(&js, None).await;
    let (store, schema) = common::store("nats_structured").await;
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
    let sink = JetStreamSink::new(js.clone()).structured(true);
    publisher(&store, sink, &stream, "to_nats")
        .catch_up()
        .await
        .unwrap();

    // On the wire: the body is the JSON format, the headers only the message id, the content
    // type and esframe's own.
    let messages = stream.messages().await;
    assert_eq!(messages.len(), events.len(), "one message per event");
    let by_id: HashMap<String, &RecordedEvent> =
        events.iter().map(|e| (e.event_id.to_string(), e)).collect();
    for m in &messages {
        let names: BTreeSet<&str> = m.raw_headers.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            BTreeSet::from([
                "Nats-Msg-Id",
                "content-type",
                "esframe-stream",
                "esframe-stream-version",
                "esframe-position",
            ]),
            "no ce- header in structured mode"
        );
        assert!(is_structured(m));
        assert_eq!(
            m.raw_headers["content-type"],
            "application/cloudevents+json"
        );
        let e = by_id[m.header("nats-msg-id")];
        assert_eq!(m.subject, format!("{}.account.Deposited", stream.prefix));
        assert_eq!(m.header("esframe-stream"), e.stream_id.to_string());
        assert_eq!(
            m.header("esframe-stream-version"),
            e.stream_version.to_string()
        );
        assert_eq!(
            m.header("esframe-position"),
            e.global_position.get().to_string()
        );
        if e.stream_id.id() == "zoë" {
            assert_eq!(
                m.raw_headers["esframe-stream"], "account/zo%C3%AB",
                "percent-encoded"
            );
        }

        let body: Value = serde_json::from_str(&m.body).expect("the body is JSON");
        assert_eq!(body["specversion"], "1.0");
        assert_eq!(body["id"], e.event_id.to_string());
        assert_eq!(body["source"], "/bank");
        assert_eq!(body["type"], "Deposited.v1");
        assert_eq!(
            body["subject"],
            e.stream_id.to_string(),
            "plain UTF-8 in JSON"
        );
        assert_eq!(body["datacontenttype"], "application/json");
        assert_eq!(
            body["time"],
            e.recorded_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        );
        assert_eq!(body["sequence"], format!("{:020}", e.global_position.get()));
        assert_eq!(body["esframeversion"], e.stream_version.to_string());
        assert_eq!(
            body["correlationid"],
            e.metadata.correlation_id.unwrap().to_string()
        );
        assert_eq!(
            body["data"],
            serde_json::json!({ "n": e.payload["n"] }),
            "data as JSON"
        );
        assert!(body.get("data_base64").is_none());
        let back = CloudEvent::from_structured(&m.body).unwrap();
        assert_eq!(back, CloudEvent::from_event(e, e.event_id, "/bank"));
    }

    // A message that says structured mode and is not a CloudEvent in the JSON format.
    let mut junk_headers = async_nats::HeaderMap::new();
    junk_headers.insert("content-type", STRUCTURED_CONTENT_TYPE);
    js.publish_with_headers(
        format!("{}.junk", stream.prefix),
        junk_headers,
        r#"{"specversion":"1.0","source":"/x","type":"T.v1"}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    // The consumer reads them and applies each once; the junk is parked.
    let pool = common::pool(5).await;
    let consumer_schema = common::fresh_schema(&pool, "nats_structured_c").await;
    let recorder = Recorder::create(&pool, &consumer_schema).await;
    let inbox = PgInbox::open(pool.clone(), &consumer_schema, "ledger")
        .await
        .unwrap();
    let running = consume(&js, &stream, inbox.clone(), &recorder);
    let status = settle(&running, |s| s.applied == 5 && s.parked == 1).await;
    running.shutdown().await;
    assert_eq!(
        (status.applied, status.duplicates, status.parked),
        (5, 0, 1),
        "{status:?}"
    );
    assert_applied_once_in_order(&recorder, &pool, &events).await;
    let letters = inbox.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0].error.contains("structured mode") && letters[0].error.contains("`id`"),
        "{}",
        letters[0].error
    );

    stream.delete().await;
    common::drop_schema(&pool, &consumer_schema).await;
    common::drop_schema(store.pool(), &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_structured_messages_mixed_in_one_stream_are_all_applied_once() {
    let js = async_nats::jetstream::new(common::nats().await);
    // A 1 s duplicate window, so that the resend at the end is stored again.
    let stream = TestStream::create(&js, Some(Duration::from_secs(1))).await;
    let (store, schema) = common::store("nats_mixed").await;
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
    // to structured mode (same name, same checkpoint) and sends versions 3 and 4.
    append(1).await;
    settled_events(&store, 4).await;
    let binary = JetStreamSink::new(js.clone());
    let structured = JetStreamSink::new(js.clone()).structured(true);
    publisher(&store, binary, &stream, "to_nats")
        .catch_up()
        .await
        .unwrap();
    append(3).await;
    let events = settled_events(&store, 8).await;
    publisher(&store, structured.clone(), &stream, "to_nats")
        .catch_up()
        .await
        .unwrap();
    // Past the window, everything again, structured: versions 1 and 2 come a second time in
    // the other mode.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let again = publisher(&store, structured, &stream, "again");
    again.catch_up().await.unwrap();
    assert_eq!(again.status().duplicates, 0, "{:?}", again.status());

    let messages = stream.messages().await;
    assert_eq!(messages.len(), 16);
    let modes: Vec<bool> = messages.iter().map(is_structured).collect();
    assert_eq!(
        modes.iter().filter(|s| !**s).count(),
        4,
        "versions 1 and 2 in binary mode"
    );
    for (m, structured) in messages.iter().zip(&modes) {
        let (_, version) = m.stream_and_version();
        if !structured {
            assert!(version <= 2, "{m:?}");
            assert_eq!(m.header("content-type"), "application/json");
            assert_eq!(m.header("ce-specversion"), "1.0");
        }
    }

    let pool = common::pool(5).await;
    let consumer_schema = common::fresh_schema(&pool, "nats_mixed_c").await;
    let recorder = Recorder::create(&pool, &consumer_schema).await;
    let inbox = PgInbox::open(pool.clone(), &consumer_schema, "ledger")
        .await
        .unwrap();
    let running = consume(&js, &stream, inbox.clone(), &recorder);
    let status = settle(&running, |s| s.applied == 8 && s.duplicates == 8).await;
    running.shutdown().await;
    assert_eq!(
        (status.applied, status.duplicates, status.parked),
        (8, 8, 0),
        "{status:?}"
    );
    assert_applied_once_in_order(&recorder, &pool, &events).await;
    assert!(inbox.dead_letters().await.unwrap().is_empty());

    stream.delete().await;
    common::drop_schema(&pool, &consumer_schema).await;
    common::drop_schema(store.pool(), &schema).await;
}
