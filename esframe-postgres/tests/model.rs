//! The memory store is the model of the PostgreSQL store: random appends (every expected-version
//! mode, reused ids, odd and extreme values in every field) go to both, side by side, and must
//! get the same outcomes (or the same errors) and leave the same streams and the same log.
//!
//! `PROPTEST_CASES` sets the number of histories (default 48).

mod common;

use esframe_core::{
    AppendOutcome, EventMetadata, EventStore, ExpectedVersion, GlobalLog, NewEvent, Position,
    RecordedEvent, StoreError, StreamId,
};
use esframe_memory::MemoryStore;
use esframe_postgres::PgEventStore;
use proptest::{prelude::*, test_runner::TestRunner};
use serde_json::{Map, Value, json};
use sqlx::AssertSqlSafe;
use uuid::Uuid;

/// The streams a history writes to: one id under two aggregate types, and two streams whose
/// parts would run together if a store joined them.
const STREAMS: [(&str, &str); 6] = [
    ("account", "a"),
    ("account", "b"),
    ("account", "it's \"quoted\""),
    ("loan", "a"),
    ("accoun", "ta"),
    ("Ünïcødé 🦀", "Ω≈ç 🦀"),
];

/// Which event id an event gets.
#[derive(Debug, Clone)]
enum IdChoice {
    Fresh,
    /// One of the ids used earlier in the history (the n-th modulo how many there are).
    Reuse(usize),
}

#[derive(Debug, Clone)]
struct EventSpec {
    id: IdChoice,
    event_type: String,
    schema_version: u32,
    payload: Value,
    metadata: Map<String, Value>,
    /// Keep the reused event's content (an idempotent retry) instead of this one.
    same_content: bool,
}

#[derive(Debug, Clone)]
struct Append {
    stream: usize,
    expected: ExpectedChoice,
    events: Vec<EventSpec>,
}

#[derive(Debug, Clone)]
enum ExpectedChoice {
    Any,
    NoStream,
    StreamExists,
    Exact(u64),
    /// The stream's current version in the model, plus this offset.
    Current(i8),
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        prop_oneof![
            any::<f64>().prop_filter("finite", |f| f.is_finite()),
            Just(f64::MAX),
            Just(f64::MIN_POSITIVE),
            Just(5e-324),
            Just(-0.0),
            Just(0.1),
        ]
        .prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
        prop_oneof![
            Just("a\u{0}b"),
            Just("\u{0}"),
            Just("\u{7f}\u{1}"),
            Just("")
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ]
}

fn nested(depth: usize) -> Value {
    (0..depth).fold(json!("bottom"), |inner, _| json!([inner]))
}

fn json_value() -> impl Strategy<Value = Value> {
    let tree = leaf().prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    any::<String>(),
                    Just("k\u{0}ey".to_owned()),
                    Just("".to_owned())
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        8 => tree,
        1 => prop_oneof![Just(63usize), Just(64), Just(65), Just(500)].prop_map(nested),
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just("Happened".to_owned()),
        2 => Just("MoneyDeposited".to_owned()),
        1 => Just(String::new()),
        1 => Just("a\u{0}b".to_owned()),
        1 => Just("tab\there".to_owned()),
        1 => Just("N".repeat(256)),
        1 => Just("N".repeat(257)),
        1 => Just("Ünïcødé 🦀".to_owned()),
    ]
}

fn event_spec() -> impl Strategy<Value = EventSpec> {
    (
        prop_oneof![3 => Just(IdChoice::Fresh), 1 => any::<usize>().prop_map(IdChoice::Reuse)],
        name(),
        prop_oneof![
            6 => Just(1u32),
            1 => Just(0),
            1 => Just(2),
            1 => Just(i32::MAX as u32),
            1 => Just(i32::MAX as u32 + 1),
            1 => Just(u32::MAX),
        ],
        json_value(),
        prop::collection::btree_map(
            prop_oneof![
                Just("user".to_owned()),
                Just("n\u{0}".to_owned()),
                any::<String>()
            ],
            leaf(),
            0..3,
        )
        .prop_map(|m| m.into_iter().collect()),
        any::<bool>(),
    )
        .prop_map(
            |(id, event_type, schema_version, payload, metadata, same_content)| EventSpec {
                id,
                event_type,
                schema_version,
                payload,
                metadata,
                same_content,
            },
        )
}

fn append() -> impl Strategy<Value = Append> {
    (
        0..STREAMS.len(),
        prop_oneof![
            2 => Just(ExpectedChoice::Any),
            1 => Just(ExpectedChoice::NoStream),
            1 => Just(ExpectedChoice::StreamExists),
            3 => (-1i8..=1).prop_map(ExpectedChoice::Current),
            1 => prop_oneof![Just(0u64), Just(i64::MAX as u64), Just(i64::MAX as u64 + 1), Just(u64::MAX)]
                .prop_map(ExpectedChoice::Exact),
        ],
        prop::collection::vec(event_spec(), 0..4),
    )
        .prop_map(|(stream, expected, events)| Append {
            stream,
            expected,
            events,
        })
}

/// What an append did, in a form both stores must agree on (no positions or times, which
/// differ by design).
fn verdict(result: &Result<AppendOutcome, StoreError>) -> String {
    match result {
        Ok(outcome) => format!(
            "ok: version {}, {} events, deduplicated {}",
            outcome.stream_version,
            outcome.positions.len(),
            outcome.deduplicated
        ),
        Err(err) => format!("{:?}: {err}", err.kind()),
    }
}

/// An event as stored, without what differs by design (position, time).
fn content(event: &RecordedEvent) -> (Uuid, String, u64, String, u32, Value, EventMetadata) {
    (
        event.event_id,
        event.stream_id.to_string(),
        event.stream_version,
        event.event_type.to_string(),
        event.schema_version,
        (*event.payload).clone(),
        event.metadata.clone(),
    )
}

struct Pg {
    runtime: tokio::runtime::Runtime,
    store: Option<PgEventStore>,
}

impl Pg {
    fn store(&self) -> &PgEventStore {
        self.store
            .as_ref()
            .expect("the store lives as long as `Pg`")
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // The store gives its connections back through the runtime, so it goes first, inside it;
        // then the runtime, and with it the guard that drops the test's schema (`common`).
        let _inside = self.runtime.enter();
        drop(self.store.take());
    }
}

/// The PostgreSQL side of the test. It ends with the test: its schema is dropped if it passed.
fn pg() -> Pg {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let store = Some(runtime.block_on(common::store("model")));
    Pg { runtime, store }
}

async fn run_history(history: &[Append], pg: &PgEventStore) -> Result<(), TestCaseError> {
    sqlx::query(AssertSqlSafe(format!(
        "TRUNCATE \"{}\".events, \"{}\".snapshots",
        pg.schema(),
        pg.schema()
    )))
    .execute(pg.pool())
    .await
    .expect("truncate");
    let model = MemoryStore::new();
    // The events appended so far, to reuse their ids (and, for idempotent retries, contents).
    let mut used: Vec<NewEvent> = Vec::new();
    for (step, op) in history.iter().enumerate() {
        let stream =
            StreamId::new(STREAMS[op.stream].0, STREAMS[op.stream].1).expect("valid stream id");
        let current = model
            .stream_version(&stream)
            .await
            .expect("model")
            .unwrap_or(0);
        let expected = match op.expected {
            ExpectedChoice::Any => ExpectedVersion::Any,
            ExpectedChoice::NoStream => ExpectedVersion::NoStream,
            ExpectedChoice::StreamExists => ExpectedVersion::StreamExists,
            ExpectedChoice::Exact(v) => ExpectedVersion::Exact(v),
            ExpectedChoice::Current(offset) => {
                ExpectedVersion::Exact(current.saturating_add_signed(i64::from(offset)))
            }
        };
        let events: Vec<NewEvent> = op
            .events
            .iter()
            .map(|spec| {
                let fresh = NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: spec.event_type.clone().into(),
                    schema_version: spec.schema_version,
                    payload: spec.payload.clone(),
                    metadata: EventMetadata {
                        correlation_id: Some(Uuid::now_v7()),
                        causation_id: None,
                        extra: spec.metadata.clone(),
                    },
                };
                match (&spec.id, used.is_empty()) {
                    (IdChoice::Reuse(n), false) => {
                        let earlier = &used[n % used.len()];
                        if spec.same_content {
                            earlier.clone()
                        } else {
                            NewEvent {
                                event_id: earlier.event_id,
                                ..fresh
                            }
                        }
                    }
                    _ => fresh,
                }
            })
            .collect();
        used.extend(events.iter().cloned());
        let in_model = model.append(&stream, expected, events.clone()).await;
        let in_pg = pg.append(&stream, expected, events).await;
        prop_assert_eq!(
            verdict(&in_model),
            verdict(&in_pg),
            "step {}: {:?} to {:?}",
            step,
            expected,
            STREAMS[op.stream]
        );
    }
    for (aggregate_type, id) in STREAMS {
        let stream = StreamId::new(aggregate_type, id).expect("valid stream id");
        let model_events: Vec<_> = model
            .read_stream(&stream, 1)
            .await
            .expect("model read")
            .iter()
            .map(content)
            .collect();
        let pg_events: Vec<_> = pg
            .read_stream(&stream, 1)
            .await
            .expect("PostgreSQL read")
            .iter()
            .map(content)
            .collect();
        prop_assert_eq!(model_events, pg_events, "stream {:?}", stream);
    }
    let model_log: Vec<Uuid> = model
        .read_all(Position::START, usize::MAX)
        .await
        .expect("model log")
        .iter()
        .map(|e| e.event_id)
        .collect();
    let pg_log: Vec<Uuid> = settled_log(pg).await.iter().map(|e| e.event_id).collect();
    prop_assert_eq!(model_log, pg_log, "the global logs differ");
    Ok(())
}

/// The whole PostgreSQL log once it is readable up to its head. The horizon is database-wide:
/// a transaction of another test running at the same time holds back events committed after
/// it started, for as long as it runs.
async fn settled_log(pg: &PgEventStore) -> Vec<RecordedEvent> {
    let head = pg.head_position().await.expect("PostgreSQL head");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let log = pg
            .read_all(Position::START, usize::MAX)
            .await
            .expect("PostgreSQL log");
        if log.last().map_or(Position::START, |e| e.global_position) >= head {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the PostgreSQL log stayed behind its head {head} for 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[test]
fn the_postgres_store_behaves_like_the_memory_store() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(48);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let pg = pg();
    let result = runner.run(&prop::collection::vec(append(), 1..14), |history| {
        pg.runtime.block_on(run_history(&history, pg.store()))
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}
