//! Partitions of one group (a projection's, a publisher's) spread over every runner of the
//! group, without a leader.
//!
//! Each runner is a member of the group (a heartbeat in the lease store). Every interval it
//! counts the live members, aims at its fair share (`ceil(N / members)`), asks sessions above
//! it to stop at their next batch boundary, and takes free partitions below it, and orphaned
//! ones (leases whose holder stopped renewing) beyond it. Each partition it holds runs as a
//! session on a task of its own, with its own lease; what a session does is its owner's
//! business ([`Balancer::run`]'s `start`).

use std::{collections::BTreeMap, time::Duration};

use futures_util::future::join_all;
use tokio::{sync::watch, task::JoinHandle};

use crate::Position;

use super::{
    Checkpoint, CheckpointCommit, CheckpointError, CheckpointStore, LeaseStore, ProjectionKey,
};

/// A partition's session, running on a task of its own until `stop` says otherwise, its lease
/// is lost, or it fails.
pub(crate) struct Session<E> {
    /// Set to `true` to stop the session at its next batch boundary.
    pub(crate) stop: watch::Sender<bool>,
    /// The session; it gives its lease up before it ends.
    pub(crate) task: JoinHandle<Result<(), E>>,
}

/// An error a partition session can end with.
pub(crate) trait SessionError: std::fmt::Display + Send + 'static {
    /// A backend error: the partition is freed and taken again, by this runner or another.
    fn is_transient(&self) -> bool;
}

/// One runner's part in a partitioned group.
pub(crate) struct Balancer<'a, L> {
    /// Where the leases and the group's members are kept.
    pub(crate) leases: &'a L,
    /// The group's name: the projection's (or publisher's) name.
    pub(crate) group: &'a str,
    /// Every partition's key, by index.
    pub(crate) partitions: &'a [ProjectionKey],
    /// This runner's name among the members.
    pub(crate) member: &'a str,
    /// How often the membership is renewed and the share reconsidered.
    pub(crate) interval: Duration,
}

impl<L: LeaseStore> Balancer<'_, L> {
    /// The time between two rounds: the configured interval, or less where the lease store's
    /// memberships expire sooner than three intervals, so that this runner's membership is
    /// renewed at least three times within its lifetime (but not more often than every 10 ms).
    fn round_interval(&self) -> Duration {
        match self.leases.membership_lifetime() {
            Some(lifetime) => self
                .interval
                .min((lifetime / 3).max(Duration::from_millis(10))),
            None => self.interval,
        }
    }

    /// Runs this runner's share of the partitions until `stop`: `start(index, lease)` starts a
    /// partition's session once its lease is taken. A session that ends with a transient error
    /// (or a lost lease, `Ok`) frees its partition; any other error stops every session and is
    /// returned, as is a lease store's lasting failure (`lease_error`). On the way out every
    /// session is stopped and waited for, and the runner leaves the group.
    pub(crate) async fn run<E: SessionError>(
        &self,
        mut stop: watch::Receiver<bool>,
        mut start: impl FnMut(u16, L::Lease) -> Session<E>,
        lease_error: impl Fn(CheckpointError) -> E,
    ) -> Result<(), E> {
        let count = self.partitions.len();
        let offset = start_offset(self.member, count);
        let mut sessions: BTreeMap<u16, Session<E>> = BTreeMap::new();
        let mut members = 1;
        let mut joined = false;
        let result = loop {
            if let Err(err) = self.reap(&mut sessions).await {
                break Err(err);
            }
            // A dropped sender counts as a stop, or the wait below would return at once, and
            // the loop spin.
            if *stop.borrow() || stop.has_changed().is_err() {
                break Ok(());
            }
            match self.leases.heartbeat(self.group, self.member).await {
                Ok(live) => members = live.max(1),
                Err(err) if err.is_transient() => {
                    tracing::warn!(group = self.group, error = %err, "cannot renew this runner's membership; keeping its partitions as they are");
                }
                Err(err) => break Err(lease_error(err)),
            }
            let mut next = self.round_interval();
            if !joined {
                // Let the members starting at the same time see each other before taking
                // partitions, instead of the first one taking them all and handing most back.
                joined = true;
            } else {
                match self
                    .rebalance(&mut sessions, members, offset, &mut start)
                    .await
                {
                    // A lease about to lapse (its holder stopped renewing it: a live holder
                    // renews at a third of the lease time) is looked at again as it lapses,
                    // not up to an interval later.
                    Ok(Some(lapses_in)) => next = next.min(lapses_in + LAPSE_MARGIN),
                    Ok(None) => {}
                    Err(err) => break Err(lease_error(err)),
                }
            }
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                _ = stop.wait_for(|stop| *stop) => {}
            }
        };
        for session in sessions.values() {
            let _ = session.stop.send(true);
        }
        let ends = join_all(sessions.into_values().map(|s| s.task)).await;
        self.leases.leave(self.group, self.member).await;
        let mut result = result;
        for end in ends {
            match end {
                Ok(Err(err)) if result.is_ok() && !err.is_transient() => result = Err(err),
                Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                _ => {}
            }
        }
        result
    }

    /// Collects the sessions that ended; the first lasting error among them.
    async fn reap<E: SessionError>(
        &self,
        sessions: &mut BTreeMap<u16, Session<E>>,
    ) -> Result<(), E> {
        let ended: Vec<u16> = sessions
            .iter()
            .filter(|(_, s)| s.task.is_finished())
            .map(|(p, _)| *p)
            .collect();
        let mut fatal = None;
        for index in ended {
            let session = sessions.remove(&index).expect("listed above");
            let key = &self.partitions[usize::from(index)];
            match session.task.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    self.leases.note_error(key, Some(&err.to_string())).await;
                    if err.is_transient() {
                        tracing::warn!(partition = %key, error = %err, "partition interrupted by a backend error; it will be taken again");
                    } else if fatal.is_none() {
                        fatal = Some(err);
                    }
                }
                Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                Err(_) => {}
            }
        }
        fatal.map_or(Ok(()), Err)
    }

    /// Hands partitions above the fair share back, or takes free ones up to it (and orphans
    /// beyond it). Returns how soon the first lease held by another runner lapses, if that is
    /// within the interval.
    async fn rebalance<E>(
        &self,
        sessions: &mut BTreeMap<u16, Session<E>>,
        members: u32,
        offset: usize,
        start: &mut impl FnMut(u16, L::Lease) -> Session<E>,
    ) -> Result<Option<Duration>, CheckpointError> {
        let count = self.partitions.len();
        let share = count.div_ceil(members as usize);
        let active: Vec<u16> = sessions
            .iter()
            .filter(|(_, s)| !*s.stop.borrow())
            .map(|(p, _)| *p)
            .collect();
        if active.len() > share {
            for index in active.iter().rev().take(active.len() - share) {
                tracing::info!(
                    group = self.group,
                    partition = index,
                    share,
                    members,
                    "handing a partition back for a fair share"
                );
                let _ = sessions[index].stop.send(true);
            }
            return Ok(None);
        }
        // Free partitions, up to the fair share; beyond it, orphans too (leases whose holder
        // stopped renewing them): a dead runner's partitions move as soon as their leases
        // expire, not only once its membership has.
        let leases = match self.leases.leases(self.group).await {
            Ok(leases) => leases,
            Err(err) if err.is_transient() => {
                tracing::warn!(group = self.group, error = %err, "cannot list the partition leases; retrying");
                return Ok(None);
            }
            Err(err) => return Err(err),
        };
        let lapsing = leases
            .iter()
            .filter(|l| !sessions.contains_key(&l.partition))
            .filter_map(|l| l.expires_in)
            .filter(|left| *left < self.interval)
            .min();
        let mut wanted = share.saturating_sub(active.len());
        let mut taking = Vec::new();
        for step in 0..count {
            let index = ((offset + step) % count) as u16;
            if sessions.contains_key(&index) {
                continue;
            }
            let info = leases.iter().find(|l| l.partition == index);
            let free = info.is_none_or(|l| l.holder.is_none());
            let orphan = info.is_some_and(|l| l.expired);
            if !free || (wanted == 0 && !orphan) {
                continue;
            }
            wanted = wanted.saturating_sub(1);
            taking.push((index, orphan));
        }
        // Taken together: a dead runner's partitions all move at once, not one lease's round
        // trips after another.
        let taken = join_all(
            taking
                .iter()
                .map(|&(index, _)| self.leases.try_lease(&self.partitions[usize::from(index)])),
        )
        .await;
        let mut failed = None;
        for (&(index, orphan), taken) in taking.iter().zip(taken) {
            let key = &self.partitions[usize::from(index)];
            match taken {
                Ok(Some(lease)) => {
                    tracing::info!(partition = %key, share, members, orphan, "partition lease taken; running");
                    sessions.insert(index, start(index, lease));
                }
                Ok(None) => {}
                Err(err) if err.is_transient() => {
                    tracing::warn!(partition = %key, error = %err, "cannot take a partition lease; retrying");
                }
                Err(err) => failed = failed.or(Some(err)),
            }
        }
        failed.map_or(Ok(lapsing), Err)
    }
}

/// How long after a lease's expiry its lapse is looked for: the store's clock decides, and
/// the time left was read a round trip ago.
const LAPSE_MARGIN: Duration = Duration::from_millis(5);

/// What [`resume_in_count`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resumed {
    /// The stored count was `count` already.
    Unchanged,
    /// The count was `from`; every partition of `count` now starts at `at`.
    Changed { from: u16, at: Position },
    /// A runner holds a lease of the old or the new count; try again once it stopped.
    Busy,
}

/// Makes the stored partition count of `first`'s group `count`, for runners whose work can
/// start again from any earlier position (publishers, process managers; a projection rebuilds
/// instead): holding every lease of the old and the new count (waiting up to `wait` for each),
/// every new partition's checkpoint becomes the lowest old one, with the count, in one commit.
/// A group that never stored a count had one partition.
pub(crate) async fn resume_in_count<C: CheckpointStore + LeaseStore>(
    checkpoints: &C,
    first: &ProjectionKey,
    count: u16,
    wait: Duration,
) -> Result<Resumed, CheckpointError> {
    let name = first.name();
    loop {
        let stored = checkpoints.partition_count(name, 1).await?;
        if stored == count {
            return Ok(Resumed::Unchanged);
        }
        let mut leases = Vec::new();
        for index in 0..stored.max(count) {
            match checkpoints
                .wait_lease(&first.with_partition(index), wait)
                .await
            {
                Ok(Some(lease)) => leases.push(lease),
                other => {
                    join_all(leases.into_iter().map(|l| checkpoints.release(l))).await;
                    return other.map(|_| Resumed::Busy);
                }
            }
        }
        let result = async {
            // Another runner may have changed the count while this one waited for the
            // leases: decide on the count stored now, under them.
            match checkpoints.partition_count(name, 1).await? {
                now if now == count => return Ok(Some(Resumed::Unchanged)),
                now if now != stored => return Ok(None),
                _ => {}
            }
            let mut lowest = None;
            for index in 0..stored {
                let at = checkpoints
                    .load(&first.with_partition(index))
                    .await?
                    .map_or(Position::START, |c| c.position);
                lowest = Some(lowest.map_or(at, |l: Position| l.min(at)));
            }
            let at = lowest.unwrap_or(Position::START);
            let to = Checkpoint {
                position: at,
                version: 1,
                replay_until: None,
            };
            let from = checkpoints.load(first).await?;
            let mut commit = CheckpointCommit::advance(first, from, to)
                .fenced(leases.first().and_then(|l| checkpoints.fence(l)));
            commit.repartition = Some(count);
            let tx = checkpoints.begin().await?;
            checkpoints.commit(tx, commit).await?;
            Ok(Some(Resumed::Changed { from: stored, at }))
        }
        .await;
        join_all(leases.into_iter().map(|l| checkpoints.release(l))).await;
        if let Some(resumed) = result? {
            return Ok(resumed);
        }
    }
}

/// A name for a runner among a group's runners: host, process, random.
pub(crate) fn new_member_name() -> std::sync::Arc<str> {
    std::sync::Arc::from(format!(
        "{}:{:08x}",
        super::this_process(),
        fastrand::u32(..)
    ))
}

/// Where member `member` starts looking for free partitions among `count`: spread, so that
/// members joining together do not all race for the same one.
fn start_offset(member: &str, count: usize) -> usize {
    use std::hash::{Hash, Hasher};
    // `DefaultHasher::new()` has fixed keys: the same member starts at the same place.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    member.hash(&mut hasher);
    (hasher.finish() % (count.max(1) as u64)) as usize
}
