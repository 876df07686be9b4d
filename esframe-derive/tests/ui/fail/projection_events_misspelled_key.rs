// `agregate` for `aggregate`: one error. Its value is still read, so the variant is not also
// reported as having no aggregate.
use esframe_core::Event;
use esframe_core::projection::ProjectionEvents;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Event)]
enum OrderEvent {
    Created,
}

#[derive(ProjectionEvents)]
enum ShopEvent {
    #[events(agregate = "order")]
    Order(OrderEvent),
}

fn main() {}
