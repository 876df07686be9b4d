// An upcaster is a `fn(Value) -> Result<Upcast, UpcastFailure>`: another signature is reported
// on the path the user wrote.
use esframe_core::Event;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = 3, upcast(v1 = deposit_v1_to_v2, v2 = upcasters::deposit_v2_to_v3))]
    MoneyDeposited { amount: u64 },
}

fn deposit_v1_to_v2(payload: Value) -> Value {
    payload
}

mod upcasters {
    use esframe_core::upcast::{Upcast, UpcastFailure};

    pub(crate) fn deposit_v2_to_v3(amount: u64) -> Result<Upcast, UpcastFailure> {
        Ok(Upcast::Next(amount.into()))
    }
}

fn main() {}
