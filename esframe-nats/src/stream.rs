//! [`ensure_stream`]: the JetStream stream a publisher's subjects go to.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    stream::{Config, StorageType},
};

/// JetStream's default duplicate window: 2 minutes.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// A stream for every subject under a prefix (`{prefix}.>`), as [`ensure_stream`] creates it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSpec {
    name: String,
    subject_prefix: String,
    duplicate_window: Duration,
    storage: StorageType,
    replicas: usize,
    max_age: Duration,
}

impl StreamSpec {
    /// The stream `name` (letters, digits, `-` and `_`) for the subjects `{subject_prefix}.>`:
    /// the publisher's [`subject_prefix`](esframe_core::publish::Publisher::subject_prefix).
    pub fn new(name: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            subject_prefix: subject_prefix.into(),
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            storage: StorageType::File,
            replicas: 1,
            max_age: Duration::ZERO,
        }
    }

    /// How long JetStream remembers a message id to drop a resend of it (default 2 minutes).
    ///
    /// A publisher's resends (after a crash, a lost acknowledgement, a restarted broker) are
    /// stored once only within this window: keep it longer than a publisher can take to come
    /// back. Beyond it, a resend is stored again, and the consumer's inbox (which deduplicates
    /// by stream and version, for ever) applies it once anyway.
    #[must_use]
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Keeps the messages in memory instead of on disk (they do not survive a restart of the
    /// server: for tests).
    #[must_use]
    pub fn in_memory(mut self) -> Self {
        self.storage = StorageType::Memory;
        self
    }

    /// Copies of each message in a cluster (default 1).
    #[must_use]
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// Drops messages older than `max_age` (default: kept for ever). The duplicate window must
    /// not be longer.
    #[must_use]
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The subject filter: `{prefix}.>`.
    pub fn subjects(&self) -> String {
        format!("{}.>", self.subject_prefix)
    }

    /// The JetStream configuration.
    pub fn config(&self) -> Config {
        Config {
            name: self.name.clone(),
            subjects: vec![self.subjects()],
            duplicate_window: self.duplicate_window,
            storage: self.storage,
            num_replicas: self.replicas,
            max_age: self.max_age,
            ..Config::default()
        }
    }
}

/// Why [`ensure_stream`] failed.
#[derive(Debug, thiserror::Error)]
#[error("JetStream stream `{name}`: {message}")]
pub struct EnsureStreamError {
    /// The stream.
    pub name: String,
    /// What happened.
    pub message: String,
    /// The client's error.
    #[source]
    pub source: Option<async_nats::Error>,
}

/// Creates the stream `spec` describes, or, if it exists, updates its subjects and duplicate
/// window to the spec's (other settings of an existing stream are left as they are).
pub async fn ensure_stream(
    context: &jetstream::Context,
    spec: &StreamSpec,
) -> Result<jetstream::stream::Stream, EnsureStreamError> {
    let fail = |message: &str, source: async_nats::Error| EnsureStreamError {
        name: spec.name.clone(),
        message: format!("{message}: {source}"),
        source: Some(source),
    };
    let wanted = spec.config();
    let mut stream = context
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|err| fail("cannot create or read it", err.into()))?;
    let current = stream
        .info()
        .await
        .map_err(|err| fail("cannot read its configuration", err.into()))?
        .config
        .clone();
    if current.subjects != wanted.subjects || current.duplicate_window != wanted.duplicate_window {
        let config = Config {
            subjects: wanted.subjects,
            duplicate_window: wanted.duplicate_window,
            ..current
        };
        context
            .update_stream(config)
            .await
            .map_err(|err| fail("cannot update it", err.into()))?;
        stream = context
            .get_stream(&spec.name)
            .await
            .map_err(|err| fail("cannot read it", err.into()))?;
    }
    Ok(stream)
}
