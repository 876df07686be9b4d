// Upcaster keys are `v<N>`: each of these is reported on the key, in one compile. (The derive
// stops at the attribute, so the functions are never looked up.)
use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = 2, upcast(from1 = deposit_v1, v = deposit_v1, vx = deposit_v1))]
    MoneyDeposited { amount: u64 },
}

fn main() {}
