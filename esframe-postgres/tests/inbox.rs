//! The consumer's inbox on PostgreSQL: every event applied exactly once per stream and version,
//! in order, however often and however concurrently it is delivered.

mod common;

use std::{sync::Arc, time::Duration};

use esframe_core::{
    EventMetadata, Payload, Position, RecordedEvent, StreamId,
    projection::HandlerError,
    publish::{CloudEvent, IncomingEvent},
};
use esframe_postgres::{InboxError, InboxHandler, InboxOutcome, PgInbox, PgTransaction};
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

/// An event as a consumer receives it: through its CloudEvent's headers and body.
fn incoming(aggregate_id: &str, version: u64, position: u64) -> IncomingEvent {
    let recorded = RecordedEvent {
        event_id: Uuid::now_v7(),
        stream_id: StreamId::new("account", aggregate_id).unwrap(),
        stream_version: version,
        global_position: Position::new(position),
        recorded_at: chrono::Utc::now(),
        event_type: "Deposited".into(),
        schema_version: 1,
        payload: Payload::from_json_text(format!(r#"{{"amount":{version}}}"#)),
        metadata: EventMetadata::default(),
    };
    let cloud = CloudEvent::from_event(&recorded, recorded.event_id, "/bank");
    let wire =
        CloudEvent::from_binary(cloud.binary_headers("ce-"), "ce-", cloud.data.clone()).unwrap();
    IncomingEvent::from_cloud_event(wire).unwrap()
}

/// Records every applied event in `applied`, in the inbox's transaction; fails on `fail_on`.
struct Recorder {
    table: String,
    fail_on: Option<(String, u64)>,
}

impl InboxHandler for Recorder {
    async fn handle(
        &self,
        tx: &mut PgTransaction,
        event: &IncomingEvent,
    ) -> Result<(), HandlerError> {
        if self.fail_on.as_ref() == Some(&(event.stream_id.id().to_owned(), event.stream_version)) {
            return Err("refused by the handler".into());
        }
        let amount: serde_json::Value = serde_json::from_str(&event.cloud_event.data)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (stream, version, amount) VALUES ($1, $2, $3)",
            self.table
        )))
        .bind(event.stream_id.id())
        .bind(i64::try_from(event.stream_version)?)
        .bind(amount["amount"].as_i64())
        .execute(tx.as_mut())
        .await?;
        Ok(())
    }
}

async fn setup(label: &str) -> (PgPool, String, PgInbox, String) {
    let pool = common::pool(24).await;
    let schema = common::fresh_schema(&pool, label).await;
    let inbox = PgInbox::open(pool.clone(), &schema, "ledger")
        .await
        .unwrap();
    let table = format!("\"{schema}\".applied");
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (stream TEXT NOT NULL, version BIGINT NOT NULL, amount BIGINT,
             PRIMARY KEY (stream, version))"
    )))
    .execute(&pool)
    .await
    .unwrap();
    (pool, schema, inbox, table)
}

async fn drop_schema(pool: &PgPool, schema: &str) {
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_redeliveries_apply_each_event_once_in_order() {
    let (pool, schema, inbox, table) = setup("inbox_race").await;
    let events: Arc<Vec<IncomingEvent>> = Arc::new(
        (0..100)
            .map(|n| incoming(&format!("s{}", n % 5), n / 5 + 1, n + 1))
            .collect(),
    );
    let recorder = Arc::new(Recorder {
        table: table.clone(),
        fail_on: None,
    });
    // 16 consumers each receive every message, in log order: 15 duplicates of each.
    let consumers: Vec<_> = (0..16)
        .map(|_| {
            let (inbox, events, recorder) =
                (inbox.clone(), Arc::clone(&events), Arc::clone(&recorder));
            tokio::spawn(async move {
                let (mut applied, mut duplicates) = (0, 0);
                for event in events.iter() {
                    loop {
                        match inbox.apply(event, &*recorder).await.unwrap() {
                            InboxOutcome::Applied => applied += 1,
                            InboxOutcome::Duplicate => duplicates += 1,
                            InboxOutcome::Early { .. } => {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                continue;
                            }
                        }
                        break;
                    }
                }
                (applied, duplicates)
            })
        })
        .collect();
    let (mut applied, mut duplicates) = (0, 0);
    for consumer in consumers {
        let (a, d) = consumer.await.unwrap();
        applied += a;
        duplicates += d;
    }
    assert_eq!((applied, duplicates), (100, 1500));
    let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT stream, count(*) FROM {table} GROUP BY stream ORDER BY stream"
    )))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        (0..5).map(|s| (format!("s{s}"), 20)).collect::<Vec<_>>()
    );
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn an_early_version_waits_and_gaps_are_allowed_only_when_asked() {
    let (pool, schema, inbox, table) = setup("inbox_order").await;
    let recorder = Recorder {
        table,
        fail_on: None,
    };
    let (v1, v2, v3) = (
        incoming("a", 1, 1),
        incoming("a", 2, 2),
        incoming("a", 3, 3),
    );
    assert_eq!(
        inbox.apply(&v2, &recorder).await.unwrap(),
        InboxOutcome::Early { expected: 1 }
    );
    assert_eq!(
        inbox.apply(&v1, &recorder).await.unwrap(),
        InboxOutcome::Applied
    );
    assert_eq!(
        inbox.apply(&v3, &recorder).await.unwrap(),
        InboxOutcome::Early { expected: 2 }
    );
    let gaps = inbox.clone().allow_gaps(true);
    assert_eq!(
        gaps.apply(&v3, &recorder).await.unwrap(),
        InboxOutcome::Applied
    );
    assert_eq!(
        gaps.apply(&v2, &recorder).await.unwrap(),
        InboxOutcome::Duplicate,
        "older than the last applied"
    );
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn a_failing_handler_changes_nothing_and_parked_messages_are_listed() {
    let (pool, schema, inbox, table) = setup("inbox_fail").await;
    let failing = Recorder {
        table: table.clone(),
        fail_on: Some(("a".into(), 1)),
    };
    let v1 = incoming("a", 1, 1);
    let err = inbox.apply(&v1, &failing).await.unwrap_err();
    assert!(
        matches!(
            err,
            InboxError::Handler {
                stream_version: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("version 1 of stream `account/a`"),
        "{err}"
    );
    let count: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "the handler's transaction was rolled back");
    // Redelivered once the handler accepts it: applied then, exactly once.
    let working = Recorder {
        table,
        fail_on: None,
    };
    assert_eq!(
        inbox.apply(&v1, &working).await.unwrap(),
        InboxOutcome::Applied
    );

    inbox
        .park(
            None,
            Some(&v1),
            "refused by the handler 5 times",
            serde_json::json!({"ce-id": "x"}),
            "{}",
        )
        .await
        .unwrap();
    let parked = inbox.dead_letters().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].message_id, Some(v1.message_id));
    assert_eq!(parked[0].stream.as_deref(), Some("account/a"));
    assert_eq!(parked[0].stream_version, Some(1));
    drop_schema(&pool, &schema).await;
}

/// Parks `event` as the broker adapters do: after the handler refused it, or behind its
/// stream's parked version.
async fn park(inbox: &PgInbox, event: &IncomingEvent, why: &str) {
    inbox
        .park(
            None,
            Some(event),
            why,
            serde_json::json!({"ce-id": event.message_id.to_string()}),
            &event.cloud_event.data,
        )
        .await
        .unwrap();
}

/// The versions applied to stream `a`, with their amounts.
async fn applied_to_a(pool: &PgPool, table: &str) -> Vec<(i64, i64)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT version, amount FROM {table} WHERE stream = 'a' ORDER BY version"
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_blocked_streams_parked_events_are_applied_in_order_when_retried() {
    let (pool, schema, inbox, table) = setup("inbox_retry").await;
    let failing = Recorder {
        table: table.clone(),
        fail_on: Some(("a".into(), 2)),
    };
    let working = Recorder {
        table: table.clone(),
        fail_on: None,
    };
    let events: Vec<IncomingEvent> = (1..=5).map(|v| incoming("a", v, v)).collect();
    assert_eq!(
        inbox.apply(&events[0], &working).await.unwrap(),
        InboxOutcome::Applied
    );
    assert!(inbox.apply(&events[1], &failing).await.is_err());
    park(&inbox, &events[1], "refused 5 times").await;
    for later in &events[2..4] {
        assert_eq!(
            inbox.apply(later, &working).await.unwrap(),
            InboxOutcome::Early { expected: 2 }
        );
        park(&inbox, later, "blocked behind version 2").await;
    }
    // A redelivery of version 3 parked a second time.
    park(&inbox, &events[2], "blocked behind version 2").await;
    let letters = inbox.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 4);
    assert!(letters.iter().all(|l| l.retryable), "{letters:#?}");
    let stream = &events[1].stream_id;
    assert!(inbox.is_parked(stream, 2).await.unwrap());
    assert!(
        !inbox.is_parked(stream, 1).await.unwrap(),
        "applied, not parked"
    );

    // The cause is not fixed yet: nothing applied, the error renewed, every letter kept.
    let again = inbox
        .retry_parked(&events[1].stream_id, &failing)
        .await
        .unwrap();
    assert_eq!(
        (again.applied, again.duplicates, again.still_parked),
        (0, 0, 4)
    );
    assert!(
        again
            .error
            .as_deref()
            .is_some_and(|e| e.contains("refused by the handler")),
        "{again:?}"
    );
    let first = inbox.dead_letters().await.unwrap().remove(0);
    assert_eq!(first.stream_version, Some(2));
    assert!(first.error.starts_with("retried: "), "{}", first.error);
    assert_eq!(applied_to_a(&pool, &table).await, [(1, 1)]);

    // Fixed: versions 2, 3 and 4 applied once each, in order, with their own data.
    let fixed = inbox
        .retry_parked(&events[1].stream_id, &working)
        .await
        .unwrap();
    assert_eq!(
        fixed,
        esframe_postgres::RetryOutcome {
            applied: 3,
            duplicates: 1,
            still_parked: 0,
            error: None,
            waiting_for: None,
        }
    );
    assert!(inbox.dead_letters().await.unwrap().is_empty());
    assert!(!inbox.is_parked(stream, 2).await.unwrap());
    assert_eq!(
        applied_to_a(&pool, &table).await,
        [(1, 1), (2, 2), (3, 3), (4, 4)]
    );
    // The stream flows again.
    assert_eq!(
        inbox.apply(&events[4], &working).await.unwrap(),
        InboxOutcome::Applied
    );
    assert_eq!(
        inbox.applied_version(&events[4].stream_id).await.unwrap(),
        Some(5)
    );
    assert_eq!(
        inbox
            .applied_version(&StreamId::new("account", "nobody").unwrap())
            .await
            .unwrap(),
        None
    );
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn a_skipped_event_unblocks_its_stream_and_strangers_can_only_be_discarded() {
    let (pool, schema, inbox, table) = setup("inbox_skip").await;
    let working = Recorder {
        table: table.clone(),
        fail_on: None,
    };
    let (v1, v2) = (incoming("a", 1, 1), incoming("a", 2, 2));
    park(&inbox, &v1, "poison").await;
    park(&inbox, &v2, "blocked behind version 1").await;
    let ids: Vec<i64> = inbox
        .dead_letters()
        .await
        .unwrap()
        .iter()
        .map(|l| l.id)
        .collect();

    // Only the next version can be skipped.
    assert_eq!(
        inbox.skip_parked(ids[1]).await.unwrap(),
        InboxOutcome::Early { expected: 1 }
    );
    assert_eq!(
        inbox.dead_letters().await.unwrap().len(),
        2,
        "nothing changed"
    );
    assert_eq!(inbox.applied_version(&v1.stream_id).await.unwrap(), None);
    assert_eq!(
        inbox.skip_parked(ids[0]).await.unwrap(),
        InboxOutcome::Applied
    );
    assert_eq!(
        inbox.applied_version(&v1.stream_id).await.unwrap(),
        Some(1),
        "a skipped version counts as applied"
    );
    let outcome = inbox.retry_parked(&v2.stream_id, &working).await.unwrap();
    assert_eq!((outcome.applied, outcome.still_parked), (1, 0));
    assert_eq!(
        applied_to_a(&pool, &table).await,
        [(2, 2)],
        "version 1 skipped: recorded, never handled"
    );
    assert_eq!(
        inbox.apply(&v1, &working).await.unwrap(),
        InboxOutcome::Duplicate
    );

    // A parked version behind one that is neither applied nor parked waits for it.
    let v5 = incoming("a", 5, 5);
    park(&inbox, &v5, "blocked").await;
    let waiting = inbox.retry_parked(&v5.stream_id, &working).await.unwrap();
    assert_eq!(
        (waiting.applied, waiting.still_parked, waiting.waiting_for),
        (0, 1, Some(3))
    );

    // A message that is no esframe event can only be discarded.
    inbox
        .park(
            None,
            None,
            "not a CloudEvent",
            serde_json::json!({}),
            "hello",
        )
        .await
        .unwrap();
    let stranger = inbox
        .dead_letters()
        .await
        .unwrap()
        .into_iter()
        .find(|l| l.body == "hello")
        .unwrap();
    assert!(!stranger.retryable);
    let refused = inbox.skip_parked(stranger.id).await.unwrap_err();
    assert!(
        matches!(refused, InboxError::DeadLetter { id, .. } if id == stranger.id),
        "{refused:?}"
    );
    assert!(
        refused.to_string().contains("discard it instead"),
        "{refused}"
    );
    assert!(inbox.discard_parked(stranger.id).await.unwrap());
    assert!(!inbox.discard_parked(stranger.id).await.unwrap());
    let missing = inbox.skip_parked(stranger.id).await.unwrap_err();
    assert!(
        missing.to_string().contains("no such dead letter"),
        "{missing}"
    );
    drop_schema(&pool, &schema).await;
}

/// An inbox whose tables were made before dead letters kept their event gets the column (and
/// the index) when it is opened; its old dead letters list as not retryable, new ones are.
#[tokio::test]
async fn an_older_dead_letter_table_gains_the_event_column_on_open() {
    let pool = common::pool(4).await;
    let schema = common::fresh_schema(&pool, "inbox_upgrade").await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA \"{schema}\";
         CREATE TABLE \"{schema}\".inbox_dead_letters (
             id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, consumer TEXT NOT NULL,
             message_id UUID, stream TEXT, version BIGINT, error TEXT NOT NULL,
             headers JSONB NOT NULL, body TEXT NOT NULL,
             parked_at TIMESTAMPTZ NOT NULL DEFAULT now());
         INSERT INTO \"{schema}\".inbox_dead_letters (consumer, stream, version, error, headers, body)
         VALUES ('ledger', 'account/a', 1, 'parked long ago', '{{}}', '{{}}');"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let inbox = PgInbox::open(pool.clone(), &schema, "ledger")
        .await
        .unwrap();
    // Opening again changes nothing.
    let inbox_again = PgInbox::open(pool.clone(), &schema, "ledger")
        .await
        .unwrap();
    let old = inbox.dead_letters().await.unwrap();
    assert_eq!(old.len(), 1);
    assert!(!old[0].retryable, "no event was kept then");
    let v2 = incoming("b", 1, 2);
    park(&inbox_again, &v2, "refused").await;
    let letters = inbox.dead_letters().await.unwrap();
    assert!(letters[1].retryable);
    let index: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT to_regclass('\"{schema}\".inbox_dead_letters_stream_idx')::text"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(index.is_some());
    drop_schema(&pool, &schema).await;
}
