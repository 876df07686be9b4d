//! Checks of the [`SnapshotStore`] capability: the latest snapshot wins, snapshots are stored
//! with their events or not at all, unusable ones can be deleted.

use serde_json::json;

use crate::{ExpectedVersion, SnapshotStore, StreamId};

use super::fixtures::{AGGREGATE, events, expect_conflict, snapshot, stream};

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
    assert_eq!(latest.stream_id.aggregate_type(), AGGREGATE);
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

/// `delete_snapshot` removes the stream's snapshot only while it is at the given version.
pub async fn delete_snapshot_only_removes_that_version<S: SnapshotStore>(store: S) {
    let s = stream("snap-delete");
    store.save_snapshot(snapshot(&s, 9, 9)).await.unwrap();
    assert!(!store.delete_snapshot(&s, 8).await.unwrap());
    assert_eq!(
        store.load_snapshot(&s).await.unwrap().map(|x| x.version),
        Some(9)
    );
    assert!(store.delete_snapshot(&s, 9).await.unwrap());
    assert_eq!(store.load_snapshot(&s).await.unwrap(), None);
    assert!(!store.delete_snapshot(&s, 9).await.unwrap());
    // A lower version may now be stored again.
    store.save_snapshot(snapshot(&s, 2, 2)).await.unwrap();
    assert_eq!(
        store.load_snapshot(&s).await.unwrap().map(|x| x.version),
        Some(2)
    );
}

/// A cold load reads the snapshot and the events from its own version on; without a snapshot,
/// every event.
pub async fn cold_loads_read_the_snapshot_and_the_events_from_its_version<S: SnapshotStore>(
    store: S,
) {
    let s = stream("snap-cold");
    let empty = store.read_snapshot_and_stream(&s).await.unwrap();
    assert_eq!((empty.snapshot, empty.events.len()), (None, 0));
    store
        .append(&s, ExpectedVersion::NoStream, events(1..=5))
        .await
        .unwrap();
    let whole = store.read_snapshot_and_stream(&s).await.unwrap();
    assert_eq!(whole.snapshot, None);
    assert_eq!(
        whole.events,
        store.read_stream_for_state(&s, 1).await.unwrap()
    );
    store.save_snapshot(snapshot(&s, 3, 30)).await.unwrap();
    let cold = store.read_snapshot_and_stream(&s).await.unwrap();
    let taken = cold.snapshot.expect("the snapshot");
    assert_eq!((taken.version, &taken.state), (3, &json!({ "value": 30 })));
    assert_eq!(taken.stream_id, s);
    assert_eq!(
        cold.events
            .iter()
            .map(|e| e.stream_version)
            .collect::<Vec<_>>(),
        vec![3, 4, 5],
        "from the snapshot's own version"
    );
    assert_eq!(
        cold.events,
        store.read_stream_for_state(&s, 3).await.unwrap()
    );
    // A snapshot beyond the stream reads with no events: the caller sees it is ahead.
    let ahead = stream("snap-cold-ahead");
    store
        .append(&ahead, ExpectedVersion::NoStream, events(1..=2))
        .await
        .unwrap();
    store.save_snapshot(snapshot(&ahead, 9, 90)).await.unwrap();
    let read = store.read_snapshot_and_stream(&ahead).await.unwrap();
    assert_eq!(read.snapshot.map(|x| x.version), Some(9));
    assert!(read.events.is_empty());
}

/// Snapshots are kept per stream, and so per aggregate type: the same id under another
/// aggregate type has its own snapshot (or none), and deleting one leaves the other.
pub async fn snapshots_are_namespaced_by_aggregate_type<S: SnapshotStore>(store: S) {
    let order = StreamId::new("order", "7").expect("valid");
    let inventory = StreamId::new("inventory", "7").expect("valid");
    store
        .append_with_snapshot(
            &order,
            ExpectedVersion::NoStream,
            events(1..=2),
            snapshot(&order, 2, 20),
        )
        .await
        .unwrap();
    assert_eq!(store.load_snapshot(&inventory).await.unwrap(), None);
    let cold = store.read_snapshot_and_stream(&inventory).await.unwrap();
    assert!(
        cold.snapshot.is_none() && cold.events.is_empty(),
        "{cold:?}"
    );
    store
        .save_snapshot(snapshot(&inventory, 1, 10))
        .await
        .unwrap();
    let order_snapshot = store.load_snapshot(&order).await.unwrap().expect("kept");
    assert_eq!(
        (order_snapshot.version, order_snapshot.stream_id),
        (2, order.clone())
    );
    store.delete_snapshot(&inventory, 1).await.unwrap();
    assert_eq!(store.load_snapshot(&inventory).await.unwrap(), None);
    assert_eq!(
        store
            .load_snapshot(&order)
            .await
            .unwrap()
            .map(|s| s.version),
        Some(2),
        "deleting the inventory's snapshot left the order's"
    );
}
