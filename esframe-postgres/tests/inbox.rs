//! The inbox: each event applied once per consumer, even when two consumers race on it.

mod common;

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use esframe_core::{
    EventMetadata, Payload, Position, RecordedEvent, StreamId,
    projection::HandlerError,
    publish::{CloudEvent, IncomingEvent},
};
use esframe_postgres::{InboxHandler, InboxOutcome, PgInbox, PgTransaction};
use sqlx::AssertSqlSafe;
use uuid::Uuid;

fn incoming(stream: &StreamId, version: u64) -> IncomingEvent {
    let event = RecordedEvent {
        event_id: Uuid::now_v7(),
        stream_id: stream.clone(),
        stream_version: version,
        global_position: Position::new(version),
        recorded_at: chrono::Utc::now(),
        event_type: "Happened".into(),
        schema_version: 1,
        payload: Payload::from_json_text(r#"{"n":1}"#),
        metadata: EventMetadata::default(),
    };
    IncomingEvent::from_cloud_event(CloudEvent::from_event(&event, event.event_id, "/test"))
        .unwrap()
}

/// Counts its runs, writes a row per run, and holds its transaction open for a while, so that a
/// second consumer arrives while the first has not committed.
struct Slow {
    table: String,
    runs: Arc<AtomicU32>,
}

impl InboxHandler for Slow {
    async fn handle(
        &self,
        tx: &mut PgTransaction,
        event: &IncomingEvent,
    ) -> Result<(), HandlerError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (version) VALUES ($1)",
            self.table
        )))
        .bind(i64::try_from(event.stream_version)?)
        .execute(tx.as_mut())
        .await?;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_racing_on_a_streams_first_event_apply_it_once() {
    let pool = common::pool(10).await;
    let schema = common::fresh_schema(&pool, "inbox_race").await;
    let inbox = PgInbox::open(pool.clone(), &schema, "ledger")
        .await
        .unwrap();
    let table = format!("\"{schema}\".effects");
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (version BIGINT NOT NULL)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let handler = Arc::new(Slow {
        table: table.clone(),
        runs: Arc::clone(&runs),
    });
    let stream = StreamId::new("account", "ada").unwrap();
    for version in [1, 2] {
        // The first version has no inbox row yet to lock; the second has one.
        let event = incoming(&stream, version);
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let (inbox, handler, event) = (inbox.clone(), Arc::clone(&handler), event.clone());
                tokio::spawn(async move { inbox.apply(&event, &*handler).await.unwrap() })
            })
            .collect();
        let mut outcomes = Vec::new();
        for racer in racers {
            outcomes.push(racer.await.unwrap());
        }
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(
            outcomes,
            [InboxOutcome::Applied, InboxOutcome::Duplicate],
            "version {version}: one consumer applies it, the other finds it applied"
        );
    }
    let effects: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(effects, 2, "each event's effect committed once");
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
        .execute(&pool)
        .await
        .unwrap();
}
