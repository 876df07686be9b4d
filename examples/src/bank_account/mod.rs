//! A bank account: open it, deposit, withdraw; overdrafts are refused; a projection keeps a
//! balances read model.
//!
//! Amounts are in cents. Run the demo with `cargo run --example bank_account`.

mod balances;
mod demo;
mod domain;

pub use balances::{AccountBalance, BalanceQuery, MemoryBalances, PgBalances};
pub use demo::{DemoReport, run_demo};
pub use domain::{
    Account, AccountCommand, AccountError, AccountEvent, money_deposited_v1, upcasters,
};
