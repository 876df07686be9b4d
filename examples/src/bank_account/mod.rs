//! A bank account: open it, deposit, withdraw; overdrafts are refused.
//!
//! Amounts are in cents. Run the demo with `cargo run --example bank_account`.

mod demo;
mod domain;

pub use demo::{DemoReport, run_demo};
pub use domain::{
    Account, AccountCommand, AccountError, AccountEvent, money_deposited_v1, upcasters,
};
