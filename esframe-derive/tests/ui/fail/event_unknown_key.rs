use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(versoin = 2)]
enum AccountEvent {
    #[event(rename = "Opened")]
    Opened { owner: String },
}

fn main() {}
