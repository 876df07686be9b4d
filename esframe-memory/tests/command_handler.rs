//! The command handler against the memory store: concurrency, retries, snapshots, cache, errors.
//! The aggregate is implemented by hand (no derive) to show the traits on their own.

use std::sync::Arc;

use esframe_core::{
    Aggregate, Command, CommandContext, CommandError, CommandHandler, Decision, DecodeErrorKind,
    Event, EventMetadata, EventStore, EventType, ExpectedVersion, NewEvent, Payload, RetryPolicy,
    Snapshot, SnapshotPolicy, SnapshotStore, StoreError, StreamId,
};
use esframe_memory::MemoryStore;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum CounterEvent {
    Added { n: u64 },
}

impl Event for CounterEvent {
    fn event_types() -> &'static [EventType] {
        const TYPES: &[EventType] = &[EventType::new("Added", 1)];
        TYPES
    }
    fn event_type(&self) -> &'static str {
        "Added"
    }
    fn schema_version(&self) -> u32 {
        1
    }
    fn to_payload(&self) -> Result<Value, serde_json::Error> {
        let Self::Added { n } = self;
        Ok(json!({ "n": n }))
    }
    fn from_payload(event_type: &str, payload: &Payload) -> Result<Self, DecodeErrorKind> {
        match event_type {
            "Added" => {
                #[derive(Deserialize)]
                struct Added {
                    n: u64,
                }
                let added: Added = payload.deserialize().map_err(DecodeErrorKind::Payload)?;
                Ok(Self::Added { n: added.n })
            }
            _ => Err(DecodeErrorKind::UnknownType),
        }
    }
}

#[derive(Debug, Clone)]
enum CounterCommand {
    Add {
        id: String,
        n: u64,
    },
    /// Adds `n` twice; the second event is only emitted if the first left the total below `limit`.
    AddTwiceBelow {
        id: String,
        n: u64,
        limit: u64,
    },
    Reject {
        id: String,
    },
    /// Adds `n` if the total is at least `min`; rejected otherwise.
    AddIfAtLeast {
        id: String,
        n: u64,
        min: u64,
    },
    /// Emits an event, then rejects: the state it leaves is unusable.
    EmitThenReject {
        id: String,
    },
}

impl Command for CounterCommand {
    fn aggregate_id(&self) -> String {
        match self {
            Self::Add { id, .. }
            | Self::AddTwiceBelow { id, .. }
            | Self::Reject { id }
            | Self::AddIfAtLeast { id, .. }
            | Self::EmitThenReject { id } => id.clone(),
        }
    }
    fn metadata(&self) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        map.insert("source".into(), json!("test"));
        map
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("rejected on purpose")]
struct Rejected;

/// Services: optionally a store to write to behind the handler's back (a concurrent writer),
/// and a pause in every decision so that queued commands pile up.
#[derive(Default)]
struct Meddler(Option<MemoryStore>, Option<std::time::Duration>);

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Counter {
    total: u64,
    applied: u64,
}

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = Rejected;
    type Services = Meddler;

    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &CounterCommand,
        services: &Meddler,
    ) -> Result<(), Rejected> {
        if let Some(pause) = services.1 {
            tokio::time::sleep(pause).await;
        }
        if let Some(store) = &services.0 {
            let sneaky = NewEvent::from_event(&CounterEvent::Added { n: 0 }).unwrap();
            store
                .append(decision.stream_id(), ExpectedVersion::Any, vec![sneaky])
                .await
                .unwrap();
        }
        match command {
            CounterCommand::Add { n, .. } => {
                decision.emit(CounterEvent::Added { n: *n });
            }
            CounterCommand::AddTwiceBelow { n, limit, .. } => {
                let after_first = decision.emit(CounterEvent::Added { n: *n }).total;
                if after_first < *limit {
                    decision.emit(CounterEvent::Added { n: *n });
                }
            }
            CounterCommand::Reject { .. } => return Err(Rejected),
            CounterCommand::AddIfAtLeast { n, min, .. } => {
                if decision.total < *min {
                    return Err(Rejected);
                }
                decision.emit(CounterEvent::Added { n: *n });
            }
            CounterCommand::EmitThenReject { .. } => {
                decision.emit(CounterEvent::Added { n: 1_000_000 });
                return Err(Rejected);
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: &CounterEvent) {
        let CounterEvent::Added { n } = event;
        self.total += n;
        self.applied += 1;
    }

    fn to_snapshot(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(self)
    }

    fn from_snapshot(state: &Value) -> Result<Self, serde_json::Error> {
        Self::deserialize(state)
    }
}

fn add(id: &str, n: u64) -> CounterCommand {
    CounterCommand::Add { id: id.into(), n }
}

fn sid(id: &str) -> StreamId {
    StreamId::new(Counter::TYPE, id).unwrap()
}

#[tokio::test]
async fn stores_events_with_envelopes_and_propagates_ids() {
    let store = MemoryStore::new();
    let handler = CommandHandler::<Counter, _>::new(store.clone());
    let correlation = Uuid::now_v7();
    let command_id = Uuid::now_v7();
    let ctx = CommandContext::new()
        .command_id(command_id)
        .correlation_id(correlation)
        .metadata("user", "ada");
    let outcome = handler.execute_with(add("c1", 5), ctx).await.unwrap();
    assert_eq!(outcome.version, 1);
    assert_eq!(outcome.attempts, 1);
    assert_eq!(outcome.events.len(), 1);
    let envelope = &outcome.events[0];
    assert_eq!(envelope.payload, CounterEvent::Added { n: 5 });
    assert_eq!(envelope.stream_version, 1);
    assert_eq!(
        envelope.event_id,
        esframe_core::derived_event_id(command_id, 0),
        "a command with an id gives its events ids derived from it"
    );

    let stored = store.read_stream(&sid("c1"), 1).await.unwrap();
    assert_eq!(stored[0].event_id, envelope.event_id);
    assert_eq!(stored[0].global_position, envelope.global_position);
    assert_eq!(stored[0].aggregate_type(), "counter");
    assert_eq!(stored[0].metadata.correlation_id, Some(correlation));
    assert_eq!(stored[0].metadata.causation_id, Some(command_id));
    assert_eq!(stored[0].metadata.extra["user"], json!("ada"));
    assert_eq!(
        stored[0].metadata.extra["source"],
        json!("test"),
        "command metadata flows too"
    );

    // Without a context the command id is generated and is both correlation and causation,
    // and event ids are random UUIDv7s.
    let second = handler.execute(add("c1", 1)).await.unwrap();
    let meta = &second.events[0].metadata;
    assert!(meta.correlation_id.is_some());
    assert_eq!(meta.correlation_id, meta.causation_id);
    assert_eq!(second.events[0].event_id.get_version_num(), 7);
    assert!(!second.deduplicated);
}

#[tokio::test]
async fn a_command_handled_twice_with_its_id_is_stored_once() {
    let store = MemoryStore::new();
    let handler = CommandHandler::<Counter, _>::new(store.clone());
    let command_id = Uuid::now_v7();
    let ctx = || CommandContext::new().command_id(command_id);
    let first = handler.execute_with(add("once", 5), ctx()).await.unwrap();
    assert!(!first.deduplicated);
    // Delivered again (a broker redelivery, a retry after an unknown outcome), through another
    // handler without the cached state: decided again, the same events, stored once.
    let other = CommandHandler::<Counter, _>::new(store.clone()).without_state_cache();
    for handler in [&handler, &other] {
        let again = handler.execute_with(add("once", 5), ctx()).await.unwrap();
        assert!(
            again.deduplicated,
            "the store recognised the command's events"
        );
        assert_eq!(again.version, 1);
        assert_eq!(again.events[0].event_id, first.events[0].event_id);
        assert_eq!(again.events[0].stream_version, 1);
        assert_eq!(
            again.events[0].global_position,
            first.events[0].global_position
        );
    }
    assert_eq!(store.read_stream(&sid("once"), 1).await.unwrap().len(), 1);
    assert_eq!(handler.load("once").await.unwrap().state.total, 5);
    // The next command on the stream decides on the true state, not the re-decided one.
    let next = handler.execute(add("once", 1)).await.unwrap();
    assert_eq!(next.version, 2);
    assert_eq!(handler.load("once").await.unwrap().state.total, 6);
    // The same id with other events: the store refuses, naming the stored event.
    match handler.execute_with(add("once", 7), ctx()).await {
        Err(CommandError::Store(StoreError::EventIdReused {
            event_id,
            stored_version,
            ..
        })) => {
            assert_eq!(event_id, first.events[0].event_id);
            assert_eq!(stored_version, 1);
        }
        other => panic!("expected EventIdReused, got {other:?}"),
    }
}

#[tokio::test]
async fn handler_sees_state_after_each_emitted_event() {
    let handler = CommandHandler::<Counter, _>::new(MemoryStore::new());
    let both = handler
        .execute(CounterCommand::AddTwiceBelow {
            id: "t".into(),
            n: 3,
            limit: 5,
        })
        .await
        .unwrap();
    assert_eq!(
        both.events.len(),
        2,
        "3 < 5 after the first event, so a second one"
    );
    let one = handler
        .execute(CounterCommand::AddTwiceBelow {
            id: "t".into(),
            n: 3,
            limit: 5,
        })
        .await
        .unwrap();
    assert_eq!(one.events.len(), 1, "9 >= 5 after the first event");
    assert_eq!(handler.load("t").await.unwrap().state.total, 9);
}

#[tokio::test]
async fn rejection_is_a_domain_error_and_stores_nothing() {
    let store = MemoryStore::new();
    let handler = CommandHandler::<Counter, _>::new(store.clone());
    handler.execute(add("r", 1)).await.unwrap();
    let err = handler
        .execute(CounterCommand::Reject { id: "r".into() })
        .await
        .unwrap_err();
    assert!(matches!(err, CommandError::Rejected(Rejected)), "{err:?}");
    assert_eq!(store.len(), 1);
    // The cached state survived the rejection intact.
    handler.execute(add("r", 2)).await.unwrap();
    assert_eq!(
        handler.load("r").await.unwrap().state,
        Counter {
            total: 3,
            applied: 2
        }
    );
}

#[tokio::test]
async fn invalid_aggregate_id_is_a_typed_error() {
    let handler = CommandHandler::<Counter, _>::new(MemoryStore::new());
    let err = handler.execute(add("bad\0id", 1)).await.unwrap_err();
    assert!(
        matches!(err, CommandError::InvalidAggregateId(_)),
        "{err:?}"
    );
    let err = handler
        .execute(add(&"x".repeat(10_000), 1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("10000 bytes"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_on_one_aggregate_lose_nothing() {
    for cached in [true, false] {
        let store = MemoryStore::new();
        let mut handler = CommandHandler::<Counter, _>::new(store.clone())
            .retry_policy(RetryPolicy::attempts(1_000));
        if !cached {
            handler = handler.without_state_cache();
        }
        let tasks: Vec<_> = (0..32)
            .map(|task| {
                let handler = handler.clone();
                tokio::spawn(async move {
                    let mut retried = 0;
                    for _ in 0..10 {
                        let outcome = handler.execute(add("hot", task + 1)).await.unwrap();
                        retried += outcome.attempts - 1;
                    }
                    retried
                })
            })
            .collect();
        let mut retries = 0;
        for t in tasks {
            retries += t.await.unwrap();
        }
        let expected_total: u64 = (1..=32).map(|n| n * 10).sum();
        let loaded = handler.load("hot").await.unwrap();
        assert_eq!(loaded.state.total, expected_total, "cached = {cached}");
        assert_eq!(loaded.version, 320);
        assert_eq!(store.len(), 320);
        println!("cached = {cached}: {retries} retries after conflicts");
    }
}

#[tokio::test]
async fn gives_up_after_the_retry_policy_is_exhausted() {
    let store = MemoryStore::new();
    let handler = CommandHandler::<Counter, _>::with_services(
        store.clone(),
        Meddler(Some(store.clone()), None),
    )
    .retry_policy(RetryPolicy::attempts(3));
    let err = handler.execute(add("meddled", 1)).await.unwrap_err();
    match err {
        CommandError::Conflict { attempts, conflict } => {
            assert_eq!(attempts, 3);
            assert_eq!(conflict.stream, sid("meddled"));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Only the meddler's three events were stored.
    assert_eq!(store.len(), 3);
}

#[tokio::test]
async fn takes_snapshots_by_policy_and_loads_from_them() {
    let store = MemoryStore::new();
    let handler = CommandHandler::<Counter, _>::new(store.clone())
        .snapshot_policy(SnapshotPolicy::every(10))
        .without_state_cache();
    for _ in 0..25 {
        handler.execute(add("s", 1)).await.unwrap();
    }
    let snapshot = store
        .load_snapshot(&sid("s"))
        .await
        .unwrap()
        .expect("snapshot taken");
    assert_eq!(snapshot.version, 20);
    assert_eq!(snapshot.state, json!({ "total": 20, "applied": 20 }));

    // Prove loads start from the snapshot: plant one with a marker state.
    store
        .save_snapshot(Snapshot {
            state: json!({ "total": 1000, "applied": 20 }),
            ..snapshot
        })
        .await
        .unwrap();
    let loaded = handler.load("s").await.unwrap();
    assert_eq!(loaded.version, 25);
    assert_eq!(
        loaded.state,
        Counter {
            total: 1005,
            applied: 25
        }
    );
}

#[tokio::test]
async fn past_states_use_a_snapshot_only_at_or_below_their_target() {
    let store = MemoryStore::new();
    let handler =
        CommandHandler::<Counter, _>::new(store.clone()).snapshot_policy(SnapshotPolicy::every(10));
    for n in 1..=25 {
        handler.execute(add("past", n)).await.unwrap();
    }
    // Plant a marker state in the v20 snapshot: a load that starts from it shows the marker.
    let snapshot = store.load_snapshot(&sid("past")).await.unwrap().unwrap();
    assert_eq!(snapshot.version, 20);
    store
        .save_snapshot(Snapshot {
            state: json!({ "total": 1_000_000, "applied": 20 }),
            ..snapshot
        })
        .await
        .unwrap();
    let sum = |upto: u64| (1..=upto).sum::<u64>();
    for (target, total) in [(19, sum(19)), (20, 1_000_000), (22, 1_000_000 + 21 + 22)] {
        let past = handler.load_at("past", target).await.unwrap();
        assert_eq!(
            (past.version, past.state.total, past.state.applied),
            (target, total, target),
            "at version {target}: a snapshot above it is never used"
        );
    }
    assert_eq!(
        handler.load_at("past", 0).await.unwrap().state,
        Counter::default()
    );
    let before = chrono::Utc::now() - chrono::TimeDelta::seconds(60);
    assert_eq!(handler.load_as_of("past", before).await.unwrap().version, 0);
    let now = handler
        .load_as_of("past", chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(
        (now.version, now.state.total),
        (25, sum(25)),
        "load_as_of replays events, never the snapshot"
    );
    // The current state still comes from the snapshot.
    assert_eq!(
        handler.load("past").await.unwrap().state.total,
        1_000_000 + (21..=25).sum::<u64>()
    );
}

#[tokio::test]
async fn unusable_snapshots_are_ignored_and_replaced() {
    let store = MemoryStore::new();
    let handler = CommandHandler::<Counter, _>::new(store.clone())
        .snapshot_policy(SnapshotPolicy::every(1_000))
        .without_state_cache();
    for _ in 0..3 {
        handler.execute(add("u", 2)).await.unwrap();
    }
    let planted = |schema_version, state| Snapshot {
        stream_id: sid("u"),
        version: 3,
        schema_version,
        state,
        taken_at: chrono::Utc::now(),
    };
    for bad in [
        planted(1, json!("garbage")),
        planted(99, json!({ "total": 1000, "applied": 3 })),
    ] {
        store.save_snapshot(bad).await.unwrap();
        let loaded = handler.load("u").await.unwrap();
        assert_eq!(
            loaded.state.total,
            6 + 2 * (loaded.version - 3),
            "rebuilt from events"
        );
        handler.execute(add("u", 2)).await.unwrap();
        let fresh = store.load_snapshot(&sid("u")).await.unwrap().unwrap();
        assert_eq!(
            fresh.schema_version,
            Counter::SNAPSHOT_VERSION,
            "a fresh snapshot replaced it"
        );
        assert_eq!(fresh.state["total"], json!(6 + 2 * (fresh.version - 3)));
    }
}

#[tokio::test]
async fn a_snapshot_ahead_of_its_stream_is_ignored_deleted_and_replaced() {
    let store = MemoryStore::new();
    let handler = CommandHandler::<Counter, _>::new(store.clone())
        .snapshot_policy(SnapshotPolicy::every(1_000))
        .without_state_cache();
    for _ in 0..3 {
        handler.execute(add("ahead", 2)).await.unwrap();
    }
    // A snapshot claiming version 50 of a stream at version 3 (restored from another
    // database, say): trusting it would decide on events that do not exist.
    let ahead = || Snapshot {
        stream_id: sid("ahead"),
        version: 50,
        schema_version: Counter::SNAPSHOT_VERSION,
        state: json!({ "total": 1000, "applied": 50 }),
        taken_at: chrono::Utc::now(),
    };
    store.save_snapshot(ahead()).await.unwrap();
    let outcome = handler.execute(add("ahead", 2)).await.unwrap();
    assert_eq!(
        outcome.version, 4,
        "decided on the state rebuilt from events"
    );
    let fresh = store.load_snapshot(&sid("ahead")).await.unwrap().unwrap();
    assert_eq!(
        (fresh.version, fresh.state["total"].clone()),
        (4, json!(8)),
        "the untrustworthy snapshot was replaced by one at the stream's version"
    );
    store.delete_snapshot(&sid("ahead"), 4).await.unwrap();
    store.save_snapshot(ahead()).await.unwrap();
    let loaded = handler.load("ahead").await.unwrap();
    assert_eq!(
        (loaded.version, loaded.state.total),
        (4, 8),
        "rebuilt from events"
    );
    assert_eq!(
        store
            .load_snapshot(&sid("ahead"))
            .await
            .unwrap()
            .map(|s| s.version),
        Some(50),
        "a plain load changes nothing stored: the next command replaces it"
    );
    handler.execute(add("ahead", 2)).await.unwrap();
    let fresh = store.load_snapshot(&sid("ahead")).await.unwrap().unwrap();
    assert_eq!(
        (fresh.version, fresh.state["total"].clone()),
        (5, json!(10))
    );
    assert_eq!(handler.load("ahead").await.unwrap().state.total, 10);
}

#[tokio::test]
async fn cached_state_catches_up_with_other_writers() {
    let store = MemoryStore::new();
    let first =
        CommandHandler::<Counter, _>::new(store.clone()).retry_policy(RetryPolicy::no_retry());
    let second = CommandHandler::<Counter, _>::new(store.clone());
    first.execute(add("shared", 1)).await.unwrap();
    second.execute(add("shared", 10)).await.unwrap();
    second.execute(add("shared", 100)).await.unwrap();
    let outcome = first.execute(add("shared", 1000)).await.unwrap();
    assert_eq!(outcome.version, 4);
    assert_eq!(
        outcome.attempts, 2,
        "decided on the stale cache, refused by the append, decided again on the stored state"
    );
    assert_eq!(first.load("shared").await.unwrap().state.total, 1111);
}

/// A rejection decided on a cached state is returned only once the stream is known not to have
/// moved (`Verify`, the default); `Trust` returns it as decided.
#[tokio::test]
async fn a_rejection_on_a_stale_cached_state_is_decided_again() {
    let store = MemoryStore::new();
    let verify = CommandHandler::<Counter, _>::new(store.clone());
    let trust = CommandHandler::<Counter, _>::new(store.clone())
        .cache_policy(esframe_core::CachePolicy::Trust);
    let other = CommandHandler::<Counter, _>::new(store.clone());
    let at_least = |min| CounterCommand::AddIfAtLeast {
        id: "gate".into(),
        n: 1,
        min,
    };
    verify.execute(add("gate", 1)).await.unwrap();
    trust.execute(add("gate", 1)).await.unwrap();
    // Both now cache a state (totals 1 and 2) that the other writer makes stale.
    other.execute(add("gate", 10)).await.unwrap();

    assert!(
        matches!(
            trust.execute(at_least(5)).await,
            Err(CommandError::Rejected(Rejected))
        ),
        "Trust answers from its stale cache"
    );
    let outcome = verify.execute(at_least(5)).await.unwrap();
    assert_eq!(
        outcome.attempts, 2,
        "rejected on the cache, then accepted on the store"
    );
    assert_eq!(verify.load("gate").await.unwrap().state.total, 13);

    // A rejection that stands is returned, and the cache still serves the next command.
    assert!(matches!(
        verify.execute(at_least(100)).await,
        Err(CommandError::Rejected(Rejected))
    ));
    assert_eq!(verify.execute(add("gate", 1)).await.unwrap().attempts, 1);
}

#[tokio::test]
async fn undecodable_stored_events_are_typed_errors() {
    let store = MemoryStore::new();
    let handler = CommandHandler::<Counter, _>::new(store.clone()).without_state_cache();
    let raw = |event_type: &str, schema_version, payload: Value| NewEvent {
        event_id: Uuid::now_v7(),
        event_type: event_type.to_owned().into(),
        schema_version,
        payload,
        metadata: EventMetadata::default(),
    };
    let cases = [
        ("unknown", raw("Exploded", 1, json!({}))),
        ("too-new", raw("Added", 2, json!({ "n": 1 }))),
        ("corrupt", raw("Added", 1, json!({ "n": "lots" }))),
    ];
    for (id, event) in cases {
        store
            .append(&sid(id), ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
        let err = handler.execute(add(id, 1)).await.unwrap_err();
        let CommandError::Decode(decode) = &err else {
            panic!("{id}: expected Decode, got {err:?}")
        };
        assert_eq!(decode.stream, sid(id));
        assert_eq!(decode.stream_version, 1);
        match (id, &decode.kind) {
            ("unknown", DecodeErrorKind::UnknownType)
            | (
                "too-new",
                DecodeErrorKind::VersionTooNew {
                    stored: 2,
                    current: 1,
                },
            )
            | ("corrupt", DecodeErrorKind::Payload(_)) => {}
            _ => panic!("{id}: wrong kind {:?}", decode.kind),
        }
        assert!(
            err.to_string().contains(&format!("stream `counter/{id}`")),
            "{err}"
        );
        assert_eq!(
            store.read_stream(&sid(id), 1).await.unwrap().len(),
            1,
            "nothing changed"
        );
    }
}

#[tokio::test]
async fn the_same_id_under_another_aggregate_type_is_another_stream() {
    let store = MemoryStore::new();
    let order = StreamId::new("order", "o-1").unwrap();
    let foreign = NewEvent::from_event(&CounterEvent::Added { n: 1_000 }).unwrap();
    store
        .append(&order, ExpectedVersion::Any, vec![foreign])
        .await
        .unwrap();
    let handler = CommandHandler::<Counter, _>::new(store.clone());
    let outcome = handler.execute(add("o-1", 1)).await.unwrap();
    assert_eq!(outcome.version, 1, "the counter `o-1` is a new stream");
    assert_eq!(outcome.events[0].stream_id, sid("o-1"));
    assert_eq!(handler.load("o-1").await.unwrap().state.total, 1);
    assert_eq!(
        store.read_stream(&order, 1).await.unwrap().len(),
        1,
        "the order is untouched"
    );
}

#[tokio::test]
async fn handlers_share_one_cache_across_clones() {
    let handler = Arc::new(CommandHandler::<Counter, _>::new(MemoryStore::new()));
    let clone = (*handler).clone();
    handler.execute(add("k", 1)).await.unwrap();
    assert_eq!(clone.execute(add("k", 1)).await.unwrap().version, 2);
}

#[tokio::test]
async fn a_trusted_stale_cache_costs_one_retry_never_a_wrong_result() {
    let store = MemoryStore::new();
    let first = CommandHandler::<Counter, _>::new(store.clone())
        .cache_policy(esframe_core::CachePolicy::Trust);
    let second = CommandHandler::<Counter, _>::new(store.clone());
    first.execute(add("trusted", 1)).await.unwrap();
    second.execute(add("trusted", 10)).await.unwrap();
    let outcome = first.execute(add("trusted", 100)).await.unwrap();
    assert_eq!(
        outcome.attempts, 2,
        "the stale cached state was refused by the version check"
    );
    assert_eq!(outcome.version, 3);
    assert_eq!(first.load("trusted").await.unwrap().state.total, 111);
    // Warm again: the next command decides on the cache without reading the stream.
    assert_eq!(
        first.execute(add("trusted", 1000)).await.unwrap().attempts,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pessimistic_mode_queues_commands_on_one_stream_without_conflicts() {
    let store = MemoryStore::new();
    let handler = CommandHandler::<Counter, _>::new(store.clone())
        .concurrency_mode(esframe_core::ConcurrencyMode::Pessimistic)
        .retry_policy(RetryPolicy::no_retry());
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let handler = handler.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    let outcome = handler
                        .execute(add("queued", 1))
                        .await
                        .expect("no conflict with no retries allowed");
                    assert_eq!(outcome.attempts, 1);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let loaded = handler.load("queued").await.unwrap();
    assert_eq!((loaded.version, loaded.state.total), (640, 640));
}

/// Runs `commands` at once on a pessimistic handler whose decisions pause, so they batch.
async fn run_batched(
    handler: &CommandHandler<Counter, MemoryStore>,
    commands: Vec<(CounterCommand, Uuid)>,
) -> Vec<Result<esframe_core::CommandOutcome<CounterEvent>, CommandError<Rejected>>> {
    let tasks: Vec<_> = commands
        .into_iter()
        .map(|(command, id)| {
            let handler = handler.clone();
            tokio::spawn(async move {
                handler
                    .execute_with(command, CommandContext::new().command_id(id))
                    .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

fn pausing(store: &MemoryStore) -> CommandHandler<Counter, MemoryStore> {
    CommandHandler::<Counter, _>::with_services(
        store.clone(),
        Meddler(None, Some(std::time::Duration::from_millis(2))),
    )
    .concurrency_mode(esframe_core::ConcurrencyMode::Pessimistic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_commands_are_stored_together_with_their_own_results_and_metadata() {
    let store = MemoryStore::new();
    let handler = pausing(&store);
    handler.execute(add("b", 1)).await.unwrap();
    let commands: Vec<_> = (0..40)
        .map(|i| {
            let command = if i % 10 == 3 {
                CounterCommand::Reject { id: "b".into() }
            } else {
                add("b", 1)
            };
            (command, Uuid::now_v7())
        })
        .collect();
    let ids: Vec<Uuid> = commands.iter().map(|(_, id)| *id).collect();
    let results = run_batched(&handler, commands).await;
    let mut stored_at = std::collections::HashMap::new();
    for (i, result) in results.iter().enumerate() {
        if i % 10 == 3 {
            assert!(
                matches!(result, Err(CommandError::Rejected(Rejected))),
                "{i}: {result:?}"
            );
            continue;
        }
        let outcome = result.as_ref().unwrap();
        assert_eq!(outcome.events.len(), 1);
        let event = &outcome.events[0];
        assert_eq!(
            event.metadata.causation_id,
            Some(ids[i]),
            "each event keeps its own command's ids"
        );
        assert_eq!(event.stream_version, outcome.version);
        *stored_at.entry(event.recorded_at).or_insert(0) += 1;
    }
    assert!(
        stored_at.values().any(|&n| n > 1),
        "commands were stored together: {stored_at:?}"
    );
    let loaded = handler.load("b").await.unwrap();
    assert_eq!((loaded.version, loaded.state.total), (37, 37));
    let versions: Vec<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|o| o.version)
        .collect();
    let mut sorted = versions.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        versions.len(),
        "no two commands got the same version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_rejected_after_emitting_does_not_leak_its_events_into_the_batch() {
    let store = MemoryStore::new();
    let handler = pausing(&store);
    handler.execute(add("d", 1)).await.unwrap();
    let mut commands: Vec<_> = (0..10).map(|_| (add("d", 1), Uuid::now_v7())).collect();
    commands.insert(
        5,
        (
            CounterCommand::EmitThenReject { id: "d".into() },
            Uuid::now_v7(),
        ),
    );
    let results = run_batched(&handler, commands).await;
    assert!(matches!(results[5], Err(CommandError::Rejected(Rejected))));
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 10);
    let loaded = handler.load("d").await.unwrap();
    assert_eq!(
        (loaded.version, loaded.state.total),
        (11, 11),
        "the rejected command's event is not stored"
    );
    // The cached state is not poisoned either: this decision depends on the state (12 < 13,
    // so a second event), and a cache holding the rejected command's 1,000,000 would emit one.
    let twice = handler
        .execute(CounterCommand::AddTwiceBelow {
            id: "d".into(),
            n: 1,
            limit: 13,
        })
        .await
        .unwrap();
    assert_eq!(twice.events.len(), 2);
    assert_eq!(handler.load("d").await.unwrap().state.total, 13);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_retry_conflicts_with_other_writers_and_lose_nothing() {
    let store = MemoryStore::new();
    let batched = pausing(&store).retry_policy(RetryPolicy::attempts(1_000));
    let other =
        CommandHandler::<Counter, _>::new(store.clone()).retry_policy(RetryPolicy::attempts(1_000));
    batched.execute(add("c", 1)).await.unwrap();
    let interferer = tokio::spawn(async move {
        for _ in 0..50 {
            other.execute(add("c", 100)).await.unwrap();
            tokio::task::yield_now().await;
        }
    });
    let results = run_batched(
        &batched,
        (0..50).map(|_| (add("c", 1), Uuid::now_v7())).collect(),
    )
    .await;
    interferer.await.unwrap();
    assert!(results.iter().all(Result::is_ok));
    let loaded = batched.load("c").await.unwrap();
    assert_eq!(
        (loaded.version, loaded.state.total),
        (101, 1 + 50 + 50 * 100)
    );
}

mod snapshots_change_nothing {
    use proptest::prelude::*;

    use super::*;

    fn command() -> impl Strategy<Value = CounterCommand> {
        prop_oneof![
            (1..50u64).prop_map(|n| add("p", n)),
            (1..20u64, 1..200u64).prop_map(|(n, limit)| CounterCommand::AddTwiceBelow {
                id: "p".into(),
                n,
                limit
            }),
            Just(CounterCommand::Reject { id: "p".into() }),
            Just(CounterCommand::EmitThenReject { id: "p".into() }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// For random histories, a handler that snapshots every `every` events loads exactly the
        /// state (and version) of one that never does, after every command.
        #[test]
        fn loading_with_snapshots_equals_loading_without(
            commands in proptest::collection::vec(command(), 1..60),
            every in 1..12u64,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let snapshotting = CommandHandler::<Counter, _>::new(MemoryStore::new())
                    .snapshot_policy(SnapshotPolicy::every(every))
                    .without_state_cache();
                let plain = CommandHandler::<Counter, _>::new(MemoryStore::new())
                    .snapshot_policy(SnapshotPolicy::Never)
                    .without_state_cache();
                for command in commands {
                    let a = snapshotting.execute(command.clone()).await.map(|o| o.version).map_err(|e| e.to_string());
                    let b = plain.execute(command).await.map(|o| o.version).map_err(|e| e.to_string());
                    prop_assert_eq!(a, b);
                    prop_assert_eq!(snapshotting.load("p").await.unwrap(), plain.load("p").await.unwrap());
                }
                Ok(())
            })?;
        }
    }
}

#[tokio::test]
async fn unknown_event_types_are_skipped_only_when_asked() {
    let store = MemoryStore::new();
    let mut foreign = NewEvent::from_event(&CounterEvent::Added { n: 1 }).unwrap();
    foreign.event_type = "Annotated".into();
    store
        .append(&sid("mixed"), ExpectedVersion::Any, vec![foreign])
        .await
        .unwrap();
    let strict = CommandHandler::<Counter, _>::new(store.clone()).without_state_cache();
    let err = strict.execute(add("mixed", 5)).await.unwrap_err();
    assert!(
        matches!(&err, CommandError::Decode(d) if matches!(d.kind, DecodeErrorKind::UnknownType)),
        "{err:?}"
    );
    assert!(err.to_string().contains("`Annotated`"), "{err}");
    let lenient = CommandHandler::<Counter, _>::new(store.clone())
        .without_state_cache()
        .skip_unknown_event_types(true);
    let outcome = lenient.execute(add("mixed", 5)).await.unwrap();
    assert_eq!(
        outcome.version, 2,
        "the skipped event still counts for the version"
    );
    assert_eq!(lenient.load("mixed").await.unwrap().state.total, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_command_queued_twice_at_once_is_stored_once() {
    // Two deliveries of one command land in the same batch: their derived event ids collide,
    // the batch's append is refused (certainly not stored), and the commands then run one by
    // one: the first is stored, the second recognised as its repeat.
    let store = MemoryStore::new();
    let handler = pausing(&store);
    handler.execute(add("twice", 1)).await.unwrap();
    let command_id = Uuid::now_v7();
    let commands = vec![
        (add("twice", 5), command_id),
        (add("twice", 5), command_id),
        (add("twice", 2), Uuid::now_v7()),
    ];
    let results = run_batched(&handler, commands).await;
    let outcomes: Vec<_> = results.iter().map(|r| r.as_ref().unwrap()).collect();
    assert_eq!(
        outcomes.iter().filter(|o| o.deduplicated).count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes[0].events[0].event_id,
        outcomes[1].events[0].event_id
    );
    let loaded = handler.load("twice").await.unwrap();
    assert_eq!(
        (loaded.version, loaded.state.total),
        (3, 8),
        "5 once, 2 once"
    );
}

#[tokio::test]
async fn a_long_stream_without_a_snapshot_gets_one_with_its_next_append() {
    let store = MemoryStore::new();
    let plain = CommandHandler::<Counter, _>::new(store.clone());
    for _ in 0..250 {
        plain.execute(add("long", 1)).await.unwrap();
    }
    assert_eq!(store.load_snapshot(&sid("long")).await.unwrap(), None);
    // Snapshots turned on for an existing history: no wait for the next multiple of 100.
    let snapshotting = CommandHandler::<Counter, _>::new(store.clone())
        .snapshot_policy(SnapshotPolicy::every(100));
    snapshotting.execute(add("long", 1)).await.unwrap();
    let snapshot = store.load_snapshot(&sid("long")).await.unwrap().unwrap();
    assert_eq!(
        (snapshot.version, snapshot.state["total"].clone()),
        (251, json!(251))
    );
}
