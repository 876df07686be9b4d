//! Running an operation on a connection, and running it again on another when the first turns
//! out to be dead (a database restart, a killed session), with a jittered, growing wait between
//! tries so that a restart of a few seconds is ridden out.

use std::time::Duration;

use tokio::time::Instant;

/// The first wait after a lost connection.
const FIRST_WAIT: Duration = Duration::from_millis(10);

/// The longest wait between two tries.
const MAX_WAIT: Duration = Duration::from_millis(500);

/// The waits between the tries of one operation whose connections keep dying.
#[derive(Debug)]
pub(crate) struct Reconnect {
    budget: Duration,
    started: Option<Instant>,
    /// How many times the operation could not get or keep a connection.
    lost: u32,
    /// Whether a connection died while a statement of the operation was on it, so that the
    /// statement may have run (for an append: may have committed).
    pub(crate) interrupted: bool,
}

impl Reconnect {
    /// Tries again for up to `budget` after the first lost connection.
    pub(crate) fn within(budget: Duration) -> Self {
        Self {
            budget,
            started: None,
            lost: 0,
            interrupted: false,
        }
    }

    /// After a lost connection: waits (a random time up to a bound that doubles from 10 ms to
    /// 500 ms) and returns `true` to try again, or `false` once the budget is spent.
    pub(crate) async fn wait(&mut self) -> bool {
        let started = *self.started.get_or_insert_with(Instant::now);
        self.lost += 1;
        let bound = FIRST_WAIT
            .saturating_mul(1 << self.lost.saturating_sub(1).min(16))
            .min(MAX_WAIT);
        // Jitter: half the bound plus a random share of the other half, so that the store's
        // operations do not reconnect in lockstep.
        let half = bound / 2;
        let wait = half + half.mul_f64(fastrand::f64());
        let left = self.budget.saturating_sub(started.elapsed());
        if left.is_zero() {
            return false;
        }
        tokio::time::sleep(wait.min(left)).await;
        true
    }
}

/// Runs `$op` with `$conn: &mut PgConnection`, a kept or pooled connection, and hands the
/// connection back ([`PgEventStore::release`](crate::PgEventStore)). `$op` gives a
/// `Result<_, Failure>`. If no connection can be had, or the one used turns out to be dead (a
/// database restart, say: [`Failure::connection_lost`](crate::error::Failure::connection_lost)),
/// runs it again on another after a backoff ([`Reconnect`]; a connection that died under `$op`
/// sets `$reconnect.interrupted`), until the store's reconnect budget is spent. Only for
/// operations that may run twice: reads, and appends (idempotent by event id).
macro_rules! on_connection {
    ($store:ident, $reconnect:ident, |$conn:ident| $op:expr) => {
        loop {
            let failure = match $store.connection().await {
                Ok(mut held) => {
                    let result: Result<_, $crate::error::Failure> = {
                        let $conn: &mut ::sqlx::PgConnection = &mut held;
                        $op
                    };
                    match result {
                        Err(failure) if failure.connection_lost() => {
                            $reconnect.interrupted = true;
                            failure
                        }
                        result => break $store.release(held, result),
                    }
                }
                Err(err) => $crate::error::Failure::Db(err),
            };
            if !(failure.connection_lost() && $reconnect.wait().await) {
                break Err(failure);
            }
            tracing::debug!("connection lost; running again on another");
        }
    };
    ($store:ident, |$conn:ident| $op:expr) => {{
        let mut reconnect = $store.reconnect();
        on_connection!($store, reconnect, |$conn| $op)
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_grow_and_stop_at_the_budget() {
        let mut reconnect = Reconnect::within(Duration::from_secs(2));
        let start = tokio::time::Instant::now();
        let mut tries = 0;
        while reconnect.wait().await {
            tries += 1;
        }
        let waited = start.elapsed();
        // About 2 s of waiting, spread over growing waits (not hundreds of instant retries).
        assert!(waited >= Duration::from_millis(1900), "{waited:?}");
        assert!(waited <= Duration::from_millis(2100), "{waited:?}");
        assert!((5..=20).contains(&tries), "{tries} tries");
    }
}
