//! The order-fulfilment process manager: reserve stock, take payment, prepare the shipment,
//! confirm; release the stock and cancel when the payment is declined or never answered, or
//! the stock is short.

use std::time::Duration;

use esframe_core::{
    Event,
    process::{Effects, Input, ProcessManager, ReactError, Route},
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

    fn route(&self, event: &ProjectedEvent<'_, FulfilmentEvent>) -> Route {
        use FulfilmentEvent as E;
        let stream_id = event.aggregate_id();
        match &event.event {
            E::Order(OrderEvent::OrderPlaced { .. }) => Route::start(stream_id),
            E::Order(OrderEvent::OrderConfirmed | OrderEvent::OrderCancelled { .. }) => {
                Route::to(stream_id)
            }
            E::Inventory(InventoryEvent::Restocked { .. }) => Route::Skip,
            E::Inventory(
                InventoryEvent::StockReserved { order_id, .. }
                | InventoryEvent::StockReleased { order_id, .. },
            ) => Route::to(order_id),
            // Payments and shipments are keyed by the order id.
            E::Payment(_) | E::Shipment(_) => Route::to(stream_id),
        }
    }

    fn evolve(&self, state: &mut Fulfilment, event: &ProjectedEvent<'_, FulfilmentEvent>) {
        use FulfilmentEvent as E;
        match &event.event {
            E::Order(OrderEvent::OrderPlaced {
                sku,
                quantity,
                amount,
            }) => {
                state.sku.clone_from(sku);
                state.quantity = *quantity;
                state.amount = *amount;
            }
            E::Inventory(InventoryEvent::StockReserved { .. }) => state.stage = Stage::Paying,
            E::Payment(PaymentEvent::PaymentCaptured { .. }) => state.stage = Stage::Shipping,
            E::Shipment(_) => state.stage = Stage::Confirming,
            E::Payment(PaymentEvent::PaymentDeclined { reason }) => {
                state.stage = Stage::Compensating;
                state.cancel_reason = Some(format!("payment declined: {reason}"));
            }
            E::Payment(PaymentEvent::PaymentExpired) => {
                state.stage = Stage::Compensating;
                state.cancel_reason = Some("the payment provider did not answer".into());
            }
            E::Order(OrderEvent::OrderConfirmed) => state.stage = Stage::Confirmed,
            E::Order(OrderEvent::OrderCancelled { .. }) => state.stage = Stage::Cancelled,
            E::Inventory(
                InventoryEvent::StockReleased { .. } | InventoryEvent::Restocked { .. },
            )
            | E::Payment(PaymentEvent::PaymentRequested { .. }) => {}
        }
    }

    fn react(
        &self,
        state: &Fulfilment,
        input: Input<'_, Self>,
        effects: &mut Effects<Self>,
    ) -> Result<(), ReactError> {
        use FulfilmentEvent as E;
        let order_id = |event: &ProjectedEvent<'_, FulfilmentEvent>| match &event.event {
            E::Inventory(
                InventoryEvent::StockReserved { order_id, .. }
                | InventoryEvent::StockReleased { order_id, .. },
            ) => order_id.clone(),
            _ => event.aggregate_id().to_owned(),
        };
        match input {
            Input::Event(event) => {
                let order_id = order_id(event);
                match &event.event {
                    E::Order(OrderEvent::OrderPlaced { sku, quantity, .. }) => {
                        effects.send::<Inventory>(InventoryCommand::Reserve {
                            sku: sku.clone(),
                            order_id,
                            quantity: *quantity,
                        });
                    }
                    E::Inventory(InventoryEvent::StockReserved { .. }) => {
                        effects.send::<Payment>(PaymentCommand::Request {
                            order_id,
                            amount: state.amount,
                        });
                        effects.schedule(
                            PAYMENT_TIMEOUT,
                            self.payment_timeout,
                            FulfilmentTimer::PaymentTimeout,
                        );
                    }
                    E::Payment(PaymentEvent::PaymentCaptured { .. }) => {
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
                    E::Payment(
                        PaymentEvent::PaymentDeclined { .. } | PaymentEvent::PaymentExpired,
                    ) => {
                        effects.cancel(PAYMENT_TIMEOUT);
                        compensate(state, order_id, effects);
                    }
                    E::Order(OrderEvent::OrderConfirmed) => {
                        effects.publish(CustomerNotice::OrderOnItsWay { order_id });
                        effects.complete();
                    }
                    E::Order(OrderEvent::OrderCancelled { reason }) => {
                        effects.publish(CustomerNotice::OrderNotFulfilled {
                            order_id,
                            reason: reason.clone(),
                        });
                        effects.complete();
                    }
                    E::Inventory(
                        InventoryEvent::StockReleased { .. } | InventoryEvent::Restocked { .. },
                    )
                    | E::Payment(PaymentEvent::PaymentRequested { .. }) => {}
                }
            }
            Input::Timer(timer) => match timer.timer {
                FulfilmentTimer::PaymentTimeout => {
                    // The payment decides: a capture that came first refuses the expiry.
                    effects.send::<Payment>(PaymentCommand::Expire {
                        order_id: timer.instance.clone(),
                    });
                }
            },
            Input::Refused(refusal) => {
                if let Some(InventoryCommand::Reserve { order_id, .. }) =
                    refusal.command::<Inventory>()
                {
                    let reason = match refusal.error::<Inventory>() {
                        Some(InventoryError::OutOfStock { .. }) => "out of stock".to_owned(),
                        _ => refusal.message().to_owned(),
                    };
                    effects.send::<Order>(OrderCommand::Cancel {
                        order_id: order_id.clone(),
                        reason,
                    });
                } else if refusal.command::<Payment>().is_some() {
                    // An expiry refused because the provider answered first: its answer's
                    // event carries the flow on.
                } else {
                    return Err(ReactError::new(format!("unexpected refusal: {refusal:?}")));
                }
            }
        }
        Ok(())
    }
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
