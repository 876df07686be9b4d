//! Every variant shape, names and versions, and a round trip of each through the stored form.

use esframe_core::{Event, EventType};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(version = 2)]
enum AccountEvent {
    #[event(name = "AccountOpened")]
    Opened {
        owner: String,
    },
    #[event(version = 3)]
    MoneyDeposited {
        amount: u64,
    },
    Closed,
    Renamed(String),
    Moved(String, u32),
    #[event(name = "Frozen", version = 7)]
    r#Frozen {},
    Empty(),
}

/// Decodes from both forms a store hands over, parsed and as text; they must agree.
fn decode(name: &str, payload: &serde_json::Value) -> Result<AccountEvent, esframe_core::DecodeErrorKind> {
    let parsed = AccountEvent::from_payload(name, &esframe_core::Payload::from(payload.clone()));
    let text = AccountEvent::from_payload(
        name,
        &esframe_core::Payload::from_json_text(payload.to_string()),
    );
    assert_eq!(parsed.as_ref().ok(), text.as_ref().ok(), "{name}: {payload}");
    assert_eq!(
        parsed.as_ref().err().map(std::mem::discriminant),
        text.as_ref().err().map(std::mem::discriminant),
        "{name}: {payload}"
    );
    parsed
}

fn main() {
    assert_eq!(
        AccountEvent::event_types(),
        [
            EventType::new("AccountOpened", 2),
            EventType::new("MoneyDeposited", 3),
            EventType::new("Closed", 2),
            EventType::new("Renamed", 2),
            EventType::new("Moved", 2),
            EventType::new("Frozen", 7),
            EventType::new("Empty", 2),
        ]
    );
    assert_eq!(AccountEvent::current_version("MoneyDeposited"), Some(3));
    assert_eq!(AccountEvent::current_version("Opened"), None);

    let cases = [
        (
            AccountEvent::Opened {
                owner: "ada".into(),
            },
            "AccountOpened",
            2,
            json!({"owner": "ada"}),
        ),
        (
            AccountEvent::MoneyDeposited { amount: 5 },
            "MoneyDeposited",
            3,
            json!({"amount": 5}),
        ),
        (AccountEvent::Closed, "Closed", 2, json!(null)),
        (
            AccountEvent::Renamed("bob".into()),
            "Renamed",
            2,
            json!("bob"),
        ),
        (
            AccountEvent::Moved("x".into(), 1),
            "Moved",
            2,
            json!(["x", 1]),
        ),
        (AccountEvent::Frozen {}, "Frozen", 7, json!({})),
        (AccountEvent::Empty(), "Empty", 2, json!([])),
    ];
    for (event, name, version, payload) in cases {
        assert_eq!(event.event_type(), name);
        assert_eq!(event.schema_version(), version);
        assert_eq!(event.to_payload().unwrap(), payload);
        assert_eq!(decode(name, &payload).unwrap(), event);
    }
    assert!(matches!(
        decode("Opened", &json!({"owner": "ada"})),
        Err(esframe_core::DecodeErrorKind::UnknownType)
    ));
    assert!(matches!(
        decode("MoneyDeposited", &json!({"amount": "many"})),
        Err(esframe_core::DecodeErrorKind::Payload(_))
    ));
}
