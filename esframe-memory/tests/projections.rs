//! The projection runner on the memory store: catch-up and live, retries and dead letters,
//! leases, rebuilds, versions and read-your-writes.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use esframe_core::{
    EventStore, ExpectedVersion, NewEvent, RecordedEvent, StreamId,
    projection::{
        CheckpointStore, HandlerError, HandlerRetry, Interest, OnFailure, Projection,
        ProjectionContext, ProjectionError, ProjectionRunner, wait_for_projections,
    },
};
use esframe_memory::{MemoryCheckpoints, MemoryStore};
use serde_json::json;
use uuid::Uuid;

#[derive(Debug, Default)]
struct Model {
    totals: HashMap<String, i64>,
    applied: Vec<Uuid>,
    replayed: usize,
    resets: usize,
}

/// Sums `amount` per stream; fails on the event ids in `poison`.
#[derive(Clone, Default)]
struct Totals {
    name: &'static str,
    version: u32,
    model: Arc<Mutex<Model>>,
    poison: Arc<Mutex<HashSet<Uuid>>>,
    interest: Option<Interest>,
}

impl Totals {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            version: 1,
            ..Self::default()
        }
    }

    fn applied(&self) -> Vec<Uuid> {
        self.model.lock().unwrap().applied.clone()
    }

    fn total(&self, stream: &str) -> i64 {
        self.model
            .lock()
            .unwrap()
            .totals
            .get(stream)
            .copied()
            .unwrap_or(0)
    }
}

impl Projection for Totals {
    fn name(&self) -> &str {
        self.name
    }

    fn version(&self) -> u32 {
        self.version
    }

    fn interest(&self) -> Interest {
        self.interest.clone().unwrap_or_default()
    }

    async fn handle(
        &self,
        event: &RecordedEvent,
        ctx: &mut ProjectionContext<'_, ()>,
    ) -> Result<(), HandlerError> {
        if self.poison.lock().unwrap().contains(&event.event_id) {
            return Err(format!("poison event {}", event.event_id).into());
        }
        let amount = event.payload["amount"].as_i64().ok_or("no amount")?;
        let mut model = self.model.lock().unwrap();
        *model.totals.entry(event.stream_id.to_string()).or_default() += amount;
        model.applied.push(event.event_id);
        if ctx.is_replay() {
            model.replayed += 1;
        }
        Ok(())
    }

    async fn reset(&self, _ctx: &mut ProjectionContext<'_, ()>) -> Result<(), HandlerError> {
        let mut model = self.model.lock().unwrap();
        model.totals.clear();
        model.applied.clear();
        model.resets += 1;
        Ok(())
    }
}

fn deposit(amount: i64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        aggregate_type: "account".into(),
        event_type: "Deposited".into(),
        schema_version: 1,
        payload: json!({ "amount": amount }),
        metadata: Default::default(),
    }
}

async fn append(store: &MemoryStore, stream: &str, amounts: &[i64]) -> Vec<Uuid> {
    let events: Vec<NewEvent> = amounts.iter().map(|&a| deposit(a)).collect();
    let ids = events.iter().map(|e| e.event_id).collect();
    store
        .append(
            &StreamId::new(stream).unwrap(),
            ExpectedVersion::Any,
            events,
        )
        .await
        .unwrap();
    ids
}

fn fast_retry(attempts: u32) -> HandlerRetry {
    HandlerRetry {
        attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
    }
}

async fn head(store: &MemoryStore) -> u64 {
    store
        .read_all(0, usize::MAX)
        .await
        .unwrap()
        .last()
        .map_or(0, |e| e.global_position)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_projection_applies_every_event_of_concurrent_writers_once() {
    let store = MemoryStore::new();
    let checkpoints = MemoryCheckpoints::new();
    append(&store, "a-0", &[5, 5]).await; // stored before the runner starts: caught up
    let totals = Totals::new("totals");
    let running = ProjectionRunner::new(store.clone(), checkpoints.clone(), totals.clone())
        .batch_size(7)
        .spawn();

    let writers: Vec<_> = (0..16)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    append(&store, &format!("a-{}", w % 8), &[i, 1]).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let last = head(&store).await;
    wait_for_projections(&checkpoints, &["totals"], last, Duration::from_secs(10))
        .await
        .unwrap();
    running.shutdown().await.unwrap();

    let stored = store.read_all(0, usize::MAX).await.unwrap();
    assert_eq!(stored.len(), 2 + 16 * 50 * 2);
    let applied = totals.applied();
    assert_eq!(
        applied,
        stored.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        "every event once, in log order"
    );
    let mut expected: HashMap<String, i64> = HashMap::new();
    for event in &stored {
        *expected.entry(event.stream_id.to_string()).or_default() +=
            event.payload["amount"].as_i64().unwrap();
    }
    assert_eq!(totals.model.lock().unwrap().totals, expected);
    assert_eq!(
        checkpoints.load("totals").await.unwrap().unwrap().position,
        last
    );
}

#[tokio::test]
async fn a_poison_event_is_retried_parked_and_retried_again_after_a_fix() {
    let store = MemoryStore::new();
    let checkpoints = MemoryCheckpoints::new();
    let totals = Totals::new("totals");
    let before = append(&store, "acc-1", &[1, 2]).await;
    let poison = append(&store, "acc-2", &[100]).await[0];
    let after = append(&store, "acc-1", &[3]).await;
    totals.poison.lock().unwrap().insert(poison);

    let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), totals.clone())
        .retry(fast_retry(3));
    let reached = runner.catch_up().await.unwrap();
    assert_eq!(reached, 4, "the runner moved past the poison event");
    assert_eq!(totals.applied(), [before.clone(), after.clone()].concat());
    assert_eq!(totals.total("acc-1"), 6);

    let parked = runner.dead_letters().await.unwrap();
    assert_eq!(parked.len(), 1);
    let letter = &parked[0];
    assert_eq!(letter.event.event_id, poison);
    assert_eq!(letter.event.stream_id.as_str(), "acc-2");
    assert_eq!(
        (letter.event.stream_version, letter.event.global_position),
        (1, 3)
    );
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
    totals.poison.lock().unwrap().clear();
    runner.retry_dead_letter(letter.id).await.unwrap();
    assert_eq!(totals.total("acc-2"), 100);
    assert!(runner.dead_letters().await.unwrap().is_empty());
    let err = runner.retry_dead_letter(letter.id).await.unwrap_err();
    assert!(
        matches!(err, ProjectionError::NoSuchDeadLetter { .. }),
        "{err}"
    );
    assert_eq!(totals.applied().len(), 4);
}

#[tokio::test]
async fn on_failure_stop_halts_before_the_event_and_a_restart_tries_it_again() {
    let store = MemoryStore::new();
    let checkpoints = MemoryCheckpoints::new();
    let totals = Totals::new("totals");
    append(&store, "acc-1", &[1]).await;
    let poison = append(&store, "acc-1", &[2]).await[0];
    append(&store, "acc-1", &[4]).await;
    totals.poison.lock().unwrap().insert(poison);

    let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), totals.clone())
        .retry(fast_retry(2))
        .on_failure(OnFailure::Stop);
    let err = runner.run(std::future::pending()).await.unwrap_err();
    let ProjectionError::Handler {
        stream,
        stream_version,
        attempts,
        message,
        ..
    } = &err
    else {
        panic!("unexpected {err}");
    };
    assert_eq!(
        (stream.as_str(), *stream_version, *attempts),
        ("acc-1", 2, 2)
    );
    assert!(message.contains("poison"));
    assert!(
        err.to_string().contains("at version 2 of stream `acc-1`"),
        "{err}"
    );
    assert_eq!(
        checkpoints.load("totals").await.unwrap().unwrap().position,
        1
    );
    assert!(runner.dead_letters().await.unwrap().is_empty());

    totals.poison.lock().unwrap().clear();
    assert_eq!(runner.catch_up().await.unwrap(), 3);
    assert_eq!(totals.total("acc-1"), 7);
    assert_eq!(totals.applied().len(), 3);
}

#[tokio::test]
async fn a_failing_batch_commits_the_events_before_the_failure_and_goes_on_after_it() {
    let store = MemoryStore::new();
    let checkpoints = MemoryCheckpoints::new();
    let totals = Totals::new("totals");
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.extend(append(&store, &format!("s-{i}"), &[1]).await);
    }
    totals.poison.lock().unwrap().insert(ids[4]);
    let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), totals.clone())
        .retry(fast_retry(2))
        .batch_size(100);
    runner.catch_up().await.unwrap();
    let expected: Vec<Uuid> = ids.iter().copied().filter(|id| *id != ids[4]).collect();
    assert_eq!(
        totals.applied(),
        expected,
        "each other event exactly once, in order"
    );
}

#[tokio::test]
async fn only_one_runner_processes_and_the_other_takes_over_when_it_stops() {
    let store = MemoryStore::new();
    let checkpoints = MemoryCheckpoints::new();
    let first = Totals::new("shared");
    let second = Totals::new("shared");
    let running_first = ProjectionRunner::new(store.clone(), checkpoints.clone(), first.clone())
        .standby_poll(Duration::from_millis(5))
        .spawn();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let running_second = ProjectionRunner::new(store.clone(), checkpoints.clone(), second.clone())
        .standby_poll(Duration::from_millis(5))
        .spawn();

    append(&store, "x", &[1, 2, 3]).await;
    wait_for_projections(&checkpoints, &["shared"], 3, Duration::from_secs(5))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(first.applied().len(), 3);
    assert!(
        second.applied().is_empty(),
        "the standby runner processed nothing"
    );

    running_first.shutdown().await.unwrap();
    append(&store, "x", &[4]).await;
    wait_for_projections(&checkpoints, &["shared"], 4, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        second.total("x"),
        4,
        "the standby took over from the checkpoint"
    );
    assert_eq!(first.applied().len(), 3);
    running_second.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rebuild_reaches_the_live_read_model_without_side_effects_and_reports_progress() {
    let store = MemoryStore::new();
    let checkpoints = MemoryCheckpoints::new();
    for i in 0..25 {
        append(&store, &format!("r-{}", i % 3), &[i, 10]).await;
    }
    let totals = Totals::new("totals");
    let progress = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&progress);
    let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), totals.clone())
        .batch_size(10)
        .on_progress(move |p| seen.lock().unwrap().push(p.clone()));
    runner.catch_up().await.unwrap();
    let live = totals.model.lock().unwrap().totals.clone();
    assert_eq!(totals.model.lock().unwrap().replayed, 0);
    assert!(
        progress.lock().unwrap().is_empty(),
        "no progress outside replays"
    );

    let report = runner.rebuild(0).await.unwrap();
    assert_eq!((report.events, report.position), (50, 50));
    let model = totals.model.lock().unwrap();
    assert_eq!(model.totals, live);
    assert_eq!(model.applied.len(), 50, "reset, then every event once");
    assert_eq!(
        (model.resets, model.replayed),
        (1, 50),
        "handlers saw is_replay"
    );
    drop(model);
    let progress = progress.lock().unwrap();
    let done: Vec<u64> = progress.iter().map(|p| p.events_done).collect();
    assert_eq!(done, [10, 20, 30, 40, 50]);
    assert!(progress.iter().all(|p| p.events_total == Some(50)));
    assert!(progress.last().unwrap().to_string().contains("100.0%"));
}

#[tokio::test]
async fn a_newer_projection_version_resets_and_replays_and_an_older_one_is_refused() {
    let store = MemoryStore::new();
    let checkpoints = MemoryCheckpoints::new();
    append(&store, "v", &[1, 2]).await;
    let v1 = Totals::new("versioned");
    ProjectionRunner::new(store.clone(), checkpoints.clone(), v1.clone())
        .catch_up()
        .await
        .unwrap();

    let mut v2 = Totals::new("versioned");
    v2.version = 2;
    ProjectionRunner::new(store.clone(), checkpoints.clone(), v2.clone())
        .catch_up()
        .await
        .unwrap();
    {
        let model = v2.model.lock().unwrap();
        assert_eq!((model.resets, model.replayed, model.totals["v"]), (1, 2, 3));
    }
    assert_eq!(
        checkpoints
            .load("versioned")
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );

    let err = ProjectionRunner::new(store.clone(), checkpoints.clone(), v1)
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

#[tokio::test]
async fn interest_skips_other_events_but_checkpoints_past_them() {
    let store = MemoryStore::new();
    let checkpoints = MemoryCheckpoints::new();
    append(&store, "a", &[1]).await;
    let mut other = deposit(50);
    other.aggregate_type = "loan".into();
    store
        .append(
            &StreamId::new("l").unwrap(),
            ExpectedVersion::Any,
            vec![other],
        )
        .await
        .unwrap();
    let mut totals = Totals::new("accounts_only");
    totals.interest = Some(Interest::aggregates(["account"]));
    let reached = ProjectionRunner::new(store.clone(), checkpoints.clone(), totals.clone())
        .catch_up()
        .await
        .unwrap();
    assert_eq!(reached, 2);
    assert_eq!(totals.applied().len(), 1);
    assert_eq!(totals.total("l"), 0);
}

#[tokio::test]
async fn rebuilds_need_a_reset_and_waits_time_out_with_a_clear_error() {
    struct NoReset;
    impl Projection for NoReset {
        fn name(&self) -> &str {
            "no_reset"
        }
        async fn handle(
            &self,
            _: &RecordedEvent,
            _: &mut ProjectionContext<'_, ()>,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    let store = MemoryStore::new();
    let checkpoints = MemoryCheckpoints::new();
    let err = ProjectionRunner::new(store.clone(), checkpoints.clone(), NoReset)
        .rebuild(0)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not implement `Projection::reset`"),
        "{err}"
    );

    let err = wait_for_projections(&checkpoints, &["no_reset"], 1, Duration::from_millis(20))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProjectionError::Timeout {
                target: 1,
                reached: 0,
                ..
            }
        ),
        "{err}"
    );

    struct Unnamed;
    impl Projection for Unnamed {
        fn name(&self) -> &str {
            ""
        }
        async fn handle(
            &self,
            _: &RecordedEvent,
            _: &mut ProjectionContext<'_, ()>,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    let err = ProjectionRunner::new(store, checkpoints, Unnamed)
        .catch_up()
        .await
        .unwrap_err();
    assert!(matches!(err, ProjectionError::InvalidName { .. }), "{err}");
}

#[tokio::test]
async fn a_catch_up_while_a_runner_holds_the_lease_is_refused() {
    let store = MemoryStore::new();
    let checkpoints = MemoryCheckpoints::new();
    let running =
        ProjectionRunner::new(store.clone(), checkpoints.clone(), Totals::new("busy")).spawn();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let err = ProjectionRunner::new(store.clone(), checkpoints.clone(), Totals::new("busy"))
        .lease_wait(Duration::from_millis(30))
        .catch_up()
        .await
        .unwrap_err();
    assert!(matches!(err, ProjectionError::Busy { .. }), "{err}");
    running.shutdown().await.unwrap();
    ProjectionRunner::new(store, checkpoints, Totals::new("busy"))
        .catch_up()
        .await
        .unwrap();
}

/// Checkpoints whose `begin` fails a given number of times, like a database that went away.
#[derive(Clone)]
struct Flaky {
    inner: MemoryCheckpoints,
    failures: Arc<Mutex<u32>>,
}

impl CheckpointStore for Flaky {
    type Tx = ();
    type Lease = esframe_memory::MemoryLease;

    fn delivery(&self) -> esframe_core::projection::Delivery {
        self.inner.delivery()
    }
    async fn try_lease(
        &self,
        projection: &str,
    ) -> Result<Option<Self::Lease>, esframe_core::projection::CheckpointError> {
        self.inner.try_lease(projection).await
    }
    fn lease_held(&self, lease: &Self::Lease) -> bool {
        self.inner.lease_held(lease)
    }
    async fn release(&self, lease: Self::Lease) {
        self.inner.release(lease).await;
    }
    async fn load(
        &self,
        projection: &str,
    ) -> Result<
        Option<esframe_core::projection::Checkpoint>,
        esframe_core::projection::CheckpointError,
    > {
        self.inner.load(projection).await
    }
    async fn begin(&self) -> Result<(), esframe_core::projection::CheckpointError> {
        let mut failures = self.failures.lock().unwrap();
        if *failures > 0 {
            *failures -= 1;
            return Err(esframe_core::projection::CheckpointError::backend(
                std::io::Error::new(std::io::ErrorKind::ConnectionReset, "database restarting"),
            ));
        }
        Ok(())
    }
    async fn commit(
        &self,
        tx: (),
        commit: esframe_core::projection::CheckpointCommit,
    ) -> Result<(), esframe_core::projection::CheckpointError> {
        self.inner.commit(tx, commit).await
    }
    async fn rollback(&self, tx: ()) {
        self.inner.rollback(tx).await;
    }
    async fn dead_letters(
        &self,
        projection: &str,
    ) -> Result<Vec<esframe_core::projection::DeadLetter>, esframe_core::projection::CheckpointError>
    {
        self.inner.dead_letters(projection).await
    }
    async fn dead_letter(
        &self,
        id: u64,
    ) -> Result<
        Option<esframe_core::projection::DeadLetter>,
        esframe_core::projection::CheckpointError,
    > {
        self.inner.dead_letter(id).await
    }
    async fn discard_dead_letter(
        &self,
        id: u64,
    ) -> Result<bool, esframe_core::projection::CheckpointError> {
        self.inner.discard_dead_letter(id).await
    }
    async fn note_retry_failure(
        &self,
        id: u64,
        error: &str,
    ) -> Result<(), esframe_core::projection::CheckpointError> {
        self.inner.note_retry_failure(id, error).await
    }
}

#[tokio::test]
async fn a_runner_rides_out_backend_failures_from_its_checkpoint() {
    let store = MemoryStore::new();
    let checkpoints = Flaky {
        inner: MemoryCheckpoints::new(),
        failures: Arc::new(Mutex::new(3)),
    };
    append(&store, "f", &[1, 2, 3]).await;
    let totals = Totals::new("flaky");
    let running = ProjectionRunner::new(store.clone(), checkpoints.clone(), totals.clone())
        .standby_poll(Duration::from_millis(5))
        .spawn();
    wait_for_projections(&checkpoints.inner, &["flaky"], 3, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        *checkpoints.failures.lock().unwrap(),
        0,
        "the failures happened"
    );
    assert_eq!(totals.applied().len(), 3, "each event once");
    assert!(!running.is_finished());
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_interrupted_rebuild_goes_on_as_a_replay_and_drops_stale_dead_letters() {
    let store = MemoryStore::new();
    let checkpoints = MemoryCheckpoints::new();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.extend(append(&store, &format!("i-{}", i % 2), &[1]).await);
    }
    let totals = Totals::new("interrupted");
    // First a live run that parks event 3.
    totals.poison.lock().unwrap().insert(ids[2]);
    let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), totals.clone())
        .retry(fast_retry(1))
        .batch_size(2);
    runner.catch_up().await.unwrap();
    assert_eq!(runner.dead_letters().await.unwrap().len(), 1);

    // A rebuild that stops on event 6: the reset dropped the stale dead letter of event 3.
    totals.poison.lock().unwrap().clear();
    totals.poison.lock().unwrap().insert(ids[5]);
    let err = runner
        .clone()
        .on_failure(OnFailure::Stop)
        .rebuild(0)
        .await
        .unwrap_err();
    assert!(matches!(err, ProjectionError::Handler { .. }), "{err}");
    assert!(runner.dead_letters().await.unwrap().is_empty());
    let stored = checkpoints.load("interrupted").await.unwrap().unwrap();
    assert_eq!((stored.position, stored.replay_until), (5, Some(10)));
    assert_eq!(totals.model.lock().unwrap().replayed, 5);

    // Resumed by an ordinary catch-up: still a replay up to where the rebuild meant to go.
    totals.poison.lock().unwrap().clear();
    runner.catch_up().await.unwrap();
    {
        let model = totals.model.lock().unwrap();
        assert_eq!(
            model.replayed, 10,
            "events 6 to 10 were handled as replays too"
        );
        assert_eq!(model.totals["i-0"] + model.totals["i-1"], 10);
        assert_eq!(model.applied.len(), 10, "reset, then each event once");
    }
    let stored = checkpoints.load("interrupted").await.unwrap().unwrap();
    assert_eq!((stored.position, stored.replay_until), (10, None));
}

#[tokio::test]
async fn a_panicking_handler_is_retried_and_parked_instead_of_killing_the_runner() {
    struct Panicky(Totals, Uuid);
    impl Projection for Panicky {
        fn name(&self) -> &str {
            "panicky"
        }
        async fn handle(
            &self,
            event: &RecordedEvent,
            ctx: &mut ProjectionContext<'_, ()>,
        ) -> Result<(), HandlerError> {
            if event.event_id == self.1 {
                panic!("bad data in {}", event.stream_id);
            }
            self.0.handle(event, ctx).await
        }
    }
    let store = MemoryStore::new();
    let checkpoints = MemoryCheckpoints::new();
    append(&store, "p", &[1]).await;
    let poison = append(&store, "p", &[2]).await[0];
    append(&store, "p", &[3]).await;
    let totals = Totals::new("panicky");
    let runner = ProjectionRunner::new(
        store.clone(),
        checkpoints.clone(),
        Panicky(totals.clone(), poison),
    )
    .retry(fast_retry(2));
    assert_eq!(runner.catch_up().await.unwrap(), 3);
    assert_eq!(totals.total("p"), 4);
    let parked = runner.dead_letters().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert!(
        parked[0]
            .event
            .error
            .contains("the handler panicked: bad data in p"),
        "{}",
        parked[0].event.error
    );
}
