// An upcaster is named by its path: a string, a closure or a missing value is reported on the
// value (or on the key when there is none), and `upcast` itself takes a list.
use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = 4, upcast(v1 = "deposit_v1", v2 = |payload| payload, v3))]
    MoneyDeposited { amount: u64 },
    #[event(version = 2, upcast = opened_v1)]
    Opened { owner: String },
    #[event(version = 2, upcast(v1 = 12))]
    Closed,
}

fn main() {}
