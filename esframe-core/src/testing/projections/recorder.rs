//! The suite's read model: what a check's projection recorded, written through the
//! checkpoint store's transaction.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, PoisonError},
};

use uuid::Uuid;

use crate::projection::HandlerError;

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
    pub(super) fn ids(&self) -> Vec<Uuid> {
        self.applied.iter().map(|a| a.event_id).collect()
    }

    pub(super) fn total(&self, stream: &str) -> i64 {
        self.applied
            .iter()
            .filter(|a| a.stream == stream)
            .map(|a| a.amount)
            .sum()
    }

    pub(super) fn replayed(&self) -> usize {
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
