//! Retry and snapshot policies of the [`CommandHandler`](crate::CommandHandler).

use std::{num::NonZeroU64, time::Duration};

/// How often a command is retried after a concurrency conflict, and how long to wait between.
///
/// Waits grow exponentially from `initial_backoff` up to `max_backoff`, with full jitter (a
/// uniformly random wait up to the current bound), so competing writers spread out.
///
/// ```
/// use esframe_core::RetryPolicy;
/// use std::time::Duration;
/// let policy = RetryPolicy::attempts(5).backoff(Duration::from_millis(2), Duration::from_millis(50));
/// assert_eq!(policy.max_attempts(), 5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 10 attempts, waits from 1 ms growing to at most 100 ms.
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(100),
        }
    }
}

impl RetryPolicy {
    /// Retry a command after at most `max_attempts - 1` conflicts with other writers (it is
    /// handled at least once). A decision on a stale cached state, taken again on the stored
    /// state, does not count.
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            ..Self::default()
        }
    }

    /// Never retry: a conflict with another writer is returned at once.
    pub fn no_retry() -> Self {
        Self::attempts(1)
    }

    /// Sets the first wait and the cap on waits.
    #[must_use]
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// The most times a command is handled.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The upper bound of the wait before retry number `retry` (1 = first retry).
    pub fn backoff_bound(&self, retry: u32) -> Duration {
        let factor = 1u32 << retry.saturating_sub(1).min(20);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// A random wait in `0..=backoff_bound(retry)`.
    pub(crate) fn jittered_backoff(&self, retry: u32) -> Duration {
        let bound = self.backoff_bound(retry);
        let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

/// When the command handler stores a snapshot of the aggregate's state, once snapshots are
/// turned on with [`CommandHandler::snapshot_policy`](crate::CommandHandler::snapshot_policy)
/// (a handler has none by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SnapshotPolicy {
    /// Never: snapshots off.
    Never,
    /// Whenever an append crosses a multiple of N events, and with the first append after a
    /// stored snapshot had to be ignored (unreadable, of another schema version, or
    /// contradicted by the stream).
    EveryNEvents(NonZeroU64),
    /// Every 100 events: what `SnapshotPolicy::default()` gives a handler that turns
    /// snapshots on.
    #[default]
    Default,
}

impl SnapshotPolicy {
    /// Snapshot every `n` events; `n = 0` means never.
    pub fn every(n: u64) -> Self {
        NonZeroU64::new(n).map_or(Self::Never, Self::EveryNEvents)
    }

    /// Whether an append moving the stream from `from` to `to` should store a snapshot.
    pub fn is_due(&self, from: u64, to: u64, stored_snapshot_unusable: bool) -> bool {
        let Some(n) = self.interval() else {
            return false;
        };
        stored_snapshot_unusable || from / n != to / n
    }

    /// Events between snapshots; `None` for [`SnapshotPolicy::Never`].
    pub fn interval(&self) -> Option<u64> {
        match self {
            Self::Never => None,
            Self::EveryNEvents(n) => Some(n.get()),
            Self::Default => Some(100),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p =
            RetryPolicy::attempts(10).backoff(Duration::from_millis(1), Duration::from_millis(10));
        assert_eq!(p.backoff_bound(1), Duration::from_millis(1));
        assert_eq!(p.backoff_bound(2), Duration::from_millis(2));
        assert_eq!(p.backoff_bound(4), Duration::from_millis(8));
        assert_eq!(p.backoff_bound(5), Duration::from_millis(10));
        assert_eq!(p.backoff_bound(60), Duration::from_millis(10));
        for retry in 1..10 {
            assert!(p.jittered_backoff(retry) <= p.backoff_bound(retry));
        }
        assert_eq!(RetryPolicy::attempts(0).max_attempts(), 1);
    }

    #[test]
    fn snapshot_due_when_crossing_multiples() {
        let p = SnapshotPolicy::every(10);
        assert!(!p.is_due(0, 9, false));
        assert!(p.is_due(9, 10, false));
        assert!(p.is_due(8, 12, false));
        assert!(!p.is_due(10, 19, false));
        assert!(p.is_due(10, 11, true));
        assert!(!SnapshotPolicy::Never.is_due(0, 1000, true));
        assert_eq!(SnapshotPolicy::every(0), SnapshotPolicy::Never);
        assert!(SnapshotPolicy::default().is_due(99, 100, false));
    }
}

/// How the handler uses a cached aggregate state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CachePolicy {
    /// Decide on the cached state and prove it current afterwards, so that no result is ever
    /// one of a stale state. The default. A decision that appends events is proved by the
    /// append itself (its expected version is the cached one): one round trip per command.
    /// If another writer changed the stream meanwhile, the append conflicts and the command
    /// is decided again at once on the stored state (this does not count as a retry). A
    /// rejection, or a command that emits nothing, is returned only after a read of the
    /// stream's version confirms it (decided again on the stored state if the stream moved).
    #[default]
    Verify,
    /// Like `Verify`, except that a rejection or a command that emits nothing is returned as
    /// decided on the cached state, without the read that confirms it: such commands cost no
    /// round trip at all, but may answer from a stale state when another process wrote the
    /// stream. Choose it only when this process is the only writer of its aggregates.
    Trust,
}

/// How the handler treats commands on the same stream within one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ConcurrencyMode {
    /// Commands run in parallel; the store's version check decides and losers retry. Best when
    /// commands rarely target the same aggregate at the same moment. The default.
    #[default]
    Optimistic,
    /// Commands on one stream queue behind each other in this process (FIFO), so they never
    /// conflict among themselves; writers in other processes are still caught by the version
    /// check and retried. Choose it for hot aggregates that many tasks write at once.
    Pessimistic,
}
