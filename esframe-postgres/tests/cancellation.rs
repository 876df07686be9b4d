//! Tasks cancelled (aborted) at any point while they hold or open a transaction leave no
//! pooled connection inside a transaction: an append that later runs on such a connection
//! would join a transaction nobody commits (its events lost, its positions colliding with the
//! next append's, and the log's horizon held back until the connection closes).

mod common;

use std::{str::FromStr, time::Duration};

use esframe_core::{
    EventStore, ExpectedVersion, GlobalLog, Position,
    projection::{Checkpoint, CheckpointCommit, CheckpointStore, ProjectionKey},
};
use esframe_postgres::PgEventStore;
use sqlx::postgres::PgConnectOptions;

const ROUNDS: u64 = 1_500;

/// Waits `for` without yielding (a timer's resolution is a millisecond).
fn spin(wait: Duration) {
    let until = std::time::Instant::now() + wait;
    while std::time::Instant::now() < until {
        std::hint::spin_loop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_leave_no_pooled_connection_in_a_transaction() {
    let app = format!("esframe_cancel_{}", std::process::id());
    let options = PgConnectOptions::from_str(&common::database_url())
        .unwrap()
        .application_name(&app);
    let pool = PgEventStore::pool_options()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("PostgreSQL reachable");
    let schema = common::fresh_schema(&pool, "cancel").await;
    let store = PgEventStore::builder(pool.clone())
        .schema(schema)
        .unwrap()
        .build()
        .await
        .unwrap();
    let checkpoints = store.checkpoints();
    let key = ProjectionKey::single("cancelled").unwrap();

    // Tasks that begin a transaction, write the checkpoint and commit, aborted after a random
    // few microseconds: some while `BEGIN` is on the wire, some mid-statement, some mid-commit.
    for round in 0..ROUNDS {
        let checkpoints = checkpoints.clone();
        let key = key.clone();
        let from = checkpoints.load(&key).await.unwrap();
        let task = tokio::spawn(async move {
            let tx = checkpoints.begin().await.unwrap();
            let to = Checkpoint {
                position: Position::new(from.map_or(0, |c| c.position.get()) + 1),
                version: 1,
                replay_until: None,
            };
            let _ = checkpoints
                .commit(tx, CheckpointCommit::advance(&key, from, to))
                .await;
        });
        spin(Duration::from_micros(fastrand::u64(0..300)));
        task.abort();
        let _ = task.await;
        // Appends on the same pool, as the store's other users would make.
        store
            .append(
                &common::sid(&format!("s{}", round % 7)),
                ExpectedVersion::Any,
                vec![common::event(round)],
            )
            .await
            .unwrap_or_else(|err| panic!("append after abort {round}: {err}"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let observer = common::pool(1).await;
    let stuck: Vec<String> = sqlx::query_scalar(
        "SELECT state || ': ' || coalesce(query, '') FROM pg_stat_activity
         WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
    )
    .bind(&app)
    .fetch_all(&observer)
    .await
    .unwrap();
    assert!(
        stuck.is_empty(),
        "pooled connections left in a transaction: {stuck:?}"
    );
    // Every append is stored and readable: none joined a transaction that never commits.
    let head = store.head_position().await.unwrap();
    let stored = store.read_all(Position::START, 10_000).await.unwrap();
    assert_eq!(stored.len() as u64, ROUNDS, "head {head}");
}
