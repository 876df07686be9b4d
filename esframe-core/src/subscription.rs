//! Following the global log: stored events first, then live ones.

use std::collections::VecDeque;

use crate::{EventStore, RecordedEvent, StoreError};

/// Default number of events a [`Subscription`] reads per batch.
pub const DEFAULT_BATCH_SIZE: usize = 512;

/// A cursor over the global log that waits for new events once it has caught up.
///
/// Delivers every event with a position greater than the start position exactly once, in global
/// order, whatever the store's live-notification mechanism does (a missed wake-up only delays).
#[derive(Debug)]
pub struct Subscription<S> {
    store: S,
    position: u64,
    batch_size: usize,
    buffer: VecDeque<RecordedEvent>,
    /// How far the last batch looked.
    scanned_to: u64,
}

impl<S: EventStore> Subscription<S> {
    /// Starts after global position `after` (0: from the beginning).
    pub fn new(store: S, after: u64) -> Self {
        Self {
            store,
            position: after,
            batch_size: DEFAULT_BATCH_SIZE,
            buffer: VecDeque::new(),
            scanned_to: after,
        }
    }

    /// Sets how many events are read per batch.
    #[must_use]
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How far the log has been consumed: the position of the last event returned by
    /// [`Subscription::next`], or past it when retired events followed it, or just before it
    /// while more parts of the same (split) stored event are still to come. Resuming after this
    /// position never loses an event.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The next event, waiting for one to be appended if the log is exhausted.
    pub async fn next(&mut self) -> Result<RecordedEvent, StoreError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.position = match self.buffer.front() {
                    // More parts of one stored event (an upcaster split it) follow: its position
                    // is not consumed until the last part is, so resuming here repeats parts
                    // rather than losing them.
                    Some(next) if next.global_position == event.global_position => {
                        event.global_position - 1
                    }
                    Some(_) => event.global_position,
                    // Past any retired events that followed it in the batch.
                    None => self.scanned_to.max(event.global_position),
                };
                return Ok(event);
            }
            let batch = self
                .store
                .read_all_batch(self.position, self.batch_size)
                .await?;
            if batch.events.is_empty() {
                if batch.scanned_to > self.position {
                    // Everything read was retired by upcasters: move past it.
                    self.position = batch.scanned_to;
                } else {
                    self.store.wait_for_events(self.position).await?;
                }
            } else {
                self.scanned_to = batch.scanned_to;
                self.buffer.extend(batch.events);
            }
        }
    }
}
