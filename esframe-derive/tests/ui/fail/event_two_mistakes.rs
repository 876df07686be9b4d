// Two mistakes in one enum: both are reported by the same compile.
use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(version = 0)]
enum AccountEvent {
    #[event(nam = "Opened")]
    Opened { owner: String },
}

fn main() {}
