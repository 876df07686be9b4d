//! What the checks share: the `Tally` projection, deposits, and a faulty checkpoint store.

use std::{
    collections::HashSet,
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
        DeadLetterStore, Delivery, HandlerError, HandlerRetry, Interest, LeaseInfo, LeaseStore,
        Projection, ProjectionContext, ProjectionKey,
    },
};

use super::recorder::{Applied, Recorder};

/// Sums `amount` per stream through the recorder; fails on the event ids in `poison`, panics on
/// those in `panic_on`.
pub(super) struct Tally<R> {
    pub(super) name: String,
    pub(super) version: u32,
    pub(super) recorder: R,
    pub(super) poison: Arc<Mutex<HashSet<Uuid>>>,
    pub(super) panic_on: Option<Uuid>,
    pub(super) interest: Interest,
}

impl<R: Clone> Tally<R> {
    pub(super) fn new(name: &str, recorder: &R) -> Self {
        Self {
            name: name.to_owned(),
            version: 1,
            recorder: recorder.clone(),
            poison: Arc::default(),
            panic_on: None,
            interest: Interest::all(),
        }
    }

    pub(super) fn poison(&self, ids: impl IntoIterator<Item = Uuid>) {
        let mut poison = self.poison.lock().unwrap_or_else(PoisonError::into_inner);
        poison.clear();
        poison.extend(ids);
    }

    pub(super) fn share(&self) -> Self {
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
            // Every stream here is an account's: the id names it.
            stream: event.aggregate_id().to_owned(),
            amount: event.payload["amount"].as_i64().ok_or("no amount")?,
            replay: ctx.is_replay(),
        };
        self.recorder.record(ctx.tx(), &self.name, applied).await
    }

    async fn reset(&self, ctx: &mut ProjectionContext<'_, Tx>) -> Result<(), HandlerError> {
        self.recorder.reset(ctx.tx(), &self.name).await
    }
}

pub(super) fn deposit(amount: i64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Deposited".into(),
        schema_version: 1,
        payload: json!({ "amount": amount }),
        metadata: Default::default(),
    }
}

/// Appends deposits of `amounts` to `stream`; their ids.
pub(super) async fn append<S: EventStore>(store: &S, stream: &str, amounts: &[i64]) -> Vec<Uuid> {
    let events: Vec<NewEvent> = amounts.iter().map(|&a| deposit(a)).collect();
    let ids = events.iter().map(|e| e.event_id).collect();
    store
        .append(
            &StreamId::new("account", stream).expect("valid stream"),
            ExpectedVersion::Any,
            events,
        )
        .await
        .expect("append");
    ids
}

pub(super) fn fast_retry(attempts: u32) -> HandlerRetry {
    HandlerRetry {
        attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
    }
}

pub(super) fn key(name: &str) -> ProjectionKey {
    ProjectionKey::single(name).expect("valid projection name")
}

/// Every stored event, once the log shows `expected` of them.
pub(super) async fn stored<S: GlobalLog>(store: &S, expected: usize) -> Vec<RecordedEvent> {
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

pub(super) async fn checkpoint_of<C: CheckpointStore>(
    checkpoints: &C,
    name: &str,
) -> Option<Checkpoint> {
    checkpoints.load(&key(name)).await.expect("load checkpoint")
}

/// A checkpoint store whose `begin` fails a given number of times, like a database that went
/// away, or whose leases are refused for good.
#[derive(Clone)]
pub(super) struct Faulty<C> {
    pub(super) inner: C,
    pub(super) failures: Arc<Mutex<u32>>,
    pub(super) refuse_leases: bool,
}

impl<C: CheckpointStore> CheckpointStore for Faulty<C> {
    type Tx = C::Tx;
    fn delivery(&self) -> Delivery {
        self.inner.delivery()
    }
    async fn load(&self, key: &ProjectionKey) -> Result<Option<Checkpoint>, CheckpointError> {
        self.inner.load(key).await
    }
    async fn partition_count(&self, name: &str, proposed: u16) -> Result<u16, CheckpointError> {
        self.inner.partition_count(name, proposed).await
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
    fn fence(&self, lease: &Self::Lease) -> Option<u64> {
        self.inner.fence(lease)
    }
    async fn heartbeat(&self, group: &str, member: &str) -> Result<u32, CheckpointError> {
        self.inner.heartbeat(group, member).await
    }
    async fn leave(&self, group: &str, member: &str) {
        self.inner.leave(group, member).await;
    }
    async fn leases(&self, name: &str) -> Result<Vec<LeaseInfo>, CheckpointError> {
        self.inner.leases(name).await
    }
    async fn note_error(&self, key: &ProjectionKey, error: Option<&str>) {
        self.inner.note_error(key, error).await;
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
