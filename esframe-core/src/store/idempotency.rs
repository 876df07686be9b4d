//! Idempotency by event id: the one decision every backend makes the same way.

use uuid::Uuid;

use crate::{AppendBatch, AppendOutcome, RecordedEvent, StoreError};

/// Decides what an append means, given what is already stored under its event ids.
///
/// Backends call this with a lookup of the batch's ids in their storage (under the same lock
/// or in the same transaction as the append, or after the append failed on a unique id), before
/// checking the expected version: a retry of an append that landed carries a stale expectation,
/// and must still get the original outcome.
///
/// - `Ok(None)`: none of the ids is stored; append the batch.
/// - `Ok(Some(outcome))`: every id is stored with the same content (same stream, event type,
///   schema version and payload, [`NewEvent::same_content`](crate::NewEvent::same_content)):
///   nothing is written, and `outcome` is the original one with `deduplicated: true`.
/// - [`StoreError::EventIdReused`]: the first id, in the batch's order, stored with other
///   content or in another stream.
/// - [`StoreError::PartialDuplicate`]: some ids are stored, others are not; it names the first
///   stored one in the batch's order.
pub fn resolve_stored_ids<'a>(
    batch: &AppendBatch,
    mut stored: impl FnMut(&Uuid) -> Option<&'a RecordedEvent>,
) -> Result<Option<AppendOutcome>, StoreError> {
    let stream = batch.stream();
    let mut found = Vec::new();
    for event in batch.events() {
        let Some(existing) = stored(&event.event_id) else {
            continue;
        };
        if !event.same_content(stream, existing) {
            return Err(StoreError::EventIdReused {
                event_id: event.event_id,
                stream: stream.clone(),
                stored_stream: existing.stream_id.clone(),
                stored_version: existing.stream_version,
            });
        }
        found.push(existing);
    }
    match found.first() {
        None => Ok(None),
        Some(first) if found.len() < batch.len() => Err(StoreError::PartialDuplicate {
            stream: stream.clone(),
            stored_event_id: first.event_id,
        }),
        Some(first) => Ok(Some(AppendOutcome {
            stream_version: found.iter().map(|e| e.stream_version).max().unwrap_or(0),
            positions: found.iter().map(|e| e.global_position).collect(),
            recorded_at: first.recorded_at,
            deduplicated: true,
        })),
    }
}
