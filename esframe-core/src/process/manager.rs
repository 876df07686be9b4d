//! The [`ProcessManager`] trait: routing, evolve and react, kept apart.

use std::fmt::Debug;

use serde::{Serialize, de::DeserializeOwned};

use crate::projection::{ProjectedEvent, ProjectionEvents};

use super::{Effects, FiredTimer, Refusal};

/// A process spanning several aggregates: an order placed, its stock reserved, its payment
/// taken, its shipment prepared, and what to undo when a step fails or never answers.
///
/// Each flow is an *instance*, keyed by a correlation value (the order id). Three parts stay
/// apart:
/// - [`route`](Self::route): which instance an event belongs to, and whether it may start one.
///   Write it as a `match` over [`Events`](Self::Events) without a `_` arm, and an event type
///   added without a rule is a compile error rather than a silent drop.
/// - [`evolve`](Self::evolve): folds an event into the instance's state. Pure: it is replayed
///   when the state's version changes.
/// - [`react`](Self::react): decides what to do next and returns it as data in [`Effects`]:
///   commands to aggregates, timers to schedule or cancel, completion. A command an aggregate
///   refuses comes back to `react` as [`Input::Refused`], so compensation is ordinary code.
///
/// A [`ProcessRunner`](super::ProcessRunner) runs it against a store; [`ProcessTest`](super::ProcessTest)
/// tests it without one.
///
/// ```
/// use esframe_core::{
///     Event,
///     process::{Effects, Input, ProcessManager, ProcessTest, ReactError, Route},
///     projection::ProjectedEvent,
/// };
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
/// enum SignupEvent {
///     SignedUp { email: String },
///     Confirmed,
/// }
///
/// /// Reminds users who have not confirmed within a day.
/// struct Reminders;
///
/// impl ProcessManager for Reminders {
///     const NAME: &'static str = "signup-reminders";
///     type Events = SignupEvent;
///     type State = ();
///     type Timer = ();
///
///     fn route(&self, event: &ProjectedEvent<'_, SignupEvent>) -> Route {
///         match event.event {
///             SignupEvent::SignedUp { .. } => Route::start(event.aggregate_id()),
///             SignupEvent::Confirmed => Route::to(event.aggregate_id()),
///         }
///     }
///
///     fn evolve(&self, _: &mut (), _: &ProjectedEvent<'_, SignupEvent>) {}
///
///     fn react(&self, _: &(), input: Input<'_, Self>, effects: &mut Effects<Self>)
///         -> Result<(), ReactError>
///     {
///         match input {
///             Input::Event(e) if matches!(e.event, SignupEvent::SignedUp { .. }) => {
///                 effects.schedule("remind", std::time::Duration::from_secs(86_400), ());
///             }
///             Input::Event(_) => effects.complete(),
///             Input::Timer(_) => effects.complete(), // (send the reminder here)
///             Input::Refused(_) => {}
///         }
///         Ok(())
///     }
/// }
///
/// let mut test = ProcessTest::new(Reminders);
/// let signed_up = SignupEvent::SignedUp { email: "a@example.com".into() };
/// let then = test.when_event("user", "u1", signed_up);
/// assert!(then.scheduled("remind"));
/// ```
///
/// Routing is a `match` without a catch-all, so an event type added later without a rule does
/// not compile (E0004, non-exhaustive patterns):
///
/// ```compile_fail,E0004
/// # use esframe_core::{Event, process::Route, projection::ProjectedEvent};
/// # use serde::{Deserialize, Serialize};
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
/// enum SignupEvent {
///     SignedUp { email: String },
///     Confirmed,
///     Unsubscribed, // new, and no rule for it yet
/// }
///
/// fn route(event: &ProjectedEvent<'_, SignupEvent>) -> Route {
///     match event.event {
///         SignupEvent::SignedUp { .. } => Route::start(event.aggregate_id()),
///         SignupEvent::Confirmed => Route::to(event.aggregate_id()),
///     }
/// }
/// ```
pub trait ProcessManager: Send + Sync + 'static {
    /// The name its checkpoint, lease, instances and timers are stored under. Changing it
    /// starts over from the beginning of the log.
    const NAME: &'static str;

    /// The version of [`State`](Self::State)'s stored form. Raise it when the state changes
    /// shape: a stored state of another version is rebuilt by replaying the instance's own
    /// events through [`evolve`](Self::evolve), as an aggregate snapshot of an old version
    /// is.
    const STATE_VERSION: u32 = 1;

    /// The events it reads, from any number of aggregates (`#[derive(ProjectionEvents)]` on
    /// an enum with a variant per aggregate). Every other event is skipped undecoded.
    type Events: ProjectionEvents;

    /// One instance's state, stored with the instance.
    type State: Default + Serialize + DeserializeOwned + Debug + Send + Sync + 'static;

    /// What a timer carries back to [`react`](Self::react) when it fires.
    type Timer: Serialize + DeserializeOwned + Debug + Send + Sync + 'static;

    /// Which instance `event` belongs to.
    fn route(&self, event: &ProjectedEvent<'_, Self::Events>) -> Route;

    /// Folds `event` into the instance's state. Called before [`react`](Self::react) sees the
    /// event, and again for every event of the instance when its stored state is rebuilt.
    fn evolve(&self, state: &mut Self::State, event: &ProjectedEvent<'_, Self::Events>);

    /// Decides what follows `input`, given the state after it. An `Err` is a failure of the
    /// instance (not of the flow): it is retried with backoff, then the instance is
    /// quarantined. Refusals by aggregates are not errors: they arrive as
    /// [`Input::Refused`].
    fn react(
        &self,
        state: &Self::State,
        input: Input<'_, Self>,
        effects: &mut Effects<Self>,
    ) -> Result<(), ReactError>;
}

/// Where an event goes: the routing rule for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To the instance with this id, starting it if there is none. A completed instance is
    /// never started again: the event is a counted no-op.
    Start(String),
    /// To the instance with this id if it exists; otherwise the event is a counted no-op.
    Continue(String),
    /// Not for any instance (an explicit rule, counted as skipped).
    Skip,
}

impl Route {
    /// [`Route::Start`].
    pub fn start(id: impl Into<String>) -> Self {
        Self::Start(id.into())
    }

    /// [`Route::Continue`].
    pub fn to(id: impl Into<String>) -> Self {
        Self::Continue(id.into())
    }

    /// The instance id, if any.
    pub fn instance(&self) -> Option<&str> {
        match self {
            Self::Start(id) | Self::Continue(id) => Some(id),
            Self::Skip => None,
        }
    }
}

/// What [`ProcessManager::react`] reacts to.
#[derive(Debug)]
pub enum Input<'a, P: ProcessManager + ?Sized> {
    /// An event routed to the instance, already folded into the state.
    Event(&'a ProjectedEvent<'a, P::Events>),
    /// A timer of the instance that came due.
    Timer(&'a FiredTimer<P::Timer>),
    /// A command the instance sent was refused by its aggregate.
    Refused(&'a Refusal),
}

/// A failure of [`ProcessManager::react`]: the instance is retried, then quarantined with this
/// message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReactError(pub String);

impl ReactError {
    /// A failure described by `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl From<&str> for ReactError {
    fn from(message: &str) -> Self {
        Self(message.to_owned())
    }
}

impl From<String> for ReactError {
    fn from(message: String) -> Self {
        Self(message)
    }
}
