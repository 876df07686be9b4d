//! An event type that appeared at v2 (nothing was ever stored at v1): its chain starts at `v2`.

use std::borrow::Cow;

use esframe_core::upcast::{Upcast, UpcastFailure};
use esframe_core::{Event, EventMetadata, RecordedEvent, StreamId, Upcasters};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = 3, upcast(v2 = limit_v2_to_v3))]
    LimitChanged { limit: u64, reason: String },
}

/// v3 added a reason.
fn limit_v2_to_v3(mut payload: Value) -> Result<Upcast, UpcastFailure> {
    payload["reason"] = json!("unknown");
    Ok(Upcast::Next(payload))
}

fn main() {
    let upcasters = Upcasters::builder()
        .current::<AccountEvent>()
        .build()
        .unwrap();
    let v2 = RecordedEvent {
        event_id: uuid::Uuid::nil(),
        stream_id: StreamId::new("account", "1").unwrap(),
        stream_version: 4,
        global_position: esframe_core::Position::new(9),
        recorded_at: Default::default(),
        event_type: Cow::Borrowed("LimitChanged"),
        schema_version: 2,
        payload: json!({ "limit": 100 }).into(),
        metadata: EventMetadata::default(),
    };
    let read = upcasters.apply_all(vec![v2]).unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].schema_version, 3);
    assert_eq!(read[0].payload, json!({ "limit": 100, "reason": "unknown" }));
    assert_eq!(
        read[0].decode::<AccountEvent>().unwrap(),
        AccountEvent::LimitChanged {
            limit: 100,
            reason: "unknown".into()
        }
    );
    assert_eq!(AccountEvent::upcasters().len(), 1);
}
