use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = 2, upcast(v0 = deposit_v0, v1 = deposit_v1))]
    MoneyDeposited { amount: u64 },
}

fn main() {}
