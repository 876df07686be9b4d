//! # esframe-memory
//!
//! [`MemoryStore`]: an in-memory [`EventStore`], [`GlobalLog`] and [`SnapshotStore`] for
//! esframe. It is the
//! reference implementation of the store contract (every other backend must behave exactly like
//! it, checked by the conformance suite) and the default for tests, examples and embedded use.
//!
//! ```
//! use esframe_core::{EventStore, ExpectedVersion, NewEvent, StreamId};
//! use esframe_memory::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = MemoryStore::new();
//! let stream = StreamId::new("account", "1").unwrap();
//! let event = NewEvent {
//!     event_id: uuid::Uuid::now_v7(),
//!     event_type: "AccountOpened".into(),
//!     schema_version: 1,
//!     payload: serde_json::json!({ "owner": "ada" }),
//!     metadata: Default::default(),
//! };
//! let outcome = store.append(&stream, ExpectedVersion::NoStream, vec![event]).await.unwrap();
//! assert_eq!(outcome.stream_version, 1);
//! assert_eq!(store.read_stream(&stream, 1).await.unwrap().len(), 1);
//! # }
//! ```
//!
//! Every operation is O(events read or written): appends never copy a stream, so speed stays flat
//! as streams grow. Data lives as long as the last clone of the store.

mod checkpoints;
mod process;
mod store;

pub use checkpoints::{DEFAULT_MEMORY_LEASE_TIME, MemoryCheckpoints, MemoryLease};
pub use process::MemoryProcessStore;
pub use store::MemoryStore;

#[doc(no_inline)]
pub use esframe_core::{EventStore, GlobalLog, SnapshotStore};
