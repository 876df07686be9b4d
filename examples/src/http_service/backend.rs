//! [`Backend`]: the store, the projection checkpoints and the balances read model a service runs
//! on, in memory or in PostgreSQL.

use esframe_memory::{MemoryCheckpoints, MemoryStore};
use esframe_postgres::{PgCheckpoints, PgEventStore};
use sqlx::PgPool;

use crate::bank_account::{MemoryBalances, PgBalances, upcasters};

/// What the service stores its events in and reads its balances from.
#[derive(Debug, Clone)]
pub struct Backend<S, C, B> {
    /// The event store the commands write to.
    pub store: S,
    /// Where the balances projection keeps its checkpoint.
    pub checkpoints: C,
    /// The balances read model the `GET` route reads.
    pub balances: B,
}

impl Backend<MemoryStore, MemoryCheckpoints, MemoryBalances> {
    /// Everything in memory, gone when the process ends.
    pub fn memory() -> Self {
        Self {
            store: MemoryStore::with_upcasters(upcasters()),
            checkpoints: MemoryCheckpoints::new(),
            balances: MemoryBalances::default(),
        }
    }
}

impl Backend<PgEventStore, PgCheckpoints, PgBalances> {
    /// Everything in the PostgreSQL schema `schema` (created on first use): the events, the
    /// checkpoint, and the read model's table, which commits with the checkpoint (exactly once).
    pub async fn postgres(
        pool: PgPool,
        schema: &str,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let store = PgEventStore::builder(pool.clone())
            .schema(schema)?
            .upcasters(upcasters())
            .build()
            .await?;
        let balances = PgBalances::create(pool, schema).await?;
        Ok(Self {
            checkpoints: store.checkpoints(),
            store,
            balances,
        })
    }
}
