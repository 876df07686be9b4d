//! # esframe-postgres
//!
//! [`PgEventStore`]: the production [`EventStore`], [`GlobalLog`] and [`SnapshotStore`] for
//! esframe, on sqlx and PostgreSQL (13 or newer; tested on 15).
//!
//! ```no_run
//! use esframe_core::CommandHandler;
//! use esframe_postgres::PgEventStore;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // Creates the schema `esframe` and its tables on first use (safe from several processes).
//! let store = PgEventStore::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! # Ok(()) }
//! ```
//!
//! What it guarantees, beyond the store contract that the conformance suite checks:
//!
//! - **One round trip per append**, whatever the number of events: the expected version
//!   (`Any`, `NoStream`, `StreamExists`, `Exact(n)`) and idempotency are checked and every event
//!   inserted by a single statement (`INSERT ... SELECT FROM unnest(...)`). The
//!   `(aggregate_type, aggregate_id, stream_version)` unique constraint decides races, so no two writers store the
//!   same version; conflicts are recognised by SQLSTATE and constraint name.
//! - **A global log that never skips.** `global_position` is the writing transaction's id
//!   shifted left 16 bits plus the event's index in its append; `read_all` returns only rows
//!   whose transaction is older than every transaction still running
//!   (`pg_snapshot_xmin(pg_current_snapshot())`). An event that commits late therefore can
//!   never appear below a position a reader has passed, and a stream's events keep their version
//!   order, because a writer only gets its transaction id after it has seen the previous version
//!   committed. A transaction held open anywhere in the cluster holds readers back:
//!   [`PgEventStore::horizon_status`] names it, and a warning is logged past a threshold.
//! - **Snapshots in the same transaction** as the events they cover (`append_with_snapshot`).
//! - **Live subscriptions** woken by `LISTEN/NOTIFY`, polling as a fallback.
//! - **Embedded migrations** in a configurable schema, safe when processes start together.
//! - **Exactly-once projections** with [`PgCheckpoints`]: the read model and the checkpoint
//!   commit in one transaction; leases by advisory lock; dead letters in a table.

#[macro_use]
mod connection;

mod append;
mod builder;
mod checkpoints;
mod error;
mod horizon;
mod inbox;
mod inline;
mod listener;
mod names;
mod process;
mod read;
mod rows;
mod schema;
mod sql;
mod stash;
mod store;
mod transaction;

pub use builder::PgEventStoreBuilder;
pub use checkpoints::{DEFAULT_LEASE_TIME, PgCheckpoints, PgLease, PgTransaction};
pub use error::PgStoreError;
pub use horizon::{HorizonHolder, HorizonStatus};
pub use inbox::{InboxDeadLetter, InboxError, InboxHandler, InboxOutcome, PgInbox, RetryOutcome};
pub use process::PgProcessStore;
pub use schema::{SCHEMA_VERSION, SchemaName};
pub use store::PgEventStore;

#[doc(no_inline)]
pub use esframe_core::{EventStore, GlobalLog, SnapshotStore, limits::MAX_EVENTS_PER_APPEND};
