// A chain climbs one version at a time up to the variant's version.
use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    // Nothing reads v2.
    #[event(version = 4, upcast(v1 = deposit_v1, v3 = deposit_v3))]
    MoneyDeposited { amount: u64 },
    // Nothing reads v3: the chain stops short of v4.
    #[event(version = 4, upcast(v1 = opened_v1, v2 = opened_v2))]
    Opened { owner: String },
    // Several at once.
    #[event(version = 6, upcast(v1 = closed_v1), upcast(v4 = closed_v4))]
    Closed,
}

fn main() {}
