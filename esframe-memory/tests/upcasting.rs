//! The memory store applies upcasters on every read path.

esframe_core::upcasting_suite!(|upcasters| async move {
    esframe_memory::MemoryStore::with_upcasters(upcasters)
});

/// A subscription stopped between the parts of a split event resumes without losing any.
#[tokio::test]
async fn resuming_between_split_parts_loses_nothing() {
    use esframe_core::{
        EventStore, ExpectedVersion, GlobalLog, NewEvent, StreamId, Upcasters,
        testing::upcasting::Sampled,
        upcast::{Upcast, upcaster},
    };
    use futures_util::StreamExt;
    use serde_json::json;
    let upcasters = Upcasters::builder()
        .current::<Sampled>()
        .register(
            upcaster("Pair", 2, |payload| {
                Ok(Upcast::Split(vec![
                    (
                        "Sampled".into(),
                        json!({ "amount": payload["a"], "currency": "EUR" }),
                    ),
                    (
                        "Sampled".into(),
                        json!({ "amount": payload["b"], "currency": "EUR" }),
                    ),
                ]))
            })
            .outputs(["Sampled"]),
        )
        .build()
        .unwrap();
    let store = esframe_memory::MemoryStore::with_upcasters(upcasters);
    let pair = NewEvent {
        event_id: uuid::Uuid::now_v7(),
        aggregate_type: "sample".into(),
        event_type: "Pair".into(),
        schema_version: 2,
        payload: json!({ "a": 1, "b": 2 }),
        metadata: Default::default(),
    };
    store
        .append(
            &StreamId::new("split").unwrap(),
            ExpectedVersion::NoStream,
            vec![pair],
        )
        .await
        .unwrap();

    let mut first_run = store.subscribe(esframe_core::Position::START);
    let first = first_run.next().await.unwrap().unwrap();
    assert_eq!(first.payload["amount"], json!(1));
    let checkpoint = first_run.position();
    assert!(
        checkpoint < first.global_position,
        "the split event is not consumed yet"
    );
    drop(first_run);

    let mut resumed = store.subscribe(checkpoint);
    let again = resumed.next().await.unwrap().unwrap();
    let second = resumed.next().await.unwrap().unwrap();
    assert_eq!(
        (
            again.payload["amount"].clone(),
            second.payload["amount"].clone()
        ),
        (json!(1), json!(2))
    );
    assert_eq!(
        resumed.position(),
        second.global_position,
        "consumed once the last part is read"
    );
}
