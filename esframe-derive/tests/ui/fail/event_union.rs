use esframe_core::Event;

#[derive(Event)]
union Deposited {
    amount: u64,
}

fn main() {}
