//! Command handling: load, decide, append with optimistic concurrency, retry, snapshot.

mod context;
mod group_commit;
mod load;
mod time_travel;

use std::{borrow::Cow, future::Future, pin::Pin, sync::Arc};

use chrono::Utc;
use tracing::Instrument;
use uuid::Uuid;

pub use context::{CommandContext, derived_event_id};

use crate::{
    Aggregate, AppendOutcome, CachePolicy, Command, CommandError, ConcurrencyMode, Conflict,
    Decision, EventEnvelope, EventMetadata, EventStore, ExpectedVersion, LoadedStream, NewEvent,
    Position, RetryPolicy, Snapshot, SnapshotPolicy, SnapshotStore, StoreError, StreamId,
    cache::StateCache,
};

use context::Provenance;
use group_commit::StreamQueues;
use load::{CURRENT, LoadedState};

/// Default number of aggregate states the handler keeps in memory.
pub const DEFAULT_STATE_CACHE_CAPACITY: usize = 10_000;

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
    /// `true` when the command carries an id and was already handled with the same events:
    /// nothing was stored this time, and `events` carry the stored events' ids, versions and
    /// positions (their type, schema version and payload are the stored ones, by the
    /// idempotency rule; their metadata and time are this call's).
    pub deduplicated: bool,
}

/// An aggregate's state rebuilt from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<A> {
    /// The state.
    pub state: A,
    /// The stream version it includes (0: no events).
    pub version: u64,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The snapshot operations of a store that keeps snapshots, chosen when the handler is given a
/// [`SnapshotPolicy`] (which needs `S: SnapshotStore`). They run once per cold load or per
/// snapshot taken, so boxing their futures costs nothing measurable.
struct SnapshotOps<S> {
    policy: SnapshotPolicy,
    load: for<'a> fn(&'a S, &'a StreamId) -> BoxFuture<'a, LoadedStream>,
    delete: for<'a> fn(&'a S, &'a StreamId, u64) -> BoxFuture<'a, bool>,
    append: for<'a> fn(
        &'a S,
        &'a StreamId,
        ExpectedVersion,
        Vec<NewEvent>,
        Snapshot,
    ) -> BoxFuture<'a, AppendOutcome>,
}

impl<S> Clone for SnapshotOps<S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for SnapshotOps<S> {}

impl<S: SnapshotStore> SnapshotOps<S> {
    fn new(policy: SnapshotPolicy) -> Self {
        Self {
            policy,
            load: load_snapshot::<S>,
            delete: delete_snapshot::<S>,
            append: append_with_snapshot::<S>,
        }
    }
}

fn load_snapshot<'a, S: SnapshotStore>(
    store: &'a S,
    stream: &'a StreamId,
) -> BoxFuture<'a, LoadedStream> {
    Box::pin(store.read_snapshot_and_stream(stream))
}

fn delete_snapshot<'a, S: SnapshotStore>(
    store: &'a S,
    stream: &'a StreamId,
    version: u64,
) -> BoxFuture<'a, bool> {
    Box::pin(store.delete_snapshot(stream, version))
}

fn append_with_snapshot<'a, S: SnapshotStore>(
    store: &'a S,
    stream: &'a StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    snapshot: Snapshot,
) -> BoxFuture<'a, AppendOutcome> {
    Box::pin(store.append_with_snapshot(stream, expected, events, snapshot))
}

/// Handles commands for aggregate `A` against store `S`.
///
/// For each command: load the state (cached state, or latest snapshot, plus the events after it),
/// let [`Aggregate::handle`] decide, append the events expecting the loaded version, and on a
/// [`Conflict`] reload and retry under the [`RetryPolicy`]. Snapshots are taken by the
/// [`SnapshotPolicy`] when one is set (it needs a [`SnapshotStore`]); without one, states are
/// rebuilt from events (and kept in the state cache). Cheap to clone; clones share the cache and
/// the services.
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
    snapshots: Option<SnapshotOps<S>>,
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
            .field("snapshots", &self.snapshots.map(|ops| ops.policy))
            .field("state_cache", &self.cache.is_some())
            .field("cache_policy", &self.cache_policy)
            .field("pessimistic", &self.queues.is_some())
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate, S: EventStore> CommandHandler<A, S>
where
    A::Services: Default,
{
    /// A handler with default services, retry policy and state cache, and no snapshots.
    pub fn new(store: S) -> Self {
        Self::with_services(store, A::Services::default())
    }
}

impl<A: Aggregate, S: SnapshotStore> CommandHandler<A, S> {
    /// Takes snapshots by `policy` and loads aggregates from the latest usable one. Snapshots
    /// of another aggregate type or snapshot version, unreadable ones, and ones the stream
    /// contradicts (a version the stream does not have) are ignored, deleted and replaced with
    /// the next append; so is a missing one on a stream of at least the policy's interval.
    /// Without this call a handler takes no snapshots; [`SnapshotPolicy::Never`] turns them off
    /// again.
    #[must_use]
    pub fn snapshot_policy(mut self, policy: SnapshotPolicy) -> Self {
        self.snapshots = (policy != SnapshotPolicy::Never).then(|| SnapshotOps::new(policy));
        self
    }
}

impl<A: Aggregate, S: EventStore> CommandHandler<A, S> {
    /// A handler whose aggregate calls `services`.
    pub fn with_services(store: S, services: A::Services) -> Self {
        Self {
            store,
            services: Arc::new(services),
            retry: RetryPolicy::default(),
            snapshots: None,
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

    /// Handles `command`; its id, correlation, causation and metadata come from `context` (or
    /// the command). With a command id, the events' ids are derived from it
    /// ([`derived_event_id`]).
    pub async fn execute_with(
        &self,
        command: A::Command,
        context: CommandContext,
    ) -> Result<CommandOutcome<A::Event>, CommandError<A::Error>> {
        let stream = StreamId::new(A::TYPE, command.aggregate_id())?;
        let provenance = Provenance::of(&command, context);
        match &self.queues {
            None => {
                let span =
                    tracing::debug_span!("esframe.command", aggregate = A::TYPE, stream = %stream);
                self.run_single(&stream, &command, &provenance)
                    .instrument(span)
                    .await
            }
            Some(queues) => self.enqueue(queues, stream, command, provenance).await,
        }
    }

    /// Rebuilds the current state of aggregate `aggregate_id` from its snapshot and events.
    pub async fn load(&self, aggregate_id: &str) -> Result<Loaded<A>, CommandError<A::Error>> {
        let stream = StreamId::new(A::TYPE, aggregate_id)?;
        let loaded = self.load_state(&stream, false, false, CURRENT).await?;
        Ok(Loaded {
            state: loaded.state,
            version: loaded.version,
        })
    }

    /// Decides `command` on `state` (at stream `version`) without storing anything: the
    /// aggregate handles it, `state` becomes the state after the emitted events, and the
    /// events come back encoded with the ids and metadata `context` (or the command) gives,
    /// ready to append expecting `version`. Process managers use it to decide several
    /// commands before storing all their events in one transaction.
    ///
    /// A rejection after events were emitted leaves `state` with them applied: load it again.
    pub async fn decide(
        &self,
        state: &mut A,
        version: u64,
        command: &A::Command,
        context: CommandContext,
    ) -> Result<Vec<NewEvent>, CommandError<A::Error>> {
        self.decide_tracked(state, version, command, context)
            .await
            .map(|(_, events)| events)
            .map_err(|(err, _)| err)
    }

    /// [`decide`](Self::decide), also returning the emitted events as values, and with an
    /// error whether `state` was changed before it.
    pub(crate) async fn decide_tracked(
        &self,
        state: &mut A,
        version: u64,
        command: &A::Command,
        context: CommandContext,
    ) -> Result<(Vec<A::Event>, Vec<NewEvent>), (CommandError<A::Error>, bool)> {
        let stream =
            StreamId::new(A::TYPE, command.aggregate_id()).map_err(|e| (e.into(), false))?;
        let provenance = Provenance::of(command, context);
        let mut decision = Decision::new(state, &stream, version);
        let decided = A::handle(&mut decision, command, &self.services).await;
        let emitted = decision.into_emitted();
        if let Err(rejection) = decided {
            return Err((CommandError::Rejected(rejection), !emitted.is_empty()));
        }
        let events = self
            .encode(&stream, &emitted, &provenance)
            .map_err(|e| (e, !emitted.is_empty()))?;
        Ok((emitted, events))
    }

    /// Handles one command on its own: load, decide, append, retry on conflict.
    async fn run_single(
        &self,
        stream: &StreamId,
        command: &A::Command,
        provenance: &Provenance,
    ) -> Result<CommandOutcome<A::Event>, CommandError<A::Error>> {
        // `attempt` counts every decision (reported); `conflicts` only the conflicts with
        // other writers that count against the retry policy. A decision on a stale cached state
        // is neither a conflict nor a rejection: it is taken again on the stored state at once.
        let (mut attempt, mut conflicts, mut use_cache) = (0, 0, true);
        loop {
            attempt += 1;
            let LoadedState {
                mut state,
                version,
                replace_snapshot,
                cached,
            } = self.load_state(stream, use_cache, true, CURRENT).await?;
            use_cache = false;
            let mut decision = Decision::new(&mut state, stream, version);
            let decided = A::handle(&mut decision, command, &self.services).await;
            let emitted = decision.into_emitted();
            if (decided.is_err() || emitted.is_empty())
                && cached
                && !self.cache_confirmed(stream, version).await?
            {
                tracing::debug!(stream = %stream, version, "cached state is stale; deciding again on the stored state");
                continue;
            }
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
                    deduplicated: false,
                });
            }
            let new_events = self.encode(stream, &emitted, provenance)?;
            let event_ids: Vec<Uuid> = new_events.iter().map(|e| e.event_id).collect();
            match self
                .store_events(stream, Some(&state), version, new_events, replace_snapshot)
                .await
            {
                Ok(outcome) => {
                    if outcome.deduplicated {
                        // The state was decided again on top of the stored events: not the
                        // stream's state.
                        self.cache_drop(stream);
                    } else {
                        self.cache_put(stream, outcome.stream_version, state);
                    }
                    let first = first_version(&outcome, emitted.len());
                    let events = emitted
                        .into_iter()
                        .zip(event_ids)
                        .zip(&outcome.positions)
                        .enumerate()
                        .map(|(i, ((event, id), &position))| {
                            envelope::<A>(
                                stream,
                                event,
                                id,
                                first + i as u64,
                                position,
                                &outcome,
                                &provenance.metadata,
                            )
                        })
                        .collect();
                    return Ok(CommandOutcome {
                        stream_id: stream.clone(),
                        version: outcome.stream_version,
                        events,
                        attempts: attempt,
                        deduplicated: outcome.deduplicated,
                    });
                }
                // Decided on a stale cached state: again at once on the stored state.
                Err(StoreError::Conflict(_)) if cached => {}
                Err(StoreError::Conflict(conflict)) => {
                    conflicts += 1;
                    if let Err(conflict) = self.after_conflict(conflict, conflicts).await {
                        return Err(CommandError::Conflict {
                            conflict,
                            attempts: attempt,
                        });
                    }
                }
                Err(other) => return Err(CommandError::Store(other)),
            }
        }
    }

    /// After the `conflicts`-th conflict with another writer: gives up with it once the
    /// attempts are used, else waits before the retry.
    async fn after_conflict(&self, conflict: Conflict, conflicts: u32) -> Result<(), Conflict> {
        if conflicts >= self.retry.max_attempts() {
            return Err(conflict);
        }
        tracing::debug!(%conflict, conflicts, "conflict; retrying");
        tokio::time::sleep(self.retry.jittered_backoff(conflicts)).await;
        Ok(())
    }

    /// Serializes emitted events with their ids (derived from the command's id, or random) and
    /// the command's metadata.
    fn encode(
        &self,
        stream: &StreamId,
        events: &[A::Event],
        provenance: &Provenance,
    ) -> Result<Vec<NewEvent>, CommandError<A::Error>> {
        events
            .iter()
            .enumerate()
            .map(|(index, event)| {
                let payload =
                    crate::Event::to_payload(event).map_err(|source| CommandError::Encode {
                        stream: stream.clone(),
                        event_type: crate::Event::event_type(event),
                        source,
                    })?;
                Ok(NewEvent {
                    event_id: provenance.event_id(index),
                    event_type: Cow::Borrowed(crate::Event::event_type(event)),
                    schema_version: crate::Event::schema_version(event),
                    payload,
                    metadata: provenance.metadata.clone(),
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
        replace_snapshot: bool,
    ) -> Result<AppendOutcome, StoreError> {
        let new_version = version + events.len() as u64;
        let expected = if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        };
        let snapshot = match (&self.snapshots, state) {
            (Some(ops), Some(state))
                if ops.policy.is_due(version, new_version, replace_snapshot) =>
            {
                self.snapshot_of(stream, state, new_version)
                    .map(|s| (ops, s))
            }
            _ => None,
        };
        match snapshot {
            Some((ops, snapshot)) => {
                (ops.append)(&self.store, stream, expected, events, snapshot).await
            }
            None => self.store.append(stream, expected, events).await,
        }
    }

    /// A snapshot of `state` at `version`, or `None` (with a warning) if it cannot be
    /// serialized or breaks the store's limits: the events are stored without it.
    fn snapshot_of(&self, stream: &StreamId, state: &A, version: u64) -> Option<Snapshot> {
        let snapshot = match state.to_snapshot() {
            Ok(value) => Snapshot {
                stream_id: stream.clone(),
                version,
                schema_version: A::SNAPSHOT_VERSION,
                state: value,
                taken_at: Utc::now(),
            },
            Err(err) => {
                tracing::warn!(stream = %stream, error = %err, "cannot serialize snapshot; appending without one");
                return None;
            }
        };
        match snapshot.checked() {
            Ok(snapshot) => Some(snapshot),
            Err(err) => {
                tracing::warn!(stream = %stream, error = %err, "snapshot refused; appending without one");
                None
            }
        }
    }

    fn cache_put(&self, stream: &StreamId, version: u64, state: A) {
        if let Some(cache) = &self.cache {
            cache.put(stream, version, state);
        }
    }

    fn cache_drop(&self, stream: &StreamId) {
        if let Some(cache) = &self.cache {
            let _ = cache.take(stream);
        }
    }
}

/// The stream version of the first of `count` events an append stored (or, deduplicated,
/// had stored).
fn first_version(outcome: &AppendOutcome, count: usize) -> u64 {
    (outcome.stream_version + 1).saturating_sub(count as u64)
}

/// The envelope of an event just stored.
fn envelope<A: Aggregate>(
    stream: &StreamId,
    event: A::Event,
    event_id: Uuid,
    stream_version: u64,
    global_position: Position,
    outcome: &AppendOutcome,
    metadata: &EventMetadata,
) -> EventEnvelope<A::Event> {
    EventEnvelope {
        event_id,
        stream_id: stream.clone(),
        stream_version,
        global_position,
        recorded_at: outcome.recorded_at,
        event_type: Cow::Borrowed(crate::Event::event_type(&event)),
        schema_version: crate::Event::schema_version(&event),
        payload: event,
        metadata: metadata.clone(),
    }
}
