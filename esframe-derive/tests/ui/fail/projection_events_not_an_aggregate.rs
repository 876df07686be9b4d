// The event type where the aggregate belongs: one error on it, nothing from the other uses of
// its aggregate type name (the interest, the dispatch, the check against the other variant).
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
    #[events(aggregate = OrderEvent)]
    Order(OrderEvent),
    #[events(aggregate = "inventory")]
    Inventory(InventoryEvent),
}

fn main() {}
