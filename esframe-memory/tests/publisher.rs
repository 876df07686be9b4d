//! The publisher on the memory store: every event reaches the sink, in order per stream, and the
//! checkpoint never passes a message the sink did not acknowledge, whatever fails.

use std::{collections::HashMap, time::Duration};

use esframe_core::{
    EventMetadata, EventStore, ExpectedVersion, GlobalLog, NewEvent, Position, RecordedEvent,
    StreamId,
    projection::{CheckpointStore, Interest, ProjectionKey},
    publish::{Backoff, Fault, MemorySink, OutgoingMessage, PublishError, Publisher},
};
use esframe_memory::{MemoryCheckpoints, MemoryStore};
use serde_json::json;
use uuid::Uuid;

fn event(event_type: &str, n: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: event_type.to_owned().into(),
        schema_version: 1,
        payload: json!({ "n": n }),
        metadata: EventMetadata {
            correlation_id: Some(Uuid::now_v7()),
            ..EventMetadata::default()
        },
    }
}

fn stream(aggregate_type: &str, id: &str) -> StreamId {
    StreamId::new(aggregate_type, id).unwrap()
}

fn quick() -> Backoff {
    Backoff {
        min: Duration::from_millis(1),
        max: Duration::from_millis(5),
    }
}

fn publisher(
    store: &MemoryStore,
    checkpoints: &MemoryCheckpoints,
    sink: &MemorySink,
) -> Publisher<MemoryStore, MemoryCheckpoints, MemorySink> {
    Publisher::new(
        store.clone(),
        checkpoints.clone(),
        sink.clone(),
        "to_broker",
        "/bank",
    )
    .unwrap()
    .backoff(quick())
    .batch_size(7)
}

/// Appends `per_stream` events to each of `streams` account streams, interleaved.
async fn fill(store: &MemoryStore, streams: usize, per_stream: u64) -> Vec<RecordedEvent> {
    for n in 1..=per_stream {
        for s in 0..streams {
            store
                .append(
                    &stream("account", &s.to_string()),
                    ExpectedVersion::Any,
                    vec![event("Deposited", n)],
                )
                .await
                .unwrap();
        }
    }
    store.read_all(Position::START, usize::MAX).await.unwrap()
}

/// Each stream's versions, in the order the sink stored them.
fn versions_per_stream(messages: &[OutgoingMessage]) -> HashMap<StreamId, Vec<u64>> {
    let mut seen: HashMap<StreamId, Vec<u64>> = HashMap::new();
    for m in messages {
        seen.entry(m.stream_id.clone())
            .or_default()
            .push(m.stream_version);
    }
    seen
}

async fn checkpoint(checkpoints: &MemoryCheckpoints) -> Position {
    checkpoints
        .load(&ProjectionKey::single("to_broker").unwrap())
        .await
        .unwrap()
        .map_or(Position::START, |c| c.position)
}

#[tokio::test]
async fn every_event_reaches_the_sink_once_in_stream_order_as_a_cloudevent() {
    let (store, checkpoints, sink) = (
        MemoryStore::new(),
        MemoryCheckpoints::new(),
        MemorySink::new(),
    );
    let all = fill(&store, 5, 6).await;
    let reached = publisher(&store, &checkpoints, &sink)
        .catch_up()
        .await
        .unwrap();
    assert_eq!(reached, all.last().unwrap().global_position);
    assert_eq!(checkpoint(&checkpoints).await, reached);

    let messages = sink.messages();
    assert_eq!(messages.len(), all.len(), "one message per event, no more");
    for (s, versions) in versions_per_stream(&messages) {
        assert_eq!(
            versions,
            (1..=6).collect::<Vec<_>>(),
            "{s}: in version order"
        );
    }
    let by_id: HashMap<Uuid, &RecordedEvent> = all.iter().map(|e| (e.event_id, e)).collect();
    for m in &messages {
        let stored = by_id[&m.id];
        let ce = &m.event;
        ce.check().unwrap();
        assert_eq!(
            (ce.id, ce.source.as_str(), ce.ty.as_str()),
            (stored.event_id, "/bank", "Deposited.v1")
        );
        assert_eq!(ce.subject, stored.stream_id.to_string());
        assert_eq!(m.subject, "esframe.account.Deposited");
        assert_eq!(
            ce.extensions["sequence"],
            format!("{:020}", stored.global_position.get())
        );
        assert_eq!(
            ce.extensions["esframeversion"],
            stored.stream_version.to_string()
        );
        assert_eq!(
            ce.extensions["correlationid"],
            stored.metadata.correlation_id.unwrap().to_string()
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&ce.data).unwrap(),
            json!({"n": stored.payload["n"]})
        );
    }

    // Nothing new: a second run sends nothing.
    publisher(&store, &checkpoints, &sink)
        .catch_up()
        .await
        .unwrap();
    assert_eq!(sink.messages().len(), all.len());
}

#[tokio::test]
async fn failures_resend_only_the_unacknowledged_tail_and_keep_stream_order() {
    let store = MemoryStore::new();
    let all = fill(&store, 4, 10).await;
    for (sink, exact) in [
        (MemorySink::deduplicating(), true),
        (MemorySink::new(), false),
    ] {
        let checkpoints = MemoryCheckpoints::new();
        // Unreachable brokers and lost acknowledgements, scattered through the run.
        let faults = (0..60).map(|n| match n % 5 {
            0 => Some(Fault::Unreachable),
            2 => Some(Fault::LostAck),
            _ => None,
        });
        sink.inject(faults);
        let reached = publisher(&store, &checkpoints, &sink)
            .catch_up()
            .await
            .unwrap();
        assert_eq!(reached, all.last().unwrap().global_position);
        let messages = sink.messages();
        let per_stream = versions_per_stream(&messages);
        for (s, versions) in &per_stream {
            if exact {
                assert_eq!(
                    versions,
                    &(1..=10).collect::<Vec<_>>(),
                    "{s}: exactly once, in order"
                );
            } else {
                // Resends repeat a stream's tail in order: never a version before one already
                // sent for the first time.
                let mut high = 0;
                for v in versions {
                    assert!(*v <= high + 1, "{s}: {v} arrived before {}", high + 1);
                    high = high.max(*v);
                }
                assert_eq!(high, 10, "{s}: every version arrived");
            }
        }
        let ids: std::collections::HashSet<Uuid> = messages.iter().map(|m| m.id).collect();
        assert_eq!(ids.len(), all.len(), "every event arrived");
    }
}

#[tokio::test]
async fn a_refused_message_stops_the_publisher_before_it_and_its_stream() {
    let (store, checkpoints, sink) = (
        MemoryStore::new(),
        MemoryCheckpoints::new(),
        MemorySink::new(),
    );
    let all = fill(&store, 1, 5).await;
    // The first two events go through, the third is refused.
    sink.inject([None, None, Some(Fault::Refuse)]);
    let publisher = publisher(&store, &checkpoints, &sink).batch_size(100);
    let err = publisher.catch_up().await.unwrap_err();
    let PublishError::Refused {
        stream,
        stream_version,
        position,
        ..
    } = &err
    else {
        panic!("expected Refused, got {err:?}");
    };
    assert_eq!(
        (stream, *stream_version, *position),
        (&all[2].stream_id, 3, all[2].global_position)
    );
    assert!(
        err.to_string().contains("version 3 of stream `account/0`"),
        "{err}"
    );
    assert_eq!(
        checkpoint(&checkpoints).await,
        all[1].global_position,
        "the checkpoint stays before it"
    );
    assert_eq!(
        sink.messages().len(),
        2,
        "nothing of the stream after the refused message was sent"
    );
    assert!(publisher.status().last_error.is_some());
    // Once the broker takes it, the publisher goes on from there.
    publisher.catch_up().await.unwrap();
    let versions: Vec<u64> = sink.messages().iter().map(|m| m.stream_version).collect();
    assert_eq!(versions, [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn interest_and_transform_choose_change_and_fan_out_what_leaves() {
    let (store, checkpoints, sink) = (
        MemoryStore::new(),
        MemoryCheckpoints::new(),
        MemorySink::new(),
    );
    let ada = stream("account", "ada");
    let events = vec![event("Opened", 1), event("Secret", 2), event("Split", 3)];
    let split_id = events[2].event_id;
    store
        .append(&ada, ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    store
        .append(
            &stream("loan", "ada"),
            ExpectedVersion::NoStream,
            vec![event("Opened", 4)],
        )
        .await
        .unwrap();
    publisher(&store, &checkpoints, &sink)
        .interest(Interest::aggregates(["account"]))
        .subject_prefix("bank")
        .transform(|event, mut cloud| match &*event.event_type {
            "Secret" => vec![],
            "Split" => vec![cloud.clone(), cloud],
            _ => {
                cloud.data = r#"{"public":true}"#.to_owned();
                vec![cloud]
            }
        })
        .catch_up()
        .await
        .unwrap();
    let messages = sink.messages();
    let summary: Vec<(&str, &str, u64)> = messages
        .iter()
        .map(|m| (m.event.ty.as_str(), m.subject.as_str(), m.stream_version))
        .collect();
    assert_eq!(
        summary,
        [
            ("Opened.v1", "bank.account.Opened", 1),
            ("Split.v1", "bank.account.Split", 3),
            ("Split.v1", "bank.account.Split", 3),
        ],
        "the loan is outside the interest, the secret dropped, the split fanned out"
    );
    assert_eq!(messages[0].event.data, r#"{"public":true}"#);
    assert_eq!(messages[1].id, split_id);
    assert_eq!(
        messages[2].id,
        Uuid::new_v5(&split_id, b"1"),
        "a stable id for the extra message"
    );
    assert_eq!(messages[2].event.id, messages[2].id);
}

#[tokio::test]
async fn a_subject_function_routes_each_event() {
    let (store, checkpoints, sink) = (
        MemoryStore::new(),
        MemoryCheckpoints::new(),
        MemorySink::new(),
    );
    fill(&store, 2, 1).await;
    publisher(&store, &checkpoints, &sink)
        .subject(|event| format!("accounts.{}", event.aggregate_id()))
        .catch_up()
        .await
        .unwrap();
    let subjects: Vec<String> = sink.messages().into_iter().map(|m| m.subject).collect();
    assert_eq!(subjects, ["accounts.0", "accounts.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_publisher_follows_new_events_and_holds_its_name() {
    let (store, checkpoints, sink) = (
        MemoryStore::new(),
        MemoryCheckpoints::new(),
        MemorySink::new(),
    );
    fill(&store, 2, 3).await;
    let running = publisher(&store, &checkpoints, &sink).spawn();
    let second = publisher(&store, &checkpoints, &sink);
    // Wait for the first to be active, then the second cannot run under the same name.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !running.status().active {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the publisher never became active"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(matches!(
        second.catch_up().await,
        Err(PublishError::LeaseHeld { .. })
    ));

    // Live: 8 writers append while it runs.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..25 {
                    store
                        .append(
                            &stream("account", &format!("w{w}")),
                            ExpectedVersion::Any,
                            vec![event("Deposited", n)],
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let head = store.head_position().await.unwrap();
    while running.status().position < head {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the publisher fell behind: {:?}",
            running.status()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The status catches up too: nothing behind, nothing pending.
    let mut status = running.status();
    while status.behind != Some(0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "behind never reached 0: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        status = running.status();
    }
    assert_eq!(status.published, 6 + 200);
    assert_eq!(
        (status.pending, status.lag, status.broker_reachable),
        (0, None, true)
    );
    running.shutdown().await;
    let messages = sink.messages();
    assert_eq!(messages.len(), 206);
    for (s, versions) in versions_per_stream(&messages) {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, expected, "{s}: in version order");
    }
    // The lease was released: another publisher may run now.
    second.catch_up().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_publisher_does_not_report_its_broker_unreachable() {
    let (store, checkpoints, sink) = (
        MemoryStore::new(),
        MemoryCheckpoints::new(),
        MemorySink::new(),
    );
    let running = publisher(&store, &checkpoints, &sink).spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !running.status().active {
        assert!(tokio::time::Instant::now() < deadline, "never active");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = running.status();
    assert!(
        status.broker_reachable && status.failures == 0,
        "nothing was sent, nothing failed: {status:?}"
    );
    running.shutdown().await;

    // A refused message is one failure, not two.
    fill(&store, 1, 1).await;
    sink.inject([Some(Fault::Refuse)]);
    let running = publisher(&store, &checkpoints, &sink).spawn();
    // Refused once, then taken on the next try.
    while sink.messages().is_empty() || running.status().pending > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never sent: {:?}",
            running.status()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let status = running.status();
    running.shutdown().await;
    assert_eq!(status.failures, 1, "{status:?}");
    assert!(
        status.broker_reachable,
        "a refusal is an answer: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_running_publisher_stops_it_and_frees_its_name() {
    let (store, checkpoints, sink) = (
        MemoryStore::new(),
        MemoryCheckpoints::new(),
        MemorySink::new(),
    );
    fill(&store, 1, 3).await;
    let running = publisher(&store, &checkpoints, &sink).spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while running.status().position < store.head_position().await.unwrap() {
        assert!(tokio::time::Instant::now() < deadline, "it never caught up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Dropped, not shut down: it stops by itself (it used to spin on the closed stop channel,
    // a core at 100%, holding its lease for ever).
    drop(running);
    let second = publisher(&store, &checkpoints, &sink);
    loop {
        match second.catch_up().await {
            Ok(_) => break,
            Err(PublishError::LeaseHeld { .. }) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the dropped publisher still holds its lease"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => panic!("{err}"),
        }
    }
}

mod suite {
    //! The shared publisher suite: partitioned publishers.
    use esframe_memory::{MemoryCheckpoints, MemoryStore};

    esframe_core::publisher_suite!(async { (MemoryStore::new(), MemoryCheckpoints::new()) });
}
