//! Per-stream command queues for the handler's pessimistic mode (group commit).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, PoisonError},
};

use tokio::sync::oneshot;

use crate::{Aggregate, CommandError, CommandOutcome, EventMetadata, StreamId};

/// The largest number of commands decided together and stored in one append.
pub(crate) const MAX_BATCH: usize = 256;

pub(crate) type Reply<A> = oneshot::Sender<
    Result<CommandOutcome<<A as Aggregate>::Event>, CommandError<<A as Aggregate>::Error>>,
>;

/// A queued command.
pub(crate) struct Job<A: Aggregate> {
    pub(crate) command: A::Command,
    pub(crate) metadata: EventMetadata,
    pub(crate) reply: Reply<A>,
}

/// Waiting commands per stream. A stream has an entry exactly while a runner task serves it, so
/// pushing and taking under one lock can never strand a command without a runner.
pub(crate) struct StreamQueues<A: Aggregate> {
    queues: Mutex<HashMap<StreamId, VecDeque<Job<A>>>>,
}

impl<A: Aggregate> Default for StreamQueues<A> {
    fn default() -> Self {
        Self {
            queues: Mutex::new(HashMap::new()),
        }
    }
}

impl<A: Aggregate> std::fmt::Debug for StreamQueues<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamQueues").finish_non_exhaustive()
    }
}

impl<A: Aggregate> StreamQueues<A> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, VecDeque<Job<A>>>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job`; `true` if no runner serves the stream and the caller must start one.
    pub(crate) fn push(&self, stream: &StreamId, job: Job<A>) -> bool {
        let mut queues = self.lock();
        match queues.get_mut(stream) {
            Some(queue) => {
                queue.push_back(job);
                false
            }
            None => {
                queues.insert(stream.clone(), VecDeque::from([job]));
                true
            }
        }
    }

    /// Takes up to [`MAX_BATCH`] waiting jobs. When none wait, the stream's entry is removed and
    /// the runner must stop.
    pub(crate) fn take(&self, stream: &StreamId) -> Vec<Job<A>> {
        let mut queues = self.lock();
        let Some(queue) = queues.get_mut(stream) else {
            return Vec::new();
        };
        if queue.is_empty() {
            queues.remove(stream);
            return Vec::new();
        }
        let n = queue.len().min(MAX_BATCH);
        queue.drain(..n).collect()
    }

    /// Returns jobs a batch did not get to, ahead of the others.
    pub(crate) fn put_back(&self, stream: &StreamId, jobs: Vec<Job<A>>) {
        let mut queues = self.lock();
        let queue = queues.entry(stream.clone()).or_default();
        for job in jobs.into_iter().rev() {
            queue.push_front(job);
        }
    }

    /// Drops the stream's entry and its waiting jobs (their callers see the runner stop).
    pub(crate) fn abandon(&self, stream: &StreamId) {
        self.lock().remove(stream);
    }
}
