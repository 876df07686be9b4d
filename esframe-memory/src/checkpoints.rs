//! [`MemoryCheckpoints`]: projection checkpoints, leases and dead letters in memory.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use chrono::Utc;
use esframe_core::projection::{
    Checkpoint, CheckpointCommit, CheckpointError, CheckpointStore, DeadLetter, DeadLetterStore,
    Delivery, LeaseStore, ProjectionKey,
};
use tokio::sync::watch;

/// Checkpoints, leases and dead letters held in memory, for projections whose read model also
/// lives in this process (tests, embedded use, the memory store).
///
/// Handlers get `()` as their transaction and update their own state; the checkpoint is saved
/// after they return, so the delivery is [`Delivery::AtLeastOnce`]: a runner aborted in the
/// middle of a batch handles that batch again when it restarts. Cheap to clone: clones share
/// the data.
#[derive(Debug, Clone, Default)]
pub struct MemoryCheckpoints {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    data: Mutex<Data>,
    commits: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Data {
    checkpoints: HashMap<ProjectionKey, Checkpoint>,
    leases: HashSet<ProjectionKey>,
    dead_letters: BTreeMap<u64, DeadLetter>,
    next_dead_letter: u64,
}

/// A projection's lease in a [`MemoryCheckpoints`]; given up when dropped.
#[derive(Debug)]
pub struct MemoryLease {
    key: ProjectionKey,
    inner: Arc<Inner>,
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        lock(&self.inner).leases.remove(&self.key);
    }
}

fn lock(inner: &Inner) -> MutexGuard<'_, Data> {
    inner.data.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemoryCheckpoints {
    /// An empty checkpoint store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Data> {
        lock(&self.inner)
    }
}

fn describe(checkpoint: Option<Checkpoint>) -> String {
    checkpoint.map_or_else(
        || "no checkpoint".to_owned(),
        |c| format!("position {} (version {})", c.position, c.version),
    )
}

impl CheckpointStore for MemoryCheckpoints {
    type Tx = ();

    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }

    async fn load(&self, key: &ProjectionKey) -> Result<Option<Checkpoint>, CheckpointError> {
        Ok(self.lock().checkpoints.get(key).copied())
    }

    async fn begin(&self) -> Result<(), CheckpointError> {
        Ok(())
    }

    async fn commit(&self, (): (), commit: CheckpointCommit) -> Result<(), CheckpointError> {
        {
            let mut data = self.lock();
            if let Some((from, _)) = commit.advance {
                let found = data.checkpoints.get(&commit.key).copied();
                if found != from {
                    return Err(CheckpointError::Moved {
                        key: commit.key,
                        expected: describe(from),
                        found: describe(found),
                    });
                }
            }
            if let Some(id) = commit.resolve
                && !data.dead_letters.contains_key(&id)
            {
                return Err(CheckpointError::DeadLetterGone {
                    key: commit.key,
                    id,
                });
            }
            if let Some((_, to)) = commit.advance {
                data.checkpoints.insert(commit.key.clone(), to);
            }
            if let Some(id) = commit.resolve {
                data.dead_letters.remove(&id);
            }
            if let Some(after) = commit.clear_dead_letters_after {
                data.dead_letters.retain(|_, letter| {
                    letter.key != commit.key || letter.event.global_position <= after
                });
            }
            if let Some(event) = commit.park {
                data.next_dead_letter += 1;
                let id = data.next_dead_letter;
                data.dead_letters.insert(
                    id,
                    DeadLetter {
                        id,
                        key: commit.key,
                        event,
                        parked_at: Utc::now(),
                    },
                );
            }
        }
        self.inner.commits.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    async fn rollback(&self, (): ()) {}

    fn changed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut commits = self.inner.commits.subscribe();
        async move {
            let _ = commits.changed().await;
        }
    }
}

impl LeaseStore for MemoryCheckpoints {
    type Lease = MemoryLease;

    async fn try_lease(&self, key: &ProjectionKey) -> Result<Option<MemoryLease>, CheckpointError> {
        let taken = self.lock().leases.insert(key.clone());
        Ok(taken.then(|| MemoryLease {
            key: key.clone(),
            inner: Arc::clone(&self.inner),
        }))
    }

    fn lease_held(&self, _lease: &MemoryLease) -> bool {
        true
    }

    async fn release(&self, lease: MemoryLease) {
        drop(lease);
    }
}

impl DeadLetterStore for MemoryCheckpoints {
    async fn dead_letters(&self, key: &ProjectionKey) -> Result<Vec<DeadLetter>, CheckpointError> {
        Ok(self
            .lock()
            .dead_letters
            .values()
            .filter(|d| d.key == *key)
            .cloned()
            .collect())
    }

    async fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, CheckpointError> {
        Ok(self.lock().dead_letters.get(&id).cloned())
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, CheckpointError> {
        Ok(self.lock().dead_letters.remove(&id).is_some())
    }

    async fn note_retry_failure(&self, id: u64, error: &str) -> Result<(), CheckpointError> {
        if let Some(letter) = self.lock().dead_letters.get_mut(&id) {
            letter.event.attempts += 1;
            error.clone_into(&mut letter.event.error);
        }
        Ok(())
    }
}
