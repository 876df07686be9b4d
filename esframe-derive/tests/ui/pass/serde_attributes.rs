//! Serde attributes that change names or defaults keep working: payloads are decoded by variant
//! index, and the stored data is the variant's own serde form.

use esframe_core::Event;
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum AccountEvent {
    #[serde(rename_all = "camelCase")]
    AccountOpened {
        owner_name: String,
        #[serde(default)]
        nickname: Option<String>,
        #[serde(default = "default_limit")]
        daily_limit: u64,
    },
    #[serde(rename = "renamed-in-json", alias = "old")]
    Renamed(String),
    #[event(name = "Closed")]
    AccountClosed,
}

fn default_limit() -> u64 {
    500
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
    let opened = AccountEvent::AccountOpened {
        owner_name: "ada".into(),
        nickname: None,
        daily_limit: 10,
    };
    let payload = opened.to_payload().unwrap();
    // The payload is the variant's data in its serde form, without serde's tag.
    assert_eq!(
        payload,
        json!({"ownerName": "ada", "nickname": null, "dailyLimit": 10})
    );
    assert_eq!(opened.event_type(), "AccountOpened");
    assert_eq!(
        decode("AccountOpened", &payload).unwrap(),
        opened
    );

    // Field defaults apply to payloads written before the field existed.
    let old = json!({"ownerName": "bob"});
    assert_eq!(
        decode("AccountOpened", &old).unwrap(),
        AccountEvent::AccountOpened {
            owner_name: "bob".into(),
            nickname: None,
            daily_limit: 500
        }
    );

    let renamed = AccountEvent::Renamed("carol".into());
    assert_eq!(renamed.event_type(), "Renamed");
    assert_eq!(renamed.to_payload().unwrap(), json!("carol"));
    assert_eq!(
        decode("Renamed", &json!("carol")).unwrap(),
        renamed
    );

    let closed = AccountEvent::AccountClosed;
    assert_eq!(closed.event_type(), "Closed");
    assert_eq!(closed.to_payload().unwrap(), json!(null));
    assert_eq!(
        decode("Closed", &json!(null)).unwrap(),
        closed
    );

    // serde's own names are not event type names.
    assert!(decode("account_closed", &json!(null)).is_err());
}
