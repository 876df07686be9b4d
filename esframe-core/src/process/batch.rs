//! Deciding a batch of inputs: instances loaded in the transaction, events folded and reacted
//! to, commands decided on staged aggregate states, and everything gathered into one
//! [`ProcessWrite`].

use std::collections::{BTreeMap, HashMap, VecDeque};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{CommandContext, Position, RecordedEvent, StreamId, projection::ProjectedEvent};

use super::{
    Effects, FiredTimer, Input, InstanceRecord, InstanceStatus, ProcessManager, ProcessStore,
    ProcessTx, ProcessWrite, Route, TimerChange, TimerRecord,
    dispatch::{Decided, Handlers, Staged},
    ids,
};

/// How many rounds of refusals one input may go through (a refusal's compensation refused,
/// and so on) before the instance is failed as looping.
const MAX_REFUSAL_ROUNDS: usize = 16;

/// One input of a batch.
pub(crate) enum Pending<'a, E> {
    /// An event from the log, with its routing rule.
    Event {
        event: ProjectedEvent<'a, E>,
        route: Route,
    },
    /// A timer that came due.
    Timer(TimerRecord),
}

impl<E> Pending<'_, E> {
    /// The instance the input goes to, if any.
    pub(crate) fn instance(&self) -> Option<&str> {
        match self {
            Pending::Event { route, .. } => route.instance(),
            Pending::Timer(t) => Some(&t.instance),
        }
    }
}

/// Why a batch could not be decided.
#[derive(Debug)]
pub(crate) enum BatchError {
    /// One instance failed (its react, its state, a command failing for a reason other than a
    /// refusal): retry, then quarantine it; the others are not to blame.
    Instance { id: String, error: String },
    /// The store failed in a way that may pass: retry the whole batch.
    Transient(String),
    /// The store refused the batch's write and will again; which instance's writes it refuses
    /// is not known yet.
    Refused(String),
    /// The checkpoint's commit was refused by the lease's fence: another runner holds the
    /// lease now; nothing was kept.
    Fenced(String),
}

/// What deciding a batch produced.
#[derive(Debug, Default)]
pub(crate) struct Decision {
    pub(crate) write: ProcessWrite,
    pub(crate) counts: Counts,
}

/// What a batch did, for the runner's status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Events handled by an instance.
    pub events: u64,
    /// Instances started.
    pub started: u64,
    /// Instances completed.
    pub completed: u64,
    /// Instances quarantined.
    pub quarantined: u64,
    /// Commands decided (accepted or refused).
    pub commands: u64,
    /// Commands refused by their aggregate.
    pub refused: u64,
    /// Timers fired.
    pub timers_fired: u64,
    /// Events routed to an ended instance: counted no-ops.
    pub ignored: u64,
    /// Events routed to an instance that does not exist, by a rule that may not start one.
    pub unrouted: u64,
    /// Events held for a quarantined instance.
    pub held: u64,
    /// Messages published.
    pub published: u64,
}

/// What a batch's commands and messages will store, by stream, with the instance that last
/// added to each (blamed if the store refuses it).
#[derive(Default)]
struct Staging {
    aggregates: HashMap<StreamId, (Staged, String)>,
    messages: HashMap<StreamId, (Vec<crate::NewEvent>, String)>,
}

impl Counts {
    pub(crate) fn add(&mut self, other: &Counts) {
        self.events += other.events;
        self.started += other.started;
        self.completed += other.completed;
        self.quarantined += other.quarantined;
        self.commands += other.commands;
        self.refused += other.refused;
        self.timers_fired += other.timers_fired;
        self.ignored += other.ignored;
        self.unrouted += other.unrouted;
        self.held += other.held;
        self.published += other.published;
    }
}

/// An instance being worked on in a batch.
struct Working<S> {
    record: InstanceRecord,
    state: S,
    previous: Option<u64>,
    dirty: bool,
    /// Final timer changes: `Some` scheduled, `None` cancelled.
    timers: BTreeMap<String, Option<TimerRecord>>,
    cancel_all: bool,
}

/// The context a batch is decided in.
pub(crate) struct BatchContext<'a, P, S> {
    pub(crate) process: &'a P,
    pub(crate) store: &'a S,
    pub(crate) handlers: &'a Handlers,
    pub(crate) now: DateTime<Utc>,
    /// Instances to quarantine at their next input instead of handling it, with the error.
    pub(crate) quarantine: &'a HashMap<String, String>,
    /// An instance to bring back from quarantine first (an operator's retry).
    pub(crate) reactivate: Option<&'a str>,
    /// Decide only this instance's inputs (finding the one whose writes the store refuses).
    pub(crate) only: Option<&'a str>,
}

impl<P: ProcessManager, S: ProcessStore> BatchContext<'_, P, S> {
    /// Decides `pending`, in order, reading instances in `tx`.
    pub(crate) async fn decide(
        &self,
        tx: &mut ProcessTx<S>,
        pending: &[Pending<'_, P::Events>],
    ) -> Result<Decision, BatchError> {
        let mut ids: Vec<String> = pending
            .iter()
            .filter_map(|p| p.instance().map(str::to_owned))
            .filter(|id| self.only.is_none_or(|only| only == id))
            .collect();
        // An instance brought back from quarantine is loaded even with nothing held (one
        // quarantined by a failing timer holds no events).
        ids.extend(self.reactivate.map(str::to_owned));
        ids.sort_unstable();
        ids.dedup();
        let records = self
            .store
            .load_instances(tx, P::NAME, &ids)
            .await
            .map_err(|e| BatchError::Transient(e.to_string()))?;
        let mut working: HashMap<String, Working<P::State>> = HashMap::new();
        for record in records {
            let id = record.id.clone();
            let state = self.state_of(&record).await?;
            let previous = Some(record.version);
            working.insert(
                id,
                Working {
                    record,
                    state,
                    previous,
                    dirty: false,
                    timers: BTreeMap::new(),
                    cancel_all: false,
                },
            );
        }
        if let Some(id) = self.reactivate
            && let Some(w) = working.get_mut(id)
        {
            w.record.status = InstanceStatus::Active;
            w.record.error = None;
            w.record.attempts = 0;
            w.record.held.clear();
            w.dirty = true;
        }

        let mut decision = Decision::default();
        decision.write.process = P::NAME.to_owned();
        let mut staging = Staging::default();
        for input in pending {
            if let Some(only) = self.only
                && input.instance() != Some(only)
            {
                continue;
            }
            match input {
                Pending::Event { event, route } => {
                    self.event(event, route, &mut working, &mut staging, &mut decision)
                        .await?
                }
                Pending::Timer(timer) => {
                    self.timer(timer, &mut working, &mut staging, &mut decision)
                        .await?
                }
            }
        }
        for (stream, (events, owner)) in staging.messages {
            let batch = crate::AppendBatch::new(&stream, crate::ExpectedVersion::Any, events)
                .map_err(|err| BatchError::Instance {
                    id: owner,
                    error: format!("its published messages were refused: {err}"),
                })?;
            decision.write.appends.push(batch);
        }

        for (stream, (staged, owner)) in staging.aggregates {
            match staged.into_append(&stream) {
                Ok(Some(batch)) => decision.write.appends.push(batch),
                Ok(None) => {}
                Err(err) => {
                    return Err(BatchError::Instance {
                        id: owner,
                        error: format!(
                            "the events of its commands to `{stream}` were refused: {err}"
                        ),
                    });
                }
            }
        }
        decision
            .write
            .appends
            .sort_by(|a, b| a.stream().cmp(b.stream()));
        for (id, w) in working {
            for (name, change) in w.timers {
                match change {
                    Some(timer) => decision.write.schedule.push(timer),
                    None => decision.write.cancel.push((id.clone(), name)),
                }
            }
            if w.cancel_all {
                decision.write.cancel_all.push(id.clone());
            }
            if !w.dirty {
                continue;
            }
            let mut record = w.record;
            record.state = serde_json::to_value(&w.state).map_err(|e| BatchError::Instance {
                id: id.clone(),
                error: format!("its state cannot be serialized: {e}"),
            })?;
            record.state_version = P::STATE_VERSION;
            record.version = w.previous.map_or(1, |v| v + 1);
            record.updated_at = self.now;
            decision.write.instances.push((record, w.previous));
        }
        Ok(decision)
    }

    /// The state of a stored instance: deserialized, or rebuilt from its events if it was
    /// stored by another [`ProcessManager::STATE_VERSION`].
    pub(crate) async fn state_of(&self, record: &InstanceRecord) -> Result<P::State, BatchError> {
        let fail = |error: String| BatchError::Instance {
            id: record.id.clone(),
            error,
        };
        if record.state_version == P::STATE_VERSION {
            return serde_json::from_value(record.state.clone()).map_err(|e| {
                fail(format!(
                    "its stored state (version {}) cannot be read: {e}",
                    record.state_version
                ))
            });
        }
        tracing::info!(
            process = P::NAME,
            instance = %record.id,
            stored = record.state_version,
            current = P::STATE_VERSION,
            "rebuilding an instance's state from its events"
        );
        let mut state = P::State::default();
        for &position in &record.events {
            let events = read_at(self.store.log(), position)
                .await
                .map_err(BatchError::Transient)?;
            for stored in &events {
                let decoded = <P::Events as crate::projection::ProjectionEvents>::decode(stored)
                    .map_err(|e| fail(format!("rebuilding its state: {e}")))?;
                if let Some(event) = decoded {
                    let projected = ProjectedEvent {
                        event,
                        envelope: stored,
                    };
                    self.process.evolve(&mut state, &projected);
                }
            }
        }
        Ok(state)
    }

    async fn event(
        &self,
        event: &ProjectedEvent<'_, P::Events>,
        route: &Route,
        working: &mut HashMap<String, Working<P::State>>,
        staging: &mut Staging,
        decision: &mut Decision,
    ) -> Result<(), BatchError> {
        let Some(id) = route.instance() else {
            return Ok(());
        };
        let position = event.global_position();
        if !working.contains_key(id) {
            if matches!(route, Route::Continue(_)) {
                decision.counts.unrouted += 1;
                return Ok(());
            }
            let correlation_id = event
                .metadata()
                .correlation_id
                .unwrap_or_else(|| event.event_id());
            working.insert(
                id.to_owned(),
                Working {
                    record: new_record(P::NAME, id, correlation_id, self.now),
                    state: P::State::default(),
                    previous: None,
                    dirty: true,
                    timers: BTreeMap::new(),
                    cancel_all: false,
                },
            );
            decision.counts.started += 1;
        }
        let w = working.get_mut(id).expect("inserted above");
        if position <= w.record.last_position {
            return Ok(()); // handled before: a repeat after an at-least-once restart
        }
        if w.record.status.is_ended() {
            w.record.ignored += 1;
            w.dirty = true;
            decision.counts.ignored += 1;
            return Ok(());
        }
        if w.record.status == InstanceStatus::Quarantined {
            if !w.record.held.contains(&position) {
                w.record.held.push(position);
                w.dirty = true;
                decision.counts.held += 1;
            }
            return Ok(());
        }
        if let Some(error) = self.quarantine.get(id) {
            quarantine(w, error, Some(position));
            decision.counts.quarantined += 1;
            return Ok(());
        }
        self.process.evolve(&mut w.state, event);
        w.record.events.push(position);
        w.record.last_position = position;
        w.dirty = true;
        decision.counts.events += 1;
        let mut effects = Effects::new(self.now);
        self.process
            .react(&w.state, Input::Event(event), &mut effects)
            .map_err(|e| BatchError::Instance {
                id: id.to_owned(),
                error: format!("react failed on event {}: {e}", describe(event.envelope)),
            })?;
        self.effects(w, effects, event.event_id(), None, staging, decision)
            .await
    }

    async fn timer(
        &self,
        timer: &TimerRecord,
        working: &mut HashMap<String, Working<P::State>>,
        staging: &mut Staging,
        decision: &mut Decision,
    ) -> Result<(), BatchError> {
        let Some(w) = working.get_mut(&timer.instance) else {
            return Ok(()); // its instance is gone: the timer is left to the store
        };
        if w.record.status != InstanceStatus::Active {
            return Ok(());
        }
        if let Some(error) = self.quarantine.get(&timer.instance) {
            quarantine(w, error, None);
            decision.counts.quarantined += 1;
            return Ok(());
        }
        let fail = |error: String| BatchError::Instance {
            id: timer.instance.clone(),
            error,
        };
        let payload: P::Timer = serde_json::from_value(timer.payload.clone())
            .map_err(|e| fail(format!("its timer `{}` cannot be read: {e}", timer.name)))?;
        let fired = FiredTimer {
            instance: timer.instance.clone(),
            name: timer.name.clone(),
            due: timer.due,
            timer: payload,
            id: timer.id,
        };
        decision.write.fired.push(timer.clone());
        decision.counts.timers_fired += 1;
        w.dirty = true;
        let mut effects = Effects::new(self.now);
        self.process
            .react(&w.state, Input::Timer(&fired), &mut effects)
            .map_err(|e| fail(format!("react failed on timer `{}`: {e}", timer.name)))?;
        self.effects(w, effects, timer.id, Some(&timer.name), staging, decision)
            .await
    }

    /// Carries out `effects` of instance `w`, decided on input `input_id` (the source of the
    /// commands' ids, and their causation; `timer` names the timer it is, if one): decides its
    /// commands, feeds refusals back to `react`, and records messages, timer changes and
    /// completion. Commands decided after a refusal keep the original input as causation.
    async fn effects(
        &self,
        w: &mut Working<P::State>,
        effects: Effects<P>,
        input_id: Uuid,
        timer: Option<&str>,
        staging: &mut Staging,
        decision: &mut Decision,
    ) -> Result<(), BatchError> {
        let id = w.record.id.clone();
        let fail = |error: String| BatchError::Instance {
            id: id.clone(),
            error,
        };
        let causation = input_id;
        let mut queue = VecDeque::from([(effects, input_id)]);
        let mut rounds = 0;
        while let Some((effects, input_id)) = queue.pop_front() {
            for (index, sent) in effects.commands.into_iter().enumerate() {
                let command_id = ids::command_id(P::NAME, &id, input_id, index);
                let mut context = CommandContext::new()
                    .command_id(command_id)
                    .correlation_id(w.record.correlation_id)
                    .causation_id(causation)
                    .metadata("process", P::NAME)
                    .metadata("process_instance", id.as_str());
                if let Some(timer) = timer {
                    context = context.metadata("process_timer", timer);
                }
                let handler = self.handlers.get(sent.aggregate_type).ok_or_else(|| {
                    fail(format!(
                        "it sent {sent:?}, but the runner has no command handler for aggregate type `{}` (it has: {:?}); add one with `ProcessRunnerBuilder::handler`",
                        sent.aggregate_type,
                        self.handlers.types()
                    ))
                })?;
                let stream = StreamId::new(sent.aggregate_type, &sent.aggregate_id)
                    .map_err(|e| fail(format!("it sent {sent:?}: {e}")))?;
                if !staging.aggregates.contains_key(&stream) {
                    let staged = handler
                        .load(&sent.aggregate_id)
                        .await
                        .map_err(|f| command_failure(&id, &sent, f))?;
                    staging
                        .aggregates
                        .insert(stream.clone(), (staged, id.clone()));
                }
                let (staged, owner) = staging.aggregates.get_mut(&stream).expect("inserted above");
                decision.counts.commands += 1;
                match handler
                    .decide(staged, &sent, command_id, context)
                    .await
                    .map_err(|f| command_failure(&id, &sent, f))?
                {
                    Decided::Accepted => *owner = id.clone(),
                    Decided::Refused(refusal) => {
                        decision.counts.refused += 1;
                        rounds += 1;
                        if rounds > MAX_REFUSAL_ROUNDS {
                            return Err(fail(format!(
                                "more than {MAX_REFUSAL_ROUNDS} refusals in a row for one input (last: {refusal:?})"
                            )));
                        }
                        let mut more = Effects::new(self.now);
                        self.process
                            .react(&w.state, Input::Refused(&refusal), &mut more)
                            .map_err(|e| fail(format!("react failed on {refusal:?}: {e}")))?;
                        queue.push_back((more, refusal.command_id));
                    }
                }
            }
            if !effects.messages.is_empty() {
                let stream = StreamId::new(P::NAME, &id)
                    .map_err(|e| fail(format!("its own stream cannot hold messages: {e}")))?;
                let metadata = crate::EventMetadata {
                    correlation_id: Some(w.record.correlation_id),
                    causation_id: Some(causation),
                    extra: Default::default(),
                };
                let (events, owner) = staging
                    .messages
                    .entry(stream)
                    .or_insert_with(|| (Vec::new(), id.clone()));
                *owner = id.clone();
                for (index, message) in effects.messages.into_iter().enumerate() {
                    let payload = message.payload.map_err(|e| {
                        fail(format!(
                            "message `{}` cannot be serialized: {e}",
                            message.event_type
                        ))
                    })?;
                    events.push(crate::NewEvent {
                        event_id: ids::message_id(P::NAME, &id, input_id, index),
                        event_type: std::borrow::Cow::Borrowed(message.event_type),
                        schema_version: message.schema_version,
                        payload,
                        metadata: metadata.clone(),
                    });
                    decision.counts.published += 1;
                }
            }
            for change in effects.timers {
                match change {
                    TimerChange::Schedule { name, due, payload } => {
                        let payload = payload.map_err(|e| {
                            fail(format!("timer `{name}` cannot be serialized: {e}"))
                        })?;
                        let timer_id = ids::timer_id(P::NAME, &id, input_id, &name);
                        w.timers.insert(
                            name.clone(),
                            Some(TimerRecord {
                                process: P::NAME.to_owned(),
                                instance: id.clone(),
                                name,
                                due,
                                payload,
                                id: timer_id,
                            }),
                        );
                    }
                    TimerChange::Cancel { name } => {
                        w.timers.insert(name, None);
                    }
                }
            }
            if effects.complete && w.record.status == InstanceStatus::Active {
                w.record.status = InstanceStatus::Completed;
                w.timers.clear();
                w.cancel_all = true;
                decision.counts.completed += 1;
            }
        }
        Ok(())
    }
}

fn command_failure(
    id: &str,
    sent: &super::SentCommand,
    failure: super::dispatch::CommandFailure,
) -> BatchError {
    if failure.transient {
        BatchError::Transient(format!("command {sent:?}: {}", failure.message))
    } else {
        BatchError::Instance {
            id: id.to_owned(),
            error: format!("its command {sent:?} failed: {}", failure.message),
        }
    }
}

fn quarantine<S>(w: &mut Working<S>, error: &str, held: Option<Position>) {
    w.record.status = InstanceStatus::Quarantined;
    w.record.error = Some(error.to_owned());
    if let Some(position) = held
        && !w.record.held.contains(&position)
    {
        w.record.held.push(position);
    }
    w.dirty = true;
}

fn new_record(process: &str, id: &str, correlation_id: Uuid, now: DateTime<Utc>) -> InstanceRecord {
    InstanceRecord {
        process: process.to_owned(),
        id: id.to_owned(),
        status: InstanceStatus::Active,
        state: serde_json::Value::Null,
        state_version: 0,
        version: 0,
        correlation_id,
        events: Vec::new(),
        last_position: Position::START,
        held: Vec::new(),
        error: None,
        attempts: 0,
        ignored: 0,
        updated_at: now,
    }
}

/// `stream@version (type)`, for messages.
pub(crate) fn describe(event: &RecordedEvent) -> String {
    format!(
        "{}@{} ({})",
        event.stream_id, event.stream_version, event.event_type
    )
}

/// The stored events at `position` (all parts of a split event), upcast.
pub(crate) async fn read_at<L: crate::GlobalLog>(
    log: &L,
    position: Position,
) -> Result<Vec<RecordedEvent>, String> {
    let batch = log
        .read_all_batch(position.before(), 1)
        .await
        .map_err(|e| e.to_string())?;
    let events: Vec<_> = batch
        .events
        .into_iter()
        .filter(|e| e.global_position == position)
        .collect();
    if events.is_empty() {
        return Err(format!("no readable event at global position {position}"));
    }
    Ok(events)
}
