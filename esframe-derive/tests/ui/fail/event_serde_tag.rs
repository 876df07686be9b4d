use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[serde(rename_all = "snake_case", tag = "type", content = "data")]
enum AccountEvent {
    Opened { owner: String },
}

fn main() {}
