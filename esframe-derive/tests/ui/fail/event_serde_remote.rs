use esframe_core::Event;
use serde::{Deserialize, Serialize};

mod other_crate {
    pub enum Movement {
        Deposited { amount: u64 },
    }
}

#[derive(Serialize, Deserialize, Event)]
#[serde(remote = "other_crate::Movement")]
enum MovementDef {
    Deposited { amount: u64 },
}

fn main() {}
