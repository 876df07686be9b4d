//! The [`Projection`] trait and the [`ProjectionContext`] its handlers receive.

use std::future::Future;

use crate::RecordedEvent;

use super::Interest;

/// What a projection handler returns on failure: any error, boxed
/// (`Box<dyn std::error::Error + Send + Sync>`), so `?` works on sqlx's, serde's or your own
/// errors, and a `String` or `&str` converts with `.into()`. The runner retries the event, then
/// parks it as a dead letter (or stops), recording the error's message.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// What a handler gets besides the event: the transaction to write the read model through, and
/// whether the event is being replayed.
#[derive(Debug)]
pub struct ProjectionContext<'a, Tx> {
    tx: &'a mut Tx,
    replaying: bool,
    attempt: u32,
}

impl<'a, Tx> ProjectionContext<'a, Tx> {
    /// A context over `tx`. The runner makes these; so do stores that apply projections inline,
    /// in the append's transaction.
    pub fn new(tx: &'a mut Tx, replaying: bool, attempt: u32) -> Self {
        Self {
            tx,
            replaying,
            attempt,
        }
    }

    /// The checkpoint store's transaction. With an exactly-once store, everything written
    /// through it commits together with the checkpoint, or not at all.
    pub fn tx(&mut self) -> &mut Tx {
        self.tx
    }

    /// `true` while the runner replays history: during [`rebuild`](super::ProjectionRunner::rebuild)
    /// and the automatic rebuild after a version change. Handlers that do more than update the
    /// read model (send mail, call other services) skip those side effects when replaying.
    pub fn is_replay(&self) -> bool {
        self.replaying
    }

    /// 1 on the first try of an event or batch, then 2, 3, ... on retries after failures.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// A read model kept up to date from events.
///
/// `Tx` is the transaction type of the [`CheckpointStore`](super::CheckpointStore) it runs with:
/// `sqlx::Transaction<'static, Postgres>` for exactly-once read models in PostgreSQL, `()` for
/// read models the handler keeps itself (at-least-once).
///
/// ```
/// use esframe_core::projection::{HandlerError, Interest, Projection, ProjectionContext};
/// use esframe_core::RecordedEvent;
/// use std::sync::{Arc, Mutex};
///
/// /// Counts events per stream, in memory.
/// #[derive(Default)]
/// struct EventCounts(Arc<Mutex<std::collections::HashMap<String, u64>>>);
///
/// impl Projection for EventCounts {
///     fn name(&self) -> &str {
///         "event_counts"
///     }
///
///     async fn handle(
///         &self,
///         event: &RecordedEvent,
///         _ctx: &mut ProjectionContext<'_, ()>,
///     ) -> Result<(), HandlerError> {
///         *self.0.lock().unwrap().entry(event.stream_id.to_string()).or_default() += 1;
///         Ok(())
///     }
///
///     async fn reset(&self, _ctx: &mut ProjectionContext<'_, ()>) -> Result<(), HandlerError> {
///         self.0.lock().unwrap().clear();
///         Ok(())
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an esframe projection for transactions of type `{Tx}`",
    label = "not a `Projection<{Tx}>`",
    note = "implement `Projection<{Tx}>` for it (or, for a `TypedProjection<{Tx}>`, pass `Typed(projection)`): `{Tx}` is the transaction type of the checkpoint store it runs with (`()` for `MemoryCheckpoints` and `AtLeastOnce`, `PgTransaction` for `PgCheckpoints`)"
)]
pub trait Projection<Tx: Send = ()>: Send + Sync + 'static {
    /// The projection's stable name: its checkpoint, lease and dead letters are kept under it.
    fn name(&self) -> &str;

    /// The read model's version. When it differs from the version the checkpoint was written
    /// with, the runner resets the read model ([`Projection::reset`]) and replays every event.
    fn version(&self) -> u32 {
        1
    }

    /// Which events the projection wants; the others are skipped (but still checkpointed).
    fn interest(&self) -> Interest {
        Interest::all()
    }

    /// Applies one event to the read model.
    fn handle(
        &self,
        event: &RecordedEvent,
        ctx: &mut ProjectionContext<'_, Tx>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Applies a batch of events, in order, all in one transaction. The default calls
    /// [`Projection::handle`] for each; override it to write a whole batch with one statement.
    ///
    /// If it fails, the runner rolls the transaction back and goes through the batch again event
    /// by event with [`Projection::handle`] to find the failing one, so the two must agree.
    /// Only exactly-once checkpoint stores use it: at least once, a rollback cannot undo what
    /// the events before a failure wrote, so the runner calls [`Projection::handle`] per event.
    fn handle_batch(
        &self,
        events: &[RecordedEvent],
        ctx: &mut ProjectionContext<'_, Tx>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            for event in events {
                self.handle(event, ctx).await?;
            }
            Ok(())
        }
    }

    /// Empties the read model before a rebuild, in the transaction that moves the checkpoint
    /// back. The default refuses, so a projection that cannot be reset is never replayed into a
    /// read model that still holds the old data.
    fn reset(
        &self,
        ctx: &mut ProjectionContext<'_, Tx>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = ctx;
        let name = self.name().to_owned();
        async move {
            Err(format!(
                "projection `{name}` does not implement `Projection::reset`, so it cannot be rebuilt"
            )
            .into())
        }
    }
}
