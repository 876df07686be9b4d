//! The projection suite: checks of the projection runner on a checkpoint backend (checkpoints,
//! leases, dead letters), run with [`projection_suite!`](crate::projection_suite) by every
//! backend unchanged.
//!
//! The checks' read model is written through the checkpoint store's transaction by a
//! [`Recorder`] the backend supplies: [`MemoryRecorder`] for stores whose transaction is `()`,
//! a table written through the transaction for an exactly-once store, so that a check sees what
//! was committed, not what was attempted.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use serde_json::json;
use uuid::Uuid;

use crate::{
    EventStore, ExpectedVersion, GlobalLog, NewEvent, Position, RecordedEvent, StreamId,
    projection::{
        Checkpoint, CheckpointCommit, CheckpointError, CheckpointStore, DeadLetter,
        DeadLetterRetry, DeadLetterStore, Delivery, HandlerError, HandlerRetry, Interest,
        LeaseStore, NewDeadLetter, OnFailure, Projection, ProjectionContext, ProjectionError,
        ProjectionKey, ProjectionRunner, ProjectionStore, wait_for_projections,
    },
};

/// One event as a check's read model recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The event.
    pub event_id: Uuid,
    /// Its stream.
    pub stream: String,
    /// Its `amount`.
    pub amount: i64,
    /// Whether the handler saw it as a replay.
    pub replay: bool,
}

/// What a check's read model holds for one projection: every recorded event in order, and how
/// many times it was reset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// The events recorded since the last reset, in the order they were recorded.
    pub applied: Vec<Applied>,
    /// How many times the read model was reset.
    pub resets: u64,
}

impl Recorded {
    fn ids(&self) -> Vec<Uuid> {
        self.applied.iter().map(|a| a.event_id).collect()
    }

    fn total(&self, stream: &str) -> i64 {
        self.applied
            .iter()
            .filter(|a| a.stream == stream)
            .map(|a| a.amount)
            .sum()
    }

    fn replayed(&self) -> usize {
        self.applied.iter().filter(|a| a.replay).count()
    }
}

/// The read model of the suite's checks, written through a checkpoint store's transaction `Tx`.
pub trait Recorder<Tx>: Clone + Send + Sync + 'static {
    /// Records `applied` for `projection` through `tx`.
    fn record(
        &self,
        tx: &mut Tx,
        projection: &str,
        applied: Applied,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Forgets `projection`'s records and counts a reset, through `tx`.
    fn reset(
        &self,
        tx: &mut Tx,
        projection: &str,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// What is recorded (committed) for `projection`.
    fn recorded(&self, projection: &str) -> impl Future<Output = Recorded> + Send;
}

/// A [`Recorder`] in memory for checkpoint stores whose transaction is `()`: records at once.
#[derive(Debug, Clone, Default)]
pub struct MemoryRecorder(Arc<Mutex<HashMap<String, Recorded>>>);

impl MemoryRecorder {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Recorded>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Recorder<()> for MemoryRecorder {
    async fn record(
        &self,
        (): &mut (),
        projection: &str,
        applied: Applied,
    ) -> Result<(), HandlerError> {
        self.with(|all| {
            all.entry(projection.to_owned())
                .or_default()
                .applied
                .push(applied)
        });
        Ok(())
    }

    async fn reset(&self, (): &mut (), projection: &str) -> Result<(), HandlerError> {
        self.with(|all| {
            let recorded = all.entry(projection.to_owned()).or_default();
            recorded.applied.clear();
            recorded.resets += 1;
        });
        Ok(())
    }

    async fn recorded(&self, projection: &str) -> Recorded {
        self.with(|all| all.get(projection).cloned().unwrap_or_default())
    }
}

/// Sums `amount` per stream through the recorder; fails on the event ids in `poison`, panics on
/// those in `panic_on`.
struct Tally<R> {
    name: String,
    version: u32,
    recorder: R,
    poison: Arc<Mutex<HashSet<Uuid>>>,
    panic_on: Option<Uuid>,
    interest: Interest,
}

impl<R: Clone> Tally<R> {
    fn new(name: &str, recorder: &R) -> Self {
        Self {
            name: name.to_owned(),
            version: 1,
            recorder: recorder.clone(),
            poison: Arc::default(),
            panic_on: None,
            interest: Interest::all(),
        }
    }

    fn poison(&self, ids: impl IntoIterator<Item = Uuid>) {
        let mut poison = self.poison.lock().unwrap_or_else(PoisonError::into_inner);
        poison.clear();
        poison.extend(ids);
    }

    fn share(&self) -> Self {
        Self {
            name: self.name.clone(),
            version: self.version,
            recorder: self.recorder.clone(),
            poison: Arc::clone(&self.poison),
            panic_on: self.panic_on,
            interest: self.interest.clone(),
        }
    }
}

impl<Tx: Send + 'static, R: Recorder<Tx>> Projection<Tx> for Tally<R> {
    fn name(&self) -> &str {
        &self.name
    }

    fn version(&self) -> u32 {
        self.version
    }

    fn interest(&self) -> Interest {
        self.interest.clone()
    }

    async fn handle(
        &self,
        event: &RecordedEvent,
        ctx: &mut ProjectionContext<'_, Tx>,
    ) -> Result<(), HandlerError> {
        if self.panic_on == Some(event.event_id) {
            panic!("bad data in {}", event.stream_id);
        }
        let poisoned = self
            .poison
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&event.event_id);
        if poisoned {
            return Err(format!("poison event {}", event.event_id).into());
        }
        let applied = Applied {
            event_id: event.event_id,
            stream: event.stream_id.to_string(),
            amount: event.payload["amount"].as_i64().ok_or("no amount")?,
            replay: ctx.is_replay(),
        };
        self.recorder.record(ctx.tx(), &self.name, applied).await
    }

    async fn reset(&self, ctx: &mut ProjectionContext<'_, Tx>) -> Result<(), HandlerError> {
        self.recorder.reset(ctx.tx(), &self.name).await
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

/// Appends deposits of `amounts` to `stream`; their ids.
async fn append<S: EventStore>(store: &S, stream: &str, amounts: &[i64]) -> Vec<Uuid> {
    let events: Vec<NewEvent> = amounts.iter().map(|&a| deposit(a)).collect();
    let ids = events.iter().map(|e| e.event_id).collect();
    store
        .append(
            &StreamId::new(stream).expect("valid stream"),
            ExpectedVersion::Any,
            events,
        )
        .await
        .expect("append");
    ids
}

fn fast_retry(attempts: u32) -> HandlerRetry {
    HandlerRetry {
        attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
    }
}

fn key(name: &str) -> ProjectionKey {
    ProjectionKey::single(name).expect("valid projection name")
}

/// Every stored event, once the log shows `expected` of them.
async fn stored<S: GlobalLog>(store: &S, expected: usize) -> Vec<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let all = store
            .read_all(Position::START, usize::MAX)
            .await
            .expect("read_all");
        if all.len() >= expected || tokio::time::Instant::now() > deadline {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn checkpoint_of<C: CheckpointStore>(checkpoints: &C, name: &str) -> Option<Checkpoint> {
    checkpoints.load(&key(name)).await.expect("load checkpoint")
}

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
    assert_eq!(letter.event.stream_id.as_str(), "acc-2");
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
    assert_eq!(
        (stream.as_str(), *stream_version, *attempts),
        ("acc-1", 2, 2)
    );
    assert!(source.to_string().contains("poison"));
    assert!(
        err.to_string().contains("at version 2 of stream `acc-1`"),
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
    let mut loan = deposit(50);
    loan.aggregate_type = "loan".into();
    store
        .append(
            &StreamId::new("l").expect("valid"),
            ExpectedVersion::Any,
            vec![loan],
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

/// A projection whose name no store can keep fails every entry point at once with a typed
/// error; a spawned runner ends instead of retrying for ever.
pub async fn an_invalid_projection_name_fails_at_once<S, C, R>(
    store: S,
    checkpoints: C,
    _recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    struct Named(&'static str);
    impl<Tx: Send> Projection<Tx> for Named {
        fn name(&self) -> &str {
            self.0
        }
        async fn handle(
            &self,
            _: &RecordedEvent,
            _: &mut ProjectionContext<'_, Tx>,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    for name in ["", "nul\0name", "new\nline"] {
        let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), Named(name));
        let err = runner.catch_up().await.unwrap_err();
        assert!(
            matches!(err, ProjectionError::InvalidKey(_)),
            "{name:?}: {err}"
        );
        assert!(matches!(
            runner.dead_letters().await,
            Err(ProjectionError::InvalidKey(_))
        ));
        let spawned = runner.spawn();
        let ended = tokio::time::timeout(Duration::from_secs(5), spawned.shutdown())
            .await
            .expect("a runner that can never run ends at once");
        assert!(
            matches!(ended, Err(ProjectionError::InvalidKey(_))),
            "{name:?}"
        );
    }
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

/// A checkpoint store whose `begin` fails a given number of times, like a database that went
/// away, or whose leases are refused for good.
#[derive(Clone)]
struct Faulty<C> {
    inner: C,
    failures: Arc<Mutex<u32>>,
    refuse_leases: bool,
}

impl<C: CheckpointStore> CheckpointStore for Faulty<C> {
    type Tx = C::Tx;
    fn delivery(&self) -> Delivery {
        self.inner.delivery()
    }
    async fn load(&self, key: &ProjectionKey) -> Result<Option<Checkpoint>, CheckpointError> {
        self.inner.load(key).await
    }
    async fn begin(&self) -> Result<C::Tx, CheckpointError> {
        let fail = {
            let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
            let fail = *failures > 0;
            *failures = failures.saturating_sub(1);
            fail
        };
        if fail {
            return Err(CheckpointError::unavailable(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "database restarting",
            )));
        }
        self.inner.begin().await
    }
    async fn commit(&self, tx: C::Tx, commit: CheckpointCommit) -> Result<(), CheckpointError> {
        self.inner.commit(tx, commit).await
    }
    async fn rollback(&self, tx: C::Tx) {
        self.inner.rollback(tx).await;
    }
    fn changed(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.changed()
    }
}

impl<C: LeaseStore> LeaseStore for Faulty<C> {
    type Lease = C::Lease;
    async fn try_lease(&self, key: &ProjectionKey) -> Result<Option<C::Lease>, CheckpointError> {
        if self.refuse_leases {
            return Err(CheckpointError::Rejected(
                "leases are refused for this key".into(),
            ));
        }
        self.inner.try_lease(key).await
    }
    fn lease_held(&self, lease: &C::Lease) -> bool {
        self.inner.lease_held(lease)
    }
    async fn release(&self, lease: C::Lease) {
        self.inner.release(lease).await;
    }
}

impl<C: DeadLetterStore> DeadLetterStore for Faulty<C> {
    async fn dead_letters(&self, key: &ProjectionKey) -> Result<Vec<DeadLetter>, CheckpointError> {
        self.inner.dead_letters(key).await
    }
    async fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, CheckpointError> {
        self.inner.dead_letter(id).await
    }
    async fn discard_dead_letter(&self, id: u64) -> Result<bool, CheckpointError> {
        self.inner.discard_dead_letter(id).await
    }
    async fn note_retry_failure(&self, id: u64, error: &str) -> Result<(), CheckpointError> {
        self.inner.note_retry_failure(id, error).await
    }
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
            .contains("the handler panicked: bad data in p"),
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

/// Checkpoints, leases and dead letters are kept per partition: the partitions of one
/// projection move, lease and park independently.
pub async fn partitions_keep_their_own_checkpoints_leases_and_dead_letters<S, C, R>(
    _store: S,
    checkpoints: C,
    _recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let p0 = ProjectionKey::new("split", 0).expect("key");
    let p1 = ProjectionKey::new("split", 1).expect("key");
    let at = |position| Checkpoint {
        position: Position::new(position),
        version: 1,
        replay_until: None,
    };
    let tx = checkpoints.begin().await.expect("begin");
    checkpoints
        .commit(tx, CheckpointCommit::advance(&p0, None, at(10)))
        .await
        .expect("commit partition 0");
    assert_eq!(checkpoints.load(&p0).await.unwrap(), Some(at(10)));
    assert_eq!(
        checkpoints.load(&p1).await.unwrap(),
        None,
        "partition 1 is untouched"
    );
    let tx = checkpoints.begin().await.expect("begin");
    let mut commit = CheckpointCommit::advance(&p1, None, at(3));
    commit.park = Some(NewDeadLetter {
        global_position: Position::new(3),
        event_id: Uuid::now_v7(),
        stream_id: StreamId::new("s").expect("valid"),
        stream_version: 1,
        event_type: "Deposited".into(),
        error: "failed".into(),
        attempts: 1,
    });
    checkpoints
        .commit(tx, commit)
        .await
        .expect("commit partition 1");
    assert_eq!(checkpoints.load(&p0).await.unwrap(), Some(at(10)));
    assert_eq!(checkpoints.load(&p1).await.unwrap(), Some(at(3)));
    assert!(checkpoints.dead_letters(&p0).await.unwrap().is_empty());
    let parked = checkpoints.dead_letters(&p1).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].key, p1);
    // A stale compare-and-set on one partition fails; the other is unaffected.
    let tx = checkpoints.begin().await.expect("begin");
    let err = checkpoints
        .commit(tx, CheckpointCommit::advance(&p0, Some(at(9)), at(11)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CheckpointError::Moved { key, .. } if *key == p0),
        "{err}"
    );
    // Leases are per partition.
    let lease0 = checkpoints
        .try_lease(&p0)
        .await
        .unwrap()
        .expect("lease partition 0");
    assert!(
        checkpoints.try_lease(&p0).await.unwrap().is_none(),
        "one holder per partition"
    );
    let lease1 = checkpoints
        .try_lease(&p1)
        .await
        .unwrap()
        .expect("lease partition 1");
    checkpoints.release(lease0).await;
    checkpoints.release(lease1).await;
    // The lease is free again once released.
    let again = tokio::time::timeout(
        Duration::from_secs(5),
        checkpoints.wait_lease(&p0, Duration::from_secs(5)),
    )
    .await
    .expect("in time")
    .unwrap();
    assert!(again.is_some(), "a released lease can be taken again");
}
