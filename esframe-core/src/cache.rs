//! The command handler's in-process cache of aggregate states.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use crate::StreamId;

/// Latest known state of recently used streams, keyed by stream.
///
/// A cached state is only a starting point: with `CachePolicy::Verify` (the default) the handler
/// reads the events appended after the cached version before deciding, and the append still
/// checks the version, so a stale entry (another process wrote meanwhile) costs one short read,
/// never a wrong decision. With `CachePolicy::Trust` the entry decides as is; the append's version
/// check still refuses events decided on a stale entry. An entry is
/// taken out while a command runs on it and put back only if the decision left it consistent.
/// When full, an arbitrary entry is evicted.
#[derive(Debug)]
pub(crate) struct StateCache<A> {
    capacity: usize,
    entries: Mutex<HashMap<StreamId, (u64, A)>>,
}

impl<A> StateCache<A> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Removes and returns the state of `stream` with its version.
    pub(crate) fn take(&self, stream: &StreamId) -> Option<(u64, A)> {
        self.lock().remove(stream)
    }

    /// Stores the state of `stream` at `version`, unless a newer one is already there.
    pub(crate) fn put(&self, stream: &StreamId, version: u64, state: A) {
        let mut entries = self.lock();
        if let Some((cached, _)) = entries.get(stream) {
            if *cached >= version {
                return;
            }
        } else if entries.len() >= self.capacity
            && let Some(victim) = entries.keys().next().cloned()
        {
            entries.remove(&victim);
        }
        entries.insert(stream.clone(), (version, state));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, (u64, A)>> {
        // A panic while holding the lock cannot leave a half-written entry: recover the map.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_newest_and_evicts_when_full() {
        let cache = StateCache::new(2);
        let a = StreamId::new("t", "a").unwrap();
        let b = StreamId::new("t", "b").unwrap();
        let c = StreamId::new("t", "c").unwrap();
        cache.put(&a, 5, "a5");
        cache.put(&a, 3, "a3");
        assert_eq!(cache.take(&a), Some((5, "a5")));
        assert_eq!(cache.take(&a), None);
        cache.put(&a, 1, "a1");
        cache.put(&b, 1, "b1");
        cache.put(&c, 1, "c1");
        let left = [&a, &b, &c]
            .iter()
            .filter(|s| cache.take(s).is_some())
            .count();
        assert_eq!(left, 2);
    }
}
