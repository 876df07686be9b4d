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
}

impl Cursor {
    pub(super) fn position(&self) -> Position {
        self.checkpoint.map_or(Position::START, |c| c.position)
    }

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
