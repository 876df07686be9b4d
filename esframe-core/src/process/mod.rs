//! Process managers: flows that span aggregates, with compensation and timeouts.
//!
//! A [`ProcessManager`] routes events to instances (one per flow, keyed by a correlation
//! value such as an order id), folds them into the instance's state, and reacts with
//! [`Effects`]: commands to aggregates, timers, completion. A [`ProcessRunner`] runs it on a
//! [`ProcessStore`] (`esframe_memory::MemoryProcessStore`, at least once;
//! `esframe_postgres::PgProcessStore`, exactly once), and [`ProcessTest`] tests it without one.
//!
//! What the runner guarantees:
//! - **One transaction per batch** (PostgreSQL): the commands' events, the instances' states,
//!   their timers and the checkpoint commit together or not at all. Command ids are derived
//!   from the process, the instance, the input and the command's index ([`command_id`]), and
//!   event ids from the command id, so a batch decided again stores the same ids.
//! - **Refusals are inputs**: a command its aggregate refuses comes back as
//!   [`Input::Refused`], in the same transaction, so compensation is ordinary `react` code.
//! - **Timers** are stored with the instance, fired when due by the active runner, taken once
//!   (a fired timer is deleted in the same transaction, checked), cancelled by name.
//! - **Tombstones**: a completed instance stays; events routed to it are counted no-ops and
//!   never start it again. Only [`Route::Start`] may start an instance.
//! - **Failures isolate**: an instance whose input keeps failing is quarantined with its later
//!   events held in order; the others go on.
//! - **Correlation and causation flow**: every command carries the flow's correlation id (that
//!   of the event that started the instance) and the causing event's id, and its events carry
//!   them on; [`ProcessRunner::trace`] reads the flow back.

mod batch;
mod clock;
mod dispatch;
mod effects;
mod ids;
mod manager;
mod record;
mod runner;
mod store;
mod testkit;

pub use batch::Counts;
pub use clock::Clock;
pub use effects::{Effects, FiredTimer, Message, Refusal, SentCommand, TimerChange};
pub use ids::{command_id, message_id, timer_id};
pub use manager::{Input, ProcessManager, ReactError, Route};
pub use record::{InstanceRecord, InstanceStatus, ProcessWrite, TimerRecord};
pub use runner::{
    Instance, ProcessError, ProcessRunner, ProcessRunnerBuilder, ProcessStatus, RunningProcess,
    partition_of,
};
pub use store::{ProcessStore, ProcessStoreError, ProcessTx};
pub use testkit::{ProcessTest, Then};
