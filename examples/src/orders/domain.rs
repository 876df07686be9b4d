//! The order flow's four aggregates: the order, the stock of a product, the payment of an
//! order, and its shipment.

use std::collections::BTreeMap;

use esframe_core::{Aggregate, Command, Decision, Event};
use serde::{Deserialize, Serialize};

// ANCHOR: order
/// What happens to an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum OrderEvent {
    /// A customer placed it.
    OrderPlaced {
        /// The product.
        sku: String,
        /// How many.
        quantity: u32,
        /// Cents to pay.
        amount: u64,
    },
    /// Stock, payment and shipment are all in place.
    OrderConfirmed,
    /// It will not be fulfilled.
    OrderCancelled {
        /// Why.
        reason: String,
    },
}

/// What can be asked of an order.
#[derive(Debug, Clone, PartialEq, Eq, Command)]
#[command(aggregate_id = order_id)]
pub enum OrderCommand {
    /// Place a new order.
    Place {
        /// The order.
        order_id: String,
        /// The product.
        sku: String,
        /// How many.
        quantity: u32,
        /// Cents to pay.
        amount: u64,
    },
    /// Confirm it.
    Confirm {
        /// The order.
        order_id: String,
    },
    /// Cancel it.
    Cancel {
        /// The order.
        order_id: String,
        /// Why.
        reason: String,
    },
}

/// Why an order refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// `Place` on an order that exists.
    #[error("the order was placed already")]
    AlreadyPlaced,
    /// A command on an order never placed.
    #[error("no such order")]
    NotPlaced,
    /// A command on a confirmed or cancelled order.
    #[error("the order is {0} already")]
    Closed(&'static str),
    /// An order of nothing.
    #[error("an order needs a quantity and an amount")]
    Empty,
}

/// An order's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Aggregate)]
#[aggregate(name = "order", command = OrderCommand, event = OrderEvent, error = OrderError)]
pub struct Order {
    /// Placed and not closed.
    pub open: bool,
    /// `confirmed` or `cancelled` once closed.
    pub closed: Option<String>,
}

impl Order {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &OrderCommand,
        _services: &(),
    ) -> Result<(), OrderError> {
        match command {
            OrderCommand::Place {
                sku,
                quantity,
                amount,
                ..
            } => {
                if decision.open || decision.closed.is_some() {
                    return Err(OrderError::AlreadyPlaced);
                }
                if *quantity == 0 || *amount == 0 {
                    return Err(OrderError::Empty);
                }
                decision.emit(OrderEvent::OrderPlaced {
                    sku: sku.clone(),
                    quantity: *quantity,
                    amount: *amount,
                });
            }
            OrderCommand::Confirm { .. } => {
                decision.require_open()?;
                decision.emit(OrderEvent::OrderConfirmed);
            }
            OrderCommand::Cancel { reason, .. } => {
                decision.require_open()?;
                decision.emit(OrderEvent::OrderCancelled {
                    reason: reason.clone(),
                });
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderPlaced { .. } => self.open = true,
            OrderEvent::OrderConfirmed => {
                self.open = false;
                self.closed = Some("confirmed".into());
            }
            OrderEvent::OrderCancelled { .. } => {
                self.open = false;
                self.closed = Some("cancelled".into());
            }
        }
    }

    fn require_open(&self) -> Result<(), OrderError> {
        match (&self.closed, self.open) {
            (Some(closed), _) if closed == "confirmed" => Err(OrderError::Closed("confirmed")),
            (Some(_), _) => Err(OrderError::Closed("cancelled")),
            (None, false) => Err(OrderError::NotPlaced),
            (None, true) => Ok(()),
        }
    }
}
// ANCHOR_END: order

// ANCHOR: inventory
/// What happens to a product's stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum InventoryEvent {
    /// Units arrived.
    Restocked {
        /// How many.
        quantity: u32,
    },
    /// Units were set aside for an order.
    StockReserved {
        /// The order.
        order_id: String,
        /// How many.
        quantity: u32,
    },
    /// An order's reservation was given back.
    StockReleased {
        /// The order.
        order_id: String,
        /// How many.
        quantity: u32,
    },
}

/// What can be asked of a product's stock.
#[derive(Debug, Clone, PartialEq, Eq, Command)]
#[command(aggregate_id = sku)]
pub enum InventoryCommand {
    /// Add units.
    Restock {
        /// The product.
        sku: String,
        /// How many.
        quantity: u32,
    },
    /// Set units aside for an order.
    Reserve {
        /// The product.
        sku: String,
        /// The order.
        order_id: String,
        /// How many.
        quantity: u32,
    },
    /// Give an order's reservation back.
    Release {
        /// The product.
        sku: String,
        /// The order.
        order_id: String,
    },
}

/// Why the stock refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    /// Fewer units available than asked for.
    #[error("out of stock: {available} available, {requested} requested")]
    OutOfStock {
        /// Units not reserved.
        available: u32,
        /// Units asked for.
        requested: u32,
    },
    /// The order has a reservation already.
    #[error("order `{0}` holds a reservation already")]
    AlreadyReserved(String),
}

/// A product's stock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Aggregate)]
#[aggregate(
    name = "inventory",
    command = InventoryCommand,
    event = InventoryEvent,
    error = InventoryError
)]
pub struct Inventory {
    /// Units not reserved.
    pub available: u32,
    /// Reservations by order.
    pub reserved: BTreeMap<String, u32>,
}

impl Inventory {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &InventoryCommand,
        _services: &(),
    ) -> Result<(), InventoryError> {
        match command {
            InventoryCommand::Restock { quantity, .. } => {
                decision.emit(InventoryEvent::Restocked {
                    quantity: *quantity,
                });
            }
            InventoryCommand::Reserve {
                order_id, quantity, ..
            } => {
                if decision.reserved.contains_key(order_id) {
                    return Err(InventoryError::AlreadyReserved(order_id.clone()));
                }
                if *quantity > decision.available {
                    return Err(InventoryError::OutOfStock {
                        available: decision.available,
                        requested: *quantity,
                    });
                }
                decision.emit(InventoryEvent::StockReserved {
                    order_id: order_id.clone(),
                    quantity: *quantity,
                });
            }
            InventoryCommand::Release { order_id, .. } => {
                // Releasing what is not reserved is a no-op, so compensation can always run.
                if let Some(&quantity) = decision.reserved.get(order_id) {
                    decision.emit(InventoryEvent::StockReleased {
                        order_id: order_id.clone(),
                        quantity,
                    });
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: &InventoryEvent) {
        match event {
            InventoryEvent::Restocked { quantity } => self.available += quantity,
            InventoryEvent::StockReserved { order_id, quantity } => {
                self.available -= quantity;
                self.reserved.insert(order_id.clone(), *quantity);
            }
            InventoryEvent::StockReleased { order_id, quantity } => {
                self.available += quantity;
                self.reserved.remove(order_id);
            }
        }
    }
}
// ANCHOR_END: inventory

// ANCHOR: payment
/// What happens to an order's payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum PaymentEvent {
    /// The payment provider was asked to charge the customer.
    PaymentRequested {
        /// Cents.
        amount: u64,
    },
    /// The provider took the money.
    PaymentCaptured {
        /// Cents.
        amount: u64,
    },
    /// The provider refused.
    PaymentDeclined {
        /// Why.
        reason: String,
    },
    /// No answer came in time; a late answer is refused.
    PaymentExpired,
}

/// What can be asked of a payment.
#[derive(Debug, Clone, PartialEq, Eq, Command)]
#[command(aggregate_id = order_id)]
pub enum PaymentCommand {
    /// Ask the provider to charge.
    Request {
        /// The order.
        order_id: String,
        /// Cents.
        amount: u64,
    },
    /// The provider's answer: charged.
    Capture {
        /// The order.
        order_id: String,
    },
    /// The provider's answer: refused.
    Decline {
        /// The order.
        order_id: String,
        /// Why.
        reason: String,
    },
    /// Give up waiting for the provider.
    Expire {
        /// The order.
        order_id: String,
    },
}

/// Why a payment refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// `Request` twice.
    #[error("the payment was requested already")]
    AlreadyRequested,
    /// An answer without a request.
    #[error("no payment was requested")]
    NotRequested,
    /// An answer or expiry after the payment was settled.
    #[error("the payment is settled already ({0})")]
    Settled(String),
}

/// An order's payment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Aggregate)]
#[aggregate(
    name = "payment",
    command = PaymentCommand,
    event = PaymentEvent,
    error = PaymentError
)]
pub struct Payment {
    /// Cents requested (0: not requested).
    pub amount: u64,
    /// `captured`, `declined` or `expired` once settled.
    pub settled: Option<String>,
}

impl Payment {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &PaymentCommand,
        _services: &(),
    ) -> Result<(), PaymentError> {
        if let PaymentCommand::Request { amount, .. } = command {
            if decision.amount > 0 {
                return Err(PaymentError::AlreadyRequested);
            }
            decision.emit(PaymentEvent::PaymentRequested { amount: *amount });
            return Ok(());
        }
        if decision.amount == 0 {
            return Err(PaymentError::NotRequested);
        }
        if let Some(settled) = &decision.settled {
            return Err(PaymentError::Settled(settled.clone()));
        }
        let event = match command {
            PaymentCommand::Capture { .. } => PaymentEvent::PaymentCaptured {
                amount: decision.amount,
            },
            PaymentCommand::Decline { reason, .. } => PaymentEvent::PaymentDeclined {
                reason: reason.clone(),
            },
            PaymentCommand::Expire { .. } => PaymentEvent::PaymentExpired,
            PaymentCommand::Request { .. } => unreachable!("handled above"),
        };
        decision.emit(event);
        Ok(())
    }

    fn apply(&mut self, event: &PaymentEvent) {
        match event {
            PaymentEvent::PaymentRequested { amount } => self.amount = *amount,
            PaymentEvent::PaymentCaptured { .. } => self.settled = Some("captured".into()),
            PaymentEvent::PaymentDeclined { .. } => self.settled = Some("declined".into()),
            PaymentEvent::PaymentExpired => self.settled = Some("expired".into()),
        }
    }
}
// ANCHOR_END: payment

// ANCHOR: shipment
/// What happens to an order's shipment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum ShipmentEvent {
    /// The parcel is packed and labelled.
    ShipmentPrepared {
        /// The product.
        sku: String,
        /// How many.
        quantity: u32,
    },
}

/// What can be asked of a shipment.
#[derive(Debug, Clone, PartialEq, Eq, Command)]
#[command(aggregate_id = order_id)]
pub enum ShipmentCommand {
    /// Pack and label the parcel.
    Prepare {
        /// The order.
        order_id: String,
        /// The product.
        sku: String,
        /// How many.
        quantity: u32,
    },
}

/// Why a shipment refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShipmentError {
    /// `Prepare` twice.
    #[error("the shipment was prepared already")]
    AlreadyPrepared,
}

/// An order's shipment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Aggregate)]
#[aggregate(
    name = "shipment",
    command = ShipmentCommand,
    event = ShipmentEvent,
    error = ShipmentError
)]
pub struct Shipment {
    /// Whether it was prepared.
    pub prepared: bool,
}

impl Shipment {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &ShipmentCommand,
        _services: &(),
    ) -> Result<(), ShipmentError> {
        let ShipmentCommand::Prepare { sku, quantity, .. } = command;
        if decision.prepared {
            return Err(ShipmentError::AlreadyPrepared);
        }
        decision.emit(ShipmentEvent::ShipmentPrepared {
            sku: sku.clone(),
            quantity: *quantity,
        });
        Ok(())
    }

    fn apply(&mut self, event: &ShipmentEvent) {
        let ShipmentEvent::ShipmentPrepared { .. } = event;
        self.prepared = true;
    }
}
// ANCHOR_END: shipment
