//! Beginning a transaction so that cancelling the caller cannot leave a pooled connection inside
//! it.
//!
//! sqlx 0.9's `Pool::begin` is not cancel-safe: dropped after `BEGIN` was sent and before its
//! answer was read, it gives the connection back to the pool still inside the transaction, with
//! nothing to roll it back (its guard only rolls back once the transaction is counted, which
//! happens after the answer). The pool hands that connection to its next user, whose statements
//! then run inside a transaction nobody commits: an append there "succeeds" and is lost when the
//! connection closes, the next append on it collides on `global_position` (one transaction id),
//! and the open transaction holds the log's horizon back, stalling every reader. A runner,
//! publisher or process manager whose task is aborted can do that. Tested by
//! `tests/cancellation.rs`, which fails within a few hundred aborts with `pool.begin()`.

use std::time::Duration;

use sqlx::PgPool;

use crate::PgTransaction;

/// Begins a transaction on a connection of `pool`. The `BEGIN` runs in a task of its own, which
/// cancelling the caller does not stop: if the caller is gone when it has finished, the
/// transaction is dropped there, and rolled back, like any other.
pub(crate) async fn begin(pool: &PgPool) -> Result<PgTransaction, sqlx::Error> {
    let pool = pool.clone();
    match tokio::spawn(async move { pool.begin().await }).await {
        Ok(begun) => begun,
        Err(stopped) => Err(sqlx::Error::Protocol(format!(
            "the task beginning a transaction stopped: {stopped}"
        ))),
    }
}

/// [`begin`], with the server ending the session if the transaction sits idle (no statement
/// running) for `idle`: a process paused in the middle of a transaction (`SIGSTOP`, a long GC)
/// loses its transaction and its locks after that long, instead of holding them for the whole
/// pause. Set in the `BEGIN` round trip itself.
pub(crate) async fn begin_bounded(
    pool: &PgPool,
    idle: Duration,
) -> Result<PgTransaction, sqlx::Error> {
    let pool = pool.clone();
    let millis = idle.as_millis().clamp(1, i32::MAX as u128);
    let statement = format!("BEGIN; SET LOCAL idle_in_transaction_session_timeout = {millis}");
    match tokio::spawn(async move { pool.begin_with(sqlx::AssertSqlSafe(statement)).await }).await {
        Ok(begun) => begun,
        Err(stopped) => Err(sqlx::Error::Protocol(format!(
            "the task beginning a transaction stopped: {stopped}"
        ))),
    }
}
