//! # esframe-amqp
//!
//! RabbitMQ (AMQP 0-9-1) for esframe, on [`lapin`]:
//!
//! - [`AmqpSink`], the [`MessageSink`](esframe_core::publish::MessageSink) a
//!   [`Publisher`](esframe_core::publish::Publisher) sends its events through: a topic exchange,
//!   routing key = subject, persistent messages, publisher confirms, reconnection on the next
//!   publish.
//! - [`AmqpInbox`], the consumer on the other side: it applies every delivered event exactly
//!   once, in stream order, through an [`esframe_postgres::PgInbox`], and parks what it cannot
//!   handle.
//! - [`binding`]: how a CloudEvent travels as an AMQP 0-9-1 message (binary content mode,
//!   headers `cloudEvents:*`; or structured, the JSON format as the body, with
//!   [`AmqpSink::structured`]). The CloudEvents spec has a binding for AMQP 1.0 only; this one
//!   follows it as closely as 0-9-1 allows.
//! - [`Topology`]: the exchange, queue and binding declared in one call.
//!
//! ```no_run
//! use esframe_amqp::{AmqpInbox, AmqpSink, LOCAL_URI, Topology};
//! use esframe_core::publish::{IncomingEvent, Publisher};
//! use esframe_postgres::{InboxHandler, PgEventStore, PgInbox, PgTransaction};
//!
//! struct Ledger;
//!
//! impl InboxHandler for Ledger {
//!     async fn handle(
//!         &self,
//!         tx: &mut PgTransaction,
//!         event: &IncomingEvent,
//!     ) -> Result<(), esframe_core::projection::HandlerError> {
//!         // Write the effect through `tx`: it commits with the inbox's record of the event.
//!         let _ = (tx, event);
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // Producer: the store's log, published to the exchange `bank.events`.
//! let store = PgEventStore::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! let setup = esframe_amqp::connect(LOCAL_URI, "setup").await?;
//! Topology::new("bank.events", "ledger.bank-events")
//!     .declare(&setup.create_channel().await?)
//!     .await?;
//! let sink = AmqpSink::new(LOCAL_URI, "bank.events");
//! let publisher =
//!     Publisher::new(store.clone(), store.checkpoints(), sink, "to_rabbitmq", "/bank")?.spawn();
//!
//! // Consumer (here in the schema `ledger` of the same database; another service would use
//! // its own): each event applied once, in its stream's order.
//! let inbox = PgInbox::open(store.pool().clone(), "ledger", "ledger").await?;
//! let consumer = AmqpInbox::new(LOCAL_URI, "ledger.bank-events", inbox, Ledger).spawn();
//! # consumer.shutdown().await;
//! # publisher.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Delivery is at least once from the store to the broker (a message whose confirm was lost is
//! sent again; RabbitMQ does not deduplicate) and exactly once from the broker into the
//! consumer's database (the inbox records each stream's last applied version in the consumer's
//! transaction).

pub mod binding;
mod connection;
mod inbox;
mod sink;
mod topology;

pub use connection::{AmqpError, DEFAULT_CONNECT_TIMEOUT, LOCAL_URI, connect};
pub use inbox::{
    ATTEMPTS_HEADER, AmqpInbox, AmqpInboxStatus, DEFAULT_EARLY_DELAY, DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PREFETCH, DeadLetters, ERROR_HEADER, RunningAmqpInbox,
};
pub use sink::{AmqpSink, DEFAULT_CONFIRM_TIMEOUT};
pub use topology::Topology;

/// The AMQP client this crate is built on, for the [`Channel`](lapin::Channel)s
/// [`Topology`] declares on and anything else the broker is asked directly.
pub use lapin;
