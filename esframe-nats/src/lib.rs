//! # esframe-nats
//!
//! NATS JetStream for esframe's publishing: the producer's [`JetStreamSink`], a
//! [`MessageSink`](esframe_core::publish::MessageSink) that a
//! [`Publisher`](esframe_core::publish::Publisher) sends the event log through, and the
//! consumer's [`JetStreamInbox`], which applies each received event once through an
//! [`esframe_postgres::PgInbox`].
//!
//! ```text
//!  producer                                    JetStream                        consumer
//!  event log ─▶ Publisher ─▶ JetStreamSink ─▶ stream (dedup by Nats-Msg-Id) ─▶ JetStreamInbox ─▶ PgInbox + handler
//!                  ▲ checkpoint after PubAck                                       ack after commit
//! ```
//!
//! Guarantees, end to end:
//!
//! - **Nothing lost.** The publisher's checkpoint passes a message only once JetStream
//!   acknowledged it (stored); the consumer acknowledges a message only once the inbox committed
//!   the handler's writes with its record of the event (or parked the message).
//! - **Once in the stream, within the duplicate window.** Every message carries the event id
//!   as `Nats-Msg-Id`, so the resends after a crash, a lost acknowledgement or a broker restart
//!   are dropped by JetStream within the stream's duplicate window ([`StreamSpec`]).
//! - **Applied once, for ever.** Beyond the window a resend is stored again; the inbox, which
//!   records the last version applied per producer stream, applies it once anyway.
//! - **In order per stream.** The publisher sends one message per stream at a time; the inbox
//!   refuses an event whose predecessor is not applied yet, and the consumer sends it back.
//!
//! ```no_run
//! use esframe_core::publish::Publisher;
//! use esframe_nats::{JetStreamSink, StreamSpec, ensure_stream};
//! use esframe_postgres::PgEventStore;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PgEventStore::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let jetstream = async_nats::jetstream::new(client);
//! ensure_stream(&jetstream, &StreamSpec::new("BANK", "bank")).await?;
//!
//! let publisher = Publisher::new(
//!     store.clone(),
//!     store.checkpoints(),
//!     JetStreamSink::new(jetstream),
//!     "bank_to_nats",
//!     "/bank",
//! )?
//! .subject_prefix("bank")
//! .spawn();
//! # publisher.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Features: `postgres` (default) brings [`JetStreamInbox`]. The `async-nats` client is built
//! with JetStream only, without TLS: to connect with TLS, enable a crypto provider of
//! `async-nats` (its `ring` or `aws-lc-rs` feature) in your own `Cargo.toml`.

pub mod headers;
#[cfg(feature = "postgres")]
mod inbox;
mod sink;
mod stream;

#[cfg(feature = "postgres")]
pub use inbox::{
    ConsumerError, DEFAULT_MAX_ACK_PENDING, DEFAULT_MAX_DELIVERIES, InboxStatus, JetStreamInbox,
    RunningInbox,
};
pub use sink::JetStreamSink;
pub use stream::{DEFAULT_DUPLICATE_WINDOW, EnsureStreamError, StreamSpec, ensure_stream};

pub use async_nats;

/// The README's example, compiled as a doctest.
#[cfg(all(doctest, feature = "postgres"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
