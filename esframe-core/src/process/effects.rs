//! What an instance decides: [`Effects`], and what comes back to it ([`Refusal`],
//! [`FiredTimer`]).

use std::{any::Any, fmt, marker::PhantomData, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Aggregate, Command, Event};

use super::ProcessManager;

/// The effects of one [`react`](ProcessManager::react) call, as data: the runner carries them
/// out, atomically with the instance's new state where the store allows (see
/// [`ProcessRunner`](super::ProcessRunner)).
pub struct Effects<P: ProcessManager + ?Sized> {
    pub(crate) commands: Vec<SentCommand>,
    pub(crate) messages: Vec<Message>,
    pub(crate) timers: Vec<TimerChange>,
    pub(crate) complete: bool,
    now: DateTime<Utc>,
    _process: PhantomData<fn() -> P>,
}

impl<P: ProcessManager + ?Sized> fmt::Debug for Effects<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Effects")
            .field("commands", &self.commands)
            .field("messages", &self.messages)
            .field("timers", &self.timers)
            .field("complete", &self.complete)
            .finish()
    }
}

impl<P: ProcessManager + ?Sized> Effects<P> {
    pub(crate) fn new(now: DateTime<Utc>) -> Self {
        Self {
            commands: Vec::new(),
            messages: Vec::new(),
            timers: Vec::new(),
            complete: false,
            now,
            _process: PhantomData,
        }
    }

    /// Empty effects for a process manager that delegates to another: hand them to the inner
    /// one's `react`, then [`absorb`](Self::absorb) them into the outer one's.
    pub fn detached(now: DateTime<Utc>) -> Self {
        Self::new(now)
    }

    /// Takes over everything `other` holds (commands, timer changes, completion), after what
    /// these effects hold.
    pub fn absorb<Q: ProcessManager + ?Sized>(&mut self, other: Effects<Q>) {
        self.commands.extend(other.commands);
        self.messages.extend(other.messages);
        self.timers.extend(other.timers);
        self.complete |= other.complete;
    }

    /// The time of the input, by the runner's clock: due times are counted from it.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// Sends `command` to aggregate `A`. It carries the flow's correlation id, the input's id
    /// as causation, and a command id derived from the instance, the input and its place in
    /// these effects, so sending it again after a crash stores nothing twice. If `A` refuses
    /// it, [`react`](ProcessManager::react) gets [`Input::Refused`](super::Input::Refused).
    pub fn send<A: Aggregate>(&mut self, command: A::Command)
    where
        A::Command: fmt::Debug,
    {
        self.commands.push(SentCommand::new::<A>(command));
    }

    /// Publishes `message` for other services: it is stored as an event in the instance's own
    /// stream (aggregate type [`ProcessManager::NAME`], id the instance id), in the same
    /// transaction as everything else the input does, with a derived id and the flow's
    /// correlation. A [`Publisher`](crate::publish::Publisher) following the log with
    /// `Interest::aggregates([NAME])` sends it to a broker: the log is the outbox.
    pub fn publish<E: Event>(&mut self, message: E) {
        self.messages.push(Message {
            event_type: message.event_type(),
            schema_version: message.schema_version(),
            payload: message.to_payload().map_err(|e| e.to_string()),
        });
    }

    /// The messages published so far.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Schedules timer `name` of this instance to fire `after` from [`now`](Self::now),
    /// carrying `timer`. A timer of the same name is replaced.
    pub fn schedule(&mut self, name: impl Into<String>, after: Duration, timer: P::Timer) {
        let after = chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        let due = self
            .now
            .checked_add_signed(after)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.schedule_at(name, due, timer);
    }

    /// Schedules timer `name` of this instance to fire at `due`, carrying `timer`. A timer of
    /// the same name is replaced.
    pub fn schedule_at(&mut self, name: impl Into<String>, due: DateTime<Utc>, timer: P::Timer) {
        let payload = serde_json::to_value(&timer);
        self.timers.push(TimerChange::Schedule {
            name: name.into(),
            due,
            payload: payload.map_err(|e| e.to_string()),
        });
    }

    /// Cancels timer `name` of this instance, if it is scheduled.
    pub fn cancel(&mut self, name: impl Into<String>) {
        self.timers.push(TimerChange::Cancel { name: name.into() });
    }

    /// Completes the instance: its timers are cancelled and it stays as a tombstone, so later
    /// events routed to it are counted no-ops and never start it again.
    pub fn complete(&mut self) {
        self.complete = true;
    }

    /// The commands sent so far.
    pub fn commands(&self) -> &[SentCommand] {
        &self.commands
    }

    /// Whether [`complete`](Self::complete) was called.
    pub fn is_complete(&self) -> bool {
        self.complete
    }
}

/// A message an instance publishes ([`Effects::publish`]), serialized.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Its event type.
    pub event_type: &'static str,
    /// Its schema version.
    pub schema_version: u32,
    /// Its payload (or why it could not be serialized).
    pub payload: Result<serde_json::Value, String>,
}

/// A timer change requested by [`Effects`].
#[derive(Debug, Clone, PartialEq)]
pub enum TimerChange {
    /// Schedule (or replace) a timer.
    Schedule {
        /// The timer's name within its instance.
        name: String,
        /// When it fires.
        due: DateTime<Utc>,
        /// The serialized [`ProcessManager::Timer`] (or why it could not be serialized).
        payload: Result<serde_json::Value, String>,
    },
    /// Cancel a timer.
    Cancel {
        /// The timer's name within its instance.
        name: String,
    },
}

/// A command an instance sends to an aggregate, with its type erased until it is handled by
/// the aggregate's registered handler.
#[derive(Clone)]
pub struct SentCommand {
    pub(crate) aggregate_type: &'static str,
    pub(crate) aggregate_id: String,
    pub(crate) command: Arc<dyn Any + Send + Sync>,
    pub(crate) debug: Arc<str>,
}

impl fmt::Debug for SentCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}: {}",
            self.aggregate_type, self.aggregate_id, self.debug
        )
    }
}

impl SentCommand {
    fn new<A: Aggregate>(command: A::Command) -> Self
    where
        A::Command: fmt::Debug,
    {
        Self {
            aggregate_type: A::TYPE,
            aggregate_id: command.aggregate_id(),
            debug: format!("{command:?}").into(),
            command: Arc::new(command),
        }
    }

    /// The aggregate type it goes to.
    pub fn aggregate_type(&self) -> &'static str {
        self.aggregate_type
    }

    /// The aggregate it goes to.
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }

    /// The command, if it is one of `A`'s.
    pub fn command<A: Aggregate>(&self) -> Option<&A::Command> {
        if self.aggregate_type != A::TYPE {
            return None;
        }
        self.command.downcast_ref()
    }
}

/// A command the aggregate refused, handed back to the instance that sent it.
#[derive(Clone)]
pub struct Refusal {
    pub(crate) sent: SentCommand,
    pub(crate) command_id: Uuid,
    pub(crate) error: Arc<dyn Any + Send + Sync>,
    pub(crate) message: String,
}

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} refused: {}", self.sent, self.message)
    }
}

impl Refusal {
    pub(crate) fn new<A: Aggregate>(sent: SentCommand, command_id: Uuid, error: A::Error) -> Self {
        Self {
            message: error.to_string(),
            sent,
            command_id,
            error: Arc::new(error),
        }
    }

    /// Whether `A` refused it.
    pub fn is<A: Aggregate>(&self) -> bool {
        self.sent.aggregate_type == A::TYPE
    }

    /// The refused command, if it was one of `A`'s.
    pub fn command<A: Aggregate>(&self) -> Option<&A::Command> {
        self.sent.command::<A>()
    }

    /// `A`'s error, if `A` refused it.
    pub fn error<A: Aggregate>(&self) -> Option<&A::Error> {
        if !self.is::<A>() {
            return None;
        }
        self.error.downcast_ref()
    }

    /// The refused command, type erased.
    pub fn sent(&self) -> &SentCommand {
        &self.sent
    }

    /// The id the refused command carried.
    pub fn command_id(&self) -> Uuid {
        self.command_id
    }

    /// The error's message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// A timer that came due, as [`react`](ProcessManager::react) receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct FiredTimer<T> {
    /// The instance it belongs to.
    pub instance: String,
    /// Its name within the instance.
    pub name: String,
    /// When it was due.
    pub due: DateTime<Utc>,
    /// What it carries.
    pub timer: T,
    /// Its id: the causation of the commands it leads to.
    pub id: Uuid,
}
