use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
struct Raw {
    amount: u64,
}

#[derive(Clone, Serialize, Deserialize, Event)]
#[serde(from = "Raw", into = "Raw")]
enum AccountEvent {
    Deposited { amount: u64 },
}

impl From<Raw> for AccountEvent {
    fn from(raw: Raw) -> Self {
        Self::Deposited { amount: raw.amount }
    }
}

impl From<AccountEvent> for Raw {
    fn from(event: AccountEvent) -> Self {
        match event {
            AccountEvent::Deposited { amount } => Self { amount },
        }
    }
}

fn main() {}
