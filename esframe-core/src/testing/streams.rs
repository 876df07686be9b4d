//! Checks of the [`EventStore`] capability: appends with every expectation, atomicity,
//! idempotency, stream reads, hostile ids, concurrent writers.

use std::{collections::HashSet, sync::Arc};

use serde_json::json;
use tokio::sync::Barrier;
use uuid::Uuid;

use crate::{EventStore, ExpectedVersion, StoreError, StreamId};

use super::fixtures::{AGGREGATE, event, events, expect_conflict, payload_n, stream, versions};

/// The first append creates the stream at version 1 and the global log at position > 0.
pub async fn append_to_new_stream_starts_at_version_one<S: EventStore>(store: S) {
    let s = stream("first");
    assert_eq!(store.stream_version(&s).await.unwrap(), None);
    let outcome = store
        .append(&s, ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();
    assert_eq!(outcome.stream_version, 1);
    assert_eq!(outcome.positions.len(), 1);
    assert!(
        outcome.positions[0] > crate::Position::START,
        "global positions start above 0"
    );
    assert!(!outcome.deduplicated);
    assert_eq!(store.stream_version(&s).await.unwrap(), Some(1));
}

/// `Any` appends whatever the version.
pub async fn expected_version_any<S: EventStore>(store: S) {
    let s = stream("any");
    assert_eq!(
        store
            .append(&s, ExpectedVersion::Any, events(1..=2))
            .await
            .unwrap()
            .stream_version,
        2
    );
    assert_eq!(
        store
            .append(&s, ExpectedVersion::Any, events(3..=3))
            .await
            .unwrap()
            .stream_version,
        3
    );
    assert_eq!(versions(&store, &s).await, vec![1, 2, 3]);
}

/// `NoStream` succeeds only on a stream without events.
pub async fn expected_version_no_stream<S: EventStore>(store: S) {
    let s = stream("no-stream");
    store
        .append(&s, ExpectedVersion::NoStream, events(1..=1))
        .await
        .unwrap();
    let again = store
        .append(&s, ExpectedVersion::NoStream, events(2..=2))
        .await;
    expect_conflict(again, &s, ExpectedVersion::NoStream, Some(1));
    assert_eq!(
        versions(&store, &s).await,
        vec![1],
        "a refused append stores nothing"
    );
}

/// `StreamExists` succeeds only on a stream with events.
pub async fn expected_version_stream_exists<S: EventStore>(store: S) {
    let s = stream("exists");
    let missing = store
        .append(&s, ExpectedVersion::StreamExists, events(1..=1))
        .await;
    expect_conflict(missing, &s, ExpectedVersion::StreamExists, None);
    assert_eq!(store.stream_version(&s).await.unwrap(), None);
    store
        .append(&s, ExpectedVersion::Any, events(1..=1))
        .await
        .unwrap();
    let ok = store
        .append(&s, ExpectedVersion::StreamExists, events(2..=2))
        .await
        .unwrap();
    assert_eq!(ok.stream_version, 2);
}

/// `Exact(n)` succeeds only at version n; `Exact(0)` means no stream.
pub async fn expected_version_exact<S: EventStore>(store: S) {
    let s = stream("exact");
    let ahead = store
        .append(&s, ExpectedVersion::Exact(3), events(1..=1))
        .await;
    expect_conflict(ahead, &s, ExpectedVersion::Exact(3), None);
    store
        .append(&s, ExpectedVersion::Exact(0), events(1..=2))
        .await
        .unwrap();
    let stale = store
        .append(&s, ExpectedVersion::Exact(1), events(3..=3))
        .await;
    expect_conflict(stale, &s, ExpectedVersion::Exact(1), Some(2));
    let zero = store
        .append(&s, ExpectedVersion::Exact(0), events(3..=3))
        .await;
    expect_conflict(zero, &s, ExpectedVersion::Exact(0), Some(2));
    let ok = store
        .append(&s, ExpectedVersion::Exact(2), events(3..=3))
        .await
        .unwrap();
    assert_eq!(ok.stream_version, 3);
    assert_eq!(versions(&store, &s).await, vec![1, 2, 3]);
}

/// An append of no events writes nothing but still checks the expectation.
pub async fn empty_append_checks_expected_version<S: EventStore>(store: S) {
    let s = stream("empty");
    store
        .append(&s, ExpectedVersion::Any, events(1..=2))
        .await
        .unwrap();
    let ok = store
        .append(&s, ExpectedVersion::Exact(2), Vec::new())
        .await
        .unwrap();
    assert_eq!(ok.stream_version, 2);
    assert!(ok.positions.is_empty());
    let refused = store
        .append(&s, ExpectedVersion::NoStream, Vec::new())
        .await;
    expect_conflict(refused, &s, ExpectedVersion::NoStream, Some(2));
}

/// A multi-event append stores all events with consecutive versions, or none.
pub async fn multi_event_append_is_atomic<S: EventStore>(store: S) {
    let s = stream("atomic");
    let outcome = store
        .append(&s, ExpectedVersion::NoStream, events(1..=3))
        .await
        .unwrap();
    assert_eq!(outcome.stream_version, 3);
    assert_eq!(outcome.positions.len(), 3);
    assert!(
        outcome.positions.windows(2).all(|w| w[0] < w[1]),
        "positions increase within an append"
    );
    let refused = store
        .append(&s, ExpectedVersion::Exact(1), events(4..=8))
        .await;
    expect_conflict(refused, &s, ExpectedVersion::Exact(1), Some(3));
    let mut batch = events(4..=5);
    batch[1].event_id = batch[0].event_id;
    match store.append(&s, ExpectedVersion::Exact(3), batch).await {
        Err(StoreError::DuplicateIdInBatch { stream: st, .. }) => assert_eq!(st, s),
        other => panic!("expected DuplicateIdInBatch, got {other:?}"),
    }
    let stored = store.read_stream(&s, 1).await.unwrap();
    assert_eq!(
        stored.iter().map(payload_n).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "refused appends store nothing"
    );
}

/// Appending the same event ids with the same content again is a no-op reporting the original.
pub async fn idempotent_append_returns_original_outcome<S: EventStore>(store: S) {
    let s = stream("idempotent");
    store
        .append(&s, ExpectedVersion::NoStream, events(1..=1))
        .await
        .unwrap();
    let batch = events(2..=3);
    let original = store
        .append(&s, ExpectedVersion::Exact(1), batch.clone())
        .await
        .unwrap();
    store
        .append(&s, ExpectedVersion::Exact(3), events(4..=4))
        .await
        .unwrap();

    // The retry carries a now-stale expectation: idempotency is checked first.
    let retried = store
        .append(&s, ExpectedVersion::Exact(1), batch.clone())
        .await
        .unwrap();
    assert!(
        retried.deduplicated,
        "a retried append reports that nothing was written"
    );
    assert_eq!(retried.stream_version, original.stream_version);
    assert_eq!(retried.positions, original.positions);
    let retried_any = store.append(&s, ExpectedVersion::Any, batch).await.unwrap();
    assert_eq!(retried_any.positions, original.positions);
    assert_eq!(
        versions(&store, &s).await,
        vec![1, 2, 3, 4],
        "nothing was appended twice"
    );
}

/// An event id stored with other content, or in another stream, is refused.
pub async fn reused_event_id_with_other_content_is_refused<S: EventStore>(store: S) {
    let s = stream("reused");
    let first = event(1);
    store
        .append(&s, ExpectedVersion::NoStream, vec![first.clone()])
        .await
        .unwrap();
    let mut changed = first.clone();
    changed.payload = json!({ "n": 999 });
    match store.append(&s, ExpectedVersion::Any, vec![changed]).await {
        Err(StoreError::EventIdReused {
            event_id,
            stored_version,
            ..
        }) => {
            assert_eq!(event_id, first.event_id);
            assert_eq!(stored_version, 1);
        }
        other => panic!("expected EventIdReused, got {other:?}"),
    }
    let other = stream("reused-elsewhere");
    match store
        .append(&other, ExpectedVersion::Any, vec![first])
        .await
    {
        Err(StoreError::EventIdReused { stored_stream, .. }) => assert_eq!(stored_stream, s),
        other => panic!("expected EventIdReused across streams, got {other:?}"),
    }
    assert_eq!(
        store
            .read_stream(&s, 1)
            .await
            .unwrap()
            .iter()
            .map(payload_n)
            .collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(store.stream_version(&other).await.unwrap(), None);
}

/// A batch mixing stored and new event ids is refused and stores nothing.
pub async fn partial_duplicate_batch_is_refused<S: EventStore>(store: S) {
    let s = stream("partial");
    let first = event(1);
    store
        .append(&s, ExpectedVersion::NoStream, vec![first.clone()])
        .await
        .unwrap();
    match store
        .append(&s, ExpectedVersion::Any, vec![first.clone(), event(2)])
        .await
    {
        Err(StoreError::PartialDuplicate {
            stored_event_id, ..
        }) => assert_eq!(stored_event_id, first.event_id),
        other => panic!("expected PartialDuplicate, got {other:?}"),
    }
    assert_eq!(versions(&store, &s).await, vec![1]);
}

/// `read_stream` starts at the given version and keeps version order; other streams stay apart.
pub async fn read_stream_from_version<S: EventStore>(store: S) {
    let a = stream("read-a");
    let b = stream("read-b");
    for n in 1..=5 {
        store
            .append(&a, ExpectedVersion::Any, vec![event(n)])
            .await
            .unwrap();
        store
            .append(&b, ExpectedVersion::Any, vec![event(100 + n)])
            .await
            .unwrap();
    }
    let tail = store.read_stream(&a, 3).await.unwrap();
    assert_eq!(
        tail.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(
        tail.iter().map(payload_n).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert!(tail.iter().all(|e| e.stream_id == a));
    assert!(store.read_stream(&a, 6).await.unwrap().is_empty());
    assert!(
        store
            .read_stream(&stream("read-none"), 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.read_stream(&a, 0).await.unwrap().len(),
        5,
        "version 0 reads from the start"
    );
}

/// `read_stream_for_state` returns what `read_stream` does, with only the fields a load reads,
/// from every version.
pub async fn state_reads_match_full_reads<S: EventStore>(store: S) {
    let s = stream("state-read");
    let mut batch = events(1..=4);
    batch[1].event_type = "Other".into();
    batch[2].schema_version = 2;
    store
        .append(&s, ExpectedVersion::NoStream, batch)
        .await
        .unwrap();
    store
        .append(
            &stream("state-read-other"),
            ExpectedVersion::NoStream,
            events(1..=2),
        )
        .await
        .unwrap();
    for from in 0..=5 {
        let full = store.read_stream(&s, from).await.unwrap();
        let state = store.read_stream_for_state(&s, from).await.unwrap();
        assert_eq!(
            state,
            full.into_iter()
                .map(crate::LoadedEvent::from_recorded)
                .collect::<Vec<_>>(),
            "from version {from}"
        );
    }
    let all = store.read_stream_for_state(&s, 1).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|e| (e.stream_version, &*e.event_type, e.schema_version))
            .collect::<Vec<_>>(),
        vec![
            (1, "Happened", 1),
            (2, "Other", 1),
            (3, "Happened", 2),
            (4, "Happened", 1)
        ]
    );
    assert!(
        store
            .read_stream_for_state(&stream("state-read-none"), 1)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Streams are namespaced by aggregate type: one id under two aggregate types is two streams,
/// with their own versions, expectations and reads, however the two parts would concatenate.
pub async fn one_id_under_two_aggregate_types_is_two_streams<S: EventStore>(store: S) {
    let order = StreamId::new("order", "42").expect("valid");
    let inventory = StreamId::new("inventory", "42").expect("valid");
    // Would be one stream if a store joined the parts without keeping them apart.
    let (joined_a, joined_b) = (
        StreamId::new("orde", "r42").expect("valid"),
        StreamId::new("order4", "2").expect("valid"),
    );
    store
        .append(&order, ExpectedVersion::NoStream, events(1..=2))
        .await
        .unwrap();
    for (n, other) in [&inventory, &joined_a, &joined_b].into_iter().enumerate() {
        let outcome = store
            .append(other, ExpectedVersion::NoStream, vec![event(10 + n as u64)])
            .await
            .unwrap_or_else(|err| panic!("{other} is a new stream: {err}"));
        assert_eq!(outcome.stream_version, 1, "{other} starts at version 1");
    }
    expect_conflict(
        store
            .append(&inventory, ExpectedVersion::Exact(2), vec![event(3)])
            .await,
        &inventory,
        ExpectedVersion::Exact(2),
        Some(1),
    );
    assert_eq!(versions(&store, &order).await, [1, 2]);
    assert_eq!(store.stream_version(&inventory).await.unwrap(), Some(1));
    for (s, first) in [
        (&order, 1),
        (&inventory, 10),
        (&joined_a, 11),
        (&joined_b, 12),
    ] {
        let read = store.read_stream(s, 1).await.unwrap();
        assert!(
            read.iter().all(|e| e.stream_id == *s),
            "{s} reads only its own events"
        );
        assert_eq!(read[0].aggregate_type(), s.aggregate_type());
        assert_eq!(read[0].aggregate_id(), s.id());
        assert_eq!(payload_n(&read[0]), first);
        let state = store.read_stream_for_state(s, 1).await.unwrap();
        assert_eq!(
            state.len(),
            read.len(),
            "{s}: state reads are namespaced too"
        );
    }
}

/// Stream ids and aggregate types full of quotes, SQL and non-ASCII text, and the longest ids
/// allowed, are stored verbatim.
pub async fn hostile_stream_ids_round_trip<S: EventStore>(store: S) {
    let long = "x".repeat(crate::MAX_STREAM_ID_LEN);
    let ids = [
        "it's",
        "\"; DROP TABLE events; --",
        "' OR '1'='1",
        "Ω≈ç√ 🦀",
        "%_\\",
        long.as_str(),
    ];
    for (n, id) in ids.iter().enumerate() {
        let s = stream(id);
        store
            .append(&s, ExpectedVersion::NoStream, vec![event(n as u64)])
            .await
            .unwrap();
    }
    for (n, id) in ids.iter().enumerate() {
        let stored = store.read_stream(&stream(id), 1).await.unwrap();
        assert_eq!(stored.len(), 1, "stream {id:?} holds exactly its own event");
        assert_eq!(stored[0].stream_id.parts(), (AGGREGATE, *id));
        assert_eq!(payload_n(&stored[0]), n as u64);
    }
    // Hostile aggregate types too, each with the same id.
    let types = ["it's", "\"; DROP TABLE events; --", "%_\\", "Ω≈ç√ 🦀"];
    for (n, aggregate_type) in types.iter().enumerate() {
        let s = StreamId::new(aggregate_type, "1").expect("valid");
        store
            .append(&s, ExpectedVersion::NoStream, vec![event(100 + n as u64)])
            .await
            .unwrap();
    }
    for (n, aggregate_type) in types.iter().enumerate() {
        let stored = store
            .read_stream(&StreamId::new(aggregate_type, "1").expect("valid"), 1)
            .await
            .unwrap();
        assert_eq!(
            stored.len(),
            1,
            "{aggregate_type:?}/1 holds exactly its own event"
        );
        assert_eq!(stored[0].stream_id.parts(), (*aggregate_type, "1"));
        assert_eq!(payload_n(&stored[0]), 100 + n as u64);
    }
}

const RACERS: usize = 16;

/// Many tasks append at the same instant with the same expected version: exactly one wins each round.
pub async fn concurrent_writers_one_stream_exactly_one_winner_per_version<S: EventStore>(store: S) {
    let s = stream("race");
    let rounds = 20u64;
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for racer in 0..RACERS {
        let (store, s, barrier) = (store.clone(), s.clone(), Arc::clone(&barrier));
        tasks.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            for round in 0..rounds {
                barrier.wait().await;
                let e = event(round * 1000 + racer as u64);
                match store
                    .append(&s, ExpectedVersion::Exact(round), vec![e])
                    .await
                {
                    Ok(outcome) => {
                        assert_eq!(outcome.stream_version, round + 1);
                        wins.push(round);
                    }
                    Err(StoreError::Conflict(c)) => assert_eq!(
                        c.actual,
                        Some(round + 1),
                        "the loser sees the winner's version"
                    ),
                    Err(other) => panic!("unexpected error: {other}"),
                }
                barrier.wait().await;
            }
            wins
        }));
    }
    let mut winners_per_round = vec![0usize; rounds as usize];
    for task in tasks {
        for round in task.await.expect("racer task") {
            winners_per_round[round as usize] += 1;
        }
    }
    assert!(
        winners_per_round.iter().all(|&w| w == 1),
        "exactly one winner per version: {winners_per_round:?}"
    );
    assert_eq!(versions(&store, &s).await, (1..=rounds).collect::<Vec<_>>());
}

/// Many tasks retrying on conflict: every event lands once, versions have no gaps or repeats.
pub async fn concurrent_writers_one_stream_lose_nothing<S: EventStore>(store: S) {
    let s = stream("contended");
    let per_task = 15u64;
    let mut tasks = Vec::new();
    for racer in 0..RACERS as u64 {
        let (store, s) = (store.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..per_task {
                let e = event(racer * 1000 + i);
                ids.push(e.event_id);
                loop {
                    let version = store.stream_version(&s).await.unwrap().unwrap_or(0);
                    match store
                        .append(&s, ExpectedVersion::Exact(version), vec![e.clone()])
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Conflict(_)) => tokio::task::yield_now().await,
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
            }
            ids
        }));
    }
    let mut expected_ids = HashSet::new();
    for task in tasks {
        expected_ids.extend(task.await.expect("writer task"));
    }
    let stored = store.read_stream(&s, 1).await.unwrap();
    let total = RACERS as u64 * per_task;
    assert_eq!(
        stored.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    let stored_ids: HashSet<Uuid> = stored.iter().map(|e| e.event_id).collect();
    assert_eq!(stored_ids.len() as u64, total, "no event stored twice");
    assert_eq!(stored_ids, expected_ids, "no event lost");
}

/// When several ids of a batch are already stored, the error names the first one in the
/// batch's order, whatever the store's lookup order.
pub async fn reused_ids_are_reported_in_the_batch_order<S: EventStore>(store: S) {
    let s = stream("reused-order");
    let (a, b) = (event(1), event(2));
    store
        .append(&s, ExpectedVersion::NoStream, vec![a.clone(), b.clone()])
        .await
        .unwrap();
    let (mut a2, mut b2) = (a.clone(), b.clone());
    a2.payload = json!({ "n": 10 });
    b2.payload = json!({ "n": 20 });
    match store
        .append(&s, ExpectedVersion::Any, vec![event(3), b2, a2])
        .await
    {
        Err(StoreError::EventIdReused {
            event_id,
            stored_version,
            ..
        }) => {
            assert_eq!(
                event_id, b.event_id,
                "the first reused id in the batch's order"
            );
            assert_eq!(stored_version, 2);
        }
        other => panic!("expected EventIdReused, got {other:?}"),
    }
    match store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![event(4), b.clone(), a.clone()],
        )
        .await
    {
        Err(StoreError::PartialDuplicate {
            stored_event_id, ..
        }) => assert_eq!(stored_event_id, b.event_id),
        other => panic!("expected PartialDuplicate, got {other:?}"),
    }
    assert_eq!(versions(&store, &s).await, vec![1, 2]);
}
