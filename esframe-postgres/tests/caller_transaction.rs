//! Appends inside the caller's transaction (`append_in`): a refused append names the stream's
//! true version and leaves the transaction usable, under every isolation level.

mod common;

use common::{connect, event, sid};

use std::time::Duration;

use esframe_core::{EventStore, ExpectedVersion, StoreError};
use serde_json::json;
use sqlx::Connection;

fn expect_conflict(
    result: Result<esframe_core::AppendOutcome, StoreError>,
    expected: ExpectedVersion,
    actual: Option<u64>,
) {
    match result {
        Err(StoreError::Conflict(conflict)) => {
            assert_eq!(
                (conflict.expected, conflict.actual),
                (expected, actual),
                "{conflict}"
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[tokio::test]
async fn a_refused_append_leaves_the_transaction_usable_and_another_append_may_follow() {
    let store = common::store("tx_refused").await;
    let s = sid("r");
    store
        .append(&s, ExpectedVersion::NoStream, vec![event(1), event(2)])
        .await
        .unwrap();
    let mut conn = connect().await;
    let mut tx = conn.begin().await.unwrap();
    expect_conflict(
        store
            .append_in(&mut tx, &s, ExpectedVersion::Exact(5), vec![event(3)])
            .await,
        ExpectedVersion::Exact(5),
        Some(2),
    );
    // Nothing was written, so the transaction can still append, with the right expectation.
    let outcome = store
        .append_in(&mut tx, &s, ExpectedVersion::Exact(2), vec![event(3)])
        .await
        .unwrap();
    assert_eq!(outcome.stream_version, 3);
    tx.commit().await.unwrap();
    assert_eq!(store.stream_version(&s).await.unwrap(), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_race_in_the_callers_transaction_names_the_winners_version() {
    let store = common::store("tx_race").await;
    let s = sid("race");
    // B takes version 1 and holds its transaction open.
    let mut b = connect().await;
    let mut tx_b = b.begin().await.unwrap();
    store
        .append_in(&mut tx_b, &s, ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();
    // A computes version 1 too, and waits on B's row in the unique index.
    let racer = {
        let store = store.clone();
        let s = s.clone();
        tokio::spawn(async move {
            let mut a = connect().await;
            let mut tx_a = a.begin().await.unwrap();
            let result = store
                .append_in(&mut tx_a, &s, ExpectedVersion::NoStream, vec![event(2)])
                .await;
            // The transaction survived the conflict.
            let alive: i32 = sqlx::query_scalar("SELECT 1")
                .fetch_one(&mut *tx_a)
                .await
                .expect("the caller's transaction is still usable");
            tx_a.commit().await.unwrap();
            (result, alive)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx_b.commit().await.unwrap();
    let (result, alive) = racer.await.unwrap();
    expect_conflict(result, ExpectedVersion::NoStream, Some(1));
    assert_eq!(alive, 1);
    let stored = store.read_stream(&s, 1).await.unwrap();
    assert_eq!(stored.len(), 1, "only the winner's event");
    assert_eq!(stored[0].payload["n"], json!(1));
}

#[tokio::test]
async fn under_repeatable_read_a_stale_snapshot_is_reported_with_the_true_version() {
    let store = common::store("tx_rr").await;
    let s = sid("rr");
    for (expected, appended_meanwhile) in [
        (ExpectedVersion::Any, 2),
        (ExpectedVersion::StreamExists, 3),
        (ExpectedVersion::Exact(4), 4),
        (ExpectedVersion::NoStream, 5),
        (ExpectedVersion::Exact(1), 6),
    ] {
        let mut conn = connect().await;
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await
            .unwrap();
        // The transaction's snapshot is taken now; the stream moves on after it.
        sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
        let n = store.stream_version(&s).await.unwrap().unwrap_or(0);
        let more: Vec<_> = (n + 1..=appended_meanwhile).map(event).collect();
        store.append(&s, ExpectedVersion::Any, more).await.unwrap();
        let result = store
            .append_in(&mut tx, &s, expected, vec![event(99)])
            .await;
        if expected.accepts(Some(appended_meanwhile)) {
            // True: the expectation holds, but this snapshot cannot see the stream's end.
            match result {
                Err(StoreError::StaleSnapshot { actual, .. }) => {
                    assert_eq!(actual, Some(appended_meanwhile));
                }
                other => panic!("{expected}: expected StaleSnapshot, got {other:?}"),
            }
        } else {
            expect_conflict(result, expected, Some(appended_meanwhile));
        }
        drop(tx);
        assert_eq!(
            store.stream_version(&s).await.unwrap(),
            Some(appended_meanwhile),
            "nothing stored by the stale transaction"
        );
    }
}
