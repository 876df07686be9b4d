//! The order flow across four aggregates, run by a process manager: stock reserved, payment
//! taken, shipment prepared, order confirmed; compensation when the payment is declined, the
//! provider never answers, or the stock is short.

pub mod demo;
pub mod domain;
pub mod process;

pub use demo::{OrderServices, Scenario, print_chain, run_demo};
pub use domain::{Inventory, Order, Payment, Shipment};
pub use process::{FulfilmentEvent, OrderFulfilment, Stage};
