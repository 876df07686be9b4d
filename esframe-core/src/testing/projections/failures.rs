//! Failures: poison events, dead letters, stopping, backend outages and refusals, panics.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    GlobalLog,
    projection::{
        CheckpointError, DeadLetterRetry, Interest, OnFailure, ProjectionError, ProjectionRunner,
        ProjectionStore, wait_for_projections,
    },
};

use super::{
    fixtures::{Faulty, Tally, append, checkpoint_of, fast_retry, key, stored},
    recorder::Recorder,
};

/// A poison event is retried, parked as a dead letter, retried in vain, then applied once after
/// a fix; the others go on.
pub async fn a_poison_event_is_retried_parked_and_retried_again_after_a_fix<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let tally = Tally::new("totals", &recorder);
    let before = append(&store, "acc-1", &[1, 2]).await;
    let poison = append(&store, "acc-2", &[100]).await[0];
    let after = append(&store, "acc-1", &[3]).await;
    tally.poison([poison]);
    let poisoned = tally.share();
    let all = stored(&store, 4).await;
    let runner =
        ProjectionRunner::new(store.clone(), checkpoints.clone(), tally).retry(fast_retry(3));
    let reached = runner.catch_up().await.expect("catch up");
    assert_eq!(
        reached, all[3].global_position,
        "the runner moved past the poison"
    );
    let recorded = recorder.recorded("totals").await;
    assert_eq!(recorded.ids(), [before, after].concat());
    assert_eq!(recorded.total("acc-1"), 6);

    let parked = runner.dead_letters().await.expect("dead letters");
    assert_eq!(parked.len(), 1);
    let letter = &parked[0];
    assert_eq!(letter.key, key("totals"));
    assert_eq!(letter.event.event_id, poison);
    assert_eq!(letter.event.stream_id.parts(), ("account", "acc-2"));
    assert_eq!(letter.event.stream_version, 1);
    assert_eq!(letter.event.global_position, all[2].global_position);
    assert_eq!(letter.event.attempts, 3);
    assert!(
        letter.event.error.contains("poison event"),
        "{}",
        letter.event.error
    );

    // Still broken: it stays parked, with one more attempt counted.
    let err = runner.retry_dead_letter(letter.id).await.unwrap_err();
    assert!(matches!(err, ProjectionError::RetryFailed { .. }), "{err}");
    assert_eq!(runner.dead_letters().await.unwrap()[0].event.attempts, 4);

    // Fixed: applied once, and the dead letter is gone.
    poisoned.poison([]);
    assert_eq!(
        runner.retry_dead_letter(letter.id).await.expect("retry"),
        DeadLetterRetry::Handled { events: 1 }
    );
    assert!(runner.dead_letters().await.unwrap().is_empty());
    let err = runner.retry_dead_letter(letter.id).await.unwrap_err();
    assert!(
        matches!(err, ProjectionError::NoSuchDeadLetter { .. }),
        "{err}"
    );
    let recorded = recorder.recorded("totals").await;
    assert_eq!(recorded.total("acc-2"), 100);
    assert_eq!(recorded.applied.len(), 4);
}

/// A dead letter whose event the projection no longer wants is resolved without calling the
/// handler, and the result says so.
pub async fn a_dead_letter_with_nothing_left_to_handle_says_so<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let tally = Tally::new("narrowing", &recorder);
    let poison = append(&store, "n", &[7]).await[0];
    tally.poison([poison]);
    let runner =
        ProjectionRunner::new(store.clone(), checkpoints.clone(), tally).retry(fast_retry(1));
    runner.catch_up().await.expect("catch up");
    let parked = runner.dead_letters().await.expect("dead letters");
    assert_eq!(parked.len(), 1);
    // The projection's interest changed: the parked event's type is not wanted any more.
    let mut narrowed = Tally::new("narrowing", &recorder);
    narrowed.interest = Interest::event_types(["Withdrawn"]);
    let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), narrowed);
    assert_eq!(
        runner.retry_dead_letter(parked[0].id).await.expect("retry"),
        DeadLetterRetry::NothingToHandle
    );
    assert!(runner.dead_letters().await.unwrap().is_empty());
    assert!(recorder.recorded("narrowing").await.applied.is_empty());
}

/// With [`OnFailure::Stop`] the runner stops before the failing event; a restart tries it again.
pub async fn on_failure_stop_halts_before_the_event_and_a_restart_tries_it_again<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let tally = Tally::new("totals", &recorder);
    append(&store, "acc-1", &[1]).await;
    let poison = append(&store, "acc-1", &[2]).await[0];
    append(&store, "acc-1", &[4]).await;
    tally.poison([poison]);
    let poisoned = tally.share();
    let all = stored(&store, 3).await;
    let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), tally)
        .retry(fast_retry(2))
        .on_failure(OnFailure::Stop);
    let err = runner.run(std::future::pending()).await.unwrap_err();
    let ProjectionError::Handler {
        stream,
        stream_version,
        attempts,
        source,
        ..
    } = &err
    else {
        panic!("unexpected {err}");
    };
    assert_eq!((stream.id(), *stream_version, *attempts), ("acc-1", 2, 2));
    assert!(source.to_string().contains("poison"));
    assert!(
        err.to_string()
            .contains("at version 2 of stream `account/acc-1`"),
        "{err}"
    );
    let stopped_at = checkpoint_of(&checkpoints, "totals")
        .await
        .expect("checkpoint")
        .position;
    assert!(
        stopped_at >= all[0].global_position && stopped_at < all[1].global_position,
        "the checkpoint stays just before the failing event"
    );
    assert!(runner.dead_letters().await.unwrap().is_empty());
    poisoned.poison([]);
    assert_eq!(runner.catch_up().await.unwrap(), all[2].global_position);
    let recorded = recorder.recorded("totals").await;
    assert_eq!(recorded.total("acc-1"), 7);
    assert_eq!(recorded.applied.len(), 3);
}

/// A runner rides out transient backend failures from its checkpoint, and stops with the error
/// when the store refuses its lease for good.
pub async fn a_runner_rides_out_backend_failures_and_stops_on_refusals<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let flaky = Faulty {
        inner: checkpoints.clone(),
        failures: Arc::new(Mutex::new(3)),
        refuse_leases: false,
    };
    append(&store, "f", &[1, 2, 3]).await;
    let all = stored(&store, 3).await;
    let running =
        ProjectionRunner::new(store.clone(), flaky.clone(), Tally::new("flaky", &recorder))
            .standby_poll(Duration::from_millis(5))
            .spawn();
    wait_for_projections(
        &checkpoints,
        &[key("flaky")],
        all[2].global_position,
        Duration::from_secs(10),
    )
    .await
    .expect("caught up after the failures");
    assert_eq!(*flaky.failures.lock().unwrap(), 0, "the failures happened");
    assert_eq!(
        recorder.recorded("flaky").await.applied.len(),
        3,
        "each event once"
    );
    assert!(!running.is_finished());
    running.shutdown().await.expect("clean shutdown");

    let refusing = Faulty {
        inner: checkpoints,
        failures: Arc::default(),
        refuse_leases: true,
    };
    let ended = tokio::time::timeout(
        Duration::from_secs(5),
        ProjectionRunner::new(store, refusing, Tally::new("refused", &recorder))
            .standby_poll(Duration::from_millis(5))
            .run(std::future::pending()),
    )
    .await
    .expect("a refused lease stops the runner instead of retrying for ever");
    assert!(
        matches!(
            ended,
            Err(ProjectionError::Checkpoint {
                source: CheckpointError::Rejected(_),
                ..
            })
        ),
        "{ended:?}"
    );
}

/// A panicking handler is retried and parked like a failing one instead of ending the runner.
pub async fn a_panicking_handler_is_retried_and_parked_instead_of_killing_the_runner<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    append(&store, "p", &[1]).await;
    let poison = append(&store, "p", &[2]).await[0];
    append(&store, "p", &[3]).await;
    let all = stored(&store, 3).await;
    let mut tally = Tally::new("panicky", &recorder);
    tally.panic_on = Some(poison);
    let runner =
        ProjectionRunner::new(store.clone(), checkpoints.clone(), tally).retry(fast_retry(2));
    assert_eq!(
        runner.catch_up().await.expect("catch up"),
        all[2].global_position
    );
    assert_eq!(recorder.recorded("panicky").await.total("p"), 4);
    let parked = runner.dead_letters().await.expect("dead letters");
    assert_eq!(parked.len(), 1);
    assert!(
        parked[0]
            .event
            .error
            .contains("the handler panicked: bad data in account/p"),
        "{}",
        parked[0].event.error
    );
}

/// A dead letter can only be retried or discarded through its own projection.
pub async fn dead_letters_belong_to_their_projection<S, C, R>(store: S, checkpoints: C, recorder: R)
where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let owner = Tally::new("owner", &recorder);
    let poison = append(&store, "d", &[1]).await[0];
    owner.poison([poison]);
    let runner =
        ProjectionRunner::new(store.clone(), checkpoints.clone(), owner).retry(fast_retry(1));
    runner.catch_up().await.expect("catch up");
    let id = runner.dead_letters().await.unwrap()[0].id;
    let other = ProjectionRunner::new(
        store.clone(),
        checkpoints.clone(),
        Tally::new("other", &recorder),
    );
    for err in [
        other.retry_dead_letter(id).await.unwrap_err(),
        other.discard_dead_letter(id).await.unwrap_err(),
    ] {
        assert!(
            matches!(&err, ProjectionError::WrongDeadLetter { owner, .. } if owner.name() == "owner"),
            "{err}"
        );
    }
    assert!(other.dead_letters().await.unwrap().is_empty());
    assert!(runner.discard_dead_letter(id).await.expect("discard"));
    assert!(!runner.discard_dead_letter(id).await.expect("discard again"));
}
