//! `#[derive(ProjectionEvents)]` over two aggregates that both have a `Created` event (one
//! named by its type, one by its type name): `decode` picks the variant by the stream's
//! aggregate type, `interest()` lets through exactly the events of those aggregates whose type
//! one of them knows. Generated code adds no warning even where the user imported the names it
//! spells out in full.
#![deny(warnings, unused_qualifications, trivial_casts, unused_results)]

use std::borrow::Cow;

use esframe_core::projection::{Interest, ProjectionEvents};
use esframe_core::{
    Aggregate, Command, DecodeErrorKind, Decision, Event, EventDecodeError, EventMetadata,
    Position, RecordedEvent, StreamId,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum OrderEvent {
    Created { customer: String },
    Shipped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum InventoryEvent {
    Created { sku: String },
    Restocked { quantity: u32 },
}

#[derive(Command)]
struct Ship(#[command(aggregate_id)] String);

#[derive(Debug, thiserror::Error)]
#[error("refused")]
struct Refused;

#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
#[aggregate(name = "order", command = Ship, event = OrderEvent, error = Refused)]
struct Order {
    shipped: bool,
}

impl Order {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        _command: &Ship,
        _services: &(),
    ) -> Result<(), Refused> {
        let _ = decision.emit(OrderEvent::Shipped);
        Ok(())
    }

    fn apply(&mut self, event: &OrderEvent) {
        self.shipped |= *event == OrderEvent::Shipped;
    }
}

#[derive(Debug, PartialEq, ProjectionEvents)]
enum ShopEvent {
    #[events(aggregate = Order)]
    Order(OrderEvent),
    #[events(aggregate = "inventory")]
    Inventory(InventoryEvent),
}

fn stored(aggregate_type: &str, event_type: &'static str, payload: Value) -> RecordedEvent {
    RecordedEvent {
        event_id: Uuid::nil(),
        stream_id: StreamId::new(aggregate_type, "42").unwrap(),
        stream_version: 3,
        global_position: Position::new(7),
        recorded_at: Default::default(),
        event_type: Cow::Borrowed(event_type),
        schema_version: 1,
        payload: payload.into(),
        metadata: EventMetadata::default(),
    }
}

fn decode(event: &RecordedEvent) -> Option<ShopEvent> {
    ShopEvent::decode(event).unwrap()
}

fn main() {
    let order_created = stored("order", "Created", json!({ "customer": "ada" }));
    let inventory_created = stored("inventory", "Created", json!({ "sku": "tea" }));
    let shipped = stored("order", "Shipped", Value::Null);
    let restocked = stored("inventory", "Restocked", json!({ "quantity": 5 }));

    // The same event type name, told apart by aggregate.
    assert_eq!(
        decode(&order_created),
        Some(ShopEvent::Order(OrderEvent::Created {
            customer: "ada".into()
        }))
    );
    assert_eq!(
        decode(&inventory_created),
        Some(ShopEvent::Inventory(InventoryEvent::Created {
            sku: "tea".into()
        }))
    );
    assert_eq!(decode(&shipped), Some(ShopEvent::Order(OrderEvent::Shipped)));
    assert_eq!(
        decode(&restocked),
        Some(ShopEvent::Inventory(InventoryEvent::Restocked { quantity: 5 }))
    );

    // Not one of these: another aggregate, or a type only the other aggregate has.
    let customer_created = stored("customer", "Created", json!({ "name": 1 }));
    let order_restocked = stored("order", "Restocked", json!({ "quantity": 5 }));
    let inventory_shipped = stored("inventory", "Shipped", Value::Null);
    for event in [&customer_created, &order_restocked, &inventory_shipped] {
        assert_eq!(decode(event), None, "{event:?}");
    }

    // A known type of a known aggregate that does not decode is an error naming the event.
    let corrupt = stored("inventory", "Created", json!({ "sku": 5 }));
    let error: EventDecodeError = ShopEvent::decode(&corrupt).unwrap_err();
    assert_eq!(error.stream, corrupt.stream_id);
    assert_eq!((error.event_type.as_str(), error.stream_version), ("Created", 3));
    assert!(matches!(error.kind, DecodeErrorKind::Payload(_)), "{error}");

    // The interest: both aggregates (the type's `TYPE` and the name), the union of the types.
    assert_eq!(
        ShopEvent::interest(),
        Interest::aggregates(["order", "inventory"])
            .and_event_types(["Created", "Shipped", "Restocked"])
    );
    let interest = ShopEvent::interest();
    for event in [&order_created, &inventory_created, &shipped, &restocked] {
        assert!(interest.matches(event), "{event:?}");
    }
    // A type name only the other aggregate knows passes the interest (decoded as `None`).
    assert!(interest.matches(&order_restocked));
    assert!(!interest.matches(&customer_created));
    assert!(!interest.matches(&stored("order", "Cancelled", Value::Null)));
}
