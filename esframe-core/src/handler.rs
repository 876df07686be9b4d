//! Command handling: load, decide, append with optimistic concurrency, retry, snapshot.

use std::{borrow::Cow, sync::Arc};

use chrono::Utc;
use serde_json::Map;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    Aggregate, CachePolicy, Command, CommandError, ConcurrencyMode, Decision, EventEnvelope,
    EventMetadata, ExpectedVersion, NewEvent, RetryPolicy, Snapshot, SnapshotPolicy, SnapshotStore,
    StoreError, StreamId,
    batch::{Job, StreamQueues},
    cache::StateCache,
};

/// Default number of aggregate states the handler keeps in memory.
pub const DEFAULT_STATE_CACHE_CAPACITY: usize = 10_000;

/// Ids and metadata that travel with a command into the events it produces.
///
/// ```
/// use esframe_core::CommandContext;
/// use uuid::Uuid;
/// let request = Uuid::now_v7();
/// let ctx = CommandContext::new().correlation_id(request).metadata("user", "alice");
/// ```
#[derive(Debug, Clone, Default)]
pub struct CommandContext {
    command_id: Option<Uuid>,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    metadata: Map<String, serde_json::Value>,
}

impl CommandContext {
    /// An empty context: ids are taken from the command or generated.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the command id (overrides [`Command::command_id`]).
    #[must_use]
    pub fn command_id(mut self, id: Uuid) -> Self {
        self.command_id = Some(id);
        self
    }

    /// Sets the correlation id; by default it is the command id.
    #[must_use]
    pub fn correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the causation id (an event that caused this command, say); by default the command id.
    #[must_use]
    pub fn causation_id(mut self, id: Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Adds a metadata entry copied into every produced event.
    #[must_use]
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// What a successful command did.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandOutcome<E> {
    /// The stream the command targeted.
    pub stream_id: StreamId,
    /// The stream's version after the command (unchanged if it emitted nothing).
    pub version: u64,
    /// The events stored, with their envelopes; empty if the command emitted nothing.
    pub events: Vec<EventEnvelope<E>>,
    /// How many times the command was handled (more than 1 after conflicts).
    pub attempts: u32,
}

/// An aggregate's state rebuilt from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<A> {
    /// The state.
    pub state: A,
    /// The stream version it includes (0: no events).
    pub version: u64,
}

/// Handles commands for aggregate `A` against store `S`.
///
/// For each command: load the state (cached state, or latest snapshot, plus the events after it),
/// let [`Aggregate::handle`] decide, append the events expecting the loaded version, and on a
/// [`Conflict`](crate::Conflict) reload and retry under the [`RetryPolicy`]. Snapshots are taken
/// by the [`SnapshotPolicy`]. Cheap to clone; clones share the cache and the services.
///
/// ```
/// # use esframe_core::{CommandHandler, RetryPolicy, SnapshotPolicy, SnapshotStore, Aggregate};
/// # fn build<A: Aggregate<Services = ()>, S: SnapshotStore>(store: S) -> CommandHandler<A, S> {
/// CommandHandler::<A, S>::new(store)
///     .retry_policy(RetryPolicy::attempts(20))
///     .snapshot_policy(SnapshotPolicy::every(50))
///     .state_cache(1_000)
/// # }
/// ```
pub struct CommandHandler<A: Aggregate, S> {
    store: S,
    services: Arc<A::Services>,
    retry: RetryPolicy,
    snapshots: SnapshotPolicy,
    cache: Option<Arc<StateCache<A>>>,
    cache_policy: CachePolicy,
    queues: Option<Arc<StreamQueues<A>>>,
    skip_unknown_types: bool,
}

impl<A: Aggregate, S: Clone> Clone for CommandHandler<A, S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            services: Arc::clone(&self.services),
            retry: self.retry,
            snapshots: self.snapshots,
            cache: self.cache.clone(),
            cache_policy: self.cache_policy,
            queues: self.queues.clone(),
            skip_unknown_types: self.skip_unknown_types,
        }
    }
}

impl<A: Aggregate, S> std::fmt::Debug for CommandHandler<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandHandler")
            .field("aggregate", &A::TYPE)
            .field("retry", &self.retry)
            .field("snapshots", &self.snapshots)
            .field("state_cache", &self.cache.is_some())
            .field("cache_policy", &self.cache_policy)
            .field("pessimistic", &self.queues.is_some())
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate, S: SnapshotStore> CommandHandler<A, S>
where
    A::Services: Default,
{
    /// A handler with default services, retry and snapshot policies and state cache.
    pub fn new(store: S) -> Self {
        Self::with_services(store, A::Services::default())
    }
}

impl<A: Aggregate, S: SnapshotStore> CommandHandler<A, S> {
    /// A handler whose aggregate calls `services`.
    pub fn with_services(store: S, services: A::Services) -> Self {
        Self {
            store,
            services: Arc::new(services),
            retry: RetryPolicy::default(),
            snapshots: SnapshotPolicy::default(),
            cache: Some(Arc::new(StateCache::new(DEFAULT_STATE_CACHE_CAPACITY))),
            cache_policy: CachePolicy::default(),
            queues: None,
            skip_unknown_types: false,
        }
    }

    /// Skips stored events whose type this aggregate's event enum does not know, instead of
    /// failing the load with [`DecodeErrorKind::UnknownType`](crate::DecodeErrorKind). Only for
    /// streams that legitimately hold events other code writes; by default an unknown type is an
    /// error, since skipping it could change the state the aggregate decides on.
    #[must_use]
    pub fn skip_unknown_event_types(mut self, skip: bool) -> Self {
        self.skip_unknown_types = skip;
        self
    }

    /// Sets whether a cached state is checked against the store before deciding.
    #[must_use]
    pub fn cache_policy(mut self, policy: CachePolicy) -> Self {
        self.cache_policy = policy;
        self
    }

    /// Sets whether commands on one stream run in parallel or queue within this process.
    #[must_use]
    pub fn concurrency_mode(mut self, mode: ConcurrencyMode) -> Self {
        self.queues = match mode {
            ConcurrencyMode::Optimistic => None,
            ConcurrencyMode::Pessimistic => Some(Arc::new(StreamQueues::default())),
        };
        self
    }

    /// Sets the retry policy for concurrency conflicts.
    #[must_use]
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets when snapshots are taken.
    #[must_use]
    pub fn snapshot_policy(mut self, policy: SnapshotPolicy) -> Self {
        self.snapshots = policy;
        self
    }

    /// Keeps up to `capacity` aggregate states in memory between commands.
    #[must_use]
    pub fn state_cache(mut self, capacity: usize) -> Self {
        self.cache = Some(Arc::new(StateCache::new(capacity)));
        self
    }

    /// Loads every aggregate from the store for every command.
    #[must_use]
    pub fn without_state_cache(mut self) -> Self {
        self.cache = None;
        self
    }

    /// The store this handler writes to.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Handles `command` with ids generated or taken from the command.
    pub async fn execute(
        &self,
        command: A::Command,
    ) -> Result<CommandOutcome<A::Event>, CommandError<A::Error>> {
        self.execute_with(command, CommandContext::default()).await
    }

    /// Handles `command`; correlation, causation and metadata come from `context`.
    pub async fn execute_with(
        &self,
        command: A::Command,
        context: CommandContext,
    ) -> Result<CommandOutcome<A::Event>, CommandError<A::Error>> {
        let stream = StreamId::new(command.aggregate_id())?;
        let metadata = metadata_for(&command, context);
        match &self.queues {
            None => {
                let span =
                    tracing::debug_span!("esframe.command", aggregate = A::TYPE, stream = %stream);
                self.run_single(&stream, &command, &metadata)
                    .instrument(span)
                    .await
            }
            Some(queues) => self.enqueue(queues, stream, command, metadata).await,
        }
    }

    /// Rebuilds the current state of aggregate `aggregate_id` from its snapshot and events.
    pub async fn load(&self, aggregate_id: &str) -> Result<Loaded<A>, CommandError<A::Error>> {
        let stream = StreamId::new(aggregate_id)?;
        let (state, version, _, _) = self.load_state(&stream, false).await?;
        Ok(Loaded { state, version })
    }

    /// Handles one command on its own: load, decide, append, retry on conflict.
    async fn run_single(
        &self,
        stream: &StreamId,
        command: &A::Command,
        metadata: &EventMetadata,
    ) -> Result<CommandOutcome<A::Event>, CommandError<A::Error>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut state, version, snapshot_unusable, trusted_cache) =
                self.load_state(stream, attempt == 1).await?;
            let mut decision = Decision::new(&mut state, stream, version);
            let decided = A::handle(&mut decision, command, &self.services).await;
            let emitted = decision.into_emitted();
            if let Err(rejection) = decided {
                if emitted.is_empty() {
                    self.cache_put(stream, version, state);
                }
                return Err(CommandError::Rejected(rejection));
            }
            if emitted.is_empty() {
                self.cache_put(stream, version, state);
                return Ok(CommandOutcome {
                    stream_id: stream.clone(),
                    version,
                    events: Vec::new(),
                    attempts: attempt,
                });
            }
            let new_events = self.encode(stream, &emitted, metadata)?;
            let event_ids: Vec<Uuid> = new_events.iter().map(|e| e.event_id).collect();
            match self
                .store_events(stream, Some(&state), version, new_events, snapshot_unusable)
                .await
            {
                Ok(outcome) => {
                    self.cache_put(stream, outcome.stream_version, state);
                    let events = emitted
                        .into_iter()
                        .zip(event_ids)
                        .zip(&outcome.positions)
                        .enumerate()
                        .map(|(i, ((event, id), &position))| {
                            let at = version + 1 + i as u64;
                            envelope::<A>(stream, event, id, at, position, &outcome, metadata)
                        })
                        .collect();
                    return Ok(CommandOutcome {
                        stream_id: stream.clone(),
                        version: outcome.stream_version,
                        events,
                        attempts: attempt,
                    });
                }
                Err(StoreError::Conflict(conflict)) => {
                    self.after_conflict(conflict, attempt, trusted_cache)
                        .await?;
                }
                Err(other) => return Err(CommandError::Store(other)),
            }
        }
    }

    /// Gives up with the conflict once the attempts are used, else waits before the retry.
    async fn after_conflict(
        &self,
        conflict: crate::Conflict,
        attempt: u32,
        trusted_cache: bool,
    ) -> Result<(), CommandError<A::Error>> {
        if attempt >= self.retry.max_attempts() {
            return Err(CommandError::Conflict {
                conflict,
                attempts: attempt,
            });
        }
        tracing::debug!(%conflict, attempt, "conflict; retrying");
        // A trusted cached state was simply stale: reload at once, no backoff.
        if !trusted_cache {
            tokio::time::sleep(self.retry.jittered_backoff(attempt)).await;
        }
        Ok(())
    }

    /// Serializes emitted events with fresh UUIDv7 ids and the command's metadata.
    fn encode(
        &self,
        stream: &StreamId,
        events: &[A::Event],
        metadata: &EventMetadata,
    ) -> Result<Vec<NewEvent>, CommandError<A::Error>> {
        events
            .iter()
            .map(|event| {
                let payload =
                    crate::Event::to_payload(event).map_err(|source| CommandError::Encode {
                        stream: stream.clone(),
                        event_type: crate::Event::event_type(event),
                        source,
                    })?;
                Ok(NewEvent {
                    event_id: Uuid::now_v7(),
                    aggregate_type: Cow::Borrowed(A::TYPE),
                    event_type: Cow::Borrowed(crate::Event::event_type(event)),
                    schema_version: crate::Event::schema_version(event),
                    payload,
                    metadata: metadata.clone(),
                })
            })
            .collect()
    }

    /// Appends expecting the stream at `version`, with a snapshot of `state` (the state after
    /// the events) when the policy asks for one; `state` is `None` when it is not that state.
    async fn store_events(
        &self,
        stream: &StreamId,
        state: Option<&A>,
        version: u64,
        events: Vec<NewEvent>,
        snapshot_unusable: bool,
    ) -> Result<crate::AppendOutcome, StoreError> {
        let new_version = version + events.len() as u64;
        let expected = if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        };
        let snapshot = state.and_then(|state| {
            self.snapshot_of(stream, state, version, new_version, snapshot_unusable)
        });
        match snapshot {
            Some(snapshot) => {
                self.store
                    .append_with_snapshot(stream, expected, events, snapshot)
                    .await
            }
            None => self.store.append(stream, expected, events).await,
        }
    }

    /// Queues `command` behind the others of its stream and waits for its result.
    async fn enqueue(
        &self,
        queues: &Arc<StreamQueues<A>>,
        stream: StreamId,
        command: A::Command,
        metadata: EventMetadata,
    ) -> Result<CommandOutcome<A::Event>, CommandError<A::Error>> {
        let (reply, result) = tokio::sync::oneshot::channel();
        let job = Job {
            command,
            metadata,
            reply,
        };
        if queues.push(&stream, job) {
            let (handler, queues, stream) = (self.clone(), Arc::clone(queues), stream.clone());
            tokio::spawn(async move { handler.serve_queue(&queues, &stream).await });
        }
        result.await.unwrap_or_else(|_| {
            Err(CommandError::Store(StoreError::backend(RunnerStopped {
                stream: stream.to_string(),
            })))
        })
    }

    /// Runs batches of a stream's queued commands until none wait.
    async fn serve_queue(&self, queues: &StreamQueues<A>, stream: &StreamId) {
        /// If a handler panics, forget the stream's queue so later commands start a new runner;
        /// the waiting callers see `RunnerStopped`.
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

    /// Decides `jobs` in order on one loaded state and stores all their events in one append
    /// (group commit). Returns the jobs it did not get to.
    ///
    /// Same results as running them one by one: each command sees the state its predecessors
    /// left. A command rejected after emitting events leaves that state unusable, so the batch
    /// stops there and the rest go back to the queue. Conflicts rerun the whole batch. A failed
    /// load, or an append certainly not stored (an inline projection refused it), runs each
    /// command on its own; any other append failure leaves it unknown whether the batch was
    /// stored, so every decided command gets the error (`fail_batch`).
    async fn run_batch(&self, stream: &StreamId, jobs: Vec<Job<A>>) -> Vec<Job<A>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut state, version, snapshot_unusable, trusted_cache) =
                match self.load_state(stream, attempt == 1).await {
                    Ok(loaded) => loaded,
                    Err(_) => return self.run_each(stream, jobs).await,
                };
            let mut emitted: Vec<A::Event> = Vec::new();
            let mut new_events = Vec::new();
            let mut decided: Vec<Result<std::ops::Range<usize>, CommandError<A::Error>>> =
                Vec::with_capacity(jobs.len());
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
                    Ok(()) => match self.encode(stream, &events, &job.metadata) {
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
            let event_ids: Vec<Uuid> = new_events.iter().map(|e| e.event_id).collect();
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
                        snapshot_unusable,
                    )
                    .await
                {
                    Ok(outcome) => Some(outcome),
                    Err(StoreError::Conflict(conflict)) => {
                        if let Err(err) =
                            self.after_conflict(conflict, attempt, trusted_cache).await
                        {
                            let CommandError::Conflict { conflict, attempts } = err else {
                                return self.run_each(stream, jobs).await;
                            };
                            let mut jobs = jobs;
                            let leftover = jobs.split_off(decided.len());
                            for job in jobs {
                                let _ = job.reply.send(Err(CommandError::Conflict {
                                    conflict: conflict.clone(),
                                    attempts,
                                }));
                            }
                            return leftover;
                        }
                        continue;
                    }
                    Err(StoreError::InlineProjection { .. }) => {
                        // Certainly not stored (the store rolled the append back): let each
                        // command meet its own fate, so one command an inline projection
                        // refuses does not fail the others.
                        if let Some(cache) = &self.cache {
                            let _ = cache.take(stream);
                        }
                        return self.run_each(stream, jobs).await;
                    }
                    Err(err) => return self.fail_batch(stream, jobs, decided.len(), err),
                }
            };
            let new_version = version + emitted.len() as u64;
            if clean {
                self.cache_put(stream, new_version, state);
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
                            let at = version + 1 + i as u64;
                            let position = *outcome.positions.get(i)?;
                            Some(envelope::<A>(
                                stream,
                                event,
                                event_ids[i],
                                at,
                                position,
                                outcome,
                                &job.metadata,
                            ))
                        })
                        .collect();
                    CommandOutcome {
                        stream_id: stream.clone(),
                        version: version + range.end as u64,
                        events: envelopes,
                        attempts: attempt,
                    }
                });
                let _ = job.reply.send(reply);
            }
            return leftover;
        }
    }

    /// The batch's append failed for a reason other than a conflict: it may or may not have been
    /// stored (a connection lost after commit, say), so nothing is decided again with new event
    /// ids, which could store a command twice. Every decided job gets the error (the first the
    /// original, the others its message): even a rejection was decided on a state that included
    /// its predecessors' events. Jobs not decided go back to the queue.
    fn fail_batch(
        &self,
        stream: &StreamId,
        mut jobs: Vec<Job<A>>,
        decided: usize,
        err: StoreError,
    ) -> Vec<Job<A>> {
        if let Some(cache) = &self.cache {
            let _ = cache.take(stream);
        }
        let leftover = jobs.split_off(decided);
        let message = err.to_string();
        let mut original = Some(err);
        for job in jobs {
            let err = original.take().unwrap_or_else(|| {
                StoreError::backend(BatchAppendFailed {
                    stream: stream.to_string(),
                    reason: message.clone(),
                })
            });
            let _ = job.reply.send(Err(CommandError::Store(err)));
        }
        leftover
    }

    /// Runs each job on its own (after a batch failed with nothing appended).
    async fn run_each(&self, stream: &StreamId, jobs: Vec<Job<A>>) -> Vec<Job<A>> {
        for job in jobs {
            let result = self.run_single(stream, &job.command, &job.metadata).await;
            let _ = job.reply.send(result);
        }
        Vec::new()
    }

    /// Builds the snapshot to store with this append, if the policy asks for one.
    fn snapshot_of(
        &self,
        stream: &StreamId,
        state: &A,
        from: u64,
        to: u64,
        stored_snapshot_unusable: bool,
    ) -> Option<Snapshot> {
        if !self.snapshots.is_due(from, to, stored_snapshot_unusable) {
            return None;
        }
        match state.to_snapshot() {
            Ok(value) => Some(Snapshot {
                stream_id: stream.clone(),
                aggregate_type: A::TYPE.to_owned(),
                version: to,
                schema_version: A::SNAPSHOT_VERSION,
                state: value,
                taken_at: Utc::now(),
            }),
            Err(err) => {
                tracing::warn!(stream = %stream, error = %err, "cannot serialize snapshot; appending without one");
                None
            }
        }
    }

    fn cache_put(&self, stream: &StreamId, version: u64, state: A) {
        if let Some(cache) = &self.cache {
            cache.put(stream, version, state);
        }
    }

    /// State, version, whether a stored snapshot had to be ignored, and whether the state is a
    /// cached one used without reading the store.
    async fn load_state(
        &self,
        stream: &StreamId,
        use_cache: bool,
    ) -> Result<(A, u64, bool, bool), CommandError<A::Error>> {
        let cached = match (&self.cache, use_cache) {
            (Some(cache), true) => cache.take(stream),
            _ => None,
        };
        let (mut state, mut version, unusable) = match cached {
            Some((version, state)) if self.cache_policy == CachePolicy::Trust => {
                return Ok((state, version, false, true));
            }
            Some((version, state)) => (state, version, false),
            None => self.load_snapshot(stream).await?,
        };
        for recorded in self.store.read_stream(stream, version + 1).await? {
            if recorded.aggregate_type != A::TYPE {
                return Err(CommandError::WrongAggregateType {
                    stream: stream.clone(),
                    expected: A::TYPE,
                    found: recorded.aggregate_type.into_owned(),
                    version: recorded.stream_version,
                });
            }
            let event = match recorded.decode::<A::Event>() {
                Ok(event) => event,
                Err(err)
                    if self.skip_unknown_types
                        && matches!(err.kind, crate::DecodeErrorKind::UnknownType) =>
                {
                    tracing::debug!(stream = %stream, version = recorded.stream_version, event_type = %recorded.event_type, "skipping an event type this code does not know");
                    version = recorded.stream_version;
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            state.apply(&event);
            version = recorded.stream_version;
        }
        Ok((state, version, unusable, false))
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<(A, u64, bool), StoreError> {
        let Some(snapshot) = self.store.load_snapshot(stream).await? else {
            return Ok((A::default(), 0, false));
        };
        if snapshot.aggregate_type != A::TYPE || snapshot.schema_version != A::SNAPSHOT_VERSION {
            tracing::info!(
                stream = %stream,
                stored = snapshot.schema_version,
                current = A::SNAPSHOT_VERSION,
                "ignoring snapshot of another aggregate version; rebuilding from events"
            );
            return Ok((A::default(), 0, true));
        }
        match A::from_snapshot(&snapshot.state) {
            Ok(state) => Ok((state, snapshot.version, false)),
            Err(err) => {
                tracing::warn!(stream = %stream, version = snapshot.version, error = %err, "unreadable snapshot ignored; rebuilding from events");
                Ok((A::default(), 0, true))
            }
        }
    }
}

/// The ids and metadata a command gives its events.
fn metadata_for<C: Command>(command: &C, context: CommandContext) -> EventMetadata {
    let command_id = context
        .command_id
        .or_else(|| command.command_id())
        .unwrap_or_else(Uuid::now_v7);
    let mut extra = command.metadata();
    extra.extend(context.metadata);
    EventMetadata {
        correlation_id: Some(context.correlation_id.unwrap_or(command_id)),
        causation_id: Some(context.causation_id.unwrap_or(command_id)),
        extra,
    }
}

/// The envelope of an event just stored.
fn envelope<A: Aggregate>(
    stream: &StreamId,
    event: A::Event,
    event_id: Uuid,
    stream_version: u64,
    global_position: u64,
    outcome: &crate::AppendOutcome,
    metadata: &EventMetadata,
) -> EventEnvelope<A::Event> {
    EventEnvelope {
        event_id,
        stream_id: stream.clone(),
        aggregate_type: Cow::Borrowed(A::TYPE),
        stream_version,
        global_position,
        recorded_at: outcome.recorded_at,
        event_type: Cow::Borrowed(crate::Event::event_type(&event)),
        schema_version: crate::Event::schema_version(&event),
        payload: event,
        metadata: metadata.clone(),
    }
}

/// A batched append failed for a reason other than a conflict; whether it was stored is unknown.
#[derive(Debug, thiserror::Error)]
#[error(
    "the batched append to stream `{stream}` that held this command failed and may or may not have been stored (check the stream before retrying): {reason}"
)]
struct BatchAppendFailed {
    stream: String,
    reason: String,
}

/// The task running a stream's queued commands stopped (a handler panicked) before this
/// command's turn.
#[derive(Debug, thiserror::Error)]
#[error(
    "the task running queued commands for stream `{stream}` stopped before this command ran (did a handler panic?)"
)]
struct RunnerStopped {
    stream: String,
}
