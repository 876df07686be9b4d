use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(name = "Account")]
enum AccountEvent {
    Opened { owner: String },
}

fn main() {}
