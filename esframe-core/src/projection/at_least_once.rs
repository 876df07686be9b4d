//! [`AtLeastOnce`]: checkpoints in one store, read model somewhere else.

use super::{
    Checkpoint, CheckpointCommit, CheckpointError, CheckpointStore, DeadLetter, DeadLetterStore,
    Delivery, LeaseInfo, LeaseStore, ProjectionKey,
};

/// Runs projections whose read model lives outside the checkpoint store (another database, a
/// search index, a cache, a message broker) on any checkpoint store, at least once.
///
/// Handlers get `()` as their transaction and write wherever they like; after they return, the
/// runner saves the checkpoint in `C`'s own transaction. If the process dies in between, the
/// batch is handled again on restart, so handlers must be idempotent:
///
/// - upsert keyed by something in the event (its `event_id`, or stream and version) instead of
///   inserting or incrementing blindly;
/// - or keep the last applied `global_position` beside the data and ignore events at or below it;
/// - never fire an external side effect twice without a key the receiver deduplicates on.
#[derive(Debug, Clone)]
pub struct AtLeastOnce<C>(pub C);

impl<C: CheckpointStore> CheckpointStore for AtLeastOnce<C> {
    type Tx = ();

    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }

    async fn load(&self, key: &ProjectionKey) -> Result<Option<Checkpoint>, CheckpointError> {
        self.0.load(key).await
    }

    async fn partition_count(&self, name: &str, proposed: u16) -> Result<u16, CheckpointError> {
        self.0.partition_count(name, proposed).await
    }

    async fn begin(&self) -> Result<(), CheckpointError> {
        Ok(())
    }

    async fn commit(&self, (): (), commit: CheckpointCommit) -> Result<(), CheckpointError> {
        let tx = self.0.begin().await?;
        self.0.commit(tx, commit).await
    }

    async fn rollback(&self, (): ()) {}

    fn changed(&self) -> impl Future<Output = ()> + Send + 'static {
        self.0.changed()
    }
}

impl<C: LeaseStore> LeaseStore for AtLeastOnce<C> {
    type Lease = C::Lease;

    async fn try_lease(&self, key: &ProjectionKey) -> Result<Option<Self::Lease>, CheckpointError> {
        self.0.try_lease(key).await
    }

    async fn wait_lease(
        &self,
        key: &ProjectionKey,
        wait: std::time::Duration,
    ) -> Result<Option<Self::Lease>, CheckpointError> {
        self.0.wait_lease(key, wait).await
    }

    fn lease_held(&self, lease: &Self::Lease) -> bool {
        self.0.lease_held(lease)
    }

    async fn release(&self, lease: Self::Lease) {
        self.0.release(lease).await;
    }
    fn fence(&self, lease: &Self::Lease) -> Option<u64> {
        self.0.fence(lease)
    }
    async fn heartbeat(&self, group: &str, member: &str) -> Result<u32, CheckpointError> {
        self.0.heartbeat(group, member).await
    }
    fn membership_lifetime(&self) -> Option<std::time::Duration> {
        self.0.membership_lifetime()
    }
    async fn leave(&self, group: &str, member: &str) {
        self.0.leave(group, member).await;
    }
    async fn leases(&self, name: &str) -> Result<Vec<LeaseInfo>, CheckpointError> {
        self.0.leases(name).await
    }
    async fn note_error(&self, key: &ProjectionKey, error: Option<&str>) {
        self.0.note_error(key, error).await;
    }
}

impl<C: DeadLetterStore> DeadLetterStore for AtLeastOnce<C> {
    async fn dead_letters(&self, key: &ProjectionKey) -> Result<Vec<DeadLetter>, CheckpointError> {
        self.0.dead_letters(key).await
    }

    async fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, CheckpointError> {
        self.0.dead_letter(id).await
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, CheckpointError> {
        self.0.discard_dead_letter(id).await
    }

    async fn note_retry_failure(&self, id: u64, error: &str) -> Result<(), CheckpointError> {
        self.0.note_retry_failure(id, error).await
    }
}
