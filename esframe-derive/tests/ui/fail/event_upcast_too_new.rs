// An upcaster reads a version older than the variant's: `v2` would produce v3.
use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = 2, upcast(v1 = deposit_v1, v2 = deposit_v2))]
    MoneyDeposited { amount: u64 },
    // The enum's version applies when the variant has none.
    #[event(upcast(v1 = opened_v1))]
    Opened { owner: String },
}

fn main() {}
