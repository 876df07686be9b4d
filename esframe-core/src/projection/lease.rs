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
}
