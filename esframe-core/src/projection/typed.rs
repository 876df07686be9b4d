//! Typed projections: the handler receives each event decoded, with its envelope; the events it
//! does not name are skipped by interest, never decoded.

use std::future::Future;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Event, EventMetadata, Position, RecordedEvent, StreamId, error::EventDecodeError};

use super::{HandlerError, Interest, Projection, ProjectionContext};

/// The events a [`TypedProjection`] reads: which ones it wants ([`ProjectionEvents::interest`])
/// and how a recorded event becomes one ([`ProjectionEvents::decode`]).
///
/// Every [`Event`] type is one, by event type name. For events of several aggregates, derive it
/// on an enum with one variant per aggregate (`#[derive(ProjectionEvents)]`), which also tells
/// the aggregates apart when two of them use the same event type name.
pub trait ProjectionEvents: Sized + Send + Sync + 'static {
    /// The events to read: what the runner filters the log by before anything is decoded.
    fn interest() -> Interest;

    /// Decodes `event`; `Ok(None)` for an event that passed the interest but is not one of
    /// these (another aggregate's event of the same type name). An event of a known type that
    /// cannot be decoded is an error naming it.
    fn decode(event: &RecordedEvent) -> Result<Option<Self>, EventDecodeError>;
}

/// One event type, from streams of any aggregate type: by its event type names.
impl<E: Event> ProjectionEvents for E {
    fn interest() -> Interest {
        Interest::events_of::<E>()
    }

    fn decode(event: &RecordedEvent) -> Result<Option<Self>, EventDecodeError> {
        if E::current_version(&event.event_type).is_none() {
            return Ok(None);
        }
        event.decode().map(Some)
    }
}

/// A decoded event with its envelope, as a [`TypedProjection`] receives it.
#[derive(Debug)]
pub struct ProjectedEvent<'a, E> {
    /// The decoded event.
    pub event: E,
    /// The stored envelope (its payload is the undecoded JSON).
    pub envelope: &'a RecordedEvent,
}

impl<E> ProjectedEvent<'_, E> {
    /// The event's stream: its aggregate type and id.
    pub fn stream_id(&self) -> &StreamId {
        &self.envelope.stream_id
    }

    /// The aggregate's id within its type.
    pub fn aggregate_id(&self) -> &str {
        self.envelope.aggregate_id()
    }

    /// The aggregate type that owns the stream.
    pub fn aggregate_type(&self) -> &str {
        self.envelope.aggregate_type()
    }

    /// The event's position in its stream (1-based).
    pub fn stream_version(&self) -> u64 {
        self.envelope.stream_version
    }

    /// The event's position in the global log.
    pub fn global_position(&self) -> Position {
        self.envelope.global_position
    }

    /// The event's unique id.
    pub fn event_id(&self) -> Uuid {
        self.envelope.event_id
    }

    /// Correlation, causation and free-form metadata.
    pub fn metadata(&self) -> &EventMetadata {
        &self.envelope.metadata
    }

    /// When the store recorded the event.
    pub fn recorded_at(&self) -> DateTime<Utc> {
        self.envelope.recorded_at
    }
}

/// A read model kept up to date from typed events: the handler gets each event of
/// [`TypedProjection::Event`] decoded, with its envelope, and never sees the others. Wrapped in
/// [`Typed`], it is a [`Projection`], run by the same
/// [`ProjectionRunner`](super::ProjectionRunner) with the same guarantees; implement
/// [`Projection`] directly for generic read models over any event.
///
/// An event of a known type that cannot be decoded fails its handler like any error: it is
/// retried, then parked as a dead letter (or stops the runner), with the decode error's message.
///
/// ```
/// use std::{collections::HashMap, sync::{Arc, Mutex}};
///
/// use esframe_core::projection::{HandlerError, ProjectedEvent, ProjectionContext, TypedProjection};
/// use esframe_core::Event;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
/// enum AccountEvent {
///     Opened { owner: String },
///     Deposited { amount: u64 },
/// }
///
/// /// Deposits per account.
/// #[derive(Default)]
/// struct Deposits(Arc<Mutex<HashMap<String, u64>>>);
///
/// impl TypedProjection for Deposits {
///     type Event = AccountEvent;
///
///     fn name(&self) -> &str {
///         "deposits"
///     }
///
///     async fn apply(
///         &self,
///         event: ProjectedEvent<'_, AccountEvent>,
///         _ctx: &mut ProjectionContext<'_, ()>,
///     ) -> Result<(), HandlerError> {
///         if let AccountEvent::Deposited { amount } = event.event {
///             *self.0.lock().unwrap().entry(event.aggregate_id().to_owned()).or_default() += amount;
///         }
///         Ok(())
///     }
/// }
///
/// // Run it as `ProjectionRunner::new(store, checkpoints, Typed(Deposits::default()))`.
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an esframe typed projection for transactions of type `{Tx}`",
    label = "not a `TypedProjection<{Tx}>`",
    note = "`{Tx}` is the transaction type of the checkpoint store it runs with (`()` for `MemoryCheckpoints` and `AtLeastOnce`, `PgTransaction` for `PgCheckpoints`); hand it to the runner as `Typed(projection)`"
)]
pub trait TypedProjection<Tx: Send = ()>: Send + Sync + 'static {
    /// The events the projection reads: an `#[derive(Event)]` enum, or an
    /// `#[derive(ProjectionEvents)]` enum over several aggregates.
    type Event: ProjectionEvents;

    /// The projection's stable name: its checkpoint, lease and dead letters are kept under it.
    fn name(&self) -> &str;

    /// The read model's version; see [`Projection::version`].
    fn version(&self) -> u32 {
        1
    }

    /// Which events the projection wants: by default those of [`TypedProjection::Event`].
    /// Narrow it (`.and_aggregates([..])`) but do not widen it: events outside
    /// `Self::Event` are skipped anyway.
    fn interest(&self) -> Interest {
        Self::Event::interest()
    }

    /// Applies one decoded event to the read model.
    fn apply(
        &self,
        event: ProjectedEvent<'_, Self::Event>,
        ctx: &mut ProjectionContext<'_, Tx>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Applies a batch of decoded events, in order, in one transaction; the default calls
    /// [`TypedProjection::apply`] for each. Override it to write a batch with one statement;
    /// the two must agree (see [`Projection::handle_batch`]).
    fn apply_batch(
        &self,
        events: Vec<ProjectedEvent<'_, Self::Event>>,
        ctx: &mut ProjectionContext<'_, Tx>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            for event in events {
                self.apply(event, ctx).await?;
            }
            Ok(())
        }
    }

    /// Empties the read model before a rebuild; see [`Projection::reset`]. The default refuses.
    fn reset(
        &self,
        ctx: &mut ProjectionContext<'_, Tx>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = ctx;
        let name = self.name().to_owned();
        async move {
            Err(
                format!("projection `{name}` does not implement `reset`, so it cannot be rebuilt")
                    .into(),
            )
        }
    }
}

/// A [`TypedProjection`] as a [`Projection`], to hand to a
/// [`ProjectionRunner`](super::ProjectionRunner) (or run inline): `Typed(deposits)`. It decodes
/// each event the interest lets through and calls [`TypedProjection::apply`]; events that are
/// not of [`TypedProjection::Event`] are skipped. It dereferences to the projection.
#[derive(Debug, Clone, Default)]
pub struct Typed<P>(pub P);

impl<P> std::ops::Deref for Typed<P> {
    type Target = P;

    fn deref(&self) -> &P {
        &self.0
    }
}

impl<Tx: Send, P: TypedProjection<Tx>> Projection<Tx> for Typed<P> {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn version(&self) -> u32 {
        self.0.version()
    }

    fn interest(&self) -> Interest {
        self.0.interest()
    }

    async fn handle(
        &self,
        event: &RecordedEvent,
        ctx: &mut ProjectionContext<'_, Tx>,
    ) -> Result<(), HandlerError> {
        match project::<P::Event>(event)? {
            Some(projected) => self.0.apply(projected, ctx).await,
            None => Ok(()),
        }
    }

    async fn handle_batch(
        &self,
        events: &[RecordedEvent],
        ctx: &mut ProjectionContext<'_, Tx>,
    ) -> Result<(), HandlerError> {
        let mut projected = Vec::with_capacity(events.len());
        for event in events {
            projected.extend(project::<P::Event>(event)?);
        }
        if projected.is_empty() {
            return Ok(());
        }
        self.0.apply_batch(projected, ctx).await
    }

    async fn reset(&self, ctx: &mut ProjectionContext<'_, Tx>) -> Result<(), HandlerError> {
        self.0.reset(ctx).await
    }
}

/// `event` decoded as `E` with its envelope, `None` if it is not one of `E`.
fn project<E: ProjectionEvents>(
    event: &RecordedEvent,
) -> Result<Option<ProjectedEvent<'_, E>>, EventDecodeError> {
    Ok(E::decode(event)?.map(|decoded| ProjectedEvent {
        event: decoded,
        envelope: event,
    }))
}
