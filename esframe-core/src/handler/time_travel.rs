//! Past states: an aggregate as it was at a version or at a moment, rebuilt through the same
//! upcasters as the current state, never from a snapshot newer than the target.

use chrono::{DateTime, Utc};

use crate::{Aggregate, CommandError, EventStore, LoadedEvent, StreamId};

use super::{
    CommandHandler, Loaded,
    load::{CURRENT, Start},
};

impl<A: Aggregate, S: EventStore> CommandHandler<A, S> {
    /// The state of aggregate `aggregate_id` as it was at stream version `version`: its events
    /// up to that version applied in order, from a snapshot only if one is stored at or below
    /// it. A stream shorter than `version` gives its current state; [`Loaded::version`] says
    /// which version the state includes (0 for `version` 0: the default state). Nothing stored
    /// changes and the state cache is neither read nor filled.
    pub async fn load_at(
        &self,
        aggregate_id: &str,
        version: u64,
    ) -> Result<Loaded<A>, CommandError<A::Error>> {
        let stream = StreamId::new(A::TYPE, aggregate_id)?;
        let loaded = self
            .load_state(&stream, false, false, version.min(CURRENT - 1))
            .await?;
        Ok(Loaded {
            state: loaded.state,
            version: loaded.version,
        })
    }

    /// The state of aggregate `aggregate_id` as it was at `at`: the events of its stream
    /// recorded at or before `at`, applied in order, up to the first one recorded after it.
    /// Snapshots are not used (they do not say when their events were recorded). Events are
    /// upcast as for the current state; [`Loaded::version`] is the version of the last event
    /// applied (0 if the stream had no event yet).
    pub async fn load_as_of(
        &self,
        aggregate_id: &str,
        at: DateTime<Utc>,
    ) -> Result<Loaded<A>, CommandError<A::Error>> {
        let stream = StreamId::new(A::TYPE, aggregate_id)?;
        let events: Vec<LoadedEvent> = self
            .store
            .read_stream(&stream, 1)
            .await?
            .into_iter()
            .take_while(|event| event.recorded_at <= at)
            .map(LoadedEvent::from_recorded)
            .collect();
        let loaded = self.apply_events(&stream, Start::empty(false), events, 0, CURRENT)?;
        Ok(Loaded {
            state: loaded.state,
            version: loaded.version,
        })
    }
}
