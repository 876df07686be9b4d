//! The order flow run by a process manager, on the in-memory store or on PostgreSQL:
//! `cargo run --example orders`, or `cargo run --example orders -- --postgres` (on
//! `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`, schema `esframe_demo`).

use esframe_core::process::Clock;
use esframe_examples::orders::{OrderFulfilment, OrderServices, run_demo};
use esframe_memory::{MemoryCheckpoints, MemoryProcessStore, MemoryStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .init();
    let run = uuid::Uuid::now_v7().simple().to_string();
    let run = &run[run.len() - 6..];
    // Timers are due by a manual clock, so the payment timeout is shown without waiting.
    let clock = Clock::manual(chrono::Utc::now());
    let process = OrderFulfilment::default();
    let report = if std::env::args().any(|arg| arg == "--postgres") {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let pool = esframe_postgres::PgEventStore::pool_options()
            .connect(&url)
            .await
            .map_err(|err| format!("cannot reach PostgreSQL at {url}: {err}"))?;
        let store = esframe_postgres::PgEventStore::builder(pool)
            .schema("esframe_demo")?
            .build()
            .await?;
        println!("order flows on PostgreSQL ({url}, schema esframe_demo)\n");
        let services = OrderServices::new(store.clone());
        let runner = services.runner(
            process,
            esframe_postgres::PgProcessStore::new(&store)?,
            clock,
        )?;
        let running = runner.spawn();
        let report = run_demo(&services, &runner, run).await;
        running.stop().await?;
        report?
    } else {
        println!("order flows on the in-memory store\n");
        let store = MemoryStore::new();
        let services = OrderServices::new(store.clone());
        let process_store = MemoryProcessStore::new(store, MemoryCheckpoints::new());
        let runner = services.runner(process, process_store, clock)?;
        let running = runner.spawn();
        let report = run_demo(&services, &runner, run).await;
        running.stop().await?;
        report?
    };
    print!("{report}");
    Ok(())
}
