//! `#[event(upcast(...))]`: the declared upcasters bring stored v1 events of a plain and of a
//! renamed event type to their current versions, and the result decodes. Generated code adds no
//! warning even where the user imported the names it spells out in full.
#![deny(warnings, unused_qualifications, trivial_casts, unused_results)]

use std::borrow::Cow;

use esframe_core::upcast::{Upcast, UpcastFailure};
use esframe_core::{Event, EventMetadata, RecordedEvent, StoreError, StreamId, Upcasters};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = 3, upcast(v1 = deposit_v1_to_v2, v2 = upcasters::deposit_v2_to_v3))]
    MoneyDeposited {
        amount: u64,
        currency: String,
        note: Option<String>,
    },
    #[event(name = "AccountOpened", version = 2, upcast(v1 = opened_v1_to_v2))]
    Opened { owner: String },
    Closed,
}

/// v1 deposits had no currency: they were all in euros.
fn deposit_v1_to_v2(mut payload: Value) -> Result<Upcast, UpcastFailure> {
    payload["currency"] = json!("EUR");
    Ok(Upcast::Next(payload))
}

mod upcasters {
    use esframe_core::upcast::{Upcast, UpcastFailure};
    use serde_json::Value;

    /// v3 added an optional note.
    pub(crate) fn deposit_v2_to_v3(mut payload: Value) -> Result<Upcast, UpcastFailure> {
        payload["note"] = Value::Null;
        Ok(Upcast::Next(payload))
    }
}

/// v1 called the owner `holder`.
fn opened_v1_to_v2(payload: Value) -> Result<Upcast, UpcastFailure> {
    let holder = payload.get("holder").ok_or("a v1 `AccountOpened` has a `holder`")?;
    Ok(Upcast::Next(json!({ "owner": holder })))
}

fn stored(event_type: &'static str, schema_version: u32, payload: Value) -> RecordedEvent {
    RecordedEvent {
        event_id: Uuid::nil(),
        stream_id: StreamId::new("account", "1").unwrap(),
        stream_version: 1,
        global_position: esframe_core::Position::new(1),
        recorded_at: Default::default(),
        event_type: Cow::Borrowed(event_type),
        schema_version,
        payload: payload.into(),
        metadata: EventMetadata::default(),
    }
}

fn main() {
    let declared: Vec<(String, u32)> = AccountEvent::upcasters()
        .iter()
        .map(|upcaster| (upcaster.event_type().to_owned(), upcaster.source_version()))
        .collect();
    assert_eq!(
        declared,
        [
            ("MoneyDeposited".to_owned(), 1),
            ("MoneyDeposited".to_owned(), 2),
            ("AccountOpened".to_owned(), 1),
        ]
    );

    let upcasters = Upcasters::builder()
        .current::<AccountEvent>()
        .build()
        .unwrap();
    let read = upcasters
        .apply_all(vec![
            stored("MoneyDeposited", 1, json!({ "amount": 5 })),
            stored("AccountOpened", 1, json!({ "holder": "ada" })),
            stored("Closed", 1, Value::Null),
        ])
        .unwrap();

    let current: Vec<(&str, u32, &Value)> = read
        .iter()
        .map(|event| (event.event_type.as_ref(), event.schema_version, &*event.payload))
        .collect();
    assert_eq!(
        current,
        [
            (
                "MoneyDeposited",
                3,
                &json!({ "amount": 5, "currency": "EUR", "note": null })
            ),
            ("AccountOpened", 2, &json!({ "owner": "ada" })),
            ("Closed", 1, &Value::Null),
        ]
    );
    let decoded: Vec<AccountEvent> = read
        .iter()
        .map(|recorded| recorded.decode::<AccountEvent>().unwrap())
        .collect();
    assert_eq!(
        decoded,
        [
            AccountEvent::MoneyDeposited {
                amount: 5,
                currency: "EUR".into(),
                note: None,
            },
            AccountEvent::Opened {
                owner: "ada".into()
            },
            AccountEvent::Closed,
        ]
    );

    // The user's function runs: its failure is the store error, naming the event.
    let failed = upcasters
        .apply_all(vec![stored("AccountOpened", 1, json!({}))])
        .unwrap_err();
    assert!(
        matches!(&failed, StoreError::Upcast { event_type, schema_version: 1, .. } if event_type == "AccountOpened"),
        "{failed:?}"
    );
}
