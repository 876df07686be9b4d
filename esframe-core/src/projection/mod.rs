//! Projections: read models kept up to date from the global log.
//!
//! A [`Projection`] turns events into a read model. A [`ProjectionRunner`] feeds it: it catches
//! up from the projection's checkpoint by reading the global log in batches, then follows new
//! events as they are appended, and stores the checkpoint through a [`CheckpointStore`], under
//! a [`ProjectionKey`] (the projection's name and partition), holding a lease from a
//! [`LeaseStore`] and parking failing events in a [`DeadLetterStore`].
//!
//! ```text
//!   global log ──read_all_batch──▶ runner ──handle_batch(events, ctx)──▶ projection
//!        ▲                           │                                     │ writes through ctx.tx()
//!        └──wait_for_events◀─────────┤                                     ▼
//!                                    └──commit(tx, checkpoint from → to)──▶ checkpoint store
//! ```
//!
//! What is guaranteed depends on the checkpoint store's [`Delivery`]:
//!
//! - [`Delivery::ExactlyOnce`] (the PostgreSQL checkpoint store): the handler writes its read
//!   model through the transaction the runner gives it, and the runner advances the checkpoint in
//!   that same transaction with a compare-and-set. A crash at any point either commits both or
//!   neither, so no event is lost or applied twice, even when two runners race.
//! - [`Delivery::AtLeastOnce`] (the memory checkpoint store, or [`AtLeastOnce`] around any
//!   store, for read models outside the checkpoint's database): the checkpoint is saved after the
//!   handler returns, so a crash in between replays the batch. Handlers must be idempotent: an
//!   upsert keyed by the event id, or a "last applied position" column compared before writing.
//!
//! Either way, events reach a projection in global order (within a stream, in version order),
//! a failing event is retried with exponential backoff and then parked as a [`DeadLetter`] (or
//! stops the runner, see [`OnFailure`]), one runner per projection is active across processes
//! (a lease from the checkpoint store), and [`ProjectionRunner::rebuild`] replays a projection
//! into a fresh read model with [`RebuildProgress`] reports.

mod at_least_once;
pub(crate) mod balance;
mod checkpoint;
mod context;
mod dead_letter;
mod error;
mod interest;
mod key;
mod lease;
mod progress;
pub(crate) mod runner;
mod typed;
mod wait;

pub use at_least_once::AtLeastOnce;
pub use checkpoint::{Checkpoint, CheckpointCommit, CheckpointStore, Delivery};
pub use context::{HandlerError, Projection, ProjectionContext};
pub use dead_letter::{DeadLetter, DeadLetterStore, NewDeadLetter};
pub use error::{CheckpointError, ProjectionError};
pub use interest::Interest;
pub use key::{InvalidProjectionKey, MAX_PROJECTION_NAME_LEN, ProjectionKey};
pub use lease::{LeaseInfo, LeaseStore, this_process};
pub use progress::{RebuildProgress, RebuildReport};
pub use runner::{
    DEFAULT_PROJECTION_BATCH_SIZE, DeadLetterRetry, HandlerRetry, OnFailure, PartitionStatus,
    ProjectionRunner, ProjectionStatus, RunningProjection,
};
pub use typed::{ProjectedEvent, ProjectionEvents, Typed, TypedProjection};
// `#[derive(ProjectionEvents)]`, re-exported here beside its trait (as serde does), so that
// `use esframe_core::projection::ProjectionEvents;` brings both.
#[cfg(feature = "derive")]
pub use esframe_derive::ProjectionEvents;
pub use wait::wait_for_projections;

/// Everything a [`ProjectionRunner`] needs of its store: checkpoints, leases and dead letters.
/// Implemented for every type that has the three.
pub trait ProjectionStore: CheckpointStore + LeaseStore + DeadLetterStore {}

impl<T: CheckpointStore + LeaseStore + DeadLetterStore> ProjectionStore for T {}
