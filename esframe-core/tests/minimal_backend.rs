//! A whole store backend in a few dozen lines, passing the conformance suite for streams and the
//! global log: the input checks, the idempotency rule, the stored-data checks and upcasting all
//! come from esframe-core. The book's "Writing a store backend" guide shows this file.

// ANCHOR: backend
use std::sync::{Arc, Mutex};

use chrono::Utc;
use esframe_core::{
    AppendBatch, AppendOutcome, Conflict, EventStore, GlobalLog, Position, RecordedEvent,
    StoreError, StreamId, Upcasters, resolve_stored_ids,
};

/// Every event in one vector behind a mutex: position `p` is `log[p - 1]`.
#[derive(Debug, Clone, Default)]
pub struct VecStore {
    log: Arc<Mutex<Vec<RecordedEvent>>>,
    upcasters: Upcasters,
}

impl EventStore for VecStore {
    async fn append_batch(&self, batch: AppendBatch) -> Result<AppendOutcome, StoreError> {
        // The batch is already checked (sizes, ranges, NULs, depth, ids); under one lock the
        // idempotency rule, the expectation and the write are one atomic step.
        let mut log = self.log.lock().unwrap();
        if let Some(original) =
            resolve_stored_ids(&batch, |id| log.iter().find(|e| e.event_id == *id))?
        {
            return Ok(original);
        }
        let stream = batch.stream().clone();
        let current = log.iter().filter(|e| e.stream_id == stream).count() as u64;
        let actual = (current > 0).then_some(current);
        if !batch.expected().accepts(actual) {
            let expected = batch.expected();
            return Err(Conflict {
                stream,
                expected,
                actual,
            }
            .into());
        }
        let recorded_at = Utc::now();
        let mut positions = Vec::new();
        for event in batch.into_events() {
            let global_position = Position::new(log.len() as u64 + 1);
            positions.push(global_position);
            log.push(RecordedEvent {
                event_id: event.event_id,
                stream_id: stream.clone(),
                stream_version: current + positions.len() as u64,
                global_position,
                recorded_at,
                event_type: event.event_type,
                schema_version: event.schema_version,
                payload: event.payload.into(),
                metadata: event.metadata,
            });
        }
        Ok(AppendOutcome {
            stream_version: current + positions.len() as u64,
            positions,
            recorded_at,
            deduplicated: false,
        })
    }

    async fn load_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let log = self.log.lock().unwrap();
        let wanted =
            |e: &&RecordedEvent| e.stream_id == *stream && e.stream_version >= from_version;
        Ok(log.iter().filter(wanted).cloned().collect())
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<u64>, StoreError> {
        let log = self.log.lock().unwrap();
        let count = log.iter().filter(|e| e.stream_id == *stream).count() as u64;
        Ok((count > 0).then_some(count))
    }

    fn upcasters(&self) -> &Upcasters {
        &self.upcasters
    }
}

impl GlobalLog for VecStore {
    async fn load_log(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let log = self.log.lock().unwrap();
        let skip = usize::try_from(after.get()).unwrap_or(usize::MAX);
        Ok(log.iter().skip(skip).take(limit).cloned().collect())
    }

    async fn head_position(&self) -> Result<Position, StoreError> {
        Ok(Position::new(self.log.lock().unwrap().len() as u64))
    }

    async fn wait_for_events(&self, _after: Position) -> Result<(), StoreError> {
        // Allowed to resolve early: readers look again. A real backend waits for a wake-up.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        Ok(())
    }
}
// ANCHOR_END: backend

// ANCHOR: suite
esframe_core::conformance_suite!(async { VecStore::default() }; streams, log);

esframe_core::upcasting_suite!(|upcasters| async move {
    VecStore {
        upcasters,
        ..VecStore::default()
    }
});
// ANCHOR_END: suite

/// The command handler runs on a store without snapshots: states are rebuilt from events (and
/// kept in the handler's state cache).
mod handler_without_snapshots {
    use esframe_core::{Aggregate, Command, CommandHandler, Decision, Event};
    use serde::{Deserialize, Serialize};

    use super::VecStore;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
    enum TallyEvent {
        Counted { by: u64 },
    }

    #[derive(Debug, Command)]
    struct Count {
        #[command(aggregate_id)]
        tally: String,
        by: u64,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    struct Never;

    #[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
    #[aggregate(command = Count, event = TallyEvent, error = Never)]
    struct Tally {
        total: u64,
    }

    impl Tally {
        async fn handle(
            decision: &mut Decision<'_, Self>,
            command: &Count,
            _services: &(),
        ) -> Result<(), Never> {
            decision.emit(TallyEvent::Counted { by: command.by });
            Ok(())
        }

        fn apply(&mut self, event: &TallyEvent) {
            let TallyEvent::Counted { by } = event;
            self.total += by;
        }
    }

    #[tokio::test]
    async fn commands_are_handled_on_a_store_that_keeps_no_snapshots() {
        let store = VecStore::default();
        let cached = CommandHandler::<Tally, _>::new(store.clone());
        let uncached = CommandHandler::<Tally, _>::new(store).without_state_cache();
        for by in 1..=10 {
            let handler = if by % 2 == 0 { &cached } else { &uncached };
            handler
                .execute(Count {
                    tally: "t".into(),
                    by,
                })
                .await
                .unwrap();
        }
        let loaded = uncached.load("t").await.unwrap();
        assert_eq!((loaded.version, loaded.state.total), (10, 55));
    }
}
