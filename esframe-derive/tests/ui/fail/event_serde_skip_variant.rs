use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[serde(skip)]
    Opened { owner: String },
    #[serde(rename = "closed", skip_deserializing)]
    Closed,
    #[serde(skip_serializing)]
    Frozen,
    #[serde(other)]
    Unknown,
}

fn main() {}
