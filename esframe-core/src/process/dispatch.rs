//! Commands from instances to aggregates: the registered command handlers, type erased, and
//! the aggregates' states staged while a batch is decided.

use std::{any::Any, collections::HashMap, future::Future, pin::Pin, sync::Arc};

use uuid::Uuid;

use crate::{
    Aggregate, AppendBatch, CommandContext, CommandError, CommandHandler, EventStore,
    ExpectedVersion, NewEvent, StoreError, StreamId,
};

use super::{Refusal, SentCommand};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a command could not be decided (not a refusal by the aggregate).
#[derive(Debug)]
pub(crate) struct CommandFailure {
    pub(crate) message: String,
    /// A store that may answer next time: the batch is retried, no instance is blamed.
    pub(crate) transient: bool,
}

impl CommandFailure {
    fn of<E: std::error::Error>(err: CommandError<E>) -> Self {
        let transient = match &err {
            CommandError::Store(e) => is_transient(e),
            CommandError::Conflict { .. } => true,
            _ => false,
        };
        Self {
            message: err.to_string(),
            transient,
        }
    }
}

fn is_transient(err: &StoreError) -> bool {
    use crate::StoreErrorKind::{Conflict, OutcomeUnknown, Unavailable};
    matches!(err.kind(), Conflict | Unavailable | OutcomeUnknown)
}

/// What deciding one command did.
pub(crate) enum Decided {
    /// Its events (possibly none) are staged.
    Accepted,
    /// The aggregate refused it.
    Refused(Refusal),
}

/// One aggregate type's command handler, type erased.
pub(crate) trait Dispatch: Send + Sync {
    /// Loads an aggregate's current state, staged for decisions.
    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Staged, CommandFailure>>;

    /// Decides `sent` on the staged state, staging the events it emits.
    fn decide<'a>(
        &'a self,
        staged: &'a mut Staged,
        sent: &'a SentCommand,
        command_id: Uuid,
        context: CommandContext,
    ) -> BoxFuture<'a, Result<Decided, CommandFailure>>;
}

/// An aggregate's state during a batch: as loaded, plus what the batch's commands emitted.
pub(crate) struct Staged {
    state: Box<dyn Any + Send + Sync>,
    /// The stream version it was loaded at: the appended events expect it.
    loaded: u64,
    events: Vec<NewEvent>,
}

impl Staged {
    /// The staged events as one append expecting the loaded version; `None` if there are none.
    pub(crate) fn into_append(self, stream: &StreamId) -> Result<Option<AppendBatch>, StoreError> {
        if self.events.is_empty() {
            return Ok(None);
        }
        let expected = match self.loaded {
            0 => ExpectedVersion::NoStream,
            v => ExpectedVersion::Exact(v),
        };
        AppendBatch::new(stream, expected, self.events).map(Some)
    }
}

/// A typed state and the events emitted on it, so it can be rebuilt after a rejection that
/// came after emitting.
struct TypedState<A: Aggregate> {
    state: A,
    emitted: Vec<A::Event>,
}

struct Handler<A: Aggregate, S> {
    handler: CommandHandler<A, S>,
}

impl<A: Aggregate, S: EventStore> Dispatch for Handler<A, S>
where
    A::Event: Send + Sync,
{
    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Staged, CommandFailure>> {
        Box::pin(async move {
            let loaded = self.handler.load(id).await.map_err(CommandFailure::of)?;
            Ok(Staged {
                state: Box::new(TypedState::<A> {
                    state: loaded.state,
                    emitted: Vec::new(),
                }),
                loaded: loaded.version,
                events: Vec::new(),
            })
        })
    }

    fn decide<'a>(
        &'a self,
        staged: &'a mut Staged,
        sent: &'a SentCommand,
        command_id: Uuid,
        context: CommandContext,
    ) -> BoxFuture<'a, Result<Decided, CommandFailure>> {
        Box::pin(async move {
            let wrong_type = || CommandFailure {
                message: format!(
                    "command {sent:?} is not a command of aggregate `{}`",
                    A::TYPE
                ),
                transient: false,
            };
            let command = sent.command::<A>().ok_or_else(wrong_type)?;
            let typed = staged
                .state
                .downcast_mut::<TypedState<A>>()
                .ok_or_else(wrong_type)?;
            let version = staged.loaded + staged.events.len() as u64;
            let decided = self
                .handler
                .decide_tracked(&mut typed.state, version, command, context)
                .await;
            match decided {
                Ok((emitted, events)) => {
                    typed.emitted.extend(emitted);
                    staged.events.extend(events);
                    Ok(Decided::Accepted)
                }
                Err((CommandError::Rejected(error), dirtied)) => {
                    if dirtied {
                        // The rejection came after emitting: rebuild the state without them.
                        let loaded = self
                            .handler
                            .load(&sent.aggregate_id)
                            .await
                            .map_err(CommandFailure::of)?;
                        typed.state = loaded.state;
                        for event in &typed.emitted {
                            typed.state.apply(event);
                        }
                    }
                    Ok(Decided::Refused(Refusal::new::<A>(
                        sent.clone(),
                        command_id,
                        error,
                    )))
                }
                Err((other, _)) => Err(CommandFailure::of(other)),
            }
        })
    }
}

/// The command handlers of a runner, by aggregate type.
#[derive(Clone, Default)]
pub(crate) struct Handlers {
    by_type: HashMap<&'static str, Arc<dyn Dispatch>>,
}

impl Handlers {
    pub(crate) fn add<A: Aggregate, S: EventStore>(&mut self, handler: CommandHandler<A, S>)
    where
        A::Event: Send + Sync,
    {
        self.by_type.insert(A::TYPE, Arc::new(Handler { handler }));
    }

    pub(crate) fn get(&self, aggregate_type: &str) -> Option<&Arc<dyn Dispatch>> {
        self.by_type.get(aggregate_type)
    }

    pub(crate) fn types(&self) -> Vec<&'static str> {
        let mut types: Vec<_> = self.by_type.keys().copied().collect();
        types.sort_unstable();
        types
    }
}
