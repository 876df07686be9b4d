//! The bank account publishing to NATS JetStream, and a second service, reporting, that
//! consumes the events through an inbox into a read model of its own.
//!
//! ```text
//!  bank (schema esframe_bank)          JetStream             reporting (esframe_reporting)
//!  command ─▶ account events ─▶ Publisher ─▶ BANK stream ─▶ JetStreamInbox ─▶ PgInbox
//!             (the global log)  checkpoint  bank.account.*   durable          + account_activity
//! ```
//!
//! - [`Bank`] (`producer`): account commands on a [`PgEventStore`](esframe_postgres::PgEventStore),
//!   each with a correlation id, and the [`Publisher`](esframe_core::publish::Publisher) of
//!   the account events through a [`JetStreamSink`](esframe_nats::JetStreamSink).
//! - [`Reporting`] (`consumer`): a [`JetStreamInbox`](esframe_nats::JetStreamInbox) that
//!   applies each event once through a [`PgInbox`](esframe_postgres::PgInbox), whose
//!   [`ActivityHandler`] keeps `account_activity` in the inbox's transaction.
//! - [`Channel`]: the stream and subjects both sides name; `connect`: reaching the servers.
//!
//! Run it with `cargo run --example publish_to_nats`, then
//! `cargo run --example consume_from_nats -- --until-caught-up` (the book's guide "Publishing
//! to another service").

mod channel;
pub mod connect;
mod consumer;
mod producer;

pub use channel::Channel;
pub use consumer::{AccountActivity, ActivityHandler, Backlog, Reporting, correlation_id};
pub use producer::{
    Bank, BankPublisher, ObservedSink, account_ids, follow_command, published_through,
    sample_commands,
};

/// The bank's PostgreSQL schema: its events and its publisher's checkpoint.
pub const BANK_SCHEMA: &str = "esframe_bank";

/// The reporting service's PostgreSQL schema: its inbox and its read model.
pub const REPORTING_SCHEMA: &str = "esframe_reporting";

/// The publisher's name, under which its checkpoint and lease are kept.
pub const PUBLISHER: &str = "bank_to_nats";

/// The CloudEvents `source` of the bank's messages.
pub const SOURCE: &str = "/bank";

/// The reporting service's durable JetStream consumer, and its inbox's consumer name.
pub const CONSUMER: &str = "reporting";

/// Cents as `123.45`.
pub fn cents(amount: i64) -> String {
    let sign = if amount < 0 { "-" } else { "" };
    let amount = amount.unsigned_abs();
    format!("{sign}{}.{:02}", amount / 100, amount % 100)
}
