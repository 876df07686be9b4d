//! The JetStream stream the bank publishes to and the reporting service reads from.

use esframe_nats::{
    EnsureStreamError, StreamSpec, async_nats::jetstream, ensure_stream as ensure_spec,
};

/// Where the account events travel: a JetStream stream and the subject prefix the publisher
/// puts in front of every subject (`{prefix}.account.MoneyDeposited`).
///
/// Both services name the same channel: the producer publishes under its prefix, the consumer
/// reads the stream's `{prefix}.account.>` subjects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    stream: String,
    subject_prefix: String,
}

impl Channel {
    /// The bank's channel: the stream `BANK`, subjects `bank.>`.
    pub fn bank() -> Self {
        Self::new("BANK", "bank")
    }

    /// Another stream and prefix (the tests use one of their own per test).
    pub fn new(stream: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            subject_prefix: subject_prefix.into(),
        }
    }

    /// The JetStream stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The subject prefix, the publisher's `subject_prefix`.
    pub fn subject_prefix(&self) -> &str {
        &self.subject_prefix
    }

    /// The subjects of the account events: `{prefix}.account.>`.
    pub fn account_subjects(&self) -> String {
        format!("{}.account.>", self.subject_prefix)
    }

    /// Creates the stream (file storage, JetStream's 2-minute duplicate window) if it does not
    /// exist. Either service may start first, so both call it.
    pub async fn ensure(
        &self,
        jetstream: &jetstream::Context,
    ) -> Result<jetstream::stream::Stream, EnsureStreamError> {
        ensure_spec(
            jetstream,
            &StreamSpec::new(&self.stream, &self.subject_prefix),
        )
        .await
    }
}
