use esframe_core::Event;

#[derive(Event)]
struct Deposited {
    amount: u64,
}

fn main() {}
