//! Aggregates: the consistency boundary that decides which events a command produces.

use std::{future::Future, ops::Deref};

use serde_json::Value;

use crate::{Command, Event, StreamId};

/// An event-sourced aggregate: state rebuilt from its events, which decides new events.
///
/// `#[derive(Aggregate)]` writes this impl: it names the associated types and delegates to the
/// inherent `handle` and `apply` functions you write, and serializes snapshots with serde.
///
/// Guarantees expected of implementations: `apply` is deterministic and infallible (events are
/// facts: they have happened); `handle` only looks at the state, the command and the services.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an esframe aggregate",
    label = "not an `Aggregate`",
    note = "consider adding `#[derive(Aggregate)]` and `#[aggregate(command = .., event = .., error = ..)]` to `{Self}`"
)]
pub trait Aggregate: Default + Send + Sync + Sized + 'static {
    /// Stable name of the aggregate type, stored with every event.
    const TYPE: &'static str;
    /// Version of the snapshot format; snapshots of another version are ignored.
    const SNAPSHOT_VERSION: u32 = 1;

    /// The commands this aggregate handles.
    type Command: Command;
    /// The events this aggregate emits and applies.
    type Event: Event;
    /// The domain error returned when a command is rejected.
    type Error: std::error::Error + Send + Sync + 'static;
    /// External services the handler may call (clock, pricing, ...); `()` if none.
    type Services: Send + Sync + 'static;

    /// Decides what `command` does: emit events through `decision`, or return a domain error.
    ///
    /// Each [`Decision::emit`] applies the event at once, so after emitting the handler sees the
    /// state the event produces.
    fn handle(
        decision: &mut Decision<'_, Self>,
        command: &Self::Command,
        services: &Self::Services,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Evolves the state by one event.
    fn apply(&mut self, event: &Self::Event);

    /// Serializes the state for a snapshot.
    fn to_snapshot(&self) -> Result<Value, serde_json::Error>;

    /// Restores the state from a snapshot written with [`Aggregate::SNAPSHOT_VERSION`].
    fn from_snapshot(state: &Value) -> Result<Self, serde_json::Error>;
}

/// A command being handled: the aggregate's state and the events emitted so far.
///
/// Dereferences to the state as of the last emitted event; the state can only change through
/// [`Decision::emit`], so what is stored is exactly what was applied.
#[derive(Debug)]
pub struct Decision<'a, A: Aggregate> {
    state: &'a mut A,
    stream_id: &'a StreamId,
    version: u64,
    emitted: Vec<A::Event>,
}

impl<'a, A: Aggregate> Decision<'a, A> {
    /// Starts deciding on `state`, loaded at `version` of `stream_id`.
    pub fn new(state: &'a mut A, stream_id: &'a StreamId, version: u64) -> Self {
        Self {
            state,
            stream_id,
            version,
            emitted: Vec::new(),
        }
    }

    /// Applies `event` to the state and records it to be stored. Returns the new state.
    pub fn emit(&mut self, event: A::Event) -> &A {
        self.state.apply(&event);
        self.emitted.push(event);
        self.state
    }

    /// The stream the command targets.
    pub fn stream_id(&self) -> &StreamId {
        self.stream_id
    }

    /// The stream version the state was loaded at, before any emitted event (0: new stream).
    pub fn loaded_version(&self) -> u64 {
        self.version
    }

    /// Whether the aggregate had no events when the command arrived.
    pub fn is_new(&self) -> bool {
        self.version == 0
    }

    /// The events emitted so far.
    pub fn emitted(&self) -> &[A::Event] {
        &self.emitted
    }

    /// Ends the decision, returning the emitted events.
    pub fn into_emitted(self) -> Vec<A::Event> {
        self.emitted
    }
}

impl<A: Aggregate> Deref for Decision<'_, A> {
    type Target = A;
    fn deref(&self) -> &A {
        self.state
    }
}
