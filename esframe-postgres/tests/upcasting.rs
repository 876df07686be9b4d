//! The PostgreSQL store applies upcasters on every read path, and never rewrites stored rows.

mod common;

use esframe_core::{EventStore, StreamId};
use esframe_postgres::PgEventStore;

async fn store_with(upcasters: esframe_core::Upcasters, label: &str) -> PgEventStore {
    let pool = common::pool(10).await;
    let schema = common::fresh_schema(&pool, label).await;
    PgEventStore::builder(pool)
        .schema(schema)
        .unwrap()
        .upcasters(upcasters)
        .build()
        .await
        .unwrap()
}

esframe_core::upcasting_suite!(|upcasters| async move { store_with(upcasters, "upcasting").await });

#[tokio::test]
async fn stored_rows_keep_their_original_version_and_payload() {
    let store = store_with(
        esframe_core::testing::upcasting::sample_upcasters(),
        "upcast_raw",
    )
    .await;
    esframe_core::testing::upcasting::old_events_are_read_at_their_current_version(store.clone())
        .await;
    // The same schema read without upcasters shows the rows exactly as written.
    let raw = PgEventStore::builder(store.pool().clone())
        .schema(store.schema().as_str())
        .unwrap()
        .build()
        .await
        .unwrap();
    let stored = raw
        .read_stream(&StreamId::new("sample", "upcast-history").unwrap(), 1)
        .await
        .unwrap();
    let summary: Vec<(&str, u32)> = stored
        .iter()
        .map(|e| (e.event_type.as_ref(), e.schema_version))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("Sampled", 1),
            ("Noise", 1),
            ("OldSampled", 1),
            ("Sampled", 2),
            ("Sampled", 3)
        ]
    );
    assert_eq!(stored[0].payload, serde_json::json!({ "amt": 1 }));
}
