// The same version twice: in one list, and across lists and attributes.
use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = 3, upcast(v1 = deposit_v1, v2 = deposit_v2, v1 = deposit_v1_again))]
    MoneyDeposited { amount: u64 },
    #[event(version = 3, upcast(v1 = opened_v1))]
    #[event(upcast(v2 = opened_v2), upcast(v2 = opened_v2_again))]
    Opened { owner: String },
}

fn main() {}
