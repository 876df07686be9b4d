//! What the conformance checks share: test events, snapshots, and assertions.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::{
    AppendOutcome, EventMetadata, EventStore, ExpectedVersion, GlobalLog, NewEvent, Position,
    RecordedEvent, Snapshot, StoreError, StreamId,
};

pub(super) const AGGREGATE: &str = "conformance";

pub(super) fn stream(name: &str) -> StreamId {
    StreamId::new(AGGREGATE, name).expect("valid test stream id")
}

/// An event whose payload carries `n`.
pub(super) fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Happened".into(),
        schema_version: 1,
        payload: json!({ "n": n }),
        metadata: EventMetadata::default(),
    }
}

pub(super) fn events(range: std::ops::RangeInclusive<u64>) -> Vec<NewEvent> {
    range.map(event).collect()
}

pub(super) fn payload_n(event: &RecordedEvent) -> u64 {
    event.payload["n"]
        .as_u64()
        .expect("conformance payloads carry `n`")
}

pub(super) fn snapshot(stream_id: &StreamId, version: u64, value: u64) -> Snapshot {
    Snapshot {
        stream_id: stream_id.clone(),
        version,
        schema_version: 1,
        state: json!({ "value": value }),
        taken_at: chrono::Utc::now(),
    }
}

pub(super) async fn versions<S: EventStore>(store: &S, stream_id: &StreamId) -> Vec<u64> {
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
pub(super) async fn settled_log<S: GlobalLog>(store: &S, expected: usize) -> Vec<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let all = store
            .read_all(Position::START, usize::MAX)
            .await
            .expect("read_all");
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

pub(super) fn expect_conflict(
    result: Result<AppendOutcome, StoreError>,
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
