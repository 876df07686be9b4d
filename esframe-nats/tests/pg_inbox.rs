//! `PgInbox` under concurrency, as a JetStream consumer meets it: a message delivered again while
//! its first delivery is still being handled (its `ack_wait` ran out, or two processes run the
//! same durable consumer) must not be applied twice, not even the first event of a stream.

mod common;

use std::time::Duration;

use common::{event, sid};
use esframe_core::{
    EventStore, ExpectedVersion, GlobalLog, Position,
    projection::HandlerError,
    publish::{CloudEvent, IncomingEvent},
};
use esframe_postgres::{InboxHandler, InboxOutcome, PgInbox, PgTransaction};

struct SlowCounter {
    schema: String,
}

impl InboxHandler for SlowCounter {
    async fn handle(&self, tx: &mut PgTransaction, _: &IncomingEvent) -> Result<(), HandlerError> {
        // Long enough for the other delivery to reach the same point.
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE \"{}\".applied SET n = n + 1",
            self.schema
        )))
        .execute(tx.as_mut())
        .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deliveries_at_once_apply_an_event_once_even_the_first_of_its_stream() {
    let (store, schema) = common::store("inbox_race").await;
    store
        .append(
            &sid("ada"),
            ExpectedVersion::NoStream,
            vec![event(1), event(2)],
        )
        .await
        .unwrap();
    // The never-skip log holds events back while another test's older transaction is open.
    let recorded = loop {
        let recorded = store.read_all(Position::START, 10).await.unwrap();
        if recorded.len() == 2 {
            break recorded;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let incoming: Vec<IncomingEvent> = recorded
        .iter()
        .map(|e| {
            IncomingEvent::from_cloud_event(CloudEvent::from_event(e, e.event_id, "/bank")).unwrap()
        })
        .collect();
    let pool = common::pool(10).await;
    let consumer = common::fresh_schema(&pool, "inbox_race_c").await;
    let inbox = PgInbox::open(pool.clone(), &consumer, "ledger")
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE \"{consumer}\".applied (n BIGINT NOT NULL); INSERT INTO \"{consumer}\".applied VALUES (0);"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let handler = SlowCounter {
        schema: consumer.clone(),
    };
    for (i, event) in incoming.iter().enumerate() {
        let (a, b) = tokio::join!(inbox.apply(event, &handler), inbox.apply(event, &handler));
        let mut outcomes = [a.unwrap(), b.unwrap()];
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(
            outcomes,
            [InboxOutcome::Applied, InboxOutcome::Duplicate],
            "version {}",
            event.stream_version
        );
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT n FROM \"{consumer}\".applied"
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            n,
            i as i64 + 1,
            "version {} applied once",
            event.stream_version
        );
    }
    common::drop_schema(&pool, &consumer).await;
    common::drop_schema(store.pool(), &schema).await;
}
