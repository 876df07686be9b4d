//! Loading an aggregate's state: cached state, or a snapshot it can trust, plus the events after.

use crate::{
    Aggregate, CachePolicy, CommandError, DecodeErrorKind, EventStore, LoadedEvent, Snapshot,
    StreamId,
};

use super::CommandHandler;

/// An aggregate's state as loaded for a command.
#[derive(Debug)]
pub(crate) struct LoadedState<A> {
    /// The state.
    pub(crate) state: A,
    /// The stream version it includes (0: no events).
    pub(crate) version: u64,
    /// The stored snapshot could not be used: store a fresh one with the next append.
    pub(crate) replace_snapshot: bool,
    /// The cached state, used without reading the store: a decision on it is confirmed by the
    /// append's version check, or (with [`CachePolicy::Verify`], when nothing is appended) by
    /// [`CommandHandler::cache_confirmed`].
    pub(crate) cached: bool,
}

/// `until` for the current state: every event.
pub(crate) const CURRENT: u64 = u64::MAX;

/// Where a load starts from before reading the stream's events.
pub(super) struct Start<A> {
    state: A,
    /// The version the state includes.
    version: u64,
    /// Read from this version on; events at or below `version` are only checked.
    read_from: u64,
    replace_snapshot: bool,
    /// The snapshot's version, if the start is a snapshot (to drop it if the stream disagrees).
    snapshot: Option<u64>,
    /// Snapshots are on and the stream has none.
    missing_snapshot: bool,
}

impl<A: Aggregate> Start<A> {
    pub(super) fn empty(replace_snapshot: bool) -> Self {
        Self {
            state: A::default(),
            version: 0,
            read_from: 1,
            replace_snapshot,
            snapshot: None,
            missing_snapshot: false,
        }
    }
}

impl<A: Aggregate, S: EventStore> CommandHandler<A, S> {
    /// The state to decide on: the cached one (used as is: see [`LoadedState::cached`]), or
    /// the latest usable snapshot, or nothing, then the events after it.
    ///
    /// `for_command`: the state is for deciding a command, whose append will replace an
    /// unusable snapshot; only then is such a snapshot deleted (a plain [`load`] leaves the
    /// store as it is).
    ///
    /// `until`: the state as it was at that version ([`CURRENT`] for the current state); the
    /// cache and snapshots above it are not used.
    ///
    /// [`load`]: CommandHandler::load
    pub(crate) async fn load_state(
        &self,
        stream: &StreamId,
        use_cache: bool,
        for_command: bool,
        until: u64,
    ) -> Result<LoadedState<A>, CommandError<A::Error>> {
        let cached = match (&self.cache, use_cache && until == CURRENT) {
            (Some(cache), true) => cache.take(stream),
            _ => None,
        };
        if let Some((version, state)) = cached {
            return Ok(LoadedState {
                state,
                version,
                replace_snapshot: false,
                cached: true,
            });
        }
        // An upcaster may drop stored events: the last one read is then not the stream's
        // version, and neither is the first one read proof that a snapshot's version exists.
        // The stored version, asked before the read, settles both (events appended meanwhile
        // are in the read).
        let stored = if self.store.upcasters().is_empty() {
            None
        } else {
            Some(self.store.stream_version(stream).await?.unwrap_or(0))
        };
        let (mut start, mut events) = match &self.snapshots {
            // The snapshot and the events from its version on, in one read.
            Some(ops) => {
                let loaded = (ops.load)(&self.store, stream).await?;
                let read_from = loaded.read_from();
                // A snapshot newer than the target is not the target's past.
                let snapshot = loaded.snapshot.filter(|s| s.version <= until);
                let start = self
                    .start_from_snapshot(stream, snapshot, for_command)
                    .await;
                if start.read_from < read_from {
                    // An unusable snapshot: the events before it are needed after all.
                    let events = self
                        .store
                        .read_stream_for_state(stream, start.read_from)
                        .await?;
                    (start, events)
                } else {
                    (start, loaded.events)
                }
            }
            None => (
                Start::empty(false),
                self.store.read_stream_for_state(stream, 1).await?,
            ),
        };
        if let Some(snapshot_version) = start.snapshot
            && match stored {
                // A snapshot taken since the version was asked is not ahead: ask again.
                Some(stored) => {
                    stored < snapshot_version
                        && self.store.stream_version(stream).await?.unwrap_or(0) < snapshot_version
                }
                None => events.first().map(|e| e.stream_version) != Some(snapshot_version),
            }
        {
            // The snapshot claims a version the stream does not have: it cannot be trusted.
            tracing::warn!(stream = %stream, snapshot_version, "snapshot is ahead of its stream; ignored, replaced, and the state rebuilt from events");
            if for_command {
                self.drop_snapshot(stream, snapshot_version).await;
            }
            start = Start::empty(true);
            events = self.store.read_stream_for_state(stream, 1).await?;
        }
        self.apply_events(stream, start, events, stored.unwrap_or(0).min(until), until)
    }

    /// Applies `events` to the start state; those at or below its version are only checked.
    /// The parts an upcaster split one stored event into share its version: all are applied.
    /// The version is at least `stored` (events an upcaster dropped still count). Events after
    /// `until` are not applied.
    pub(super) fn apply_events(
        &self,
        stream: &StreamId,
        start: Start<A>,
        events: Vec<LoadedEvent>,
        stored: u64,
        until: u64,
    ) -> Result<LoadedState<A>, CommandError<A::Error>> {
        let Start {
            mut state,
            version: start_version,
            mut replace_snapshot,
            missing_snapshot,
            ..
        } = start;
        let mut version = start_version.max(stored);
        for loaded in events {
            if loaded.stream_version > until {
                break;
            }
            if loaded.stream_version <= start_version {
                continue;
            }
            version = version.max(loaded.stream_version);
            match loaded.decode::<A::Event>(stream) {
                Ok(event) => state.apply(&event),
                Err(err)
                    if self.skip_unknown_types
                        && matches!(err.kind, DecodeErrorKind::UnknownType) =>
                {
                    tracing::debug!(stream = %stream, version = loaded.stream_version, event_type = %loaded.event_type, "skipping an event type this code does not know");
                }
                Err(err) => return Err(err.into()),
            }
        }
        if missing_snapshot
            && let Some(interval) = self.snapshots.and_then(|ops| ops.policy.interval())
        {
            replace_snapshot |= version >= interval;
        }
        Ok(LoadedState {
            state,
            version,
            replace_snapshot,
            cached: false,
        })
    }

    /// Whether a decision taken on the cached state at `version` that appends nothing (a
    /// rejection, or no events) stands: always with [`CachePolicy::Trust`]; with
    /// [`CachePolicy::Verify`], when the stream is still at `version` (one small read).
    pub(crate) async fn cache_confirmed(
        &self,
        stream: &StreamId,
        version: u64,
    ) -> Result<bool, CommandError<A::Error>> {
        if self.cache_policy == CachePolicy::Trust {
            return Ok(true);
        }
        Ok(self.store.stream_version(stream).await?.unwrap_or(0) == version)
    }

    /// The latest snapshot if it can be used: of this stream, this aggregate type and snapshot
    /// version, and readable. Reading from its own version (not the one after) proves the
    /// stream has that version; see `load_state`.
    async fn start_from_snapshot(
        &self,
        stream: &StreamId,
        snapshot: Option<Snapshot>,
        for_command: bool,
    ) -> Start<A> {
        let Some(snapshot) = snapshot else {
            // None yet: a stream that is already long gets one with its next append.
            return Start {
                missing_snapshot: true,
                ..Start::empty(false)
            };
        };
        match self.usable(stream, &snapshot) {
            Ok(state) => Start {
                state,
                version: snapshot.version,
                read_from: snapshot.version,
                replace_snapshot: false,
                snapshot: Some(snapshot.version),
                missing_snapshot: false,
            },
            Err(why) => {
                tracing::info!(stream = %stream, version = snapshot.version, "ignoring a snapshot ({why}); rebuilding from events and replacing it");
                // Deleted, so that the replacement is stored even at a lower version.
                if for_command {
                    self.drop_snapshot(stream, snapshot.version).await;
                }
                Start::empty(true)
            }
        }
    }

    fn usable(&self, stream: &StreamId, snapshot: &Snapshot) -> Result<A, String> {
        if snapshot.stream_id != *stream {
            return Err(format!("it belongs to stream `{}`", snapshot.stream_id));
        }
        if snapshot.schema_version != A::SNAPSHOT_VERSION {
            return Err(format!(
                "it has snapshot version {}, this code writes {}",
                snapshot.schema_version,
                A::SNAPSHOT_VERSION
            ));
        }
        if snapshot.version == 0 {
            return Err("it is at version 0".to_owned());
        }
        A::from_snapshot(&snapshot.state).map_err(|err| format!("it cannot be read: {err}"))
    }

    /// Deletes an untrustworthy snapshot, so that the next one replaces it even at a lower
    /// version. Best effort: a failure only costs another rebuild next time.
    async fn drop_snapshot(&self, stream: &StreamId, version: u64) {
        if let Some(ops) = &self.snapshots
            && let Err(err) = (ops.delete)(&self.store, stream, version).await
        {
            tracing::warn!(stream = %stream, error = %err, "cannot delete an unusable snapshot");
        }
    }
}
