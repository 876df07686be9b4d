//! Messages the consumer cannot handle are parked, after the configured attempts, while the
//! others are applied; a stream's later events wait behind its parked one.

mod common;

use std::time::Duration;

use common::{Broker, Recorder, amqp_url, event, sid, wait_for};
use esframe_amqp::{
    AmqpInbox, AmqpSink, DeadLetters,
    binding::{self, header_text},
    lapin::{BasicProperties, options::BasicPublishOptions},
};
use esframe_core::{
    EventStore, ExpectedVersion, Position, RecordedEvent,
    publish::{CloudEvent, OutgoingMessage, Publisher},
};
use esframe_postgres::{PgEventStore, PgInbox};

const ATTEMPTS: u32 = 3;

/// Appends 6 events to each of `streams`, and returns them all.
async fn fill(store: &PgEventStore, streams: &[&str]) -> Vec<RecordedEvent> {
    for id in streams {
        let events = (1..=6).map(event).collect();
        store
            .append(&sid(id), ExpectedVersion::NoStream, events)
            .await
            .unwrap();
    }
    common::read_log(store, 6 * streams.len()).await
}

async fn publish_all(store: &PgEventStore, broker: &Broker) {
    let sink =
        AmqpSink::new(amqp_url(), &broker.name).connection_name(broker.connection_name("sink"));
    Publisher::new(
        store.clone(),
        store.checkpoints(),
        sink.clone(),
        "to_rabbitmq",
        "/bank",
    )
    .unwrap()
    .catch_up()
    .await
    .unwrap();
    sink.close().await;
}

/// Sends a message straight to the exchange, as another (broken) producer would.
async fn send_raw(broker: &Broker, properties: BasicProperties, body: &[u8]) {
    broker
        .channel
        .basic_publish(
            broker.name.as_str().into(),
            "esframe.account.Deposited".into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The message of an esframe event (stream `account/json`, version 1) whose data is not JSON.
fn not_json() -> (OutgoingMessage, BasicProperties) {
    let id = uuid::Uuid::now_v7();
    let stream = sid("json");
    let recorded = RecordedEvent {
        event_id: id,
        stream_id: stream.clone(),
        stream_version: 1,
        global_position: Position::new(1),
        recorded_at: chrono::Utc::now(),
        event_type: "Deposited".into(),
        schema_version: 1,
        payload: esframe_core::Payload::from_json_text("{}"),
        metadata: Default::default(),
    };
    let mut cloud = CloudEvent::from_event(&recorded, id, "/elsewhere");
    cloud.data = "this is not JSON".to_owned();
    let message = OutgoingMessage {
        id,
        subject: "esframe.account.Deposited".into(),
        stream_id: stream,
        stream_version: 1,
        position: Position::new(1),
        event: cloud,
    };
    let properties = binding::properties(&message).unwrap();
    (message, properties)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_is_parked_after_its_attempts_while_the_others_are_applied() {
    let pool = common::pool(10).await;
    let store = common::store(&pool, "poison").await;
    let consumer_schema = common::schema_name("poison_c");
    let broker = Broker::new().await;

    let all = fill(&store, &["a", "b", "c", "d", "p"]).await;
    // The handler refuses version 4 of `p`, every time.
    let poison = all
        .iter()
        .find(|e| e.stream_id == sid("p") && e.stream_version == 4)
        .unwrap();
    let mut recorder = Recorder::create(&pool, &consumer_schema).await;
    recorder.poison = Some(poison.event_id);
    publish_all(&store, &broker).await;
    // A message that is no CloudEvent at all, and an event whose data is not JSON.
    send_raw(
        &broker,
        BasicProperties::default().with_content_type("text/plain".into()),
        b"hello",
    )
    .await;
    let (bad_json, properties) = not_json();
    send_raw(&broker, properties, bad_json.event.data.as_bytes()).await;

    let inbox = PgInbox::open(pool.clone(), &consumer_schema, "ledger")
        .await
        .unwrap();
    let consumer = AmqpInbox::new(amqp_url(), &broker.name, inbox.clone(), recorder.clone())
        .connection_name(broker.connection_name("inbox"))
        .max_attempts(ATTEMPTS)
        .backoff(common::quick())
        .early_delay(Duration::from_millis(20))
        .spawn();
    // 4 whole streams and p's first 3; parked: the stranger, p 4 (and 5 and 6 behind it), the
    // bad JSON.
    wait_for(
        Duration::from_secs(30),
        "27 events applied and 5 messages parked",
        async || {
            let s = consumer.status();
            s.applied == 27 && s.parked == 5
        },
        || format!("{:?}", consumer.status()),
    )
    .await;
    let status = consumer.status();
    consumer.shutdown().await;

    assert_eq!(recorder.count(&pool).await, 27);
    let per_stream = recorder.per_stream(&pool).await;
    for id in ["a", "b", "c", "d"] {
        assert_eq!(per_stream[&format!("account/{id}")], (6, 21, 6));
    }
    assert_eq!(
        per_stream["account/p"],
        (3, 6, 3),
        "p stops before its poison"
    );
    assert_eq!(
        recorder.calls(poison.event_id),
        ATTEMPTS,
        "tried {ATTEMPTS} times"
    );
    assert_eq!(recorder.calls(bad_json.id), ATTEMPTS);
    assert_eq!(status.retried, 2 * u64::from(ATTEMPTS - 1));
    assert_eq!(status.early, 2, "p 5 and 6 came while 4 was parked");
    assert_eq!(
        recorder
            .out_of_order
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    let letters = inbox.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 5, "{letters:#?}");
    let stranger = letters.iter().find(|l| l.body == "hello").unwrap();
    assert_eq!((stranger.message_id, &stranger.stream), (None, &None));
    assert!(
        stranger.error.contains("not a CloudEvent"),
        "{}",
        stranger.error
    );
    assert_eq!(stranger.headers["amqp:content_type"], "text/plain");

    let parked_p: Vec<_> = letters
        .iter()
        .filter(|l| l.stream.as_deref() == Some("account/p"))
        .collect();
    let versions: Vec<i64> = parked_p.iter().filter_map(|l| l.stream_version).collect();
    assert_eq!(versions, [4, 5, 6], "p's tail, parked in order");
    let first = parked_p[0];
    assert_eq!(first.message_id, Some(poison.event_id));
    assert!(
        first.error.contains("poison") && first.error.contains("after 3 attempts"),
        "{}",
        first.error
    );
    assert_eq!(
        first.headers["cloudEvents:id"],
        poison.event_id.to_string(),
        "the headers are kept, to send it again"
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&first.body).unwrap(),
        *poison.payload.value().unwrap()
    );
    assert!(
        parked_p[1].error.contains("version 4") && parked_p[1].error.contains("is parked"),
        "{}",
        parked_p[1].error
    );

    let json = letters
        .iter()
        .find(|l| l.message_id == Some(bad_json.id))
        .unwrap();
    assert_eq!(json.stream.as_deref(), Some("account/json"));
    assert_eq!(json.body, "this is not JSON");
    assert!(json.error.contains("after 3 attempts"), "{}", json.error);

    // The poison's cause fixed: p's tail applied from the dead letters, in order, once.
    let mut fixed = recorder.clone();
    fixed.poison = None;
    let retried = inbox.retry_parked(&sid("p"), &fixed).await.unwrap();
    assert_eq!(
        (retried.applied, retried.still_parked),
        (3, 0),
        "{retried:?}"
    );
    assert_eq!(recorder.per_stream(&pool).await["account/p"], (6, 21, 6));
    assert_eq!(
        recorder
            .out_of_order
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // Data that is not JSON fails again, and stays, with the new error; the stranger can
    // only be discarded.
    let json_again = inbox.retry_parked(&sid("json"), &fixed).await.unwrap();
    assert_eq!((json_again.applied, json_again.still_parked), (0, 1));
    assert!(json_again.error.is_some(), "{json_again:?}");
    assert!(!stranger.retryable && json.retryable);
    assert!(inbox.discard_parked(stranger.id).await.unwrap());
    assert_eq!(inbox.dead_letters().await.unwrap().len(), 1);

    broker.finish(&[]).await;
    common::drop_schema(&pool, store.schema().as_str()).await;
    common::drop_schema(&pool, &consumer_schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_dead_letter_exchange_the_poison_goes_there_with_its_error() {
    let pool = common::pool(10).await;
    let store = common::store(&pool, "dlx").await;
    let consumer_schema = common::schema_name("dlx_c");
    let broker = Broker::with_topology(|t| {
        let (exchange, queue) = (format!("{}.dlx", t.exchange), format!("{}.dead", t.queue));
        t.dead_letters(exchange, queue)
    })
    .await;
    let (dead_exchange, dead_queue) = broker.topology.dead_letters.clone().unwrap();

    let all = fill(&store, &["a"]).await;
    let mut recorder = Recorder::create(&pool, &consumer_schema).await;
    recorder.poison = Some(all[1].event_id);
    publish_all(&store, &broker).await;
    send_raw(&broker, BasicProperties::default(), b"hello").await;

    let inbox = PgInbox::open(pool.clone(), &consumer_schema, "ledger")
        .await
        .unwrap();
    let consumer = AmqpInbox::new(amqp_url(), &broker.name, inbox.clone(), recorder.clone())
        .connection_name(broker.connection_name("inbox"))
        .max_attempts(ATTEMPTS)
        .dead_letters(DeadLetters::Exchange(dead_exchange))
        .backoff(common::quick())
        .early_delay(Duration::from_millis(20))
        .spawn();
    wait_for(
        Duration::from_secs(30),
        "1 event applied and 6 messages parked",
        async || {
            let s = consumer.status();
            s.applied == 1 && s.parked == 6
        },
        || format!("{:?}", consumer.status()),
    )
    .await;
    consumer.shutdown().await;

    assert_eq!(recorder.count(&pool).await, 1);
    assert!(
        inbox.dead_letters().await.unwrap().is_empty(),
        "on the exchange, not in the inbox"
    );
    let dead = broker.drain(&dead_queue).await;
    assert_eq!(
        dead.len(),
        6,
        "version 2, the 4 behind it, and the stranger"
    );
    let header = |m: &esframe_amqp::lapin::message::Delivery, name: &str| {
        m.properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name))
            .and_then(header_text)
    };
    let versions: Vec<Option<String>> = dead
        .iter()
        .map(|m| header(m, "cloudEvents:esframeversion"))
        .collect();
    assert_eq!(
        versions,
        [Some("2"), Some("3"), Some("4"), Some("5"), Some("6"), None]
            .map(|v| v.map(str::to_owned))
            .to_vec()
    );
    assert_eq!(header(&dead[0], "esframe-attempts").as_deref(), Some("3"));
    assert!(
        header(&dead[0], "esframe-error")
            .unwrap()
            .contains("poison")
    );
    assert_eq!(header(&dead[1], "esframe-attempts").as_deref(), Some("0"));
    assert!(
        header(&dead[1], "esframe-error")
            .unwrap()
            .contains("version 2 of stream `account/a` is parked")
    );
    assert_eq!(
        dead[0].properties.message_id().as_ref().unwrap().as_str(),
        all[1].event_id.to_string(),
        "the message's own properties"
    );

    broker.finish(&[]).await;
    common::drop_schema(&pool, store.schema().as_str()).await;
    common::drop_schema(&pool, &consumer_schema).await;
}
