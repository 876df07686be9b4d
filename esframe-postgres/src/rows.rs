//! Turning rows into envelopes. A row that does not fit (hand-edited, corrupt) becomes a
//! [`StoreError::Corrupt`] naming its stream, version and type; nothing panics.

use chrono::{DateTime, Utc};
use esframe_core::{
    CorruptData, EventMetadata, Position, RecordedEvent, Snapshot, StoreError, StreamId,
};
use serde_json::Value;
use sqlx::{Row, postgres::PgRow};
use uuid::Uuid;

/// Decodes an event row selected with `EVENT_COLUMNS`. `known_stream` skips re-validating the
/// stream id when the query was for one stream.
pub(crate) fn event(
    row: &PgRow,
    known_stream: Option<&StreamId>,
) -> Result<RecordedEvent, StoreError> {
    let stream_id = match known_stream {
        Some(stream) => stream.clone(),
        None => {
            let text: String = row
                .try_get(2)
                .map_err(|err| StoreError::unavailable(None, err))?;
            StreamId::new(&text).map_err(|err| {
                CorruptData::new(
                    StreamId::lossy(&text),
                    0,
                    format!("stored stream id {text:?} is invalid"),
                )
                .source(err)
            })?
        }
    };
    let raw_version: i64 = row.try_get(3).map_err(|err| {
        CorruptData::new(
            stream_id.clone(),
            0,
            "column `stream_version` cannot be read",
        )
        .source(err)
    })?;
    let stream_version = u64::try_from(raw_version).map_err(|_| {
        CorruptData::new(
            stream_id.clone(),
            0,
            format!("negative stream version {raw_version}"),
        )
    })?;
    // The type first, so that every later error can name it.
    let event_type: String = row.try_get(5).map_err(|err| {
        CorruptData::new(
            stream_id.clone(),
            stream_version,
            "column `event_type` cannot be read",
        )
        .source(err)
    })?;
    let corrupt = |problem: String| {
        CorruptData::new(stream_id.clone(), stream_version, problem).event_type(event_type.clone())
    };
    let field = |name: &str, err: sqlx::Error| {
        StoreError::from(corrupt(format!("column `{name}` cannot be read")).source(err))
    };
    let raw_position: i64 = row.try_get(0).map_err(|e| field("global_position", e))?;
    let raw_schema: i32 = row.try_get(6).map_err(|e| field("schema_version", e))?;
    let extra: Value = row.try_get(10).map_err(|e| field("metadata", e))?;
    let Value::Object(extra) = extra else {
        return Err(corrupt(format!("metadata is not a JSON object: {extra}")).into());
    };
    Ok(RecordedEvent {
        event_id: row
            .try_get::<Uuid, _>(1)
            .map_err(|e| field("event_id", e))?,
        aggregate_type: std::borrow::Cow::Owned(
            row.try_get(4).map_err(|e| field("aggregate_type", e))?,
        ),
        global_position: Position::new(
            u64::try_from(raw_position)
                .map_err(|_| corrupt(format!("negative global position {raw_position}")))?,
        ),
        recorded_at: row
            .try_get::<DateTime<Utc>, _>(11)
            .map_err(|e| field("recorded_at", e))?,
        schema_version: u32::try_from(raw_schema)
            .map_err(|_| corrupt(format!("negative schema version {raw_schema}")))?,
        payload: row.try_get(7).map_err(|e| field("payload", e))?,
        metadata: EventMetadata {
            correlation_id: row.try_get(8).map_err(|e| field("correlation_id", e))?,
            causation_id: row.try_get(9).map_err(|e| field("causation_id", e))?,
            extra,
        },
        event_type: std::borrow::Cow::Owned(event_type),
        stream_version,
        stream_id,
    })
}

/// Decodes a snapshot row; `None` (with a warning) if the row itself is unusable, so a bad
/// snapshot only costs a rebuild from events.
pub(crate) fn snapshot(row: &PgRow, stream: &StreamId) -> Option<Snapshot> {
    let decoded = (|| -> Result<Snapshot, sqlx::Error> {
        let version: i64 = row.try_get(1)?;
        let schema_version: i32 = row.try_get(2)?;
        Ok(Snapshot {
            stream_id: stream.clone(),
            aggregate_type: row.try_get(0)?,
            version: u64::try_from(version).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            schema_version: u32::try_from(schema_version)
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            state: row.try_get(3)?,
            taken_at: row.try_get(4)?,
        })
    })();
    match decoded {
        Ok(snapshot) => Some(snapshot),
        Err(err) => {
            tracing::warn!(stream = %stream, error = %err, "unreadable snapshot row ignored");
            None
        }
    }
}
