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

use super::{CheckpointError, LeaseStore, ProjectionKey};

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
            if !joined {
                // Let the members starting at the same time see each other before taking
                // partitions, instead of the first one taking them all and handing most back.
                joined = true;
            } else if let Err(err) = self
                .rebalance(&mut sessions, members, offset, &mut start)
                .await
            {
                break Err(lease_error(err));
            }
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
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
    /// beyond it).
    async fn rebalance<E>(
        &self,
        sessions: &mut BTreeMap<u16, Session<E>>,
        members: u32,
        offset: usize,
        start: &mut impl FnMut(u16, L::Lease) -> Session<E>,
    ) -> Result<(), CheckpointError> {
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
            return Ok(());
        }
        // Free partitions, up to the fair share; beyond it, orphans too (leases whose holder
        // stopped renewing them): a dead runner's partitions move as soon as their leases
        // expire, not only once its membership has.
        let leases = match self.leases.leases(self.group).await {
            Ok(leases) => leases,
            Err(err) if err.is_transient() => {
                tracing::warn!(group = self.group, error = %err, "cannot list the partition leases; retrying");
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        let mut wanted = share.saturating_sub(active.len());
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
            let key = &self.partitions[usize::from(index)];
            match self.leases.try_lease(key).await {
                Ok(Some(lease)) => {
                    tracing::info!(partition = %key, share, members, orphan, "partition lease taken; running");
                    sessions.insert(index, start(index, lease));
                    wanted = wanted.saturating_sub(1);
                }
                Ok(None) => {}
                Err(err) if err.is_transient() => {
                    tracing::warn!(partition = %key, error = %err, "cannot take a partition lease; retrying");
                    return Ok(());
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
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
