//! [`CommandContext`] and what a command gives its events: ids, correlation, metadata.

use serde_json::Map;
use uuid::Uuid;

use crate::{Command, EventMetadata};

/// Ids and metadata that travel with a command into the events it produces.
///
/// A command with an id (given here, or by [`Command::command_id`]) produces events whose ids
/// are derived from it ([`derived_event_id`]), so the same command handled twice (retried after
/// an unknown outcome, delivered twice by a broker) is stored once: if it decides the same
/// events again, the store recognises them and nothing is stored
/// ([`CommandOutcome::deduplicated`](crate::CommandOutcome::deduplicated)); if its own first
/// handling changed the decision (a second `Open` refused as already open), that result is
/// returned; if it decides other events, the store refuses them
/// ([`StoreError::EventIdReused`](crate::StoreError::EventIdReused)). Without an id, event ids
/// are random (UUIDv7).
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

    /// Sets the command id (overrides [`Command::command_id`]): the events' ids are derived
    /// from it, which makes handling the same command twice idempotent.
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

/// The id of event number `index` (from 0) produced by the command `command_id`: a UUIDv5 in the
/// command id's namespace. The same command always gives its events the same ids.
///
/// ```
/// use esframe_core::derived_event_id;
/// let command = uuid::Uuid::now_v7();
/// assert_eq!(derived_event_id(command, 0), derived_event_id(command, 0));
/// assert_ne!(derived_event_id(command, 0), derived_event_id(command, 1));
/// ```
pub fn derived_event_id(command_id: Uuid, index: usize) -> Uuid {
    let index = u64::try_from(index).unwrap_or(u64::MAX);
    Uuid::new_v5(&command_id, &index.to_be_bytes())
}

/// What a command gives the events it produces.
#[derive(Debug, Clone)]
pub(crate) struct Provenance {
    /// Correlation, causation and free-form entries.
    pub(crate) metadata: EventMetadata,
    /// The command's own id, when it carries one: event ids are derived from it.
    pub(crate) command_id: Option<Uuid>,
}

impl Provenance {
    pub(crate) fn of<C: Command>(command: &C, context: CommandContext) -> Self {
        let explicit = context.command_id.or_else(|| command.command_id());
        let command_id = explicit.unwrap_or_else(Uuid::now_v7);
        let mut extra = command.metadata();
        extra.extend(context.metadata);
        Self {
            metadata: EventMetadata {
                correlation_id: Some(context.correlation_id.unwrap_or(command_id)),
                causation_id: Some(context.causation_id.unwrap_or(command_id)),
                extra,
            },
            command_id: explicit,
        }
    }

    /// The id of the command's event number `index`.
    pub(crate) fn event_id(&self, index: usize) -> Uuid {
        match self.command_id {
            Some(command_id) => derived_event_id(command_id, index),
            None => Uuid::now_v7(),
        }
    }
}
