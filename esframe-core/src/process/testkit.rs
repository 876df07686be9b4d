//! [`ProcessTest`]: given/when/then for a process manager, without a store.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use crate::{
    Aggregate, Event, EventMetadata, Payload, Position, RecordedEvent, StreamId,
    projection::{ProjectedEvent, ProjectionEvents},
};

use super::{
    Effects, FiredTimer, Input, Message, ProcessManager, Refusal, Route, SentCommand, TimerChange,
    ids,
};

type Refuser = Arc<dyn Fn(&SentCommand) -> Option<Refusal> + Send + Sync>;

/// Tests a [`ProcessManager`] as given/when/then: given past events, when an event arrives
/// (or time passes and a timer fires), then these commands are sent, these timers scheduled,
/// the instance completed. Nothing is stored; aggregates are not run, except that
/// [`refusing`](Self::refusing) makes one refuse commands, to test compensation.
///
/// The clock is manual and starts at 2030-01-01T00:00:00Z.
pub struct ProcessTest<P: ProcessManager> {
    process: P,
    now: DateTime<Utc>,
    instances: BTreeMap<String, TestInstance<P::State>>,
    /// Scheduled timers: (instance, name) → (due, payload, id).
    timers: BTreeMap<(String, String), (DateTime<Utc>, serde_json::Value, Uuid)>,
    versions: HashMap<StreamId, u64>,
    position: u64,
    refusers: HashMap<&'static str, Refuser>,
}

struct TestInstance<S> {
    state: S,
    correlation_id: Uuid,
    complete: bool,
}

/// What one `when` did.
#[derive(Debug, Default, Clone)]
pub struct Then {
    /// The commands sent, in order (refused ones included).
    pub commands: Vec<SentCommand>,
    /// The messages published ([`Effects::publish`]).
    pub published: Vec<Message>,
    /// The commands refused (by [`ProcessTest::refusing`]).
    pub refused: Vec<SentCommand>,
    /// Timers scheduled: (instance, name, due).
    pub scheduled: Vec<(String, String, DateTime<Utc>)>,
    /// Timers cancelled: (instance, name).
    pub cancelled: Vec<(String, String)>,
    /// Timers that fired: (instance, name).
    pub fired: Vec<(String, String)>,
    /// Instances completed.
    pub completed: Vec<String>,
    /// Instances started.
    pub started: Vec<String>,
    /// Whether the event was a no-op: routed nowhere, to a missing instance, or to a completed
    /// one.
    pub ignored: bool,
    /// A react failure, if any.
    pub error: Option<String>,
}

impl Then {
    /// The commands sent to aggregate `A`, in order.
    pub fn sent<A: Aggregate>(&self) -> Vec<&A::Command> {
        self.commands
            .iter()
            .filter_map(|c| c.command::<A>())
            .collect()
    }

    /// The messages published, by event type.
    pub fn published_types(&self) -> Vec<&'static str> {
        self.published.iter().map(|m| m.event_type).collect()
    }

    /// Whether instance `id` completed.
    pub fn completed(&self, id: &str) -> bool {
        self.completed.iter().any(|c| c == id)
    }

    /// Whether timer `name` was scheduled (by any instance).
    pub fn scheduled(&self, name: &str) -> bool {
        self.scheduled.iter().any(|(_, n, _)| n == name)
    }

    /// Whether timer `name` was cancelled (by any instance).
    pub fn cancelled(&self, name: &str) -> bool {
        self.cancelled.iter().any(|(_, n)| n == name)
    }
}

impl<P: ProcessManager> ProcessTest<P> {
    /// A test of `process` with no instances.
    pub fn new(process: P) -> Self {
        Self {
            process,
            now: Utc
                .with_ymd_and_hms(2030, 1, 1, 0, 0, 0)
                .single()
                .unwrap_or_default(),
            instances: BTreeMap::new(),
            timers: BTreeMap::new(),
            versions: HashMap::new(),
            position: 0,
            refusers: HashMap::new(),
        }
    }

    /// Makes aggregate `A` refuse the commands for which `refuse` returns an error.
    pub fn refusing<A: Aggregate>(
        mut self,
        refuse: impl Fn(&A::Command) -> Option<A::Error> + Send + Sync + 'static,
    ) -> Self {
        self.refusers.insert(
            A::TYPE,
            Arc::new(move |sent: &SentCommand| {
                let command = sent.command::<A>()?;
                let error = refuse(command)?;
                Some(Refusal::new::<A>(sent.clone(), Uuid::nil(), error))
            }),
        );
        self
    }

    /// Given `events` of aggregate `A` instance `id`, handled in order; their effects are
    /// kept (timers stay scheduled) but not reported.
    pub fn given<A: Aggregate>(
        mut self,
        id: &str,
        events: impl IntoIterator<Item = A::Event>,
    ) -> Self {
        for event in events {
            self.when::<A>(id, event);
        }
        self
    }

    /// When event `event` of aggregate `A` instance `id` is stored.
    pub fn when<A: Aggregate>(&mut self, id: &str, event: A::Event) -> Then {
        self.when_event(A::TYPE, id, event)
    }

    /// Given `events` in the stream of `aggregate_type` and `id` (for events whose aggregate
    /// is not at hand, or has no [`Aggregate`] type).
    pub fn given_events<E: Event>(
        mut self,
        aggregate_type: &str,
        id: &str,
        events: impl IntoIterator<Item = E>,
    ) -> Self {
        for event in events {
            self.when_event(aggregate_type, id, event);
        }
        self
    }

    /// When `event` is stored in the stream of `aggregate_type` and `id`.
    pub fn when_event<E: Event>(&mut self, aggregate_type: &str, id: &str, event: E) -> Then {
        let recorded = self.record(aggregate_type, id, &event);
        let mut then = Then::default();
        let decoded = match P::Events::decode(&recorded) {
            Ok(Some(decoded)) if P::Events::interest().matches(&recorded) => decoded,
            Ok(_) => {
                then.ignored = true;
                return then;
            }
            Err(err) => {
                then.error = Some(err.to_string());
                return then;
            }
        };
        let projected = ProjectedEvent {
            event: decoded,
            envelope: &recorded,
        };
        let route = self.process.route(&projected);
        let Some(instance) = route.instance().map(str::to_owned) else {
            then.ignored = true;
            return then;
        };
        if !self.instances.contains_key(&instance) {
            if matches!(route, Route::Continue(_)) {
                then.ignored = true;
                return then;
            }
            self.instances.insert(
                instance.clone(),
                TestInstance {
                    state: P::State::default(),
                    correlation_id: recorded
                        .metadata
                        .correlation_id
                        .unwrap_or(recorded.event_id),
                    complete: false,
                },
            );
            then.started.push(instance.clone());
        }
        let process = &self.process;
        let inst = self.instances.get_mut(&instance).expect("inserted above");
        if inst.complete {
            then.ignored = true;
            return then;
        }
        process.evolve(&mut inst.state, &projected);
        let mut effects = Effects::new(self.now);
        if let Err(err) = process.react(&inst.state, Input::Event(&projected), &mut effects) {
            then.error = Some(err.to_string());
            return then;
        }
        self.carry_out(&instance, effects, recorded.event_id, &mut then);
        then
    }

    /// Moves the clock by `by` and fires every timer due, earliest first.
    pub fn advance_clock(&mut self, by: Duration) -> Then {
        self.now += chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        let mut then = Then::default();
        loop {
            let due = self
                .timers
                .iter()
                .filter(|(_, (due, _, _))| *due <= self.now)
                .min_by_key(|(_, (due, _, _))| *due)
                .map(|(key, value)| (key.clone(), value.clone()));
            let Some(((instance, name), (due, payload, id))) = due else {
                return then;
            };
            self.timers.remove(&(instance.clone(), name.clone()));
            let timer: P::Timer = match serde_json::from_value(payload) {
                Ok(timer) => timer,
                Err(err) => {
                    then.error = Some(format!("timer `{name}` cannot be read: {err}"));
                    return then;
                }
            };
            then.fired.push((instance.clone(), name.clone()));
            let fired = FiredTimer {
                instance: instance.clone(),
                name,
                due,
                timer,
                id,
            };
            let Some(inst) = self.instances.get(&instance) else {
                continue;
            };
            let mut effects = Effects::new(self.now);
            if let Err(err) = self
                .process
                .react(&inst.state, Input::Timer(&fired), &mut effects)
            {
                then.error = Some(err.to_string());
                return then;
            }
            self.carry_out(&instance, effects, id, &mut then);
        }
    }

    /// The state of instance `id`.
    pub fn state(&self, id: &str) -> Option<&P::State> {
        self.instances.get(id).map(|i| &i.state)
    }

    /// Whether instance `id` has completed.
    pub fn is_complete(&self, id: &str) -> bool {
        self.instances.get(id).is_some_and(|i| i.complete)
    }

    /// The timers scheduled now: (instance, name, due).
    pub fn timers(&self) -> Vec<(String, String, DateTime<Utc>)> {
        self.timers
            .iter()
            .map(|((i, n), (due, _, _))| (i.clone(), n.clone(), *due))
            .collect()
    }

    /// The clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    fn carry_out(&mut self, instance: &str, effects: Effects<P>, input: Uuid, then: &mut Then) {
        let mut queue = vec![(effects, input)];
        while let Some((effects, input)) = queue.pop() {
            for sent in effects.commands {
                then.commands.push(sent.clone());
                let refusal = self
                    .refusers
                    .get(sent.aggregate_type)
                    .and_then(|refuse| refuse(&sent));
                if let Some(mut refusal) = refusal {
                    refusal.command_id =
                        ids::command_id(P::NAME, instance, input, then.commands.len());
                    then.refused.push(sent.clone());
                    let mut more = Effects::new(self.now);
                    let Some(inst) = self.instances.get(instance) else {
                        continue;
                    };
                    if let Err(err) =
                        self.process
                            .react(&inst.state, Input::Refused(&refusal), &mut more)
                    {
                        then.error = Some(err.to_string());
                        return;
                    }
                    queue.push((more, refusal.command_id));
                }
            }
            then.published.extend(effects.messages);
            for change in effects.timers {
                match change {
                    TimerChange::Schedule { name, due, payload } => {
                        let payload = match payload {
                            Ok(payload) => payload,
                            Err(err) => {
                                then.error = Some(err);
                                return;
                            }
                        };
                        let id = ids::timer_id(P::NAME, instance, input, &name);
                        then.scheduled
                            .push((instance.to_owned(), name.clone(), due));
                        self.timers
                            .insert((instance.to_owned(), name), (due, payload, id));
                    }
                    TimerChange::Cancel { name } => {
                        then.cancelled.push((instance.to_owned(), name.clone()));
                        self.timers.remove(&(instance.to_owned(), name));
                    }
                }
            }
            if effects.complete
                && let Some(inst) = self.instances.get_mut(instance)
                && !inst.complete
            {
                inst.complete = true;
                then.completed.push(instance.to_owned());
                self.timers.retain(|(i, _), _| i != instance);
            }
        }
    }

    fn record<E: Event>(&mut self, aggregate_type: &str, id: &str, event: &E) -> RecordedEvent {
        let stream = StreamId::new(aggregate_type, id)
            .unwrap_or_else(|e| panic!("invalid stream id in a test: {e}"));
        let version = self.versions.entry(stream.clone()).or_default();
        *version += 1;
        self.position += 1;
        let correlation = self
            .instances
            .values()
            .next()
            .map(|i| i.correlation_id)
            .unwrap_or_else(Uuid::now_v7);
        let payload = event
            .to_payload()
            .unwrap_or_else(|e| panic!("event cannot be serialized in a test: {e}"));
        RecordedEvent {
            event_id: Uuid::now_v7(),
            stream_id: stream,
            stream_version: *version,
            global_position: Position::new(self.position),
            recorded_at: self.now,
            event_type: Cow::Borrowed(event.event_type()),
            schema_version: event.schema_version(),
            payload: Payload::from(payload),
            metadata: EventMetadata {
                correlation_id: Some(correlation),
                causation_id: None,
                extra: Default::default(),
            },
        }
    }
}

impl<P: ProcessManager> std::fmt::Debug for ProcessTest<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessTest")
            .field("now", &self.now)
            .field("instances", &self.instances.keys().collect::<Vec<_>>())
            .field("timers", &self.timers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}
