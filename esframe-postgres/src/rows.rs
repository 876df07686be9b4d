//! Turning rows into envelopes. A row that does not fit (hand-edited, corrupt) becomes a
//! [`StoreError::Corrupt`] naming its stream, version and type; nothing panics.
//!
//! The columns' types are the migrations' own, so values are decoded without sqlx's per-column
//! type check (`try_get_unchecked`; a value of another type still fails to decode, as a corrupt
//! row). JSON is parsed straight from the row's bytes, an empty metadata object without
//! parsing, and consecutive rows of one stream share its id.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use esframe_core::{
    CorruptData, EventMetadata, LoadedEvent, Payload, Position, RecordedEvent, Snapshot,
    StoreError, StreamId,
};
use serde_json::{Map, Value};
use sqlx::{Row, ValueRef, postgres::PgRow};
use uuid::Uuid;

use crate::names::Names;

/// Column indexes of `EVENT_COLUMNS`.
mod col {
    pub(super) const GLOBAL_POSITION: usize = 0;
    pub(super) const EVENT_ID: usize = 1;
    pub(super) const AGGREGATE_ID: usize = 2;
    pub(super) const STREAM_VERSION: usize = 3;
    pub(super) const AGGREGATE_TYPE: usize = 4;
    pub(super) const EVENT_TYPE: usize = 5;
    pub(super) const SCHEMA_VERSION: usize = 6;
    pub(super) const PAYLOAD: usize = 7;
    pub(super) const CORRELATION_ID: usize = 8;
    pub(super) const CAUSATION_ID: usize = 9;
    pub(super) const METADATA: usize = 10;
    pub(super) const RECORDED_AT: usize = 11;
}

/// The column of a partition read that holds the horizon, after `EVENT_COLUMNS`.
pub(crate) const PARTITION_HORIZON_COLUMN: usize = 12;

/// Decodes the event rows of one read. A read of one stream takes its id from the query;
/// otherwise the last stream id is kept, so that a run of rows of one stream (an append's
/// events) validates and allocates it once.
pub(crate) struct EventRows {
    last_stream: Option<StreamId>,
    known: bool,
    names: Names,
}

impl EventRows {
    /// Rows of any stream.
    pub(crate) fn new() -> Self {
        Self {
            last_stream: None,
            known: false,
            names: Names::default(),
        }
    }

    /// Rows of `stream` only.
    pub(crate) fn of(stream: &StreamId) -> Self {
        Self {
            last_stream: Some(stream.clone()),
            known: true,
            names: Names::default(),
        }
    }

    /// Decodes an event row selected with `EVENT_COLUMNS`.
    pub(crate) fn event(&mut self, row: &PgRow) -> Result<RecordedEvent, StoreError> {
        let stream_id = self.stream_id(row)?;
        let raw_version: i64 = row.try_get_unchecked(col::STREAM_VERSION).map_err(|err| {
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
        let event_type = name(row, col::EVENT_TYPE)
            .map(|text| self.names.get(text))
            .map_err(|err| {
                CorruptData::new(
                    stream_id.clone(),
                    stream_version,
                    "column `event_type` cannot be read",
                )
                .source(err)
            })?;
        let corrupt = |problem: String| {
            CorruptData::new(stream_id.clone(), stream_version, problem)
                .event_type(event_type.clone())
        };
        let field = |name: &str, err: sqlx::Error| {
            StoreError::from(corrupt(format!("column `{name}` cannot be read")).source(err))
        };
        let raw_position: i64 = row
            .try_get_unchecked(col::GLOBAL_POSITION)
            .map_err(|e| field("global_position", e))?;
        let raw_schema: i32 = row
            .try_get_unchecked(col::SCHEMA_VERSION)
            .map_err(|e| field("schema_version", e))?;
        let extra = metadata(row, col::METADATA).map_err(|e| field("metadata", e))?;
        let Some(extra) = extra else {
            return Err(corrupt("metadata is not a JSON object".to_owned()).into());
        };
        Ok(RecordedEvent {
            event_id: row
                .try_get_unchecked::<Uuid, _>(col::EVENT_ID)
                .map_err(|e| field("event_id", e))?,
            global_position: Position::new(
                u64::try_from(raw_position)
                    .map_err(|_| corrupt(format!("negative global position {raw_position}")))?,
            ),
            recorded_at: row
                .try_get_unchecked::<DateTime<Utc>, _>(col::RECORDED_AT)
                .map_err(|e| field("recorded_at", e))?,
            schema_version: u32::try_from(raw_schema)
                .map_err(|_| corrupt(format!("negative schema version {raw_schema}")))?,
            payload: payload(row, col::PAYLOAD).map_err(|e| field("payload", e))?,
            metadata: EventMetadata {
                correlation_id: row
                    .try_get_unchecked(col::CORRELATION_ID)
                    .map_err(|e| field("correlation_id", e))?,
                causation_id: row
                    .try_get_unchecked(col::CAUSATION_ID)
                    .map_err(|e| field("causation_id", e))?,
                extra,
            },
            event_type,
            stream_version,
            stream_id,
        })
    }

    fn stream_id(&mut self, row: &PgRow) -> Result<StreamId, StoreError> {
        if self.known
            && let Some(stream) = &self.last_stream
        {
            return Ok(stream.clone());
        }
        let text = |index| {
            let raw = row
                .try_get_raw(index)
                .map_err(|err| StoreError::unavailable(None, err))?;
            raw.as_str()
                .map_err(|err| StoreError::unavailable(None, sqlx::Error::Decode(err)))
        };
        let (aggregate_type, id) = (text(col::AGGREGATE_TYPE)?, text(col::AGGREGATE_ID)?);
        if let Some(last) = &self.last_stream
            && last.parts() == (aggregate_type, id)
        {
            return Ok(last.clone());
        }
        let stream = StreamId::new(aggregate_type, id).map_err(|err| {
            CorruptData::new(
                StreamId::lossy(aggregate_type, id),
                0,
                format!("stored stream id {aggregate_type:?}/{id:?} is invalid"),
            )
            .source(err)
        })?;
        self.last_stream = Some(stream.clone());
        Ok(stream)
    }
}

/// Decodes the rows of a load of one stream's state: `stream_version, event_type,
/// schema_version, payload` from column `first` on.
pub(crate) struct StateRows<'a> {
    stream: &'a StreamId,
    first: usize,
    names: Names,
}

impl<'a> StateRows<'a> {
    pub(crate) fn new(stream: &'a StreamId, first: usize) -> Self {
        Self {
            stream,
            first,
            names: Names::default(),
        }
    }

    pub(crate) fn event(&mut self, row: &PgRow) -> Result<LoadedEvent, StoreError> {
        let at = self.first;
        let raw_version: i64 = row.try_get_unchecked(at).map_err(|err| {
            CorruptData::new(
                self.stream.clone(),
                0,
                "column `stream_version` cannot be read",
            )
            .source(err)
        })?;
        let stream_version = u64::try_from(raw_version).map_err(|_| {
            CorruptData::new(
                self.stream.clone(),
                0,
                format!("negative stream version {raw_version}"),
            )
        })?;
        let corrupt = |problem: String, event_type: Option<&str>| {
            let corrupt = CorruptData::new(self.stream.clone(), stream_version, problem);
            match event_type {
                Some(event_type) => corrupt.event_type(event_type),
                None => corrupt,
            }
        };
        let event_type = self.name(row, at + 1).map_err(|err| {
            corrupt("column `event_type` cannot be read".to_owned(), None).source(err)
        })?;
        let field = |name: &str, err: sqlx::Error| {
            StoreError::from(
                corrupt(format!("column `{name}` cannot be read"), Some(&event_type)).source(err),
            )
        };
        let raw_schema: i32 = row
            .try_get_unchecked(at + 2)
            .map_err(|e| field("schema_version", e))?;
        Ok(LoadedEvent {
            stream_version,
            schema_version: u32::try_from(raw_schema).map_err(|_| {
                corrupt(
                    format!("negative schema version {raw_schema}"),
                    Some(&event_type),
                )
            })?,
            payload: payload(row, at + 3).map_err(|e| field("payload", e))?,
            event_type,
        })
    }

    fn name(&mut self, row: &PgRow, index: usize) -> Result<Cow<'static, str>, sqlx::Error> {
        Ok(self.names.get(name(row, index)?))
    }
}

/// A non-null text column, borrowed from the row.
fn name(row: &PgRow, index: usize) -> Result<&str, sqlx::Error> {
    let raw = row.try_get_raw(index)?;
    if raw.is_null() {
        return Err(sqlx::Error::Decode("unexpected NULL".into()));
    }
    raw.as_str().map_err(sqlx::Error::Decode)
}

/// The text of a `jsonb` column: its binary form is a format version (1) and the JSON text.
fn jsonb_text(row: &PgRow, index: usize) -> Result<&[u8], sqlx::Error> {
    let raw = row.try_get_raw(index)?;
    if raw.is_null() {
        return Err(sqlx::Error::Decode("unexpected NULL".into()));
    }
    let bytes = raw.as_bytes().map_err(sqlx::Error::Decode)?;
    match raw.format() {
        sqlx::postgres::PgValueFormat::Binary => match bytes.split_first() {
            Some((1, text)) => Ok(text),
            _ => Err(sqlx::Error::Decode(
                "unsupported jsonb format version".into(),
            )),
        },
        sqlx::postgres::PgValueFormat::Text => Ok(bytes),
    }
}

/// A `jsonb` column as a [`Payload`] of its JSON text, parsed only when needed.
fn payload(row: &PgRow, index: usize) -> Result<Payload, sqlx::Error> {
    let text = std::str::from_utf8(jsonb_text(row, index)?)
        .map_err(|err| sqlx::Error::Decode(err.into()))?;
    Ok(Payload::from_json_text(text))
}

/// The metadata object (`None` if the column holds JSON that is not an object). The usual
/// empty object costs no parsing.
fn metadata(row: &PgRow, index: usize) -> Result<Option<Map<String, Value>>, sqlx::Error> {
    let text = jsonb_text(row, index)?;
    if text == b"{}" {
        return Ok(Some(Map::new()));
    }
    match serde_json::from_slice(text).map_err(|err| sqlx::Error::Decode(err.into()))? {
        Value::Object(map) => Ok(Some(map)),
        _ => Ok(None),
    }
}

/// Where a snapshot's columns are in a row: version, schema version, state, taken at.
pub(crate) type SnapshotColumns = [usize; 4];

/// The columns of the `load_snapshot` statement.
pub(crate) const SNAPSHOT_COLUMNS: SnapshotColumns = [0, 1, 2, 3];

/// The columns of the snapshot row (part 0) of the `load_snapshot_and_stream` statement.
pub(crate) const COLD_LOAD_SNAPSHOT_COLUMNS: SnapshotColumns = [1, 3, 4, 5];

/// Decodes a snapshot row; `None` (with a warning) if the row itself is unusable, so a bad
/// snapshot only costs a rebuild from events.
pub(crate) fn snapshot(row: &PgRow, stream: &StreamId, cols: SnapshotColumns) -> Option<Snapshot> {
    let [version, schema_version, state, taken_at] = cols;
    let decoded = (|| -> Result<Snapshot, sqlx::Error> {
        let version: i64 = row.try_get(version)?;
        let schema_version: i32 = row.try_get(schema_version)?;
        Ok(Snapshot {
            stream_id: stream.clone(),
            version: u64::try_from(version).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            schema_version: u32::try_from(schema_version)
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            state: row.try_get(state)?,
            taken_at: row.try_get(taken_at)?,
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
