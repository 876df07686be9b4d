use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(version = "2")]
enum AccountEvent {
    #[event(version = 1.5)]
    Opened { owner: String },
    #[event(version = -1)]
    Closed,
    #[event(version = 4294967296)]
    Reopened,
}

fn main() {}
