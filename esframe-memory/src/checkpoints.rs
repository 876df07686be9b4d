//! [`MemoryCheckpoints`]: projection checkpoints, leases and dead letters in memory.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use chrono::Utc;
use esframe_core::projection::{
    Checkpoint, CheckpointCommit, CheckpointError, CheckpointStore, DeadLetter, DeadLetterStore,
    Delivery, LeaseInfo, LeaseStore, ProjectionKey,
};
use tokio::{sync::watch, time::Instant};

/// How long a member of a partitioned projection's group stays counted without a heartbeat,
/// by default.
pub const DEFAULT_MEMORY_LEASE_TIME: Duration = Duration::from_secs(10);

/// Checkpoints, leases and dead letters held in memory, for projections whose read model also
/// lives in this process (tests, embedded use, the memory store).
///
/// A lease is held until it is dropped or released (its holder is in this process, so it
/// cannot die unnoticed); each one carries a fencing token, so a commit by a runner whose
/// lease was taken over is refused. Members of a partitioned projection's group count for the
/// lease time ([`MemoryCheckpoints::with_lease_time`]) after their last heartbeat.
///
/// Handlers get `()` as their transaction and update their own state; the checkpoint is saved
/// after they return, so the delivery is [`Delivery::AtLeastOnce`]: a runner aborted in the
/// middle of a batch handles that batch again when it restarts. Cheap to clone: clones share
/// the data.
#[derive(Debug, Clone, Default)]
pub struct MemoryCheckpoints {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    data: Mutex<Data>,
    commits: watch::Sender<u64>,
    lease_time: Duration,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            data: Mutex::default(),
            commits: watch::Sender::default(),
            lease_time: DEFAULT_MEMORY_LEASE_TIME,
        }
    }
}

#[derive(Debug, Default)]
struct Data {
    checkpoints: HashMap<ProjectionKey, Checkpoint>,
    /// The token of each held lease.
    leases: HashMap<ProjectionKey, u64>,
    /// The last token given out for each key.
    tokens: HashMap<ProjectionKey, u64>,
    errors: HashMap<ProjectionKey, String>,
    members: HashMap<String, HashMap<String, Instant>>,
    partition_counts: HashMap<String, u16>,
    dead_letters: BTreeMap<u64, DeadLetter>,
    next_dead_letter: u64,
}

/// A projection's lease in a [`MemoryCheckpoints`]; given up when dropped.
#[derive(Debug)]
pub struct MemoryLease {
    key: ProjectionKey,
    token: u64,
    inner: Arc<Inner>,
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        let mut data = lock(&self.inner);
        if data.leases.get(&self.key) == Some(&self.token) {
            data.leases.remove(&self.key);
        }
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

    /// An empty checkpoint store whose group members count for `lease_time` after their last
    /// heartbeat (default [`DEFAULT_MEMORY_LEASE_TIME`]).
    pub fn with_lease_time(lease_time: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                lease_time,
                ..Inner::default()
            }),
        }
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

    async fn partition_count(&self, name: &str, proposed: u16) -> Result<u16, CheckpointError> {
        let mut data = self.lock();
        if let Some(&count) = data.partition_counts.get(name) {
            return Ok(count);
        }
        let ran_before = data.checkpoints.keys().any(|key| key.name() == name);
        let count = if ran_before { 1 } else { proposed };
        data.partition_counts.insert(name.to_owned(), count);
        Ok(count)
    }

    async fn begin(&self) -> Result<(), CheckpointError> {
        Ok(())
    }

    async fn commit(&self, (): (), commit: CheckpointCommit) -> Result<(), CheckpointError> {
        {
            let mut data = self.lock();
            if let Some(token) = commit.fence {
                let current = data.leases.get(&commit.key).copied();
                if current != Some(token) {
                    return Err(CheckpointError::Fenced {
                        key: commit.key,
                        token,
                        current: current.map_or_else(|| "free".to_owned(), |t| t.to_string()),
                    });
                }
            }
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
                if let Some(count) = commit.repartition {
                    let name = commit.key.name().to_owned();
                    data.checkpoints
                        .retain(|key, _| key.name() != name || key.partition() < count);
                    for partition in 0..count {
                        if let Ok(key) = ProjectionKey::new(&name, partition) {
                            data.checkpoints.insert(key, to);
                        }
                    }
                    data.partition_counts.insert(name.clone(), count);
                    let after = commit.clear_dead_letters_after.unwrap_or_default();
                    data.dead_letters.retain(|_, letter| {
                        letter.key.name() != name || letter.event.global_position <= after
                    });
                }
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
        let mut data = self.lock();
        if data.leases.contains_key(key) {
            return Ok(None);
        }
        let token = data.tokens.get(key).map_or(1, |t| t + 1);
        data.tokens.insert(key.clone(), token);
        data.leases.insert(key.clone(), token);
        Ok(Some(MemoryLease {
            key: key.clone(),
            token,
            inner: Arc::clone(&self.inner),
        }))
    }

    fn lease_held(&self, lease: &MemoryLease) -> bool {
        self.lock().leases.get(&lease.key) == Some(&lease.token)
    }

    async fn release(&self, lease: MemoryLease) {
        drop(lease);
    }

    fn fence(&self, lease: &MemoryLease) -> Option<u64> {
        Some(lease.token)
    }

    async fn heartbeat(&self, group: &str, member: &str) -> Result<u32, CheckpointError> {
        let now = Instant::now();
        let mut data = self.lock();
        let members = data.members.entry(group.to_owned()).or_default();
        members.insert(member.to_owned(), now + self.inner.lease_time);
        members.retain(|_, expires| *expires > now);
        Ok(u32::try_from(members.len()).unwrap_or(u32::MAX))
    }

    fn membership_lifetime(&self) -> Option<Duration> {
        Some(self.inner.lease_time)
    }

    async fn leave(&self, group: &str, member: &str) {
        if let Some(members) = self.lock().members.get_mut(group) {
            members.remove(member);
        }
    }

    async fn leases(&self, name: &str) -> Result<Vec<LeaseInfo>, CheckpointError> {
        let data = self.lock();
        let mut held: Vec<LeaseInfo> = data
            .leases
            .keys()
            .chain(data.errors.keys())
            .filter(|key| key.name() == name)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|key| LeaseInfo {
                partition: key.partition(),
                holder: data
                    .leases
                    .contains_key(key)
                    .then(|| format!("this process (pid {})", std::process::id())),
                expires_in: None,
                expired: false,
                token: data
                    .leases
                    .get(key)
                    .or_else(|| data.tokens.get(key))
                    .copied(),
                last_error: data.errors.get(key).cloned(),
            })
            .collect();
        held.sort_by_key(|l| l.partition);
        Ok(held)
    }

    async fn note_error(&self, key: &ProjectionKey, error: Option<&str>) {
        let mut data = self.lock();
        match error {
            Some(error) => {
                data.errors.insert(key.clone(), error.to_owned());
            }
            None => {
                data.errors.remove(key);
            }
        }
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
