//! Upgrading a schema written by an earlier esframe: migration 5 namespaces streams by aggregate
//! type, keeps every stored stream readable under its aggregate type, and refuses (changing
//! nothing) a stream it cannot split.

mod common;

use esframe_core::{
    EventStore, ExpectedVersion, SnapshotStore, StreamId,
    projection::{DeadLetterStore, ProjectionKey},
};
use esframe_postgres::{PgEventStore, PgStoreError};
use sqlx::{AssertSqlSafe, PgPool};

/// The migrations before streams were namespaced, as that release applied them.
const BEFORE_NAMESPACES: [(i32, &str, &str); 4] = [
    (1, "events", include_str!("../migrations/0001_events.sql")),
    (
        2,
        "projections",
        include_str!("../migrations/0002_projections.sql"),
    ),
    (
        3,
        "projection_replays",
        include_str!("../migrations/0003_projection_replays.sql"),
    ),
    (
        4,
        "projection_partitions",
        include_str!("../migrations/0004_projection_partitions.sql"),
    ),
];

/// A schema at version 4 holding `rows` (SQL run after the migrations, `{schema}` replaced).
async fn schema_at_version_4(pool: &PgPool, label: &str, rows: &str) -> String {
    let schema = common::fresh_schema(pool, label).await;
    let quoted = format!("\"{schema}\"");
    let mut script = format!(
        "CREATE SCHEMA {quoted};
         CREATE TABLE {quoted}.esframe_migrations (
             version    INTEGER     PRIMARY KEY,
             name       TEXT        NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );"
    );
    for (version, name, sql) in BEFORE_NAMESPACES {
        script.push_str(&sql.replace("{schema}", &quoted));
        script.push_str(&format!(
            ";\nINSERT INTO {quoted}.esframe_migrations (version, name) VALUES ({version}, '{name}');\n"
        ));
    }
    script.push_str(&rows.replace("{schema}", &quoted));
    sqlx::raw_sql(AssertSqlSafe(script))
        .execute(pool)
        .await
        .expect("a version-4 schema with rows");
    schema
}

/// An event row in the version-4 layout (`stream_id`, no namespace).
fn old_event(position: u32, stream: &str, version: u32, aggregate: &str, n: u32) -> String {
    format!(
        "INSERT INTO {{schema}}.events (global_position, event_id, stream_id, stream_version,
             aggregate_type, event_type, schema_version, payload, metadata)
         VALUES ({position}, md5('{stream}-{version}-{aggregate}')::uuid, '{stream}', {version},
             '{aggregate}', 'Happened', 1, '{{\"n\": {n}}}', '{{}}');\n"
    )
}

async fn open(pool: &PgPool, schema: &str) -> Result<PgEventStore, PgStoreError> {
    PgEventStore::builder(pool.clone())
        .schema(schema)
        .expect("valid schema name")
        .build()
        .await
}

fn ns(aggregate_type: &str, id: &str) -> StreamId {
    StreamId::new(aggregate_type, id).expect("valid stream id")
}

#[tokio::test]
async fn streams_stored_before_namespaces_read_back_under_their_aggregate_type() {
    let pool = common::pool(2).await;
    let mut rows = String::new();
    rows.push_str(&old_event(1 << 16, "42", 1, "order", 1));
    rows.push_str(&old_event(2 << 16, "42", 2, "order", 2));
    rows.push_str(&old_event(3 << 16, "acc-1", 1, "account", 3));
    rows.push_str(
        "INSERT INTO {schema}.snapshots (stream_id, aggregate_type, version, schema_version,
             state, taken_at)
         VALUES ('42', 'order', 2, 1, '{\"total\": 3}', now());
         INSERT INTO {schema}.projection_dead_letters (projection, partition, global_position,
             event_id, stream_id, stream_version, event_type, error, attempts)
         SELECT 'totals', 0, global_position, event_id, stream_id, stream_version, event_type,
             'it failed', 3
         FROM {schema}.events WHERE stream_id = 'acc-1';\n",
    );
    let schema = schema_at_version_4(&pool, "upgrade", &rows).await;
    let store = open(&pool, &schema).await.expect("migration 5 applies");

    let order = store.read_stream(&ns("order", "42"), 1).await.unwrap();
    let ns_order: Vec<u64> = order
        .iter()
        .map(|e| e.payload["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns_order, [1, 2], "the order's events, in version order");
    assert!(order.iter().all(|e| e.stream_id == ns("order", "42")));
    assert_eq!(
        store
            .read_stream(&ns("account", "acc-1"), 1)
            .await
            .unwrap()
            .len(),
        1
    );
    let snapshot = store.load_snapshot(&ns("order", "42")).await.unwrap();
    assert_eq!(
        snapshot.map(|s| s.version),
        Some(2),
        "the snapshot kept its stream"
    );
    let parked = store
        .checkpoints()
        .dead_letters(&ProjectionKey::single("totals").unwrap())
        .await
        .unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].event.stream_id, ns("account", "acc-1"));

    // The id "42" is now free for every other aggregate type.
    assert_eq!(
        store.stream_version(&ns("inventory", "42")).await.unwrap(),
        None
    );
    store
        .append(
            &ns("inventory", "42"),
            ExpectedVersion::NoStream,
            vec![common::event(9)],
        )
        .await
        .expect("another aggregate type's stream 42 is a new stream");
    assert_eq!(
        store.stream_version(&ns("order", "42")).await.unwrap(),
        Some(2)
    );
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_stream_of_two_aggregate_types_is_refused_and_nothing_changes() {
    let pool = common::pool(2).await;
    let mut rows = String::new();
    rows.push_str(&old_event(1 << 16, "shared-7", 1, "order", 1));
    rows.push_str(&old_event(2 << 16, "shared-7", 2, "inventory", 2));
    let schema = schema_at_version_4(&pool, "mixed", &rows).await;
    let dump = format!(
        "SELECT string_agg(to_jsonb(e)::text, ',' ORDER BY global_position) FROM \"{schema}\".events e"
    );
    let before: String = sqlx::query_scalar(AssertSqlSafe(dump.clone()))
        .fetch_one(&pool)
        .await
        .unwrap();

    let err = open(&pool, &schema)
        .await
        .expect_err("the migration refuses the stream");
    let message = err.to_string();
    assert!(
        message.contains("'shared-7'"),
        "names the stream: {message}"
    );
    assert!(
        message.contains("more than one aggregate type"),
        "{message}"
    );

    let after: String = sqlx::query_scalar(AssertSqlSafe(dump))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        after, before,
        "the rows are unchanged, column names included"
    );
    let applied: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT max(version) FROM \"{schema}\".esframe_migrations"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(applied, Some(4), "the schema stays at version 4");
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
        .execute(&pool)
        .await
        .unwrap();
}
