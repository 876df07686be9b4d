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
