//! Per-stream queues for the handler's pessimistic mode.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::StreamId;

/// One async mutex per stream with commands in flight; entries are removed when unused.
#[derive(Debug, Default)]
pub(crate) struct StreamLocks {
    locks: Mutex<HashMap<StreamId, Arc<AsyncMutex<()>>>>,
}

/// Held while one command runs on a stream; later commands on the stream wait in FIFO order.
#[derive(Debug)]
pub(crate) struct StreamGuard<'a> {
    owner: &'a StreamLocks,
    stream: StreamId,
    guard: Option<OwnedMutexGuard<()>>,
}

impl StreamLocks {
    pub(crate) async fn lock(&self, stream: &StreamId) -> StreamGuard<'_> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(locks.entry(stream.clone()).or_default())
        };
        StreamGuard {
            owner: self,
            stream: stream.clone(),
            guard: Some(lock.lock_owned().await),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        let mut locks = self
            .owner
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        drop(self.guard.take());
        // Only the map holds the mutex now: nobody is running or waiting on this stream.
        if locks
            .get(&self.stream)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(&self.stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_holder_per_stream_and_no_leftover_entries() {
        let locks = Arc::new(StreamLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let stream = StreamId::new("s").unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (locks, inside, stream) =
                    (Arc::clone(&locks), Arc::clone(&inside), stream.clone());
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let _guard = locks.lock(&stream).await;
                        assert_eq!(
                            inside.fetch_add(1, Ordering::SeqCst),
                            0,
                            "two holders at once"
                        );
                        tokio::task::yield_now().await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(locks.len(), 0);
    }
}
