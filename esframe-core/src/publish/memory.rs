//! [`MemorySink`]: a message sink in memory, for tests and examples.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex, PoisonError},
};

use uuid::Uuid;

use super::{MessageSink, OutgoingMessage, Published, SinkError};

/// A broker in memory: it keeps every message it acknowledges, in order, and can deduplicate by
/// message id (as JetStream does within its window) and fail on request.
#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    messages: Vec<OutgoingMessage>,
    seen: HashSet<Uuid>,
    deduplicate: bool,
    faults: VecDeque<Option<Fault>>,
}

/// What the next publish does, when failures are injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The broker is unreachable; nothing is stored.
    Unreachable,
    /// The broker stores the message but the acknowledgement is lost.
    LostAck,
    /// The broker refuses the message.
    Refuse,
}

impl MemorySink {
    /// A sink that stores every message it is given, duplicates included (like RabbitMQ).
    pub fn new() -> Self {
        Self::default()
    }

    /// A sink that drops a message whose id it has stored before (like JetStream's
    /// deduplication, with a window that never ends).
    pub fn deduplicating() -> Self {
        let sink = Self::default();
        sink.lock().deduplicate = true;
        sink
    }

    /// The next publishes go as `faults` say, one each, in order: `None` is a publish that
    /// succeeds, `Some(fault)` one that fails so.
    pub fn inject(&self, faults: impl IntoIterator<Item = Option<Fault>>) {
        self.lock().faults.extend(faults);
    }

    /// Every message stored, in the order they arrived.
    pub fn messages(&self) -> Vec<OutgoingMessage> {
        self.lock().messages.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MessageSink for MemorySink {
    async fn publish(&self, message: &OutgoingMessage) -> Result<Published, SinkError> {
        let mut inner = self.lock();
        let fault = inner.faults.pop_front().flatten();
        match fault {
            Some(Fault::Unreachable) => {
                return Err(SinkError::Unreachable {
                    message: "injected: broker unreachable".to_owned(),
                    source: None,
                });
            }
            Some(Fault::Refuse) => {
                return Err(SinkError::Refused {
                    message: "injected: message refused".to_owned(),
                    source: None,
                });
            }
            Some(Fault::LostAck) | None => {}
        }
        let duplicate = !inner.seen.insert(message.id);
        if !(duplicate && inner.deduplicate) {
            inner.messages.push(message.clone());
        }
        if fault == Some(Fault::LostAck) {
            return Err(SinkError::Unreachable {
                message: "injected: acknowledgement lost".to_owned(),
                source: None,
            });
        }
        Ok(Published {
            duplicate: duplicate && inner.deduplicate,
        })
    }
}
