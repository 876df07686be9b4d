//! Migrations: idempotent, safe when many processes start at once, refusing a newer schema.

mod common;

use esframe_postgres::{PgEventStore, PgStoreError, SCHEMA_VERSION};

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
