//! The [`LeaseStore`] contract: one active runner per projection partition.

use std::{future::Future, time::Duration};

use super::{CheckpointError, ProjectionKey};

/// Grants each projection partition to one runner at a time, across every process sharing the
/// store.
///
/// Guarantees every implementation gives (checked by the projection suite): at most one live
/// lease per [`ProjectionKey`]; a lease whose holder dies is given up (its connection closes,
/// or it expires) so another runner can take it. A runner that lost its lease without noticing
/// is stopped by the checkpoint's compare-and-set, never by the lease alone.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot grant projection leases",
    label = "not a `LeaseStore`",
    note = "use `esframe_memory::MemoryCheckpoints` or `store.checkpoints()` of `esframe_postgres::PgEventStore`"
)]
pub trait LeaseStore: Clone + Send + Sync + 'static {
    /// Proof of being the partition's active runner; dropping it gives the lease up.
    type Lease: Send + Sync + 'static;

    /// Takes the partition's lease if no one holds it.
    fn try_lease(
        &self,
        key: &ProjectionKey,
    ) -> impl Future<Output = Result<Option<Self::Lease>, CheckpointError>> + Send;

    /// Takes the partition's lease, waiting up to `wait` for its holder (and, where a store
    /// has them, appends updating the projection inline) to let go; `None` if it could not.
    /// The default tries every 10 ms.
    fn wait_lease(
        &self,
        key: &ProjectionKey,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<Self::Lease>, CheckpointError>> + Send {
        async move {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                if let Some(lease) = self.try_lease(key).await? {
                    return Ok(Some(lease));
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok(None);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Whether `lease` is still held. Cheap: reads state kept by the lease's keep-alive.
    fn lease_held(&self, lease: &Self::Lease) -> bool;

    /// Gives the lease up at once.
    fn release(&self, lease: Self::Lease) -> impl Future<Output = ()> + Send;

    /// The lease's fencing token: it grows each time the partition's lease changes hands. A
    /// commit that carries it ([`CheckpointCommit::fence`](super::CheckpointCommit::fence))
    /// fails with [`CheckpointError::Fenced`] once another runner has taken the lease, so a
    /// runner that lost its lease without noticing (paused past its expiry, cut off from the
    /// database) can never commit again. `None` for leases that cannot be lost unnoticed (the
    /// memory store's, given up only when dropped).
    fn fence(&self, lease: &Self::Lease) -> Option<u64>;

    /// Announces `member` as a live worker of `group` (a partitioned projection's name) for a
    /// while, and returns how many live members the group has, this one included. Partitioned
    /// runners call it on every rebalance to learn their fair share.
    ///
    /// In a store whose leases lapse, a member must stop counting before the leases of a
    /// member that died lapse (PostgreSQL: two thirds of the lease time, as leases are renewed
    /// every third): otherwise a survivor that takes them as orphans is over its share, hands
    /// them back, and they sit free until the dead member stops counting.
    fn heartbeat(
        &self,
        group: &str,
        member: &str,
    ) -> impl Future<Output = Result<u32, CheckpointError>> + Send;

    /// How long a member counts after its [`heartbeat`](Self::heartbeat), in a store whose
    /// memberships expire (PostgreSQL: two thirds of the lease time). A partitioned runner
    /// renews its membership at least three times within it, whatever its rebalance
    /// interval, so that live members never drop out of each other's count. The default,
    /// `None`: the runner keeps to its interval.
    fn membership_lifetime(&self) -> Option<std::time::Duration> {
        None
    }

    /// Removes `member` from `group` at once (a clean shutdown), so the others take its share
    /// without waiting for its heartbeat to expire.
    fn leave(&self, group: &str, member: &str) -> impl Future<Output = ()> + Send;

    /// The leases of projection `name`'s partitions the store knows of (held, or with a
    /// recorded error), by partition.
    fn leases(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Vec<LeaseInfo>, CheckpointError>> + Send;

    /// Records the last error of a partition's runner (`None`: it recovered), shown by the
    /// projection's status. Best effort: a failure to record it is ignored.
    fn note_error(
        &self,
        key: &ProjectionKey,
        error: Option<&str>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (key, error);
        async {}
    }
}

/// A partition's lease as [`LeaseStore::leases`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The partition.
    pub partition: u16,
    /// Who holds it (the store's description of the holding process); `None` if it is free or
    /// expired.
    pub holder: Option<String>,
    /// Time left before it expires if its holder stops renewing it (`None`: it does not
    /// expire).
    pub expires_in: Option<Duration>,
    /// Whether its holder stopped renewing it before giving it up (it died, or is paused or
    /// cut off): the lease is free to take, and the partition has no runner.
    pub expired: bool,
    /// The fencing token ([`LeaseStore::fence`]).
    pub token: Option<u64>,
    /// The last error its runners recorded ([`LeaseStore::note_error`]).
    pub last_error: Option<String>,
}

/// This process as lease stores and partitioned runners name it: `host:pid` (the host from
/// `HOSTNAME` or `/etc/hostname`).
pub fn this_process() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "host".to_owned());
    format!("{host}:{}", std::process::id())
}
