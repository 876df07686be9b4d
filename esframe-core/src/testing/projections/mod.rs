//! The projection suite: checks of the projection runner on a checkpoint backend (checkpoints,
//! leases, dead letters), run with [`projection_suite!`](crate::projection_suite) by every
//! backend unchanged.
//!
//! The checks' read model is written through the checkpoint store's transaction by a
//! [`Recorder`] the backend supplies: [`MemoryRecorder`] for stores whose transaction is `()`,
//! a table written through the transaction for an exactly-once store, so that a check sees what
//! was committed, not what was attempted.

mod delivery;
mod failures;
mod fixtures;
mod keys;
mod partitions;
mod rebuilds;
mod recorder;

pub use delivery::*;
pub use failures::*;
pub use keys::*;
pub use partitions::*;
pub use rebuilds::*;
pub use recorder::{Applied, MemoryRecorder, Recorded, Recorder};
