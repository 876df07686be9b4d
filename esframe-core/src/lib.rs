//! # esframe-core
//!
//! The heart of esframe, a CQRS and event-sourcing framework: the traits you implement
//! ([`Aggregate`], [`Command`], [`Event`]), the event envelope, the storage contract
//! ([`EventStore`], [`GlobalLog`], [`SnapshotStore`], checked against the [`limits`]),
//! command handling with optimistic concurrency, retries and
//! snapshots ([`CommandHandler`]), projections with checkpoints, dead letters and rebuilds
//! ([`projection`]), and a given/when/then test kit ([`testkit`]).
//!
//! ```
//! use esframe_core::{Aggregate, Command, Decision, Event};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
//! enum CounterEvent {
//!     Incremented { by: u64 },
//! }
//!
//! #[derive(Command)]
//! struct Increment {
//!     #[command(aggregate_id)]
//!     counter: String,
//!     by: u64,
//! }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("counter overflow")]
//! struct Overflow;
//!
//! #[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
//! #[aggregate(command = Increment, event = CounterEvent, error = Overflow)]
//! struct Counter {
//!     value: u64,
//! }
//!
//! impl Counter {
//!     async fn handle(
//!         decision: &mut Decision<'_, Self>,
//!         command: &Increment,
//!         _services: &(),
//!     ) -> Result<(), Overflow> {
//!         decision.value.checked_add(command.by).ok_or(Overflow)?;
//!         decision.emit(CounterEvent::Incremented { by: command.by });
//!         Ok(())
//!     }
//!
//!     fn apply(&mut self, event: &CounterEvent) {
//!         match event {
//!             CounterEvent::Incremented { by } => self.value += by,
//!         }
//!     }
//! }
//! # fn main() {}
//! ```
//!
//! ## Feature flags
//!
//! | feature   | default | what it adds |
//! |-----------|---------|--------------|
//! | `derive`  | yes     | `#[derive(Aggregate, Command, Event)]`, and [`projection`]'s `#[derive(ProjectionEvents)]`, re-exported from `esframe-derive` |
//! | `testing` | no      | [`testing`]: the conformance suite every store backend runs |

mod aggregate;
mod cache;
mod command;
mod envelope;
mod error;
mod event;
mod handler;
pub mod limits;
mod payload;
mod policy;
mod position;
pub mod process;
pub mod projection;
pub mod publish;
mod store;
mod stream_id;
mod subscription;
pub mod testkit;
pub mod upcast;

#[cfg(feature = "testing")]
pub mod testing;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use aggregate::{Aggregate, Decision};
pub use command::Command;
pub use envelope::{EventEnvelope, EventMetadata, NewEvent, RecordedEvent};
pub use error::{
    BackendError, CommandError, Conflict, CorruptData, EventDecodeError, InputLocation,
    InputProblem, InvalidInput, StoreError, StoreErrorKind,
};
pub use event::{DecodeErrorKind, Event, EventType};
pub use handler::{
    CommandContext, CommandHandler, CommandOutcome, DEFAULT_STATE_CACHE_CAPACITY, Loaded,
    derived_event_id,
};
pub use payload::{Payload, PayloadError};
pub use policy::{CachePolicy, ConcurrencyMode, RetryPolicy, SnapshotPolicy};
pub use position::Position;
pub use store::{
    AppendBatch, AppendOutcome, EventStore, ExpectedVersion, GlobalBatch, GlobalLog,
    InvalidPartition, LoadedEvent, LoadedStream, LogPartition, MAX_PARTITIONS, PARTITION_BUCKETS,
    Snapshot, SnapshotStore, resolve_stored_ids, stream_bucket,
};
pub use stream_id::{InvalidStreamId, MAX_STREAM_ID_LEN, StreamId, StreamIdPart};
pub use subscription::{DEFAULT_BATCH_SIZE, Subscription};
pub use upcast::{Upcaster, Upcasters};

// `#[derive(ProjectionEvents)]` is re-exported from `projection`, beside its trait.
#[cfg(feature = "derive")]
pub use esframe_derive::{Aggregate, Command, Event};
