//! Delivery: every event once and in order, under concurrent writers, failing batches, failover and interest.

use std::time::Duration;

use uuid::Uuid;

use crate::{
    ExpectedVersion, GlobalLog, StreamId,
    projection::{
        Interest, ProjectionError, ProjectionRunner, ProjectionStore, wait_for_projections,
    },
};

use super::{
    fixtures::{Tally, append, checkpoint_of, deposit, fast_retry, key, stored},
    recorder::Recorder,
};

/// A live projection applies every event of 16 concurrent writers exactly once, in log order.
pub async fn live_projection_applies_every_event_of_concurrent_writers_once<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    append(&store, "a-0", &[5, 5]).await; // stored before the runner starts: caught up
    let tally = Tally::new("totals", &recorder);
    let running = ProjectionRunner::new(store.clone(), checkpoints.clone(), tally)
        .batch_size(7)
        .spawn();
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    append(&store, &format!("a-{}", w % 8), &[i, 1]).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let all = stored(&store, 2 + 16 * 25 * 2).await;
    assert_eq!(all.len(), 2 + 16 * 25 * 2);
    let last = all.last().expect("events").global_position;
    wait_for_projections(
        &checkpoints,
        &[key("totals")],
        last,
        Duration::from_secs(30),
    )
    .await
    .expect("the projection catches up");
    running.shutdown().await.expect("clean shutdown");
    let recorded = recorder.recorded("totals").await;
    assert_eq!(
        recorded.ids(),
        all.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        "every event once, in log order"
    );
    assert_eq!(
        checkpoint_of(&checkpoints, "totals")
            .await
            .map(|c| c.position),
        Some(last)
    );
}

/// A batch with a failing event commits the events before it and goes on after it, each once.
pub async fn a_failing_batch_commits_the_events_before_the_failure_and_goes_on_after_it<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let tally = Tally::new("totals", &recorder);
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.extend(append(&store, &format!("s-{i}"), &[1]).await);
    }
    tally.poison([ids[4]]);
    stored(&store, 10).await;
    ProjectionRunner::new(store.clone(), checkpoints.clone(), tally)
        .retry(fast_retry(2))
        .batch_size(100)
        .catch_up()
        .await
        .expect("catch up");
    let expected: Vec<Uuid> = ids.iter().copied().filter(|id| *id != ids[4]).collect();
    assert_eq!(
        recorder.recorded("totals").await.ids(),
        expected,
        "each other event exactly once, in order"
    );
}

/// Full batches are read ahead while the previous one is applied: through small batches, a
/// parked event and writers appending during the catch-up, every other event is applied once,
/// in log order, and the checkpoint ends at the last event.
pub async fn batches_read_ahead_apply_every_event_once_in_order<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let tally = Tally::new("ahead", &recorder);
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.extend(append(&store, &format!("ahead-{}", i % 3), &[1]).await);
    }
    tally.poison([ids[7]]);
    stored(&store, 20).await;
    let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), tally)
        .retry(fast_retry(1))
        .batch_size(3);
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..20 {
                ids.extend(append(&store, &format!("ahead-{}", i % 3), &[1]).await);
            }
            ids
        })
    };
    runner.catch_up().await.expect("catch up");
    ids.extend(writer.await.expect("writer"));
    let all = stored(&store, 40).await;
    runner.catch_up().await.expect("catch up again");
    let expected: Vec<Uuid> = all
        .iter()
        .map(|e| e.event_id)
        .filter(|id| *id != ids[7])
        .collect();
    assert_eq!(
        recorder.recorded("ahead").await.ids(),
        expected,
        "every other event once, in log order"
    );
    assert_eq!(
        checkpoint_of(&checkpoints, "ahead")
            .await
            .map(|c| c.position),
        all.last().map(|e| e.global_position)
    );
}

/// Of two runners only the lease holder processes; when it dies the other takes over from the
/// checkpoint.
pub async fn only_one_runner_processes_and_the_other_takes_over_when_it_dies<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let first = Tally::new("shared", &recorder);
    let second = Tally::new("shared", &recorder);
    let running_first = ProjectionRunner::new(store.clone(), checkpoints.clone(), first)
        .standby_poll(Duration::from_millis(10))
        .spawn();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let running_second = ProjectionRunner::new(store.clone(), checkpoints.clone(), second)
        .standby_poll(Duration::from_millis(10))
        .spawn();
    append(&store, "x", &[1, 2, 3]).await;
    let all = stored(&store, 3).await;
    wait_for_projections(
        &checkpoints,
        &[key("shared")],
        all[2].global_position,
        Duration::from_secs(10),
    )
    .await
    .expect("processed");
    running_first.abort();
    append(&store, "x", &[4]).await;
    let all = stored(&store, 4).await;
    wait_for_projections(
        &checkpoints,
        &[key("shared")],
        all[3].global_position,
        Duration::from_secs(30),
    )
    .await
    .expect("the standby takes over");
    let recorded = recorder.recorded("shared").await;
    assert_eq!(recorded.total("x"), 10);
    assert_eq!(
        recorded.ids(),
        all.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        "each event once, whichever runner applied it"
    );
    running_second.shutdown().await.expect("clean shutdown");
}

/// Events outside the projection's interest are skipped, and the checkpoint moves past them.
pub async fn interest_skips_other_events_but_checkpoints_past_them<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    append(&store, "a", &[1]).await;
    // A loan with the same id as the account: another stream, of another aggregate type.
    store
        .append(
            &StreamId::new("loan", "a").expect("valid"),
            ExpectedVersion::Any,
            vec![deposit(50)],
        )
        .await
        .expect("append");
    let all = stored(&store, 2).await;
    let mut tally = Tally::new("accounts_only", &recorder);
    tally.interest = Interest::aggregates(["account"]);
    let reached = ProjectionRunner::new(store.clone(), checkpoints.clone(), tally)
        .catch_up()
        .await
        .expect("catch up");
    assert_eq!(reached, all[1].global_position);
    let recorded = recorder.recorded("accounts_only").await;
    assert_eq!(recorded.applied.len(), 1);
    assert_eq!(recorded.total("l"), 0);
}

/// A catch-up while another runner holds the lease is refused as busy, and runs once it is free.
pub async fn a_catch_up_while_a_runner_holds_the_lease_is_refused<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let running = ProjectionRunner::new(
        store.clone(),
        checkpoints.clone(),
        Tally::new("busy", &recorder),
    )
    .spawn();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = ProjectionRunner::new(
        store.clone(),
        checkpoints.clone(),
        Tally::new("busy", &recorder),
    )
    .lease_wait(Duration::from_millis(30))
    .catch_up()
    .await
    .unwrap_err();
    assert!(matches!(err, ProjectionError::Busy { .. }), "{err}");
    running.shutdown().await.expect("clean shutdown");
    ProjectionRunner::new(store, checkpoints, Tally::new("busy", &recorder))
        .catch_up()
        .await
        .expect("free again");
}
