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
        event_type: "Pair".into(),
        schema_version: 2,
        payload: json!({ "a": 1, "b": 2 }),
        metadata: Default::default(),
    };
    store
        .append(
            &StreamId::new("sample", "split").unwrap(),
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

/// A snapshot taken at a version whose stored event an upcaster now drops is still trusted:
/// the stream has that version even though no event comes back for it.
#[tokio::test]
async fn a_snapshot_at_a_dropped_event_is_trusted() {
    use esframe_core::{
        CommandHandler, EventStore, ExpectedVersion, NewEvent, Snapshot, SnapshotPolicy,
        SnapshotStore, StreamId,
        testing::upcasting::{AddSample, SampledTotal, sample_upcasters},
    };
    use serde_json::json;
    let store = esframe_memory::MemoryStore::with_upcasters(sample_upcasters());
    let stream = StreamId::new("sample", "snapshot-at-drop").unwrap();
    let raw = |event_type: &'static str, schema_version, payload| NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: event_type.into(),
        schema_version,
        payload,
        metadata: Default::default(),
    };
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![
                raw("Sampled", 3, json!({ "amount": 1, "currency": "EUR" })),
                raw("Noise", 1, json!({})),
            ],
        )
        .await
        .unwrap();
    // The state says 7, not the 1 the events give: proof that the snapshot was used.
    store
        .save_snapshot(Snapshot {
            stream_id: stream.clone(),
            version: 2,
            schema_version: 1,
            state: json!({ "total": 7, "events": 1 }),
            taken_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    let handler = CommandHandler::<SampledTotal, _>::new(store)
        .without_state_cache()
        .snapshot_policy(SnapshotPolicy::every(100));
    let outcome = handler
        .execute(AddSample {
            id: stream.id().into(),
            amount: 2,
        })
        .await
        .unwrap();
    assert_eq!(outcome.version, 3);
    let loaded = handler.load(stream.id()).await.unwrap();
    assert_eq!(
        (loaded.state.total, loaded.version),
        (9, 3),
        "built on the snapshot"
    );
    let kept = handler.store().load_snapshot(&stream).await.unwrap();
    assert_eq!(kept.map(|s| s.version), Some(2), "the snapshot is kept");
}
