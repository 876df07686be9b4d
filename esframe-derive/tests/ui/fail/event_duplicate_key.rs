use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(version = 2)]
#[event(version = 3)]
enum AccountEvent {
    #[event(name = "Opened", name = "AccountOpened")]
    Opened { owner: String },
}

fn main() {}
