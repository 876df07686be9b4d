//! The bank account as an HTTP service: a small JSON API on axum. Run it with
//! `cargo run --example http_service` (see `examples/http_service/main.rs`).
//!
//! | route | body | success |
//! |---|---|---|
//! | `POST /accounts` | `{"owner": "Ada"}`, optionally `"id"` | 201 [`Written`], `Location` |
//! | `POST /accounts/{id}/deposits` | `{"amount": 250}` (cents) | 200 [`Written`] |
//! | `POST /accounts/{id}/withdrawals` | `{"amount": 100}` (cents) | 200 [`Written`] |
//! | `GET /accounts/{id}[?min_position=N]` | | 200 [`AccountView`] |
//!
//! Guarantees:
//! - **Writes go through the aggregate, reads through the read model.** The `POST` routes run
//!   one command each; `GET` reads the balances read model, which a projection keeps up to date
//!   in the background, never the aggregate.
//! - **Read-your-writes on request.** A write answers with the global `position` of its last
//!   event; a `GET` with `?min_position=<position>` answers only once the read model has
//!   processed it (waiting up to the read timeout, then 503 `read_model_behind`). Without
//!   `min_position` a `GET` answers at once, possibly from before recent writes.
//! - **Correlation.** Each request's `x-correlation-id` (a UUID; a new one if absent) is in its
//!   tracing span, in the metadata of every event it stores, and in the response's header
//!   ([`correlate`]).
//! - **Optimistic concurrency on request.** A deposit or withdrawal with `Expected-Version: N`
//!   (a `version` from an earlier answer) is stored only if the account is at version N, checked
//!   atomically with the write; else 409 `version_mismatch` ([`CheckedAccount`]).
//! - **Typed errors.** Every failure is an [`ApiError`]: `{"error": "...", "code": "...", ...}`
//!   with 400 for bad input (JSON, id, amount, headers), 404 for an unknown account, 409 for a
//!   concurrency conflict (or an account opened twice), 422 for a refusal by the account's
//!   rules (a zero amount, an overdraft), 503 when the store or the read model is unavailable.

mod app;
mod backend;
mod correlation;
mod errors;
mod expected_version;
mod routes;

pub use app::{DEFAULT_READ_TIMEOUT, HttpService};
pub use backend::Backend;
pub use correlation::{CORRELATION_ID, CorrelationId, correlate};
pub use errors::ApiError;
pub use expected_version::{CheckedAccount, CheckedCommand, CheckedError, EXPECTED_VERSION};
pub use routes::{AccountView, Amount, OpenAccount, ReadQuery, Written};
