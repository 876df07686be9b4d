//! The order-fulfilment process manager: reserve stock, take payment, prepare the shipment,
//! confirm; release the stock and cancel when the payment is declined or never answered, or
//! the stock is short.

use std::time::Duration;

use esframe_core::{
    Event,
    process::{Effects, Input, ProcessManager, ReactError, Refusal, Route},
    projection::{ProjectedEvent, ProjectionEvents},
};
use serde::{Deserialize, Serialize};

use super::domain::{
    Inventory, InventoryCommand, InventoryError, InventoryEvent, Order, OrderCommand, OrderEvent,
    Payment, PaymentCommand, PaymentEvent, Shipment, ShipmentCommand, ShipmentEvent,
};

// ANCHOR: events
/// The events the flow follows, from all four aggregates.
#[derive(Debug, Clone, PartialEq, ProjectionEvents)]
pub enum FulfilmentEvent {
    /// From orders.
    #[events(aggregate = Order)]
    Order(OrderEvent),
    /// From the stock of products.
    #[events(aggregate = Inventory)]
    Inventory(InventoryEvent),
    /// From payments.
    #[events(aggregate = Payment)]
    Payment(PaymentEvent),
    /// From shipments.
    #[events(aggregate = Shipment)]
    Shipment(ShipmentEvent),
}
// ANCHOR_END: events

// ANCHOR: state
/// Where one order's flow is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Waiting for the stock.
    #[default]
    Reserving,
    /// Waiting for the payment provider.
    Paying,
    /// Waiting for the shipment.
    Shipping,
    /// Waiting for the order to be confirmed.
    Confirming,
    /// Undoing: waiting for the order to be cancelled.
    Compensating,
    /// Confirmed.
    Confirmed,
    /// Cancelled.
    Cancelled,
}

/// One order's flow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fulfilment {
    /// Where it is.
    pub stage: Stage,
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Cents.
    pub amount: u64,
    /// Why it was cancelled.
    pub cancel_reason: Option<String>,
}

/// What a timer of the flow carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FulfilmentTimer {
    /// The payment provider has not answered in time.
    PaymentTimeout,
}
// ANCHOR_END: state

/// What the flow tells the customer: messages for the notification service, published from the
/// flow's own stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum CustomerNotice {
    /// The order is confirmed and its parcel prepared.
    OrderOnItsWay {
        /// The order.
        order_id: String,
    },
    /// The order was cancelled.
    OrderNotFulfilled {
        /// The order.
        order_id: String,
        /// Why.
        reason: String,
    },
}

/// An event of the flow, as the process manager receives it.
pub type FlowEvent<'a> = ProjectedEvent<'a, FulfilmentEvent>;

/// The name of the payment timer.
pub const PAYMENT_TIMEOUT: &str = "payment-timeout";

/// The process manager. `payment_timeout` is how long the provider has to answer.
#[derive(Debug, Clone)]
pub struct OrderFulfilment {
    /// How long the payment provider has to answer.
    pub payment_timeout: Duration,
}

impl Default for OrderFulfilment {
    fn default() -> Self {
        Self {
            payment_timeout: Duration::from_secs(30),
        }
    }
}

// ANCHOR: process
impl ProcessManager for OrderFulfilment {
    const NAME: &'static str = "order-fulfilment";
    type Events = FulfilmentEvent;
    type State = Fulfilment;
    type Timer = FulfilmentTimer;

    fn route(&self, event: &FlowEvent<'_>) -> Route {
        use super::domain::{InventoryEvent as I, OrderEvent as O};
        use FulfilmentEvent as E;
        let stream_id = event.aggregate_id();
        match &event.event {
            E::Order(O::OrderPlaced { .. }) => Route::start(stream_id),
            E::Order(O::OrderConfirmed) => Route::to(stream_id),
            E::Order(O::OrderCancelled { .. }) => Route::to(stream_id),
            E::Inventory(I::Restocked { .. }) => Route::Skip,
            E::Inventory(I::StockReserved { order_id, .. }) => Route::to(order_id),
            E::Inventory(I::StockReleased { order_id, .. }) => Route::to(order_id),
            // Payments and shipments are keyed by the order id.
            E::Payment(_) | E::Shipment(_) => Route::to(stream_id),
        }
    }

    fn evolve(&self, state: &mut Fulfilment, event: &FlowEvent<'_>) {
        use super::domain::{InventoryEvent as I, OrderEvent as O, PaymentEvent as P};
        use FulfilmentEvent as E;
        let stage = match &event.event {
            E::Order(O::OrderPlaced {
                sku,
                quantity,
                amount,
            }) => {
                state.sku.clone_from(sku);
                state.quantity = *quantity;
                state.amount = *amount;
                return;
            }
            E::Inventory(I::StockReserved { .. }) => Stage::Paying,
            E::Payment(P::PaymentCaptured { .. }) => Stage::Shipping,
            E::Shipment(_) => Stage::Confirming,
            E::Payment(P::PaymentDeclined { reason }) => {
                state.cancel_reason = Some(format!("payment declined: {reason}"));
                Stage::Compensating
            }
            E::Payment(P::PaymentExpired) => {
                let reason = "the payment provider did not answer";
                state.cancel_reason = Some(reason.into());
                Stage::Compensating
            }
            E::Order(O::OrderConfirmed) => Stage::Confirmed,
            E::Order(O::OrderCancelled { .. }) => Stage::Cancelled,
            E::Inventory(I::StockReleased { .. })
            | E::Inventory(I::Restocked { .. })
            | E::Payment(P::PaymentRequested { .. }) => return,
        };
        state.stage = stage;
    }

    fn react(
        &self,
        state: &Fulfilment,
        input: Input<'_, Self>,
        effects: &mut Effects<Self>,
    ) -> Result<(), ReactError> {
        match input {
            Input::Event(event) => self.on_event(state, event, effects),
            Input::Timer(timer) => match timer.timer {
                FulfilmentTimer::PaymentTimeout => {
                    // The payment decides: a capture that came first refuses this.
                    let order_id = timer.instance.clone();
                    effects.send::<Payment>(PaymentCommand::Expire { order_id });
                }
            },
            Input::Refused(refusal) => match cancellation(refusal) {
                Some(cancel) => effects.send::<Order>(cancel),
                // An expiry refused because the provider answered first: the
                // answer's event carries the flow on.
                None if refusal.is::<Payment>() => {}
                None => return Err(format!("unexpected refusal: {refusal:?}").into()),
            },
        }
        Ok(())
    }
}

impl OrderFulfilment {
    /// The next step after `event`.
    fn on_event(
        &self,
        state: &Fulfilment,
        event: &FlowEvent<'_>, // already folded into `state`
        effects: &mut Effects<Self>,
    ) {
        use super::domain::{InventoryEvent as I, OrderEvent as O, PaymentEvent as P};
        use FulfilmentEvent as E;
        let order_id = match &event.event {
            E::Inventory(I::StockReserved { order_id, .. }) => order_id.clone(),
            _ => event.aggregate_id().to_owned(),
        };
        match &event.event {
            E::Order(O::OrderPlaced { sku, quantity, .. }) => {
                effects.send::<Inventory>(InventoryCommand::Reserve {
                    sku: sku.clone(),
                    order_id,
                    quantity: *quantity,
                });
            }
            E::Inventory(I::StockReserved { .. }) => {
                let amount = state.amount;
                effects.send::<Payment>(PaymentCommand::Request { order_id, amount });
                let timer = FulfilmentTimer::PaymentTimeout;
                effects.schedule(PAYMENT_TIMEOUT, self.payment_timeout, timer);
            }
            E::Payment(P::PaymentCaptured { .. }) => {
                effects.cancel(PAYMENT_TIMEOUT);
                effects.send::<Shipment>(ShipmentCommand::Prepare {
                    order_id,
                    sku: state.sku.clone(),
                    quantity: state.quantity,
                });
            }
            E::Shipment(ShipmentEvent::ShipmentPrepared { .. }) => {
                effects.send::<Order>(OrderCommand::Confirm { order_id });
            }
            E::Payment(P::PaymentDeclined { .. } | P::PaymentExpired) => {
                effects.cancel(PAYMENT_TIMEOUT);
                compensate(state, order_id, effects);
            }
            E::Order(O::OrderConfirmed) => {
                effects.publish(CustomerNotice::OrderOnItsWay { order_id });
                effects.complete();
            }
            E::Order(O::OrderCancelled { reason }) => {
                let reason = reason.clone();
                let notice = CustomerNotice::OrderNotFulfilled { order_id, reason };
                effects.publish(notice);
                effects.complete();
            }
            // Nothing follows these.
            E::Inventory(_) | E::Payment(P::PaymentRequested { .. }) => {}
        }
    }
}

/// The order's cancellation, when its stock reservation was refused.
fn cancellation(refusal: &Refusal) -> Option<OrderCommand> {
    let command = refusal.command::<Inventory>()?;
    let InventoryCommand::Reserve { order_id, .. } = command else {
        return None;
    };
    let reason = match refusal.error::<Inventory>() {
        Some(InventoryError::OutOfStock { .. }) => "out of stock".to_owned(),
        _ => refusal.message().to_owned(),
    };
    let order_id = order_id.clone();
    Some(OrderCommand::Cancel { order_id, reason })
}
// ANCHOR_END: process

/// Releases the stock and cancels the order.
fn compensate(state: &Fulfilment, order_id: String, effects: &mut Effects<OrderFulfilment>) {
    effects.send::<Inventory>(InventoryCommand::Release {
        sku: state.sku.clone(),
        order_id: order_id.clone(),
    });
    effects.send::<Order>(OrderCommand::Cancel {
        order_id,
        reason: state
            .cancel_reason
            .clone()
            .unwrap_or_else(|| "cancelled".into()),
    });
}
