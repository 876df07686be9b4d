use esframe_core::Event;
use esframe_core::projection::ProjectionEvents;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Event)]
enum OrderEvent<T> {
    Created(T),
}

#[derive(ProjectionEvents)]
enum ShopEvent<T> {
    #[events(aggregate = "order")]
    Order(OrderEvent<T>),
}

fn main() {}
