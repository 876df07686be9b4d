use esframe_core::Upcasters;

fn money_deposited_v1(payload: serde_json::Value) -> serde_json::Value {
    payload
}

fn main() {
    let _ = Upcasters::builder().register(money_deposited_v1);
}
