//! The bank-account example.
//!
//! - `cargo run --example bank_account`: on the in-memory store.
//! - `cargo run --example bank_account -- --postgres`: on PostgreSQL at `DATABASE_URL`
//!   (default `postgres://postgres@127.0.0.1:5432/test`), in the schema `esframe_demo`, created on
//!   first use. Each run uses new account ids, so it can be run again and again.

use esframe_examples::bank_account::{MemoryBalances, PgBalances, run_demo, upcasters};
use esframe_memory::{MemoryCheckpoints, MemoryStore};
use esframe_postgres::PgEventStore;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let run = &run[run.len() - 6..];
    if std::env::args().any(|arg| arg == "--postgres") {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        // ANCHOR: postgres
        let pool = PgEventStore::pool_options()
            .connect(&url)
            .await
            .map_err(|err| format!("cannot reach PostgreSQL at {url}: {err}"))?;
        let store = PgEventStore::builder(pool)
            .schema("esframe_demo")?
            .upcasters(upcasters())
            .build()
            .await?;
        // The balances read model lives in the same schema, and its checkpoint too,
        // so each change to it commits with the checkpoint (exactly once).
        let pool = store.pool().clone();
        let balances = PgBalances::create(pool, "esframe_demo").await?;
        let checkpoints = store.checkpoints();
        // ANCHOR_END: postgres
        println!("esframe bank account (PostgreSQL at {url}, schema esframe_demo)\n");
        run_demo(store, checkpoints, balances, run, &mut std::io::stdout()).await?;
    } else {
        println!("esframe bank account (in-memory store)\n");
        run_demo(
            MemoryStore::with_upcasters(upcasters()),
            MemoryCheckpoints::new(),
            MemoryBalances::default(),
            run,
            &mut std::io::stdout(),
        )
        .await?;
    }
    Ok(())
}
