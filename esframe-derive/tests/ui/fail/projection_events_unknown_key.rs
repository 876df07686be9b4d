use esframe_core::Event;
use esframe_core::projection::ProjectionEvents;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Event)]
enum OrderEvent {
    Created,
}

#[derive(ProjectionEvents)]
enum ShopEvent {
    #[events(aggregate = "order", colour = "red")]
    Order(OrderEvent),
}

fn main() {}
