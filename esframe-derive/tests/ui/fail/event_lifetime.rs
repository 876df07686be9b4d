use esframe_core::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent<'a> {
    Opened { owner: &'a str },
}

fn main() {}
