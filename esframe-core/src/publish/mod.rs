//! Events leaving the service: a [`Publisher`] follows the global log (the event log is the
//! outbox: no second copy of any event) and sends each event to a broker as a
//! [`CloudEvent`] through a [`MessageSink`], checkpointed under its own name.
//!
//! ```text
//!   global log ──read_all_batch──▶ publisher ──publish, one in flight per stream──▶ sink ──▶ broker
//!        ▲                           │  ◀──────────────── acknowledged ──────────────┘
//!        └──wait_for_events◀─────────┤
//!                                    └──checkpoint: highest position acknowledged without a gap
//! ```
//!
//! Brokers: `esframe-nats` (JetStream, which deduplicates by message id) and `esframe-amqp`
//! (RabbitMQ, publisher confirms); [`MemorySink`] for tests. On the consumer's side, an inbox
//! applies each event once, by stream and version.

mod cloudevent;
mod incoming;
mod memory;
mod publisher;
mod pump;
mod sink;
mod status;

pub use cloudevent::{
    CloudEvent, InvalidCloudEvent, SPEC_VERSION, STRUCTURED_CONTENT_TYPE,
    is_structured_content_type, sequence, valid_extension_name,
};
pub use incoming::{IncomingEvent, NotAnEsframeEvent};
pub use memory::{Fault, MemorySink};
pub use publisher::{
    DEFAULT_PUBLISH_BATCH_SIZE, DEFAULT_STREAMS_IN_FLIGHT, PublishError, Publisher,
    RunningPublisher, SubjectFn,
};
pub use sink::{
    Backoff, MessageSink, OutgoingMessage, Published, SinkError, Transform, subject_for,
};
pub use status::PublisherStatus;
