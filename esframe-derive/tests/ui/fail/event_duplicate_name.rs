use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    Opened {
        owner: String,
    },
    #[event(name = "Opened")]
    Reopened {
        owner: String,
    },
    #[event(name = "Closed")]
    Shut,
    Closed,
}

fn main() {}
