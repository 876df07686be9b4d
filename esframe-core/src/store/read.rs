//! The read path above every backend: what stored events must look like before upcasting.

use crate::{CorruptData, Position, RecordedEvent, StoreError, StreamId};

/// Checks a read of `stream` from `from_version`: every event belongs to the stream and the
/// versions run `from_version, from_version + 1, ...` without a gap or a repeat. A stream whose
/// stored versions are not consecutive would rebuild a silently wrong state.
pub(crate) fn check_stream(
    stream: &StreamId,
    from_version: u64,
    events: &[RecordedEvent],
) -> Result<(), StoreError> {
    check_versions(
        stream,
        from_version,
        events.iter().map(|e| {
            let other = (e.stream_id != *stream).then(|| {
                format!(
                    "a read of this stream returned an event of stream `{}`",
                    e.stream_id
                )
            });
            (e.stream_version, e.event_type.as_ref(), other)
        }),
    )
}

/// Checks the versions of a load of `stream` from `from_version`, as [`check_stream`] does.
pub(crate) fn check_loaded(
    stream: &StreamId,
    from_version: u64,
    events: &[crate::LoadedEvent],
) -> Result<(), StoreError> {
    check_versions(
        stream,
        from_version,
        events
            .iter()
            .map(|e| (e.stream_version, e.event_type.as_ref(), None)),
    )
}

/// Versions must run `from_version, from_version + 1, ...`. Each item is an event's version,
/// its type (to name it) and a problem already found with it, reported first.
fn check_versions<'a>(
    stream: &StreamId,
    from_version: u64,
    events: impl Iterator<Item = (u64, &'a str, Option<String>)>,
) -> Result<(), StoreError> {
    let mut expected = from_version.max(1);
    for (version, event_type, problem) in events {
        let problem = match problem {
            Some(problem) => problem,
            None if version == expected => {
                expected += 1;
                continue;
            }
            None if version > expected => format!(
                "the stream's versions are not consecutive: version {expected} is missing before version {version}"
            ),
            None => format!(
                "the stream's versions are not consecutive: version {version} comes again or out of order after version {}",
                expected - 1
            ),
        };
        return Err(CorruptData::new(stream.clone(), version, problem)
            .event_type(event_type)
            .into());
    }
    Ok(())
}

/// Checks a read of the global log after `after`: positions strictly increase from above it.
pub(crate) fn check_log(after: Position, events: &[RecordedEvent]) -> Result<(), StoreError> {
    let mut last = after;
    for event in events {
        if event.global_position <= last {
            return Err(CorruptData::new(
                event.stream_id.clone(),
                event.stream_version,
                format!(
                    "the global log is out of order: position {} follows position {last}",
                    event.global_position
                ),
            )
            .event_type(event.event_type.as_ref())
            .into());
        }
        last = event.global_position;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(stream: &str, version: u64, position: u64) -> RecordedEvent {
        RecordedEvent {
            event_id: uuid::Uuid::now_v7(),
            stream_id: StreamId::new("a", stream).unwrap(),
            stream_version: version,
            global_position: Position::new(position),
            recorded_at: chrono::Utc::now(),
            event_type: "E".into(),
            schema_version: 1,
            payload: crate::Payload::default(),
            metadata: Default::default(),
        }
    }

    #[test]
    fn gaps_repeats_and_foreign_events_in_a_stream_are_corrupt() {
        let s = StreamId::new("a", "s").unwrap();
        let ok = [stored("s", 3, 1), stored("s", 4, 2)];
        assert!(check_stream(&s, 3, &ok).is_ok());
        for (events, from, message) in [
            (
                vec![stored("s", 1, 1), stored("s", 3, 2)],
                1,
                "version 2 is missing",
            ),
            (vec![stored("s", 2, 1)], 1, "version 1 is missing"),
            (
                vec![stored("s", 1, 1), stored("s", 1, 2)],
                1,
                "version 1 comes again",
            ),
            (vec![stored("t", 1, 1)], 1, "an event of stream `a/t`"),
        ] {
            let err = check_stream(&s, from, &events).unwrap_err();
            assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
            assert!(err.to_string().contains(message), "{err}");
            assert!(err.to_string().contains("stream `a/s`"), "{err}");
        }
    }

    #[test]
    fn an_unordered_log_is_corrupt() {
        let events = [stored("a", 1, 5), stored("b", 1, 4)];
        assert!(check_log(Position::START, &events).is_err());
        assert!(check_log(Position::new(5), &events[..1]).is_err());
        assert!(check_log(Position::new(4), &events[..1]).is_ok());
    }
}
