//! Checks of the [`GlobalLog`] capability: order, batches, every envelope field, concurrent
//! writers, subscriptions that follow or stop at the head.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use futures_util::StreamExt;
use serde_json::json;
use uuid::Uuid;

use crate::{EventMetadata, ExpectedVersion, GlobalLog, Position, StreamId};

use super::fixtures::{AGGREGATE, event, events, payload_n, settled_log, stream};

/// `read_all` returns every event once, in increasing position, honouring `after` and `limit`.
pub async fn read_all_is_globally_ordered_in_batches<S: GlobalLog>(store: S) {
    let names = ["g-a", "g-b", "g-c"];
    for n in 0..30u64 {
        let s = stream(names[(n % 3) as usize]);
        store
            .append(&s, ExpectedVersion::Any, vec![event(n)])
            .await
            .unwrap();
    }
    settled_log(&store, 30).await;
    let mut seen = Vec::new();
    let mut after = Position::START;
    loop {
        let batch = store.read_all(after, 7).await.unwrap();
        assert!(batch.len() <= 7, "read_all respects its limit");
        let Some(last) = batch.last() else { break };
        after = last.global_position;
        seen.extend(batch);
    }
    assert_eq!(seen.len(), 30);
    assert!(
        seen.windows(2)
            .all(|w| w[0].global_position < w[1].global_position),
        "global positions strictly increase"
    );
    assert_eq!(
        seen.iter().map(payload_n).collect::<Vec<_>>(),
        (0..30).collect::<Vec<_>>(),
        "global order is append order"
    );
    let mut next_version: HashMap<&StreamId, u64> = HashMap::new();
    for e in &seen {
        let v = next_version.entry(&e.stream_id).or_insert(1);
        assert_eq!(
            e.stream_version, *v,
            "each stream's events appear in version order"
        );
        *v += 1;
    }
    let from_middle = store.read_all(seen[9].global_position, 100).await.unwrap();
    assert_eq!(from_middle.len(), 20);
    assert_eq!(from_middle[0].event_id, seen[10].event_id);
}

/// Everything given to `append` comes back from both read paths.
pub async fn envelope_fields_round_trip<S: GlobalLog>(store: S) {
    let s = stream("envelope");
    let mut e = event(7);
    e.event_type = "MoneyDeposited".into();
    e.schema_version = 3;
    e.payload = json!({ "amount": 12.5, "note": "a \"quoted\" 'note'", "nested": { "list": [1, 2, null] } });
    e.metadata = EventMetadata {
        correlation_id: Some(Uuid::now_v7()),
        causation_id: Some(Uuid::now_v7()),
        extra: json!({ "user": "ada", "tenant": 7 })
            .as_object()
            .cloned()
            .unwrap_or_default(),
    };
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    let outcome = store
        .append(&s, ExpectedVersion::NoStream, vec![e.clone()])
        .await
        .unwrap();
    let after = chrono::Utc::now() + chrono::Duration::seconds(5);
    for stored in [
        store.read_stream(&s, 1).await.unwrap().remove(0),
        settled_log(&store, 1).await.remove(0),
    ] {
        assert_eq!(stored.event_id, e.event_id);
        assert_eq!(stored.stream_id, s);
        assert_eq!(stored.aggregate_type(), AGGREGATE);
        assert_eq!(stored.aggregate_id(), s.id());
        assert_eq!(stored.stream_version, 1);
        assert_eq!(stored.global_position, outcome.positions[0]);
        assert_eq!(stored.event_type, "MoneyDeposited");
        assert_eq!(stored.schema_version, 3);
        assert_eq!(stored.payload, e.payload);
        assert_eq!(stored.metadata, e.metadata);
        assert!(
            stored.recorded_at > before && stored.recorded_at < after,
            "recorded_at is the append time"
        );
        assert_eq!(stored.recorded_at, outcome.recorded_at);
    }
}

/// Many tasks on many streams: every event in the global log once, each stream in order.
pub async fn concurrent_writers_many_streams<S: GlobalLog>(store: S) {
    let writers = 32u64;
    let per_writer = 20u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let s = stream(&format!("many-{w}"));
            for i in 0..per_writer {
                let expected = if i == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(i)
                };
                store
                    .append(&s, expected, vec![event(w * 1000 + i)])
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer task");
    }
    let all = settled_log(&store, (writers * per_writer) as usize).await;
    assert!(
        all.windows(2)
            .all(|w| w[0].global_position < w[1].global_position)
    );
    let ids: HashSet<Uuid> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), all.len(), "no event twice in the global log");
    let mut next: HashMap<&StreamId, u64> = HashMap::new();
    for e in &all {
        let v = next.entry(&e.stream_id).or_insert(1);
        assert_eq!(
            e.stream_version, *v,
            "stream {} out of order in the global log",
            e.stream_id
        );
        assert_eq!(payload_n(e) % 1000, *v - 1);
        *v += 1;
    }
    assert_eq!(next.len() as u64, writers);
}

/// A subscription delivers stored events, then live ones, each once and in order.
pub async fn subscription_delivers_stored_then_live_events<S: GlobalLog>(store: S) {
    let s = stream("sub");
    store
        .append(&s, ExpectedVersion::Any, events(1..=3))
        .await
        .unwrap();
    let mut sub = store.subscribe(Position::START);
    let writer = {
        let (store, s) = (store.clone(), s.clone());
        tokio::spawn(async move {
            for n in 4..=10 {
                tokio::time::sleep(Duration::from_millis(2)).await;
                store
                    .append(&s, ExpectedVersion::Any, vec![event(n)])
                    .await
                    .unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let next = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a live event arrives within 10 s")
            .expect("a following subscription never ends")
            .unwrap();
        seen.push(payload_n(&next));
        assert_eq!(sub.position(), next.global_position);
    }
    writer.await.unwrap();
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    let quiet = tokio::time::timeout(Duration::from_millis(50), sub.next()).await;
    assert!(quiet.is_err(), "no event is delivered twice");
}

/// A subscription reading ahead (full batches of 4) while writers append to several streams
/// delivers every event once, in log order, with its position following each event.
pub async fn subscriptions_reading_ahead_deliver_every_event_once<S: GlobalLog>(store: S) {
    for n in 1..=30 {
        store
            .append(
                &stream(&format!("ahead-{}", n % 3)),
                ExpectedVersion::Any,
                vec![event(n)],
            )
            .await
            .unwrap();
    }
    let mut sub = store.subscribe(Position::START).batch_size(4);
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..10 {
                    store
                        .append(
                            &stream(&format!("ahead-{w}")),
                            ExpectedVersion::Any,
                            vec![event(100 + w * 10 + n)],
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    while seen.len() < 60 {
        let next = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("an event within 10 s")
            .expect("a following subscription never ends")
            .unwrap();
        assert_eq!(sub.position(), next.global_position);
        seen.push(next.event_id);
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let log: Vec<Uuid> = settled_log(&store, 60)
        .await
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(seen, log, "every event once, in log order");
    let quiet = tokio::time::timeout(Duration::from_millis(50), sub.next()).await;
    assert!(quiet.is_err(), "no event is delivered twice");
    let caught_up: Vec<Uuid> = store
        .subscribe(Position::START)
        .batch_size(7)
        .until_head()
        .map(|e| e.unwrap().event_id)
        .collect()
        .await;
    assert_eq!(
        caught_up, log,
        "until_head with read-ahead ends after the last event"
    );
}

/// A subscription made with `until_head` delivers what is stored, then ends.
pub async fn subscription_until_head_ends_after_the_stored_events<S: GlobalLog>(store: S) {
    let s = stream("sub-head");
    assert!(
        store
            .subscribe(Position::START)
            .until_head()
            .next()
            .await
            .is_none(),
        "an empty log ends at once"
    );
    store
        .append(&s, ExpectedVersion::Any, events(1..=3))
        .await
        .unwrap();
    settled_log(&store, 3).await;
    let caught_up: Vec<_> = tokio::time::timeout(
        Duration::from_secs(10),
        store
            .subscribe(Position::START)
            .until_head()
            .collect::<Vec<_>>(),
    )
    .await
    .expect("a catch-up ends")
    .into_iter()
    .map(|e| payload_n(&e.unwrap()))
    .collect();
    assert_eq!(caught_up, vec![1, 2, 3]);
    let second = store.read_all(Position::START, 2).await.unwrap()[1].global_position;
    store
        .append(&s, ExpectedVersion::Any, events(4..=5))
        .await
        .unwrap();
    let mut rest = store.subscribe(second).until_head().batch_size(1);
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(10), rest.next())
        .await
        .expect("a catch-up ends")
    {
        seen.push(payload_n(&event.unwrap()));
    }
    assert_eq!(
        seen,
        vec![3, 4, 5],
        "events committed before it are waited for"
    );
}

/// The head is the position of the last stored event.
pub async fn head_position_is_the_last_stored_event<S: GlobalLog>(store: S) {
    assert_eq!(store.head_position().await.unwrap(), Position::START);
    let outcome = store
        .append(&stream("head"), ExpectedVersion::Any, events(1..=4))
        .await
        .unwrap();
    assert_eq!(
        store.head_position().await.unwrap(),
        *outcome.positions.last().unwrap()
    );
}
