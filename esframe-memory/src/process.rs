//! [`MemoryProcessStore`]: process-manager instances and timers in memory.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use chrono::{DateTime, Utc};
use esframe_core::{
    GlobalLog, Position, RecordedEvent, StoreError,
    process::{
        InstanceRecord, InstanceStatus, ProcessStore, ProcessStoreError, ProcessWrite, TimerRecord,
    },
};
use uuid::Uuid;

use crate::{MemoryCheckpoints, MemoryStore};

/// Process-manager instances and timers in memory, beside a [`MemoryStore`] and
/// [`MemoryCheckpoints`].
///
/// A write (the commands' events in all their streams, the instances, the timers) is atomic:
/// checked, then stored under one lock. The checkpoint is committed after it (at least once):
/// if the runner stops between the two, the events are handled again, and each instance skips
/// the ones at or below the last position it handled, so nothing is applied twice.
#[derive(Debug, Clone)]
pub struct MemoryProcessStore {
    store: MemoryStore,
    checkpoints: MemoryCheckpoints,
    data: Arc<Mutex<Data>>,
}

#[derive(Debug, Default)]
struct Data {
    /// (process, instance id) → instance.
    instances: BTreeMap<(String, String), InstanceRecord>,
    /// (process, instance id, timer name) → timer.
    timers: BTreeMap<(String, String, String), TimerRecord>,
}

impl MemoryProcessStore {
    /// Instances and timers of process managers running on `store`, checkpointed in
    /// `checkpoints`.
    pub fn new(store: MemoryStore, checkpoints: MemoryCheckpoints) -> Self {
        Self {
            store,
            checkpoints,
            data: Arc::default(),
        }
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn moved(what: String) -> ProcessStoreError {
    ProcessStoreError::Moved { what }
}

impl ProcessStore for MemoryProcessStore {
    type Log = MemoryStore;
    type Checkpoints = MemoryCheckpoints;

    fn log(&self) -> &MemoryStore {
        &self.store
    }

    fn checkpoints(&self) -> &MemoryCheckpoints {
        &self.checkpoints
    }

    async fn load_instances(
        &self,
        _tx: &mut (),
        process: &str,
        ids: &[String],
    ) -> Result<Vec<InstanceRecord>, ProcessStoreError> {
        let data = self.data();
        Ok(ids
            .iter()
            .filter_map(|id| {
                data.instances
                    .get(&(process.to_owned(), id.clone()))
                    .cloned()
            })
            .collect())
    }

    async fn write(&self, _tx: &mut (), write: ProcessWrite) -> Result<(), ProcessStoreError> {
        let mut data = self.data();
        for (record, previous) in &write.instances {
            let stored = data
                .instances
                .get(&(record.process.clone(), record.id.clone()))
                .map(|r| r.version);
            if stored != *previous {
                return Err(moved(format!(
                    "instance `{}` of process manager `{}`",
                    record.id, record.process
                )));
            }
        }
        for timer in &write.fired {
            let key = (
                timer.process.clone(),
                timer.instance.clone(),
                timer.name.clone(),
            );
            if data.timers.get(&key).map(|t| t.id) != Some(timer.id) {
                return Err(moved(format!(
                    "timer `{}` of instance `{}`",
                    timer.name, timer.instance
                )));
            }
        }
        if !write.appends.is_empty() {
            self.store.append_streams(write.appends)?;
        }
        for (record, _) in write.instances {
            data.instances
                .insert((record.process.clone(), record.id.clone()), record);
        }
        for timer in write.fired {
            data.timers
                .remove(&(timer.process, timer.instance, timer.name));
        }
        let process = write.process;
        for instance in write.cancel_all {
            data.timers
                .retain(|(p, i, _), _| !(*p == process && *i == instance));
        }
        for (instance, name) in write.cancel {
            data.timers.remove(&(process.clone(), instance, name));
        }
        for timer in write.schedule {
            data.timers.insert(
                (
                    timer.process.clone(),
                    timer.instance.clone(),
                    timer.name.clone(),
                ),
                timer,
            );
        }
        Ok(())
    }

    async fn instance(
        &self,
        process: &str,
        id: &str,
    ) -> Result<Option<InstanceRecord>, ProcessStoreError> {
        Ok(self
            .data()
            .instances
            .get(&(process.to_owned(), id.to_owned()))
            .cloned())
    }

    async fn instances(
        &self,
        process: &str,
        status: InstanceStatus,
        limit: usize,
    ) -> Result<Vec<InstanceRecord>, ProcessStoreError> {
        Ok(self
            .data()
            .instances
            .values()
            .filter(|r| r.process == process && r.status == status)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn due_timers(
        &self,
        process: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TimerRecord>, ProcessStoreError> {
        let data = self.data();
        let mut due: Vec<TimerRecord> = data
            .timers
            .values()
            .filter(|t| t.process == process && t.due <= now && active(&data, t))
            .cloned()
            .collect();
        due.sort_by(|a, b| (a.due, &a.instance, &a.name).cmp(&(b.due, &b.instance, &b.name)));
        due.truncate(limit);
        Ok(due)
    }

    async fn next_due(&self, process: &str) -> Result<Option<DateTime<Utc>>, ProcessStoreError> {
        let data = self.data();
        Ok(data
            .timers
            .values()
            .filter(|t| t.process == process && active(&data, t))
            .map(|t| t.due)
            .min())
    }

    async fn timers(
        &self,
        process: &str,
        instance: &str,
    ) -> Result<Vec<TimerRecord>, ProcessStoreError> {
        Ok(self
            .data()
            .timers
            .values()
            .filter(|t| t.process == process && t.instance == instance)
            .cloned()
            .collect())
    }

    async fn flow_head(&self, correlation_id: Uuid) -> Result<Option<Position>, StoreError> {
        Ok(self
            .trace(correlation_id)
            .await?
            .last()
            .map(|e| e.global_position))
    }

    async fn trace(&self, correlation_id: Uuid) -> Result<Vec<RecordedEvent>, StoreError> {
        let all = self.store.load_log(Position::START, usize::MAX).await?;
        Ok(all
            .into_iter()
            .filter(|e| e.metadata.correlation_id == Some(correlation_id))
            .collect())
    }
}

fn active(data: &Data, timer: &TimerRecord) -> bool {
    data.instances
        .get(&(timer.process.clone(), timer.instance.clone()))
        .is_some_and(|r| r.status == InstanceStatus::Active)
}
