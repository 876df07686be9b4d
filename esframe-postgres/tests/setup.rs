//! Setup and operations: migrations idempotent and safe when many processes start at once, a
//! newer schema refused, and recovery when the store's connections are killed.

mod common;

use esframe_postgres::{EventStore, PgEventStore, PgStoreError, SCHEMA_VERSION};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_stores_starting_at_once_migrate_once() {
    let pool = common::pool(20).await;
    let schema = common::fresh_schema(&pool, "concurrent_start").await;
    let starts: Vec<_> = (0..12)
        .map(|_| {
            let (pool, schema) = (pool.clone(), schema.clone());
            tokio::spawn(async move {
                PgEventStore::builder(pool)
                    .schema(schema)
                    .unwrap()
                    .build()
                    .await
            })
        })
        .collect();
    for start in starts {
        start
            .await
            .unwrap()
            .expect("every concurrent start succeeds");
    }
    let applied: Vec<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT version FROM \"{schema}\".esframe_migrations ORDER BY version"
    )))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(applied, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_schema_from_a_newer_release_is_refused() {
    let pool = common::pool(2).await;
    let schema = common::fresh_schema(&pool, "newer").await;
    PgEventStore::builder(pool.clone())
        .schema(&*schema)
        .unwrap()
        .build()
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".esframe_migrations (version, name) VALUES (999, 'future')"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let err = PgEventStore::builder(pool)
        .schema(&*schema)
        .unwrap()
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(err, PgStoreError::SchemaTooNew { found: 999, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn invalid_schema_names_are_refused_before_touching_the_database() {
    let pool = common::pool(1).await;
    let err = PgEventStore::builder(pool)
        .schema("x\"; DROP SCHEMA public; --")
        .unwrap_err();
    assert!(matches!(err, PgStoreError::InvalidSchemaName(_)), "{err:?}");
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(1))
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .unwrap();
    let err = PgEventStore::builder(pool).build().await.unwrap_err();
    assert!(matches!(err, PgStoreError::Database(_)), "{err:?}");
    assert!(err.to_string().starts_with("PostgreSQL error"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_recovers_from_its_connections_being_killed() {
    // As after a database restart: every connection of the store's pool is terminated. Kept
    // connections go back to the pool within 100 ms of idling (where its ping finds them dead),
    // so after a short pause appends and reads succeed at once.
    use sqlx::postgres::PgConnectOptions;
    use std::str::FromStr;

    let app = format!("esframe_restart_{}", std::process::id());
    let options = PgConnectOptions::from_str(&common::database_url())
        .unwrap()
        .application_name(&app);
    let pool = PgEventStore::pool_options()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("PostgreSQL reachable");
    let schema = common::fresh_schema(&pool, "restart").await;
    let store = PgEventStore::builder(pool.clone())
        .schema(schema)
        .unwrap()
        .build()
        .await
        .unwrap();
    let stream = esframe_core::StreamId::new("account", "r").unwrap();
    let new_event = || esframe_core::NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "E".into(),
        schema_version: 1,
        payload: serde_json::json!({}),
        metadata: Default::default(),
    };
    let appends: Vec<_> = (0..4)
        .map(|_| {
            let (store, stream) = (store.clone(), stream.clone());
            tokio::spawn(async move {
                store
                    .append(
                        &stream,
                        esframe_core::ExpectedVersion::Any,
                        vec![new_event()],
                    )
                    .await
            })
        })
        .collect();
    for append in appends {
        append.await.unwrap().unwrap();
    }

    let killer = common::pool(1).await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                               WHERE application_name = $1) k",
    )
    .bind(&app)
    .fetch_one(&killer)
    .await
    .unwrap();
    assert!(killed > 0, "the store's connections were found and killed");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    for _ in 0..5 {
        store
            .append(
                &stream,
                esframe_core::ExpectedVersion::Any,
                vec![new_event()],
            )
            .await
            .expect("a kept connection that was killed is not used again");
        assert!(store.stream_version(&stream).await.unwrap().is_some());
    }
    assert_eq!(store.read_stream(&stream, 1).await.unwrap().len(), 9);
}
