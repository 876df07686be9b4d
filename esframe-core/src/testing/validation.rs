//! Checks of the input rules every store enforces the same way (they are decided in
//! esframe-core, before the backend): each refused request gets its typed error, and nothing
//! stored changes; values at the limits are accepted and read back unchanged.

use serde_json::{Map, Value, json};

use crate::{
    EventStore, ExpectedVersion, InputLocation, InputProblem, InvalidInput, NewEvent,
    RecordedEvent, SnapshotStore, StoreError, StreamId,
    limits::{
        MAX_EVENTS_PER_APPEND, MAX_JSON_DEPTH, MAX_NAME_LEN, MAX_SCHEMA_VERSION, MAX_VERSION,
    },
};

use super::fixtures::{event, snapshot, stream};

/// What a store holds of the streams a check touches, to compare before and after.
struct Stored<'a, S> {
    store: &'a S,
    streams: Vec<StreamId>,
    before: Vec<Vec<RecordedEvent>>,
}

impl<'a, S: EventStore> Stored<'a, S> {
    /// Seeds `target` and a bystander stream with events and remembers them.
    async fn seed(store: &'a S, target: &StreamId) -> Self {
        let bystander = stream(&format!("{target}-bystander"));
        for s in [target, &bystander] {
            store
                .append(s, ExpectedVersion::Any, vec![event(1), event(2)])
                .await
                .expect("seed the streams");
        }
        let streams = vec![target.clone(), bystander];
        let before = Self::read(store, &streams).await;
        Self {
            store,
            streams,
            before,
        }
    }

    async fn read(store: &S, streams: &[StreamId]) -> Vec<Vec<RecordedEvent>> {
        let mut all = Vec::new();
        for s in streams {
            all.push(store.read_stream(s, 1).await.expect("read the stream"));
        }
        all
    }

    async fn unchanged(&self, what: &str) {
        assert_eq!(
            Self::read(self.store, &self.streams).await,
            self.before,
            "{what}: a refused append changed what is stored"
        );
    }
}

/// Asserts that `result` is [`StoreError::InvalidInput`] at `location` with a problem
/// `matches` accepts, naming `stream`.
fn expect_invalid<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    stream: &StreamId,
    location: &InputLocation,
    matches: impl FnOnce(&InputProblem) -> bool,
    what: &str,
) {
    match result {
        Err(StoreError::InvalidInput(InvalidInput {
            stream: s,
            location: l,
            problem,
        })) => {
            assert_eq!(&s, stream, "{what}: the error names the stream");
            assert_eq!(&l, location, "{what}: the error names where the value is");
            assert!(matches(&problem), "{what}: unexpected problem {problem:?}");
        }
        other => panic!("{what}: expected InvalidInput, got {other:?}"),
    }
}

fn at(index: usize, event_type: &str) -> InputLocation {
    InputLocation::Event {
        index,
        event_type: event_type.to_owned(),
    }
}

/// `value` nested in `depth` arrays.
fn nested(depth: usize, value: Value) -> Value {
    (0..depth).fold(value, |inner, _| Value::Array(vec![inner]))
}

/// An append of more events than a store can number is refused whole.
pub async fn oversized_appends_are_refused<S: EventStore>(store: S) {
    let s = stream("too-many");
    let stored = Stored::seed(&store, &s).await;
    let batch: Vec<NewEvent> = (0..=MAX_EVENTS_PER_APPEND as u64).map(event).collect();
    expect_invalid(
        store.append(&s, ExpectedVersion::Any, batch).await,
        &s,
        &InputLocation::Append,
        |p| {
            matches!(p, InputProblem::TooManyEvents { count, limit }
                if *count == MAX_EVENTS_PER_APPEND + 1 && *limit == MAX_EVENTS_PER_APPEND)
        },
        "too many events",
    );
    stored.unchanged("too many events").await;
}

/// Schema versions and expected versions outside what every store holds are refused, not
/// clamped.
pub async fn numbers_out_of_range_are_refused<S: EventStore>(store: S) {
    let s = stream("out-of-range");
    let stored = Stored::seed(&store, &s).await;
    for (schema_version, what) in [
        (0, "schema version 0"),
        (MAX_SCHEMA_VERSION + 1, "schema version above i32::MAX"),
        (u32::MAX, "schema version u32::MAX"),
    ] {
        let mut e = event(3);
        e.schema_version = schema_version;
        expect_invalid(
            store
                .append(&s, ExpectedVersion::Any, vec![event(4), e])
                .await,
            &s,
            &at(1, "Happened"),
            |p| {
                matches!(p, InputProblem::OutOfRange { field: "schema_version", value, min: 1, max }
                    if *value == u64::from(schema_version) && *max == u64::from(MAX_SCHEMA_VERSION))
            },
            what,
        );
    }
    for version in [MAX_VERSION + 1, u64::MAX] {
        expect_invalid(
            store
                .append(&s, ExpectedVersion::Exact(version), vec![event(3)])
                .await,
            &s,
            &InputLocation::ExpectedVersion,
            |p| matches!(p, InputProblem::OutOfRange { field: "expected version", value, .. } if *value == version),
            "an expected version above i64::MAX",
        );
    }
    stored.unchanged("numbers out of range").await;
    // The largest storable expectation is a plain conflict, not an input error.
    match store
        .append(&s, ExpectedVersion::Exact(MAX_VERSION), vec![event(3)])
        .await
    {
        Err(StoreError::Conflict(c)) => assert_eq!(c.actual, Some(2)),
        other => panic!("expected a conflict at Exact(i64::MAX), got {other:?}"),
    }
}

/// A NUL character anywhere in a payload or metadata (value or key) is refused with its path.
pub async fn nul_characters_are_refused<S: EventStore>(store: S) {
    let s = stream("nul");
    let stored = Stored::seed(&store, &s).await;
    let payloads = [
        (json!({ "note": "a\u{0}b" }), "/note"),
        (json!({ "list": [1, "x", "\u{0}"] }), "/list/2"),
        (json!({ "k\u{0}ey": 1 }), "/k\\0ey"),
        (json!("\u{0}"), ""),
    ];
    for (payload, path) in payloads {
        let mut e = event(3);
        e.payload = payload;
        expect_invalid(
            store.append(&s, ExpectedVersion::Any, vec![e]).await,
            &s,
            &at(0, "Happened"),
            |p| matches!(p, InputProblem::NulCharacter { field: "payload", at } if at == path),
            "a NUL in the payload",
        );
    }
    let metadata = [
        (json!({ "user": "ad\u{0}a" }), "/user"),
        (json!({ "\u{0}": "x" }), "/\\0"),
    ];
    for (extra, path) in metadata {
        let mut e = event(3);
        e.metadata.extra = extra.as_object().cloned().unwrap_or_default();
        expect_invalid(
            store.append(&s, ExpectedVersion::Any, vec![e]).await,
            &s,
            &at(0, "Happened"),
            |p| matches!(p, InputProblem::NulCharacter { field: "metadata", at } if at == path),
            "a NUL in the metadata",
        );
    }
    stored.unchanged("NUL characters").await;
}

/// Type names that are empty, too long or hold control characters (NUL included) are refused.
pub async fn invalid_names_are_refused<S: EventStore>(store: S) {
    let s = stream("names");
    let stored = Stored::seed(&store, &s).await;
    let long = "T".repeat(MAX_NAME_LEN + 1);
    for (event_type, what) in [
        ("", "an empty event type"),
        (long.as_str(), "an event type too long"),
        ("Money\u{0}Deposited", "a NUL in the event type"),
        ("line\nbreak", "a control character in the event type"),
    ] {
        let mut e = event(3);
        e.event_type = event_type.to_owned().into();
        let result = store.append(&s, ExpectedVersion::Any, vec![e]).await;
        match result {
            Err(StoreError::InvalidInput(InvalidInput {
                location:
                    InputLocation::Event {
                        index: 0,
                        event_type: shown,
                    },
                problem:
                    InputProblem::InvalidName {
                        field: "event_type",
                        ..
                    },
                ..
            })) => assert!(!shown.contains('\0'), "{what}: the name is shown escaped"),
            other => panic!("{what}: expected InvalidName, got {other:?}"),
        }
    }
    stored.unchanged("invalid names").await;
}

/// JSON nested deeper than every store can read back is refused, even nested far beyond what a
/// recursive check or drop could survive; nothing crashes.
pub async fn json_nested_too_deep_is_refused<S: EventStore>(store: S) {
    let s = stream("deep");
    let stored = Stored::seed(&store, &s).await;
    for depth in [MAX_JSON_DEPTH + 1, 100_000] {
        let mut e = event(3);
        e.payload = nested(depth, json!(1));
        expect_invalid(
            store.append(&s, ExpectedVersion::Any, vec![e]).await,
            &s,
            &at(0, "Happened"),
            |p| matches!(p, InputProblem::TooDeep { field: "payload", max } if *max == MAX_JSON_DEPTH),
            "a payload nested too deep",
        );
        let mut e = event(3);
        let mut extra = Map::new();
        extra.insert("deep".into(), nested(depth, json!(1)));
        e.metadata.extra = extra;
        expect_invalid(
            store.append(&s, ExpectedVersion::Any, vec![e]).await,
            &s,
            &at(0, "Happened"),
            |p| {
                matches!(
                    p,
                    InputProblem::TooDeep {
                        field: "metadata",
                        ..
                    }
                )
            },
            "metadata nested too deep",
        );
    }
    // Refused for another reason first: the deep value must still be dropped safely.
    let mut bad_name = event(3);
    bad_name.event_type = "".into();
    let deep = || {
        let mut e = event(4);
        e.payload = nested(100_000, json!(1));
        e
    };
    expect_invalid(
        store
            .append(&s, ExpectedVersion::Any, vec![bad_name, deep()])
            .await,
        &s,
        &at(0, "(empty)"),
        |p| matches!(p, InputProblem::InvalidName { .. }),
        "a bad name before a deep payload",
    );
    assert!(
        store
            .append(&s, ExpectedVersion::Exact(u64::MAX), vec![deep()])
            .await
            .is_err(),
        "an expectation out of range with a deep payload"
    );
    stored.unchanged("deep JSON").await;
}

/// Values at every limit are accepted and read back exactly as given.
pub async fn values_at_the_limits_round_trip<S: EventStore>(store: S) {
    // The longest aggregate type and id a stream id can have.
    let s = StreamId::new(
        "A".repeat(MAX_NAME_LEN),
        "I".repeat(crate::MAX_STREAM_ID_LEN),
    )
    .expect("a stream id at the limits");
    let name = "N".repeat(MAX_NAME_LEN);
    let mut e = event(0);
    e.event_type = name.clone().into();
    e.schema_version = MAX_SCHEMA_VERSION;
    e.payload = json!({
        "deepest": nested(MAX_JSON_DEPTH - 1, json!("bottom")),
        "u64": u64::MAX,
        "i64": i64::MIN,
        "floats": [0.1, 1e300, -2.5e-300, 5e-324, 1.7976931348623157e308],
        "text": "quotes \" ' \\ tabs\t newlines\n unicode Ω≈ç√ 🦀 \u{7f} \u{10ffff}",
        "empty": ["", {}, []],
    });
    e.metadata.extra = json!({ "deep": nested(MAX_JSON_DEPTH - 1, json!(null)), "ü": "ß" })
        .as_object()
        .cloned()
        .unwrap_or_default();
    store
        .append(&s, ExpectedVersion::NoStream, vec![e.clone()])
        .await
        .expect("values at the limits are accepted");
    let stored = store.read_stream(&s, 1).await.unwrap();
    assert_eq!(stored.len(), 1);
    let read = &stored[0];
    assert_eq!(read.event_type, name);
    assert_eq!(read.stream_id, s);
    assert_eq!(read.schema_version, MAX_SCHEMA_VERSION);
    assert_eq!(read.payload, e.payload, "the payload reads back unchanged");
    assert_eq!(
        read.metadata, e.metadata,
        "the metadata reads back unchanged"
    );
}

/// Snapshots that break the limits are refused by `save_snapshot` and `append_with_snapshot`,
/// and a snapshot of another stream cannot ride along an append; nothing is stored.
pub async fn invalid_snapshots_are_refused<S: SnapshotStore>(store: S) {
    let s = stream("bad-snapshots");
    let mut bad = Vec::new();
    let mut nul = snapshot(&s, 2, 2);
    nul.state = json!({ "name": "\u{0}" });
    bad.push((nul, "a NUL in the state"));
    let mut deep = snapshot(&s, 2, 2);
    deep.state = nested(100_000, json!(0));
    bad.push((deep, "a state nested too deep"));
    bad.push((snapshot(&s, 0, 0), "version 0"));
    bad.push((snapshot(&s, MAX_VERSION + 1, 0), "a version above i64::MAX"));
    let mut schema = snapshot(&s, 2, 2);
    schema.schema_version = 0;
    bad.push((schema, "schema version 0"));
    for (snapshot, what) in bad {
        let result = store.save_snapshot(snapshot).await;
        expect_invalid(result, &s, &InputLocation::Snapshot, |_| true, what);
    }
    let mut nul = snapshot(&s, 2, 2);
    nul.state = json!(["\u{0}"]);
    expect_invalid(
        store
            .append_with_snapshot(&s, ExpectedVersion::NoStream, vec![event(1), event(2)], nul)
            .await,
        &s,
        &InputLocation::Snapshot,
        |p| matches!(p, InputProblem::NulCharacter { field: "state", .. }),
        "append_with_snapshot with a NUL in the state",
    );
    // The events are refused first: the unchecked deep state is still dropped safely.
    let mut deep = snapshot(&s, 2, 2);
    deep.state = nested(100_000, json!(0));
    let mut bad_name = event(1);
    bad_name.event_type = "".into();
    assert!(
        store
            .append_with_snapshot(&s, ExpectedVersion::NoStream, vec![bad_name], deep)
            .await
            .is_err(),
        "a refused batch with a deep snapshot"
    );
    let other = stream("bad-snapshots-other");
    let mut deep_other = snapshot(&other, 2, 2);
    deep_other.state = nested(100_000, json!(0));
    expect_invalid(
        store
            .append_with_snapshot(
                &s,
                ExpectedVersion::NoStream,
                vec![event(1), event(2)],
                deep_other,
            )
            .await,
        &s,
        &InputLocation::Snapshot,
        |p| matches!(p, InputProblem::OtherStream { stream } if *stream == other),
        "a deep snapshot of another stream",
    );
    expect_invalid(
        store
            .append_with_snapshot(
                &s,
                ExpectedVersion::NoStream,
                vec![event(1), event(2)],
                snapshot(&other, 2, 2),
            )
            .await,
        &s,
        &InputLocation::Snapshot,
        |p| matches!(p, InputProblem::OtherStream { stream } if *stream == other),
        "a snapshot of another stream",
    );
    assert_eq!(
        store.stream_version(&s).await.unwrap(),
        None,
        "no event stored"
    );
    assert_eq!(
        store.load_snapshot(&s).await.unwrap(),
        None,
        "no snapshot stored"
    );
    assert_eq!(store.load_snapshot(&other).await.unwrap(), None);
}
