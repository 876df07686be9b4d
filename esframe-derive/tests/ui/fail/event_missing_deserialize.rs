// Only one of the two serde traits: still one error, on the enum's name.
use esframe_core::Event;
use serde::Serialize;

#[derive(Debug, Serialize, Event)]
enum AccountEvent {
    Opened { owner: String },
    Closed,
}

fn main() {
    let _ = AccountEvent::Closed.event_type();
}
