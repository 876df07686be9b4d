//! Where a runner's session is: the checkpoint, and the replay it is in, if any.

use std::time::Instant;

use crate::{GlobalBatch, Position};

use super::super::Checkpoint;

/// What a session knows: the checkpoint (which says whether it replays history), and the
/// next batch if it was read while the previous one was applied.
pub(super) struct Cursor {
    pub(super) checkpoint: Option<Checkpoint>,
    pub(super) version: u32,
    /// The batch after a position, read ahead; used only if the checkpoint is still there.
    pub(super) ahead: Option<(Position, GlobalBatch)>,
    /// How far a partition's reads have looked past the checkpoint without finding any of its
    /// events: the next read starts there, and the checkpoint moves there with the next batch
    /// (not on its own, which would commit on every wake-up).
    pub(super) scanned: Position,
    /// The fencing token of the session's lease, carried by every commit.
    pub(super) fence: Option<u64>,
    /// Since when `scanned` has been past the checkpoint.
    pub(super) scanned_since: Option<Instant>,
}

impl Cursor {
    pub(super) fn position(&self) -> Position {
        self.checkpoint.map_or(Position::START, |c| c.position)
    }

    /// Where the next read starts: the checkpoint, or past it as far as reads have looked.
    pub(super) fn read_from(&self) -> Position {
        self.position().max(self.scanned)
    }

    /// Whether reads have looked past the checkpoint for [`IDLE_CHECKPOINT_EVERY`] without
    /// finding an event of the partition: the checkpoint then moves there on its own, so that
    /// waits for a position (`wait_for_projections`) end for partitions without new events.
    pub(super) fn idle_checkpoint_due(&self) -> bool {
        self.scanned > self.position()
            && self
                .scanned_since
                .is_some_and(|since| since.elapsed() >= IDLE_CHECKPOINT_EVERY)
    }
}

/// How long a partition's reads may look past its checkpoint before it moves on its own.
pub(super) const IDLE_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

impl Cursor {
    /// Whether the events after the checkpoint are replays.
    pub(super) fn replaying(&self) -> bool {
        self.checkpoint
            .is_some_and(|c| c.replay_until.is_some_and(|until| c.position < until))
    }

    /// Where the replay ends ([`Position::START`] if it is not replaying).
    pub(super) fn replay_end(&self) -> Position {
        self.checkpoint
            .and_then(|c| c.replay_until)
            .unwrap_or(Position::START)
    }

    /// The checkpoint at `position`, still replaying if that is below the replay's end.
    pub(super) fn at(&self, position: Position) -> Checkpoint {
        let replay_until = self
            .checkpoint
            .and_then(|c| c.replay_until)
            .filter(|&until| position < until);
        Checkpoint {
            position,
            version: self.version,
            replay_until,
        }
    }
}

/// Tracks a replay for progress reports.
pub(super) struct Replay {
    pub(super) started: Instant,
    pub(super) done: u64,
    pub(super) total: Option<u64>,
}
