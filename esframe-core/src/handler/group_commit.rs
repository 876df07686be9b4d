//! Group commit: the handler's pessimistic mode. Commands on one stream queue in this process;
//! a runner task decides a batch of them on one loaded state and stores all their events in one
//! append.

use std::{
    collections::{HashMap, VecDeque},
    ops::Range,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::oneshot;
use tracing::Instrument;

use crate::{Aggregate, CommandError, CommandOutcome, Decision, EventStore, StoreError, StreamId};

use super::{
    CommandHandler,
    context::Provenance,
    load::{CURRENT, LoadedState},
};

/// The largest number of commands decided together and stored in one append.
pub(crate) const MAX_BATCH: usize = 256;

type Reply<A> = oneshot::Sender<
    Result<CommandOutcome<<A as Aggregate>::Event>, CommandError<<A as Aggregate>::Error>>,
>;

/// A queued command.
pub(crate) struct Job<A: Aggregate> {
    command: A::Command,
    provenance: Provenance,
    reply: Reply<A>,
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
    fn push(&self, stream: &StreamId, job: Job<A>) -> bool {
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
    fn take(&self, stream: &StreamId) -> Vec<Job<A>> {
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
    fn put_back(&self, stream: &StreamId, jobs: Vec<Job<A>>) {
        let mut queues = self.lock();
        let queue = queues.entry(stream.clone()).or_default();
        for job in jobs.into_iter().rev() {
            queue.push_front(job);
        }
    }

    /// Drops the stream's entry and its waiting jobs (their callers see the runner stop).
    fn abandon(&self, stream: &StreamId) {
        self.lock().remove(stream);
    }
}

/// What a batch decided for one command: the range of its events among the batch's events.
type Decided<E> = Result<Range<usize>, CommandError<E>>;

impl<A: Aggregate, S: EventStore> CommandHandler<A, S> {
    /// Queues `command` behind the others of its stream and waits for its result.
    pub(crate) async fn enqueue(
        &self,
        queues: &Arc<StreamQueues<A>>,
        stream: StreamId,
        command: A::Command,
        provenance: Provenance,
    ) -> Result<CommandOutcome<A::Event>, CommandError<A::Error>> {
        let (reply, result) = oneshot::channel();
        let job = Job {
            command,
            provenance,
            reply,
        };
        if queues.push(&stream, job) {
            let (handler, queues, stream) = (self.clone(), Arc::clone(queues), stream.clone());
            tokio::spawn(async move { handler.serve_queue(&queues, &stream).await });
        }
        result
            .await
            .unwrap_or(Err(CommandError::QueueStopped { stream }))
    }

    /// Runs batches of a stream's queued commands until none wait.
    async fn serve_queue(&self, queues: &StreamQueues<A>, stream: &StreamId) {
        /// If a handler panics, forget the stream's queue so later commands start a new runner;
        /// the waiting callers see `QueueStopped`.
        struct Abandon<'a, A: Aggregate>(&'a StreamQueues<A>, &'a StreamId, bool);
        impl<A: Aggregate> Drop for Abandon<'_, A> {
            fn drop(&mut self) {
                if !self.2 {
                    self.0.abandon(self.1);
                }
            }
        }
        let mut guard = Abandon(queues, stream, false);
        loop {
            let jobs = queues.take(stream);
            if jobs.is_empty() {
                guard.2 = true;
                return;
            }
            let span = tracing::debug_span!("esframe.command_batch", aggregate = A::TYPE, stream = %stream, commands = jobs.len());
            let leftover = self.run_batch(stream, jobs).instrument(span).await;
            if !leftover.is_empty() {
                queues.put_back(stream, leftover);
            }
        }
    }

    /// Decides `jobs` in order on one loaded state and stores all their events in one append.
    /// Returns the jobs it did not get to.
    ///
    /// Same results as running them one by one: each command sees the state its predecessors
    /// left. A command rejected after emitting events leaves that state unusable, so the batch
    /// stops there and the rest go back to the queue. Conflicts rerun the whole batch. A failed
    /// load, or an append certainly not stored (every error but
    /// [`StoreErrorKind::OutcomeUnknown`](crate::StoreErrorKind::OutcomeUnknown)), runs each
    /// command on its own; an unknown outcome leaves it unknown whether the batch was stored, so
    /// every decided command gets the error ([`CommandError::BatchFailed`], or the error itself
    /// for a batch of one).
    async fn run_batch(&self, stream: &StreamId, jobs: Vec<Job<A>>) -> Vec<Job<A>> {
        // As in `run_single`: a batch decided on a stale cached state is decided again at once
        // on the stored state, without counting as a conflict.
        let (mut attempt, mut conflicts, mut use_cache) = (0, 0, true);
        loop {
            attempt += 1;
            let loaded = match self.load_state(stream, use_cache, true, CURRENT).await {
                Ok(loaded) => loaded,
                Err(_) => return self.run_each(stream, jobs).await,
            };
            use_cache = false;
            let LoadedState {
                mut state,
                version,
                replace_snapshot,
                cached,
            } = loaded;
            let mut emitted: Vec<A::Event> = Vec::new();
            let mut new_events = Vec::new();
            let mut decided: Vec<Decided<A::Error>> = Vec::with_capacity(jobs.len());
            let mut clean = true;
            for job in &jobs {
                let at = version + emitted.len() as u64;
                let mut decision = Decision::new(&mut state, stream, at);
                let result = A::handle(&mut decision, &job.command, &self.services).await;
                let events = decision.into_emitted();
                match result {
                    Err(rejection) => {
                        clean = events.is_empty();
                        decided.push(Err(CommandError::Rejected(rejection)));
                    }
                    Ok(()) => match self.encode(stream, &events, &job.provenance) {
                        Ok(encoded) => {
                            let start = emitted.len();
                            emitted.extend(events);
                            new_events.extend(encoded);
                            decided.push(Ok(start..emitted.len()));
                        }
                        Err(err) => {
                            clean = events.is_empty();
                            decided.push(Err(err));
                        }
                    },
                }
                if !clean {
                    break;
                }
            }
            // Nothing to append proves the cached state current: with `Verify`, ask.
            if new_events.is_empty() && cached {
                match self.cache_confirmed(stream, version).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(_) => return self.run_each(stream, jobs).await,
                }
            }
            let event_ids: Vec<uuid::Uuid> = new_events.iter().map(|e| e.event_id).collect();
            let outcome = if new_events.is_empty() {
                None
            } else {
                let snapshot_state = clean.then_some(&state);
                match self
                    .store_events(
                        stream,
                        snapshot_state,
                        version,
                        new_events,
                        replace_snapshot,
                    )
                    .await
                {
                    Ok(outcome) => Some(outcome),
                    Err(StoreError::Conflict(_)) if cached => continue,
                    Err(StoreError::Conflict(conflict)) => {
                        conflicts += 1;
                        if let Err(conflict) = self.after_conflict(conflict, conflicts).await {
                            return self.fail_decided(jobs, decided.len(), |_| {
                                CommandError::Conflict {
                                    conflict: conflict.clone(),
                                    attempts: attempt,
                                }
                            });
                        }
                        continue;
                    }
                    Err(err) if err.kind() != crate::StoreErrorKind::OutcomeUnknown => {
                        // Certainly not stored (an inline projection refused it, a reused id,
                        // the database unavailable): let each command meet its own fate, so one
                        // command that caused it does not fail the others.
                        self.cache_drop(stream);
                        return self.run_each(stream, jobs).await;
                    }
                    Err(err) => {
                        // It may or may not have been stored (a connection lost around the
                        // commit): nothing is decided again with new event ids, which could
                        // store a command twice. Even a rejection was decided on a state that
                        // included its predecessors' events.
                        self.cache_drop(stream);
                        if decided.len() == 1 {
                            return self.fail_decided(jobs, 1, {
                                let mut err = Some(err);
                                move |_| match err.take() {
                                    Some(err) => CommandError::Store(err),
                                    None => CommandError::QueueStopped {
                                        stream: stream.clone(),
                                    },
                                }
                            });
                        }
                        let source = Arc::new(err);
                        let others = decided.len().saturating_sub(1);
                        return self.fail_decided(jobs, decided.len(), |_| {
                            CommandError::BatchFailed {
                                stream: stream.clone(),
                                others,
                                source: Arc::clone(&source),
                            }
                        });
                    }
                }
            };
            let deduplicated = outcome.as_ref().is_some_and(|o| o.deduplicated);
            let first = outcome
                .as_ref()
                .map_or(version + 1, |o| super::first_version(o, emitted.len()));
            if deduplicated {
                self.cache_drop(stream);
            } else if clean {
                self.cache_put(stream, version + emitted.len() as u64, state);
            }
            let mut jobs = jobs;
            let leftover = jobs.split_off(decided.len());
            let mut events = emitted.into_iter();
            for (job, result) in jobs.into_iter().zip(decided) {
                let reply = result.map(|range| {
                    let count = range.len();
                    let envelopes = range
                        .clone()
                        .zip(events.by_ref().take(count))
                        .filter_map(|(i, event)| {
                            let outcome = outcome.as_ref()?;
                            let at = first + i as u64;
                            let position = *outcome.positions.get(i)?;
                            Some(super::envelope::<A>(
                                stream,
                                event,
                                event_ids[i],
                                at,
                                position,
                                outcome,
                                &job.provenance.metadata,
                            ))
                        })
                        .collect();
                    CommandOutcome {
                        stream_id: stream.clone(),
                        version: first - 1 + range.end as u64,
                        events: envelopes,
                        attempts: attempt,
                        deduplicated,
                    }
                });
                let _ = job.reply.send(reply);
            }
            return leftover;
        }
    }

    /// Answers the first `decided` jobs with `error`; the others go back to the queue.
    fn fail_decided(
        &self,
        mut jobs: Vec<Job<A>>,
        decided: usize,
        mut error: impl FnMut(usize) -> CommandError<A::Error>,
    ) -> Vec<Job<A>> {
        let leftover = jobs.split_off(decided);
        for (i, job) in jobs.into_iter().enumerate() {
            let _ = job.reply.send(Err(error(i)));
        }
        leftover
    }

    /// Runs each job on its own (after a batch failed with nothing appended).
    async fn run_each(&self, stream: &StreamId, jobs: Vec<Job<A>>) -> Vec<Job<A>> {
        for job in jobs {
            let result = self.run_single(stream, &job.command, &job.provenance).await;
            let _ = job.reply.send(result);
        }
        Vec::new()
    }
}
