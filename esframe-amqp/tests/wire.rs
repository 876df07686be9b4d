//! What reaches the broker: every event as a CloudEvent in binary content mode, checked on the
//! raw AMQP messages; and what the broker refuses.

mod common;

use std::time::Duration;

use common::{Broker, amqp_url, event, sid};
use esframe_amqp::{
    AmqpSink,
    binding::{self, POSITION_HEADER, STREAM_HEADER, STREAM_VERSION_HEADER},
    lapin::types::{AMQPValue, FieldTable},
};
use esframe_core::{
    EventStore, ExpectedVersion, Position, StreamId,
    publish::{CloudEvent, IncomingEvent, MessageSink, OutgoingMessage, Publisher, SinkError},
};
use uuid::Uuid;

fn text(headers: &FieldTable, name: &str) -> String {
    match headers.inner().get(name) {
        Some(value) => binding::header_text(value).unwrap_or_else(|| panic!("{name}: {value:?}")),
        None => panic!("no header {name}: {headers:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_as_a_cloud_event_with_its_attributes_in_headers() {
    let pool = common::pool(10).await;
    let store = common::store(&pool, "wire").await;
    let broker = Broker::new().await;
    let ada = sid("ada");
    let mut second = event(2);
    second.metadata.causation_id = Some(Uuid::now_v7());
    store
        .append(&ada, ExpectedVersion::NoStream, vec![event(1), second])
        .await
        .unwrap();
    store
        .append(
            &StreamId::new("loan", "l-1").unwrap(),
            ExpectedVersion::NoStream,
            vec![event(3)],
        )
        .await
        .unwrap();
    let stored = common::read_log(&store, 3).await;
    assert_eq!(stored.len(), 3);

    let sink =
        AmqpSink::new(amqp_url(), &broker.name).connection_name(broker.connection_name("sink"));
    sink.connect()
        .await
        .expect("the sink connects and finds the exchange");
    let publisher = Publisher::new(
        store.clone(),
        store.checkpoints(),
        sink.clone(),
        "to_rabbitmq",
        "/bank",
    )
    .unwrap();
    let reached = publisher.catch_up().await.unwrap();
    assert_eq!(reached, stored.last().unwrap().global_position);
    assert_eq!(publisher.status().published, 3);

    let messages = broker.drain(&broker.name).await;
    assert_eq!(messages.len(), 3, "one message per event");
    // Streams are sent concurrently: the queue's order is the log's only within a stream.
    let versions: Vec<u64> = messages
        .iter()
        .filter(|m| m.routing_key.as_str() == "esframe.account.Deposited")
        .map(|m| {
            let h = m.properties.headers().as_ref().unwrap();
            text(h, "cloudEvents:esframeversion").parse().unwrap()
        })
        .collect();
    assert_eq!(versions, [1, 2], "in stream order");
    for message in &messages {
        let p = &message.properties;
        let id = p.message_id().as_ref().expect("a message id").as_str();
        let stored = stored
            .iter()
            .find(|e| e.event_id.to_string() == id)
            .expect("the message of a stored event");
        let version = stored.stream_version;
        let position = stored.global_position.get();
        assert_eq!(message.exchange.as_str(), broker.name);
        assert_eq!(
            message.routing_key.as_str(),
            format!("esframe.{}.Deposited", stored.aggregate_type()),
            "routing key = subject"
        );
        assert_eq!(
            p.message_id().as_ref().unwrap().as_str(),
            stored.event_id.to_string()
        );
        assert_eq!(*p.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "Deposited.v1");
        assert_eq!(
            *p.timestamp(),
            Some(u64::try_from(stored.recorded_at.timestamp()).unwrap())
        );
        let correlation = stored.metadata.correlation_id.unwrap().to_string();
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), correlation);

        let h = p.headers().as_ref().expect("headers");
        assert_eq!(text(h, "cloudEvents:id"), stored.event_id.to_string());
        assert_eq!(text(h, "cloudEvents:source"), "/bank");
        assert_eq!(text(h, "cloudEvents:specversion"), "1.0");
        assert_eq!(text(h, "cloudEvents:type"), "Deposited.v1");
        assert_eq!(text(h, "cloudEvents:subject"), stored.stream_id.to_string());
        assert_eq!(
            text(h, "cloudEvents:time"),
            stored
                .recorded_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        );
        let sequence = text(h, "cloudEvents:sequence");
        assert_eq!(
            sequence,
            format!("{position:020}"),
            "zero-padded to 20 digits"
        );
        assert_eq!(sequence.len(), 20);
        assert_eq!(text(h, "cloudEvents:sequencetype"), "Integer");
        assert_eq!(text(h, "cloudEvents:esframeversion"), version.to_string());
        assert_eq!(
            text(h, "cloudEvents:esframeaggregate"),
            stored.aggregate_type()
        );
        assert_eq!(text(h, "cloudEvents:esframestream"), stored.aggregate_id());
        assert_eq!(
            text(h, "cloudEvents:partitionkey"),
            stored.stream_id.to_string()
        );
        assert_eq!(text(h, "cloudEvents:correlationid"), correlation);
        assert!(
            text(h, "cloudEvents:traceparent").starts_with(&format!(
                "00-{}-",
                stored.metadata.correlation_id.unwrap().simple()
            )),
            "the trace is the correlation"
        );
        match stored.metadata.causation_id {
            Some(causation) => {
                assert_eq!(text(h, "cloudEvents:causationid"), causation.to_string())
            }
            None => assert!(!h.contains_key("cloudEvents:causationid")),
        }
        assert!(
            !h.contains_key("cloudEvents:datacontenttype"),
            "binary mode carries it as the content type"
        );
        assert_eq!(text(h, STREAM_HEADER), stored.stream_id.to_string());
        assert_eq!(
            h.inner()[STREAM_VERSION_HEADER],
            AMQPValue::LongLongInt(i64::try_from(version).unwrap())
        );
        assert_eq!(
            h.inner()[POSITION_HEADER],
            AMQPValue::LongLongInt(i64::try_from(position).unwrap())
        );
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&message.data).unwrap(),
            *stored.payload.value().unwrap(),
            "the body is the payload"
        );

        // And a consumer reads it back as the event it was.
        let cloud = binding::cloud_event(p, &message.data).unwrap();
        let incoming = IncomingEvent::from_cloud_event(cloud).unwrap();
        assert_eq!(
            (
                incoming.message_id,
                &incoming.stream_id,
                incoming.stream_version,
                incoming.position
            ),
            (
                stored.event_id,
                &stored.stream_id,
                version,
                stored.global_position
            )
        );
        assert_eq!(incoming.event_type, "Deposited");
    }

    sink.close().await;
    broker.finish(&[]).await;
    common::drop_schema(&pool, store.schema().as_str()).await;
}

fn message(subject: &str) -> OutgoingMessage {
    let id = Uuid::now_v7();
    let stream = sid("x");
    let recorded = esframe_core::RecordedEvent {
        event_id: id,
        stream_id: stream.clone(),
        stream_version: 1,
        global_position: Position::new(1),
        recorded_at: chrono::Utc::now(),
        event_type: "Deposited".into(),
        schema_version: 1,
        payload: esframe_core::Payload::from_json_text(r#"{"n":1}"#),
        metadata: Default::default(),
    };
    OutgoingMessage {
        id,
        subject: subject.to_owned(),
        stream_id: stream,
        stream_version: 1,
        position: Position::new(1),
        event: CloudEvent::from_event(&recorded, id, "/bank"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_messages_and_missing_exchanges_are_refused_and_a_dead_broker_unreachable() {
    // Only `esframe.account.#` is bound: anything else comes back (mandatory) and is refused.
    let broker = Broker::with_topology(|t| t.binding_key("esframe.account.#")).await;
    let sink =
        AmqpSink::new(amqp_url(), &broker.name).connection_name(broker.connection_name("sink"));
    sink.publish(&message("esframe.account.Deposited"))
        .await
        .expect("a routable message is confirmed");
    let err = sink
        .publish(&message("esframe.loan.Deposited"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SinkError::Refused { .. }) && err.to_string().contains("NO_ROUTE"),
        "{err}"
    );
    // The channel survives a returned message.
    sink.publish(&message("esframe.account.Deposited"))
        .await
        .unwrap();
    assert_eq!(broker.drain(&broker.name).await.len(), 2);

    // Without `mandatory`, the broker drops what it cannot route, and confirms it.
    let lenient = AmqpSink::new(amqp_url(), &broker.name)
        .connection_name(broker.connection_name("lenient"))
        .mandatory(false);
    lenient
        .publish(&message("esframe.loan.Deposited"))
        .await
        .unwrap();
    lenient.close().await;

    // An exchange that does not exist: refused (the broker closes the channel; the sink opens
    // a new one next time).
    let nowhere = AmqpSink::new(amqp_url(), format!("{}.missing", broker.name))
        .connection_name(broker.connection_name("nowhere"));
    for _ in 0..2 {
        let err = nowhere
            .publish(&message("esframe.account.Deposited"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, SinkError::Refused { .. }) && err.to_string().contains("NOT_FOUND"),
            "{err}"
        );
    }
    assert!(matches!(
        nowhere.connect().await,
        Err(SinkError::Refused { .. })
    ));

    // No broker at all: unreachable, so the publisher retries.
    let dead = AmqpSink::new("amqp://guest:guest@127.0.0.1:1/%2f", &broker.name)
        .connect_timeout(Duration::from_secs(2));
    let err = dead
        .publish(&message("esframe.account.Deposited"))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");

    sink.close().await;
    broker.finish(&[]).await;
}

/// A broker that accepts connections and never answers: the publishes of many streams waiting
/// on it make one connection attempt between them, not one each after the other (which would
/// take streams × the connect timeout), and the next attempt comes after a short pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_to_a_silent_broker_share_one_connection_attempt() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket); // open, and silent
        }
    });
    let sink = AmqpSink::new(
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        "nowhere",
    )
    .connect_timeout(Duration::from_millis(300));
    let message = message("esframe.account.Deposited");
    let publishes: Vec<_> = (0..8)
        .map(|_| {
            let (sink, message) = (sink.clone(), message.clone());
            tokio::spawn(async move { sink.publish(&message).await })
        })
        .collect();
    for publish in publishes {
        let failed = publish.await.unwrap();
        assert!(
            matches!(failed, Err(SinkError::Unreachable { .. })),
            "{failed:?}"
        );
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "eight publishes made one connection attempt"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let again = sink.publish(&message).await;
    assert!(
        matches!(again, Err(SinkError::Unreachable { .. })),
        "{again:?}"
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    silent.abort();
}
