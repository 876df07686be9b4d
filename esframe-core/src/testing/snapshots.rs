//! Checks of the [`SnapshotStore`] capability: the latest snapshot wins, snapshots are stored
//! with their events or not at all, unusable ones can be deleted.

use serde_json::json;

use crate::{ExpectedVersion, SnapshotStore};

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
