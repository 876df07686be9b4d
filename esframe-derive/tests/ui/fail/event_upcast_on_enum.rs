use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(version = 2, upcast(v1 = deposit_v1))]
enum AccountEvent {
    MoneyDeposited { amount: u64 },
}

fn main() {}
