// A variant without `#[events(aggregate = ...)]`: one error on it, and the fallback impl keeps
// the type's uses quiet.
use esframe_core::Event;
use esframe_core::projection::ProjectionEvents;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Event)]
enum OrderEvent {
    Created,
}

#[derive(Debug, Serialize, Deserialize, Event)]
enum InventoryEvent {
    Created,
}

#[derive(ProjectionEvents)]
enum ShopEvent {
    #[events(aggregate = "order")]
    Order(OrderEvent),
    Inventory(InventoryEvent),
}

fn uses<E: ProjectionEvents>() {}

fn main() {
    uses::<ShopEvent>();
}
