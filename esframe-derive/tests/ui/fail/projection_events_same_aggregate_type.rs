// An aggregate named by its type and again by its type name: the derive cannot compare them,
// the compiler does, and reports it on the second.
use esframe_core::projection::ProjectionEvents;
use esframe_core::{Aggregate, Command, Decision, Event};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Event)]
enum OrderEvent {
    Created,
}

#[derive(Debug, Serialize, Deserialize, Event)]
enum LegacyOrderEvent {
    Placed,
}

#[derive(Command)]
struct Create(#[command(aggregate_id)] String);

#[derive(Debug, thiserror::Error)]
#[error("refused")]
struct Refused;

#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
#[aggregate(name = "order", command = Create, event = OrderEvent, error = Refused)]
struct Order;

impl Order {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        _command: &Create,
        _services: &(),
    ) -> Result<(), Refused> {
        decision.emit(OrderEvent::Created);
        Ok(())
    }

    fn apply(&mut self, _event: &OrderEvent) {}
}

#[derive(ProjectionEvents)]
enum ShopEvent {
    #[events(aggregate = Order)]
    Order(OrderEvent),
    #[events(aggregate = "order")]
    Legacy(LegacyOrderEvent),
}

fn main() {}
