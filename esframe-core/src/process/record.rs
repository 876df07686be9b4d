//! What a process store keeps: instances, timers, and the atomic write of one batch.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{AppendBatch, Position};

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceStatus {
    /// Running: its events are handled as they come.
    Active,
    /// Completed: a tombstone; events routed to it are counted no-ops.
    Completed,
    /// Failed too often: its later events are held, in order, until it is retried or
    /// discarded.
    Quarantined,
    /// Discarded by an operator after quarantine: a tombstone, like `Completed`.
    Discarded,
}

impl InstanceStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Quarantined => "quarantined",
            Self::Discarded => "discarded",
        }
    }

    /// The status stored as `name`, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "active" => Self::Active,
            "completed" => Self::Completed,
            "quarantined" => Self::Quarantined,
            "discarded" => Self::Discarded,
            _ => return None,
        })
    }

    /// Whether the instance has ended (completed or discarded).
    pub fn is_ended(self) -> bool {
        matches!(self, Self::Completed | Self::Discarded)
    }
}

/// One stored instance of a process manager.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRecord {
    /// The process manager's name.
    pub process: String,
    /// The instance id (its correlation value).
    pub id: String,
    /// Where it is in its life.
    pub status: InstanceStatus,
    /// The state, serialized.
    pub state: serde_json::Value,
    /// [`ProcessManager::STATE_VERSION`](super::ProcessManager::STATE_VERSION) of `state`.
    pub state_version: u32,
    /// How many times it was written: the compare-and-set that keeps two writers apart.
    pub version: u64,
    /// The correlation id of its flow: every command it sends carries it.
    pub correlation_id: Uuid,
    /// The global position of every event folded into `state`, in order (to rebuild it).
    pub events: Vec<Position>,
    /// The last input position handled (an event at or below it is a repeat).
    pub last_position: Position,
    /// Events routed to it while quarantined, in order, to handle when it is retried.
    pub held: Vec<Position>,
    /// Why it was quarantined.
    pub error: Option<String>,
    /// Failed attempts of its current input.
    pub attempts: u32,
    /// Events routed to it after it ended (counted no-ops).
    pub ignored: u64,
    /// When it was last written.
    pub updated_at: DateTime<Utc>,
}

/// One scheduled timer.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerRecord {
    /// The process manager's name.
    pub process: String,
    /// The instance it belongs to.
    pub instance: String,
    /// Its name within the instance.
    pub name: String,
    /// When it fires.
    pub due: DateTime<Utc>,
    /// The serialized [`ProcessManager::Timer`](super::ProcessManager::Timer).
    pub payload: serde_json::Value,
    /// Its id, unique per scheduling: the causation of what it leads to.
    pub id: Uuid,
}

/// Everything one batch (or one fired timer) changes, written by
/// [`ProcessStore::write`](super::ProcessStore::write) atomically with the checkpoint where the
/// store allows.
#[derive(Debug, Default)]
pub struct ProcessWrite {
    /// The process manager whose instances and timers it writes.
    pub process: String,
    /// The commands' events, one batch per stream, each expecting the version its command was
    /// decided on. Stored first, in one statement.
    pub appends: Vec<AppendBatch>,
    /// Instances to store: `(record, previous version)`, `None` for a new instance. A stored
    /// version other than the previous one (or an instance that exists when `None`) fails the
    /// write as [`ProcessStoreError::Moved`](super::ProcessStoreError::Moved).
    pub instances: Vec<(InstanceRecord, Option<u64>)>,
    /// Timers to schedule (replacing one of the same instance and name).
    pub schedule: Vec<TimerRecord>,
    /// Timers to cancel: `(instance, name)`, of [`process`](Self::process).
    pub cancel: Vec<(String, String)>,
    /// Every timer of these instances of [`process`](Self::process) is cancelled (they
    /// completed).
    pub cancel_all: Vec<String>,
    /// Timers that fired: each must still be stored with this id, else the write fails as
    /// `Moved` (another runner took it).
    pub fired: Vec<TimerRecord>,
}

impl ProcessWrite {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.instances.is_empty()
            && self.schedule.is_empty()
            && self.cancel.is_empty()
            && self.cancel_all.is_empty()
            && self.fired.is_empty()
    }
}
