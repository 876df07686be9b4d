//! Connections kept checked out of the sqlx pool between store operations.
//!
//! sqlx pings every connection when it goes back to its pool (a `Sync` and a wait for
//! `ReadyForQuery`): a second round trip after every one-statement append or read, costing about
//! as much client and server work as the statement itself. The store keeps some connections here
//! after an operation and hands them to the next one directly, so a steady flow of appends pays
//! one round trip each (8 writers: from 63% to about 79% of pgbench's rate).
//!
//! The stash never starves the pool's other users: it holds at most half the pool, only keeps a
//! connection while the pool still has an idle one, and gives back every connection it has not
//! reused within [`MAX_IDLE`]. The pool still opens, limits and replaces connections; a
//! connection whose operation failed is never stashed but dropped, so the pool tests it.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use sqlx::{PgPool, Postgres, pool::PoolConnection};

use crate::listener::BackgroundTask;

/// How long a stashed connection may wait for reuse before it goes back to the pool.
pub(crate) const MAX_IDLE: Duration = Duration::from_millis(100);

/// Stashed connections with the time each was put back, oldest first.
type Stashed = Arc<Mutex<Vec<(PoolConnection<Postgres>, Instant)>>>;

/// A small stack of checked-out connections, newest on top.
pub(crate) struct ConnectionStash {
    connections: Stashed,
    capacity: usize,
    sweeper: BackgroundTask,
}

impl ConnectionStash {
    /// Up to half of `pool`'s connections (at least one). Starts the sweeper, so it must be
    /// called inside a tokio runtime.
    pub(crate) fn for_pool(pool: &PgPool) -> Self {
        let capacity = (pool.options().get_max_connections() as usize / 2).max(1);
        let stash = Self {
            connections: Arc::new(Mutex::new(Vec::with_capacity(capacity))),
            capacity,
            sweeper: BackgroundTask::default(),
        };
        stash.sweeper.ensure_running(|| {
            let connections = Arc::downgrade(&stash.connections);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(MAX_IDLE).await;
                    let Some(connections) = connections.upgrade() else {
                        return;
                    };
                    // The oldest are at the bottom of the stack.
                    let stale: Vec<_> = {
                        let mut connections =
                            connections.lock().unwrap_or_else(PoisonError::into_inner);
                        let fresh = connections
                            .iter()
                            .position(|(_, since)| since.elapsed() < MAX_IDLE)
                            .unwrap_or(connections.len());
                        connections.drain(..fresh).collect()
                    };
                    // Dropped outside the lock: each goes back to the pool.
                    drop(stale);
                }
            })
        });
        stash
    }

    /// A stashed connection, or one from the pool.
    pub(crate) async fn acquire(
        &self,
        pool: &PgPool,
    ) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let stashed = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match stashed {
            Some((connection, _)) => Ok(connection),
            None => pool.acquire().await,
        }
    }

    /// Keeps a connection whose last statement completed (successfully or with an error
    /// response), unless the stash is full or the pool has no idle connection left (someone may
    /// be waiting for one): then it goes back to the pool.
    pub(crate) fn keep(&self, connection: PoolConnection<Postgres>, pool: &PgPool) {
        if pool.num_idle() == 0 && pool.size() >= pool.options().get_max_connections() {
            return;
        }
        {
            let mut connections = self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if connections.len() >= self.capacity {
                return;
            }
            connections.push((connection, Instant::now()));
        }
    }
}
