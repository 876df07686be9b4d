//! [`PublisherStatus`]: how far a publisher is, how far behind, and how it is doing; kept on a
//! board its partitions' sessions write to.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use crate::Position;

/// A publisher's state, for operators: how far it is, how far behind, and how it is doing.
///
/// For a publisher split into partitions ([`Publisher::partitions`](super::Publisher::partitions))
/// it is this runner's view, over the partitions it holds (listed in `partitions`): the lowest
/// checkpoint, the highest head, the sum of what is pending and behind, the oldest lag.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PublisherStatus {
    /// The checkpoint: every event at or before it reached the broker.
    pub position: Position,
    /// The last position the publisher saw in the log.
    pub head: Position,
    /// Events read but not yet acknowledged, in the batch in progress (0 when caught up).
    pub pending: usize,
    /// How long the oldest unpublished event has waited, when there is one.
    pub lag: Option<Duration>,
    /// Messages the broker acknowledged since the publisher started.
    pub published: u64,
    /// Of those, how many the broker recognised as duplicates.
    pub duplicates: u64,
    /// Failed sends since the publisher started.
    pub failures: u64,
    /// Checkpoint commits refused by a lease's fencing token since the publisher started:
    /// another runner had taken the partition while this one was paused or cut off past its
    /// lease. Each is followed by a stand-by, never by a second owner.
    pub fenced: u64,
    /// The last failure, while it is not resolved.
    pub last_error: Option<String>,
    /// `false` while the broker cannot be reached.
    pub broker_reachable: bool,
    /// Whether the publisher holds a lease (only a running one does).
    pub active: bool,
    /// Events in the log after the checkpoint, as last counted (at most once a second, while
    /// the publisher has work; 0 once caught up). `None` until first known.
    pub behind: Option<u64>,
    /// Messages acknowledged per second, over the last second or more of sending.
    pub rate: f64,
    /// The partitions this runner holds the leases of (`[0]` for an unsplit publisher while
    /// it runs).
    pub partitions: Vec<u16>,
}

/// What one partition's session last reported.
#[derive(Debug, Clone, Default)]
pub(super) struct LaneStatus {
    pub(super) held: bool,
    pub(super) position: Position,
    pub(super) head: Position,
    pub(super) pending: usize,
    pub(super) lag: Option<Duration>,
    pub(super) behind: Option<u64>,
    /// When `behind` was last counted.
    pub(super) counted_at: Option<Instant>,
}

/// The publisher's counters and every partition's report, shared by its sessions.
#[derive(Debug, Default)]
pub(super) struct Board {
    counters: Mutex<Counters>,
    lanes: Mutex<BTreeMap<u16, LaneStatus>>,
}

/// The publisher-wide part of the status.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) published: u64,
    pub(super) duplicates: u64,
    pub(super) failures: u64,
    pub(super) fenced: u64,
    pub(super) last_error: Option<String>,
    /// `true` while unreachable: an idle publisher has no reason to report its broker down.
    pub(super) unreachable: bool,
    pub(super) rate: f64,
    /// When the rate was last measured, and the count of messages then.
    pub(super) rate_sampled: Option<(Instant, u64)>,
}

impl Board {
    /// The status: the counters, and the partitions held (or, when none is, every partition
    /// last seen) folded into one.
    pub(super) fn snapshot(&self) -> PublisherStatus {
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        let held: Vec<(&u16, &LaneStatus)> = lanes.iter().filter(|(_, l)| l.held).collect();
        let shown: Vec<&LaneStatus> = if held.is_empty() {
            lanes.values().collect()
        } else {
            held.iter().map(|(_, l)| *l).collect()
        };
        PublisherStatus {
            position: shown.iter().map(|l| l.position).min().unwrap_or_default(),
            head: shown.iter().map(|l| l.head).max().unwrap_or_default(),
            pending: shown.iter().map(|l| l.pending).sum(),
            lag: shown.iter().filter_map(|l| l.lag).max(),
            published: counters.published,
            duplicates: counters.duplicates,
            failures: counters.failures,
            fenced: counters.fenced,
            last_error: counters.last_error.clone(),
            broker_reachable: !counters.unreachable,
            active: !held.is_empty(),
            behind: if shown.is_empty() {
                None
            } else {
                shown.iter().map(|l| l.behind).sum()
            },
            rate: counters.rate,
            partitions: held.iter().map(|(p, _)| **p).collect(),
        }
    }

    pub(super) fn counters<T>(&self, change: impl FnOnce(&mut Counters) -> T) -> T {
        change(&mut self.counters.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(super) fn lane<T>(&self, partition: u16, change: impl FnOnce(&mut LaneStatus) -> T) -> T {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        change(lanes.entry(partition).or_default())
    }
}
