// `versoin` for `version`: one error. Its value is still read as the version, so the upcasters,
// which need version 3, report nothing.
use esframe_core::Event;
use esframe_core::upcast::{Upcast, UpcastFailure};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Event)]
#[event(versoin = 3)]
enum AccountEvent {
    #[event(upcast(v1 = opened_v1, v2 = opened_v2))]
    Opened { owner: String },
    Closed,
}

fn opened_v1(payload: serde_json::Value) -> Result<Upcast, UpcastFailure> {
    Ok(Upcast::Next(payload))
}

fn opened_v2(payload: serde_json::Value) -> Result<Upcast, UpcastFailure> {
    Ok(Upcast::Next(payload))
}

fn main() {}
