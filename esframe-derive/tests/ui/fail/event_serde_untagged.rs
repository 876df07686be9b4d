use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[serde(untagged)]
enum AccountEvent {
    Opened { owner: String },
}

fn main() {}
