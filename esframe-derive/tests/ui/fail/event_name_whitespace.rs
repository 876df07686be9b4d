use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(name = "Account Opened")]
    Opened { owner: String },
    #[event(name = "Closed\n")]
    Closed,
    #[event(name = Frozen)]
    Frozen,
}

fn main() {}
