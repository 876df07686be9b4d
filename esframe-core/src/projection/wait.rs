//! Read-your-writes: waiting until projections have processed a position.

use std::time::{Duration, Instant};

use crate::Position;

use super::{CheckpointStore, ProjectionError, ProjectionKey};

/// Waits until every projection in `projections` has its checkpoint at or past global position
/// `position` (say, the last position of a command's events), or fails with
/// [`ProjectionError::Timeout`] naming the first one still behind.
///
/// A checkpoint past a position means the event there was handled, skipped by the projection's
/// interest, or parked as a dead letter. Waiting is woken by commits in this process and polls
/// otherwise (a few milliseconds; see [`CheckpointStore::changed`]).
pub async fn wait_for_projections<C: CheckpointStore>(
    checkpoints: &C,
    projections: &[ProjectionKey],
    position: Position,
    timeout: Duration,
) -> Result<(), ProjectionError> {
    let started = Instant::now();
    loop {
        // Register for the wake-up before reading, so a commit in between is not missed.
        let changed = checkpoints.changed();
        let mut behind = None;
        for projection in projections {
            let reached = checkpoints
                .load(projection)
                .await
                .map_err(|source| ProjectionError::Checkpoint {
                    projection: projection.clone(),
                    source,
                })?
                .map_or(Position::START, |c| c.position);
            if reached < position {
                behind = Some((projection, reached));
                break;
            }
        }
        let Some((projection, reached)) = behind else {
            return Ok(());
        };
        let waited = started.elapsed();
        let Some(left) = timeout.checked_sub(waited) else {
            return Err(ProjectionError::Timeout {
                projection: projection.clone(),
                target: position,
                reached,
                waited,
            });
        };
        let _ = tokio::time::timeout(left, changed).await;
    }
}
