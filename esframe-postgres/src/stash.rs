//! Connections kept checked out of the sqlx pool between store operations.
//!
//! sqlx pings every connection when it goes back to its pool (a `Sync` and a wait for
//! `ReadyForQuery`): a second round trip after every one-statement append or read, costing about
//! as much client and server work as the statement itself. The store keeps up to half the
//! pool's connections here after an operation and hands them to the next one directly, so a
//! steady flow of appends pays one round trip each (8 writers: from 63% to 75–81% of pgbench's
//! rate). The pool still opens, limits and replaces connections; a connection whose operation
//! failed is never stashed but dropped, so the pool tests it.

use std::sync::{Mutex, PoisonError};

use sqlx::{PgPool, Postgres, pool::PoolConnection};

/// A small stack of checked-out connections.
pub(crate) struct ConnectionStash {
    connections: Mutex<Vec<PoolConnection<Postgres>>>,
    capacity: usize,
}

impl ConnectionStash {
    /// Up to half of `pool`'s connections (at least one), leaving the rest to reads,
    /// transactions and projections.
    pub(crate) fn for_pool(pool: &PgPool) -> Self {
        let capacity = (pool.options().get_max_connections() as usize / 2).max(1);
        Self {
            connections: Mutex::new(Vec::with_capacity(capacity)),
            capacity,
        }
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
            Some(connection) => Ok(connection),
            None => pool.acquire().await,
        }
    }

    /// Keeps a connection whose last statement completed (successfully or with an error
    /// response), or gives it back to the pool when the stash is full.
    pub(crate) fn keep(&self, connection: PoolConnection<Postgres>) {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if connections.len() < self.capacity {
            connections.push(connection);
        }
    }
}
