//! Bad input: hostile stream ids, corrupt rows, unknown types, versions newer than the code.
//! Each gives a typed error naming the stream and version; nothing stored changes.

mod common;

use esframe_core::{
    CommandError, CommandHandler, CorruptData, DecodeErrorKind, EventStore, ExpectedVersion,
    GlobalLog, NewEvent, Position, Snapshot, SnapshotPolicy, SnapshotStore, StoreError, StreamId,
};
use esframe_examples::bank_account::{Account, AccountCommand};
use esframe_postgres::PgEventStore;
use serde_json::json;
use sqlx::AssertSqlSafe;

fn sid(s: &str) -> StreamId {
    StreamId::new("account", s).unwrap()
}

fn open(account_id: &str) -> AccountCommand {
    AccountCommand::Open {
        account_id: account_id.into(),
        owner: "Ada".into(),
    }
}

fn deposit(account_id: &str, amount: u64) -> AccountCommand {
    AccountCommand::Deposit {
        account_id: account_id.into(),
        amount,
    }
}

/// Every row of the events table as JSON text, to prove nothing changed.
async fn table_dump(store: &PgEventStore) -> Vec<String> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT to_jsonb(e)::text FROM \"{}\".events e ORDER BY global_position",
        store.schema()
    )))
    .fetch_all(store.pool())
    .await
    .unwrap()
}

async fn tamper(store: &PgEventStore, set: &str, stream: &str, version: i64) {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{}\".events SET {set} WHERE aggregate_id = $1 AND stream_version = $2",
        store.schema()
    )))
    .bind(stream)
    .bind(version)
    .execute(store.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn hostile_aggregate_ids_are_refused_or_stored_verbatim() {
    let store = common::store("hostile").await;
    let accounts = CommandHandler::<Account, _>::new(store.clone());
    for refused in [
        "nul\0byte".to_owned(),
        "x".repeat(10_000),
        String::new(),
        "tab\there".to_owned(),
    ] {
        let err = accounts.execute(open(&refused)).await.unwrap_err();
        assert!(
            matches!(err, CommandError::InvalidAggregateId(_)),
            "{err:?}"
        );
    }
    assert!(table_dump(&store).await.is_empty(), "nothing was written");
    for verbatim in [
        "'; DROP TABLE events; --",
        "Robert'); DROP TABLE students;--",
        "\\x00",
        "$1",
        "😀",
    ] {
        accounts.execute(open(verbatim)).await.unwrap();
        accounts.execute(deposit(verbatim, 5)).await.unwrap();
        let loaded = accounts.load(verbatim).await.unwrap();
        assert_eq!((loaded.version, loaded.state.balance), (2, 5), "{verbatim}");
    }
    assert_eq!(table_dump(&store).await.len(), 10);
}

#[tokio::test]
async fn corrupt_unknown_and_too_new_events_are_typed_errors_and_change_nothing() {
    let store = common::store("corrupt").await;
    let accounts = CommandHandler::<Account, _>::new(store.clone()).without_state_cache();
    type Case = (&'static str, &'static str, fn(&DecodeErrorKind) -> bool);
    let cases: [Case; 3] = [
        ("acc-corrupt", "payload = '{\"amount\": \"lots\"}'", |k| {
            matches!(k, DecodeErrorKind::Payload(_))
        }),
        ("acc-unknown", "event_type = 'MoneyTeleported'", |k| {
            matches!(k, DecodeErrorKind::UnknownType)
        }),
        ("acc-newer", "schema_version = 7", |k| {
            matches!(
                k,
                DecodeErrorKind::VersionTooNew {
                    stored: 7,
                    current: 2
                }
            )
        }),
    ];
    for (id, set, expected_kind) in cases {
        accounts.execute(open(id)).await.unwrap();
        accounts.execute(deposit(id, 10)).await.unwrap();
        tamper(&store, set, id, 2).await;
        let before = table_dump(&store).await;
        for err in [
            accounts.execute(deposit(id, 1)).await.unwrap_err(),
            accounts.load(id).await.unwrap_err(),
        ] {
            let CommandError::Decode(decode) = &err else {
                panic!("{id}: expected a decode error, got {err:?}")
            };
            assert_eq!(decode.stream, sid(id));
            assert_eq!(decode.stream_version, 2);
            assert!(expected_kind(&decode.kind), "{id}: {:?}", decode.kind);
            let message = err.to_string();
            assert!(
                message.contains(&format!("version 2 of stream `account/{id}`")),
                "{message}"
            );
        }
        assert_eq!(
            table_dump(&store).await,
            before,
            "{id}: nothing stored changed"
        );
    }
}

#[tokio::test]
async fn corrupt_rows_are_store_errors_naming_stream_and_version() {
    let store = common::store("corrupt_rows").await;
    store
        .append(&sid("meta"), ExpectedVersion::NoStream, vec![new_event()])
        .await
        .unwrap();
    tamper(&store, "metadata = '[1, 2]'", "meta", 1).await;
    let before = table_dump(&store).await;
    for err in [
        store.read_stream(&sid("meta"), 1).await.unwrap_err(),
        read_all_settled(&store).await.unwrap_err(),
    ] {
        match &err {
            StoreError::Corrupt(CorruptData {
                stream,
                version,
                event_type,
                problem,
                ..
            }) => {
                assert_eq!((stream, *version), (&sid("meta"), 1));
                assert_eq!(event_type.as_deref(), Some("Happened"));
                assert!(problem.contains("metadata"), "{problem}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
    assert_eq!(table_dump(&store).await, before);

    // A stream id that could never have been written through esframe.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{}\".events SET aggregate_id = '', metadata = '{{}}'",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap();
    match read_all_settled(&store).await.unwrap_err() {
        StoreError::Corrupt(CorruptData {
            stream, problem, ..
        }) => {
            assert_eq!(stream.id(), "(empty)");
            assert!(problem.contains("stream id"), "{problem}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn unreadable_snapshots_are_ignored_and_replaced() {
    let store = common::store("bad_snapshot").await;
    let accounts = CommandHandler::<Account, _>::new(store.clone())
        .snapshot_policy(esframe_core::SnapshotPolicy::every(2))
        .without_state_cache();
    accounts.execute(open("s")).await.unwrap();
    accounts.execute(deposit("s", 3)).await.unwrap();
    assert_eq!(
        store
            .load_snapshot(&sid("s"))
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{}\".snapshots SET state = '\"garbage\"'",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let loaded = accounts.load("s").await.unwrap();
    assert_eq!(
        (loaded.version, loaded.state.balance),
        (2, 3),
        "rebuilt from events"
    );
    accounts.execute(deposit("s", 4)).await.unwrap();
    let fresh = store.load_snapshot(&sid("s")).await.unwrap().unwrap();
    assert_eq!(fresh.version, 3);
    assert_eq!(fresh.state["balance"], json!(7));
}

fn new_event() -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "Happened".into(),
        schema_version: 1,
        payload: json!({}),
        metadata: Default::default(),
    }
}

/// `read_all` once the appended row is past the horizon (or its error).
async fn read_all_settled(
    store: &PgEventStore,
) -> Result<Vec<esframe_core::RecordedEvent>, StoreError> {
    for _ in 0..2000 {
        match store.read_all(Position::START, 10).await {
            Ok(events) if events.is_empty() => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await
            }
            other => return other,
        }
    }
    panic!("the row never became readable");
}

#[tokio::test]
async fn a_stream_with_a_gap_in_its_versions_is_corrupt_not_a_wrong_state() {
    let store = common::store("gap").await;
    let accounts = CommandHandler::<Account, _>::new(store.clone()).without_state_cache();
    accounts.execute(open("g")).await.unwrap();
    for amount in [1, 2, 3] {
        accounts.execute(deposit("g", amount)).await.unwrap();
    }
    // Version 3 (the deposit of 2) vanishes: replaying would give 4 instead of 6, silently.
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM \"{}\".events WHERE aggregate_id = 'g' AND stream_version = 3",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let before = table_dump(&store).await;
    for err in [
        accounts.load("g").await.unwrap_err(),
        accounts.execute(deposit("g", 1)).await.unwrap_err(),
    ] {
        match &err {
            CommandError::Store(StoreError::Corrupt(corrupt)) => {
                assert_eq!((corrupt.stream.id(), corrupt.version), ("g", 4));
                assert_eq!(corrupt.event_type.as_deref(), Some("MoneyDeposited"));
                assert!(corrupt.problem.contains("version 3 is missing"), "{err}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
    assert_eq!(table_dump(&store).await, before, "nothing stored changed");
}

#[tokio::test]
async fn a_snapshot_ahead_of_its_stream_is_ignored_and_replaced() {
    let store = common::store("snapshot_ahead").await;
    let accounts = CommandHandler::<Account, _>::new(store.clone())
        .snapshot_policy(SnapshotPolicy::every(1_000))
        .without_state_cache();
    accounts.execute(open("a")).await.unwrap();
    accounts.execute(deposit("a", 5)).await.unwrap();
    store
        .save_snapshot(Snapshot {
            stream_id: sid("a"),
            version: 99,
            schema_version: 1,
            state: json!({ "owner": "Mallory", "balance": 1_000_000, "open": true }),
            taken_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    let done = accounts.execute(deposit("a", 1)).await.unwrap();
    assert_eq!(done.version, 3, "decided on the stream, not the snapshot");
    assert_eq!(accounts.load("a").await.unwrap().state.balance, 6);
    let fresh = store.load_snapshot(&sid("a")).await.unwrap().unwrap();
    assert_eq!(
        (fresh.version, fresh.state["balance"].clone()),
        (3, json!(6))
    );
}

#[tokio::test]
async fn json_nested_deeper_than_can_be_read_is_a_typed_error() {
    // Written behind esframe's back (esframe refuses to store it): 1,000 nested arrays, which
    // PostgreSQL accepts and serde_json refuses to read past 128 levels. Reads hand the payload
    // over unparsed, so they succeed; whatever looks inside gets a typed error naming the event.
    let store = common::store("deep_row").await;
    let accounts = CommandHandler::<Account, _>::new(store.clone()).without_state_cache();
    accounts.execute(open("deep")).await.unwrap();
    accounts.execute(deposit("deep", 10)).await.unwrap();
    tamper(
        &store,
        "payload = (repeat('[', 1000) || repeat(']', 1000))::jsonb",
        "deep",
        2,
    )
    .await;
    let before = table_dump(&store).await;
    let streamed = store.read_stream(&sid("deep"), 1).await.unwrap();
    let global = read_all_settled(&store).await.unwrap();
    for event in [&streamed[1], &global[1]] {
        assert_eq!(event.stream_version, 2);
        let err = event.payload.value().unwrap_err();
        assert!(err.to_string().contains("recursion limit"), "{err}");
        assert!(
            event.payload.is_null(),
            "an unreadable payload reads as null"
        );
    }
    for err in [
        accounts.execute(deposit("deep", 1)).await.unwrap_err(),
        accounts.load("deep").await.unwrap_err(),
    ] {
        let CommandError::Decode(decode) = &err else {
            panic!("expected a decode error, got {err:?}")
        };
        assert_eq!((decode.stream.id(), decode.stream_version), ("deep", 2));
        assert!(matches!(decode.kind, DecodeErrorKind::Payload(_)), "{err}");
    }
    assert_eq!(table_dump(&store).await, before);
}
