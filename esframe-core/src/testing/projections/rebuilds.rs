//! Rebuilds: resets, replays, versions, progress, interruptions.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use crate::{
    GlobalLog, Position, RecordedEvent,
    projection::{
        HandlerError, OnFailure, Projection, ProjectionContext, ProjectionError, ProjectionRunner,
        ProjectionStore, wait_for_projections,
    },
};

use super::{
    fixtures::{Tally, append, checkpoint_of, fast_retry, key, stored},
    recorder::Recorder,
};

/// A rebuild resets the read model, replays every event as a replay, reaches what the live
/// projection had, and reports progress.
pub async fn a_rebuild_reaches_the_live_read_model_and_reports_progress<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    for i in 0..25 {
        append(&store, &format!("r-{}", i % 3), &[i, 10]).await;
    }
    let all = stored(&store, 50).await;
    let progress = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&progress);
    let runner = ProjectionRunner::new(
        store.clone(),
        checkpoints.clone(),
        Tally::new("totals", &recorder),
    )
    .batch_size(10)
    .on_progress(move |p| {
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(p.clone())
    });
    runner.catch_up().await.expect("catch up");
    let live = recorder.recorded("totals").await;
    assert_eq!(live.replayed(), 0);
    assert!(
        progress.lock().unwrap().is_empty(),
        "no progress outside replays"
    );

    let report = runner.rebuild(Position::START).await.expect("rebuild");
    assert_eq!(
        (report.events, report.position),
        (50, all[49].global_position)
    );
    let rebuilt = recorder.recorded("totals").await;
    assert_eq!(rebuilt.ids(), live.ids(), "reset, then every event once");
    assert_eq!(
        (rebuilt.resets, rebuilt.replayed()),
        (1, 50),
        "handlers saw is_replay"
    );
    let progress = progress.lock().unwrap();
    let done: Vec<u64> = progress.iter().map(|p| p.events_done).collect();
    assert_eq!(done, [10, 20, 30, 40, 50]);
    assert!(progress.iter().all(|p| p.events_total == Some(50)));
    assert!(progress.last().unwrap().to_string().contains("100.0%"));
}

/// A newer projection version resets and replays; an older one is refused.
pub async fn a_newer_projection_version_resets_and_replays_and_an_older_one_is_refused<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    append(&store, "v", &[1, 2]).await;
    stored(&store, 2).await;
    ProjectionRunner::new(
        store.clone(),
        checkpoints.clone(),
        Tally::new("versioned", &recorder),
    )
    .catch_up()
    .await
    .expect("v1");
    let mut v2 = Tally::new("versioned", &recorder);
    v2.version = 2;
    ProjectionRunner::new(store.clone(), checkpoints.clone(), v2)
        .catch_up()
        .await
        .expect("v2");
    let recorded = recorder.recorded("versioned").await;
    assert_eq!(
        (recorded.resets, recorded.replayed(), recorded.total("v")),
        (1, 2, 3)
    );
    assert_eq!(
        checkpoint_of(&checkpoints, "versioned")
            .await
            .map(|c| c.version),
        Some(2)
    );
    let err = ProjectionRunner::new(
        store.clone(),
        checkpoints.clone(),
        Tally::new("versioned", &recorder),
    )
    .catch_up()
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            ProjectionError::VersionTooNew {
                stored: 2,
                code: 1,
                ..
            }
        ),
        "{err}"
    );
}

/// A projection without `reset` cannot be rebuilt; a wait that times out names the projection.
pub async fn rebuilds_need_a_reset_and_waits_time_out_with_a_clear_error<S, C, R>(
    store: S,
    checkpoints: C,
    _recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    struct NoReset;
    impl<Tx: Send> Projection<Tx> for NoReset {
        fn name(&self) -> &str {
            "no_reset"
        }
        async fn handle(
            &self,
            _: &RecordedEvent,
            _: &mut ProjectionContext<'_, Tx>,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    let err = ProjectionRunner::new(store.clone(), checkpoints.clone(), NoReset)
        .rebuild(Position::START)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not implement `Projection::reset`"),
        "{err}"
    );
    let err = wait_for_projections(
        &checkpoints,
        &[key("no_reset")],
        Position::new(1),
        Duration::from_millis(20),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, ProjectionError::Timeout { target, reached, .. }
            if *target == Position::new(1) && *reached == Position::START),
        "{err}"
    );
}

/// A rebuild interrupted by a failure goes on as a replay when the projection runs again, and
/// the reset dropped the dead letters the replay handles again.
pub async fn an_interrupted_rebuild_goes_on_as_a_replay_and_drops_stale_dead_letters<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.extend(append(&store, &format!("i-{}", i % 2), &[1]).await);
    }
    let all = stored(&store, 10).await;
    let tally = Tally::new("interrupted", &recorder);
    let poison = tally.share();
    // First a live run that parks event 3.
    poison.poison([ids[2]]);
    let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), tally)
        .retry(fast_retry(1))
        .batch_size(2);
    runner.catch_up().await.expect("catch up");
    assert_eq!(runner.dead_letters().await.unwrap().len(), 1);
    // A rebuild that stops on event 6: the reset dropped the stale dead letter of event 3.
    poison.poison([ids[5]]);
    let err = runner
        .clone()
        .on_failure(OnFailure::Stop)
        .rebuild(Position::START)
        .await
        .unwrap_err();
    assert!(matches!(err, ProjectionError::Handler { .. }), "{err}");
    assert!(runner.dead_letters().await.unwrap().is_empty());
    let checkpoint = checkpoint_of(&checkpoints, "interrupted")
        .await
        .expect("checkpoint");
    assert!(
        checkpoint.position >= all[4].global_position
            && checkpoint.position < all[5].global_position,
        "the rebuild stopped just before event 6"
    );
    assert_eq!(checkpoint.replay_until, Some(all[9].global_position));
    assert_eq!(recorder.recorded("interrupted").await.replayed(), 5);
    // Resumed by an ordinary catch-up: still a replay up to where the rebuild meant to go.
    poison.poison([]);
    runner.catch_up().await.expect("catch up");
    let recorded = recorder.recorded("interrupted").await;
    assert_eq!(
        recorded.replayed(),
        10,
        "events 6 to 10 were handled as replays too"
    );
    assert_eq!(recorded.ids(), ids, "reset, then each event once");
    let checkpoint = checkpoint_of(&checkpoints, "interrupted")
        .await
        .expect("checkpoint");
    assert_eq!(
        (checkpoint.position, checkpoint.replay_until),
        (all[9].global_position, None)
    );
}
