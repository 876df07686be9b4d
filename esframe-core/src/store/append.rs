//! [`AppendBatch`]: an append checked against the contract, the only form backends store.

use std::collections::HashSet;

use crate::{
    ExpectedVersion, InputLocation, InputProblem, InvalidInput, NewEvent, StoreError, StreamId,
    limits::{self, MAX_EVENTS_PER_APPEND, MAX_SCHEMA_VERSION, MAX_VERSION},
};

/// An append that passed the contract's checks: at most
/// [`MAX_EVENTS_PER_APPEND`](crate::limits::MAX_EVENTS_PER_APPEND) events, every number in the
/// range every store can hold, no NUL character, JSON no deeper than
/// [`MAX_JSON_DEPTH`](crate::limits::MAX_JSON_DEPTH), valid type names, no event id twice.
///
/// [`EventStore::append`](crate::EventStore::append) builds one and hands it to the backend's
/// [`EventStore::append_batch`](crate::EventStore::append_batch); a backend can rely on all of
/// the above and only has to store it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendBatch {
    stream: StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
}

impl AppendBatch {
    /// Checks an append. Refused input is [`StoreError::InvalidInput`] (or
    /// [`StoreError::DuplicateIdInBatch`]) naming the event and the field; the events are then
    /// dropped without recursion, however deep their JSON.
    pub fn new(
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Self, StoreError> {
        match check(stream, expected, &events) {
            Ok(()) => Ok(Self {
                stream: stream.clone(),
                expected,
                events,
            }),
            Err(err) => {
                // Whatever the reason, a refused event may be nested too deep for `Value`'s
                // recursive drop (the first problem found is not necessarily the depth).
                dismantle_events(events);
                Err(err)
            }
        }
    }

    /// The stream to append to.
    pub fn stream(&self) -> &StreamId {
        &self.stream
    }

    /// What the writer expects the stream's version to be.
    pub fn expected(&self) -> ExpectedVersion {
        self.expected
    }

    /// The events, in order.
    pub fn events(&self) -> &[NewEvent] {
        &self.events
    }

    /// How many events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the append carries no event (it then only checks the expectation).
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The events, taken out.
    pub fn into_events(self) -> Vec<NewEvent> {
        self.events
    }
}

fn check(
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    let invalid = |location, problem| {
        StoreError::InvalidInput(InvalidInput {
            stream: stream.clone(),
            location,
            problem,
        })
    };
    if events.len() > MAX_EVENTS_PER_APPEND {
        return Err(invalid(
            InputLocation::Append,
            InputProblem::TooManyEvents {
                count: events.len(),
                limit: MAX_EVENTS_PER_APPEND,
            },
        ));
    }
    if let ExpectedVersion::Exact(version) = expected {
        limits::check_range("expected version", version, 0, MAX_VERSION)
            .map_err(|problem| invalid(InputLocation::ExpectedVersion, problem))?;
    }
    for (index, event) in events.iter().enumerate() {
        check_event(event).map_err(|problem| {
            let event_type = if matches!(
                problem,
                InputProblem::InvalidName {
                    field: "event_type",
                    ..
                }
            ) {
                printable_name(&event.event_type)
            } else {
                event.event_type.to_string()
            };
            invalid(InputLocation::Event { index, event_type }, problem)
        })?;
    }
    if let Some(event_id) = repeated_id(events) {
        return Err(StoreError::DuplicateIdInBatch {
            stream: stream.clone(),
            event_id,
        });
    }
    Ok(())
}

/// A refused name as an error can show it: escaped, at most 64 characters, `(empty)` if empty.
fn printable_name(name: &str) -> String {
    if name.is_empty() {
        return "(empty)".to_owned();
    }
    name.chars()
        .take(64)
        .collect::<String>()
        .escape_debug()
        .to_string()
}

fn check_event(event: &NewEvent) -> Result<(), InputProblem> {
    limits::check_name("event_type", &event.event_type)?;
    limits::check_range(
        "schema_version",
        u64::from(event.schema_version),
        1,
        u64::from(MAX_SCHEMA_VERSION),
    )?;
    limits::check_json("payload", &event.payload)?;
    limits::check_json_map("metadata", &event.metadata.extra)
}

/// The first event id that appears twice, in the append's order.
fn repeated_id(events: &[NewEvent]) -> Option<uuid::Uuid> {
    match events.len() {
        0 | 1 => None,
        // Small batches (most commands) without allocating.
        2..=16 => events
            .iter()
            .enumerate()
            .find(|(i, e)| events[..*i].iter().any(|f| f.event_id == e.event_id))
            .map(|(_, e)| e.event_id),
        n => {
            let mut seen = HashSet::with_capacity(n);
            events
                .iter()
                .find(|e| !seen.insert(e.event_id))
                .map(|e| e.event_id)
        }
    }
}

/// Drops refused events without recursion ([`limits::dismantle`]).
pub(crate) fn dismantle_events(events: Vec<NewEvent>) {
    for event in events {
        limits::dismantle(event.payload);
        limits::dismantle(serde_json::Value::Object(event.metadata.extra));
    }
}
