//! The checks of the conformance suite. Each takes a fresh, empty store and panics with a message
//! naming the broken guarantee.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use serde_json::json;
use tokio::sync::Barrier;
use uuid::Uuid;

use crate::{
    EventMetadata, ExpectedVersion, NewEvent, RecordedEvent, Snapshot, SnapshotStore, StoreError,
    StreamId,
};

const AGGREGATE: &str = "conformance";

fn stream(name: &str) -> StreamId {
    StreamId::new(name).expect("valid test stream id")
}

/// An event whose payload carries `n`.
fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        aggregate_type: AGGREGATE.into(),
        event_type: "Happened".into(),
        schema_version: 1,
        payload: json!({ "n": n }),
        metadata: EventMetadata::default(),
    }
}

fn events(range: std::ops::RangeInclusive<u64>) -> Vec<NewEvent> {
    range.map(event).collect()
}

fn payload_n(event: &RecordedEvent) -> u64 {
    event.payload["n"]
        .as_u64()
        .expect("conformance payloads carry `n`")
}

fn snapshot(stream_id: &StreamId, version: u64, value: u64) -> Snapshot {
    Snapshot {
        stream_id: stream_id.clone(),
        aggregate_type: AGGREGATE.into(),
        version,
        schema_version: 1,
        state: json!({ "value": value }),
        taken_at: chrono::Utc::now(),
    }
}

async fn versions<S: SnapshotStore>(store: &S, stream_id: &StreamId) -> Vec<u64> {
    store
        .read_stream(stream_id, 1)
        .await
        .expect("read_stream")
        .iter()
        .map(|e| e.stream_version)
        .collect()
}

/// Reads the whole global log once it holds `expected` events (appends become readable there once
/// every earlier transaction has ended), then checks that no more appear.
async fn settled_log<S: SnapshotStore>(store: &S, expected: usize) -> Vec<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let all = store.read_all(0, usize::MAX).await.expect("read_all");
        if all.len() >= expected {
            assert_eq!(
                all.len(),
                expected,
                "the global log holds more events than were appended"
            );
            return all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the global log shows {} of {expected} appended events after 10 s",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn expect_conflict(
    result: Result<crate::AppendOutcome, StoreError>,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    actual: Option<u64>,
) {
    match result {
        Err(StoreError::Conflict(conflict)) => {
            assert_eq!(&conflict.stream, stream_id, "conflict names the stream");
            assert_eq!(
                conflict.expected, expected,
                "conflict names the expectation"
            );
            assert_eq!(conflict.actual, actual, "conflict names the actual version");
        }
        other => panic!("expected a conflict ({expected} vs {actual:?}), got {other:?}"),
    }
}

/// The first append creates the stream at version 1 and the global log at position > 0.
pub async fn append_to_new_stream_starts_at_version_one<S: SnapshotStore>(store: S) {
    let s = stream("first");
    assert_eq!(store.stream_version(&s).await.unwrap(), None);
    let outcome = store
        .append(&s, ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();
    assert_eq!(outcome.stream_version, 1);
    assert_eq!(outcome.positions.len(), 1);
    assert!(outcome.positions[0] > 0, "global positions start above 0");
    assert!(!outcome.deduplicated);
    assert_eq!(store.stream_version(&s).await.unwrap(), Some(1));
}

/// `Any` appends whatever the version.
pub async fn expected_version_any<S: SnapshotStore>(store: S) {
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
pub async fn expected_version_no_stream<S: SnapshotStore>(store: S) {
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
pub async fn expected_version_stream_exists<S: SnapshotStore>(store: S) {
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
pub async fn expected_version_exact<S: SnapshotStore>(store: S) {
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
pub async fn empty_append_checks_expected_version<S: SnapshotStore>(store: S) {
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
    settled_log(&store, 2).await;
}

/// A multi-event append stores all events with consecutive versions, or none.
pub async fn multi_event_append_is_atomic<S: SnapshotStore>(store: S) {
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
    settled_log(&store, 3).await;
}

/// Appending the same event ids with the same content again is a no-op reporting the original.
pub async fn idempotent_append_returns_original_outcome<S: SnapshotStore>(store: S) {
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
pub async fn reused_event_id_with_other_content_is_refused<S: SnapshotStore>(store: S) {
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
pub async fn partial_duplicate_batch_is_refused<S: SnapshotStore>(store: S) {
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
pub async fn read_stream_from_version<S: SnapshotStore>(store: S) {
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

/// `read_all` returns every event once, in increasing position, honouring `after` and `limit`.
pub async fn read_all_is_globally_ordered_in_batches<S: SnapshotStore>(store: S) {
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
    let mut after = 0;
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
pub async fn envelope_fields_round_trip<S: SnapshotStore>(store: S) {
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
        assert_eq!(stored.aggregate_type, AGGREGATE);
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

/// Stream ids full of quotes, SQL and non-ASCII text, and the longest allowed, are stored verbatim.
pub async fn hostile_stream_ids_round_trip<S: SnapshotStore>(store: S) {
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
        assert_eq!(stored[0].stream_id.as_str(), *id);
        assert_eq!(payload_n(&stored[0]), n as u64);
    }
    settled_log(&store, ids.len()).await;
}

/// The latest snapshot wins; an older one never replaces it.
pub async fn snapshots_keep_the_latest<S: SnapshotStore>(store: S) {
    let s = stream("snap");
    assert_eq!(store.load_snapshot(&s).await.unwrap(), None);
    store.save_snapshot(snapshot(&s, 5, 50)).await.unwrap();
    store.save_snapshot(snapshot(&s, 9, 90)).await.unwrap();
    store.save_snapshot(snapshot(&s, 7, 70)).await.unwrap();
    let latest = store.load_snapshot(&s).await.unwrap().expect("a snapshot");
    assert_eq!(latest.version, 9);
    assert_eq!(latest.state, json!({ "value": 90 }));
    assert_eq!(latest.aggregate_type, AGGREGATE);
    assert_eq!(
        store.load_snapshot(&stream("snap-other")).await.unwrap(),
        None
    );
}

/// `append_with_snapshot` stores the snapshot with the events, and neither on conflict.
pub async fn append_with_snapshot_stores_both_or_neither<S: SnapshotStore>(store: S) {
    let s = stream("snap-append");
    store
        .append_with_snapshot(
            &s,
            ExpectedVersion::NoStream,
            events(1..=3),
            snapshot(&s, 3, 3),
        )
        .await
        .unwrap();
    assert_eq!(
        store.load_snapshot(&s).await.unwrap().map(|x| x.version),
        Some(3)
    );
    let refused = store
        .append_with_snapshot(
            &s,
            ExpectedVersion::Exact(1),
            events(4..=5),
            snapshot(&s, 3, 99),
        )
        .await;
    expect_conflict(refused, &s, ExpectedVersion::Exact(1), Some(3));
    let kept = store.load_snapshot(&s).await.unwrap().expect("snapshot");
    assert_eq!(
        kept.state,
        json!({ "value": 3 }),
        "a refused append stores no snapshot"
    );
    store
        .append_with_snapshot(
            &s,
            ExpectedVersion::Exact(3),
            events(4..=5),
            snapshot(&s, 5, 5),
        )
        .await
        .unwrap();
    assert_eq!(
        store.load_snapshot(&s).await.unwrap().map(|x| x.version),
        Some(5)
    );
}

const RACERS: usize = 16;

/// Many tasks append at the same instant with the same expected version: exactly one wins each round.
pub async fn concurrent_writers_one_stream_exactly_one_winner_per_version<S: SnapshotStore>(
    store: S,
) {
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
pub async fn concurrent_writers_one_stream_lose_nothing<S: SnapshotStore>(store: S) {
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

/// Many tasks on many streams: every event in the global log once, each stream in order.
pub async fn concurrent_writers_many_streams<S: SnapshotStore>(store: S) {
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
pub async fn subscription_delivers_stored_then_live_events<S: SnapshotStore>(store: S) {
    let s = stream("sub");
    store
        .append(&s, ExpectedVersion::Any, events(1..=3))
        .await
        .unwrap();
    let mut sub = store.subscribe(0);
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
            .unwrap();
        seen.push(payload_n(&next));
        assert_eq!(sub.position(), next.global_position);
    }
    writer.await.unwrap();
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    let quiet = tokio::time::timeout(Duration::from_millis(50), sub.next()).await;
    assert!(quiet.is_err(), "no event is delivered twice");
}
