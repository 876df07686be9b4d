//! Process managers on PostgreSQL: completed three-step orders per second through the order
//! process manager, against the same three commands sent directly by one client, and the
//! latency from `OrderPlaced` to `OrderConfirmed`.
//!
//! `cargo bench -p esframe-examples --bench process_managers` (PostgreSQL at `DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`). `ESFRAME_BENCH_ORDERS` sets the orders
//! per round (default 1,000), `ESFRAME_BENCH_ROUNDS` the paired rounds (default 5; medians and
//! the range of the ratio are printed).
//!
//! The three steps: the client places an order; the process manager reserves its stock
//! (`Inventory::Reserve`) when it sees `OrderPlaced`, and confirms the order when it sees
//! `StockReserved`, then completes the instance. The direct baseline is one client running
//! `Place`, `Reserve`, `Confirm` for each order in turn, on the same store and handlers.
//! Each round runs both, one after the other, on 16 products. Latency is measured in a
//! separate paced run (orders placed at a steady 200 per second), from the stored
//! `recorded_at` of `OrderPlaced` to that of `OrderConfirmed`.

use std::time::{Duration, Instant};

use esframe_core::{
    process::{Clock, Effects, Input, ProcessManager, ProcessRunner, ReactError, Route},
    projection::{ProjectedEvent, ProjectionEvents},
};
use esframe_examples::orders::{
    OrderServices,
    domain::{Inventory, InventoryCommand, InventoryEvent, Order, OrderCommand, OrderEvent},
};
use esframe_postgres::{PgEventStore, PgProcessStore};
use sqlx::AssertSqlSafe;

type Error = Box<dyn std::error::Error + Send + Sync>;

const SCHEMA: &str = "esframe_bench_process";
const PRODUCTS: u32 = 16;

/// The events of the three-step flow.
#[derive(Debug, Clone, PartialEq, ProjectionEvents)]
enum StepEvent {
    #[events(aggregate = Order)]
    Order(OrderEvent),
    #[events(aggregate = Inventory)]
    Inventory(InventoryEvent),
}

/// Place → reserve → confirm.
struct ThreeSteps;

impl ProcessManager for ThreeSteps {
    const NAME: &'static str = "three-steps";
    type Events = StepEvent;
    type State = ();
    type Timer = ();

    fn route(&self, event: &ProjectedEvent<'_, StepEvent>) -> Route {
        // The direct baseline's orders (`d…`) are not for the process manager.
        if event.aggregate_id().starts_with('d') {
            return Route::Skip;
        }
        match &event.event {
            StepEvent::Order(OrderEvent::OrderPlaced { .. }) => Route::start(event.aggregate_id()),
            StepEvent::Order(_) => Route::to(event.aggregate_id()),
            StepEvent::Inventory(InventoryEvent::StockReserved { order_id, .. })
                if !order_id.starts_with('d') =>
            {
                Route::to(order_id)
            }
            StepEvent::Inventory(_) => Route::Skip,
        }
    }

    fn evolve(&self, _: &mut (), _: &ProjectedEvent<'_, StepEvent>) {}

    fn react(
        &self,
        _: &(),
        input: Input<'_, Self>,
        effects: &mut Effects<Self>,
    ) -> Result<(), ReactError> {
        let Input::Event(event) = input else {
            return Err("this flow has no timers and no refusals".into());
        };
        match &event.event {
            StepEvent::Order(OrderEvent::OrderPlaced { sku, quantity, .. }) => {
                effects.send::<Inventory>(InventoryCommand::Reserve {
                    sku: sku.clone(),
                    order_id: event.aggregate_id().to_owned(),
                    quantity: *quantity,
                });
            }
            StepEvent::Inventory(InventoryEvent::StockReserved { order_id, .. }) => {
                effects.send::<Order>(OrderCommand::Confirm {
                    order_id: order_id.clone(),
                });
            }
            StepEvent::Order(OrderEvent::OrderConfirmed) => effects.complete(),
            _ => {}
        }
        Ok(())
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Error> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(&url))
}

async fn run(url: &str) -> Result<(), Error> {
    let orders = env_number("ESFRAME_BENCH_ORDERS", 1_000) as u32;
    let rounds = env_number("ESFRAME_BENCH_ROUNDS", 5).max(1);
    let pool = PgEventStore::pool_options()
        .max_connections(8)
        .connect(url)
        .await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await?;
    println!("esframe process-manager benchmark: PostgreSQL {version} at {url}");
    println!("{orders} three-step orders per round, {rounds} paired rounds\n");
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"
    )))
    .execute(&pool)
    .await?;
    let store = PgEventStore::builder(pool.clone())
        .schema(SCHEMA)?
        .build()
        .await?;
    let services = OrderServices::new(store.clone());
    for p in 0..PRODUCTS {
        services
            .inventory
            .execute(InventoryCommand::Restock {
                sku: format!("p{p}"),
                quantity: 100_000_000,
            })
            .await?;
    }
    let runner = ProcessRunner::builder(ThreeSteps, PgProcessStore::new(&store)?)
        .handler(services.orders.clone())
        .handler(services.inventory.clone())
        .clock(Clock::system())
        .build()?;
    let running = runner.spawn();

    let mut pairs = Vec::new();
    for round in 0..rounds {
        let direct = direct(&services, round, orders).await?;
        let managed = managed(&services, &runner, round, orders).await?;
        println!(
            "  round {}: direct {direct:>7.0} orders/s   process manager {managed:>7.0} orders/s   {:>5.1}%",
            round + 1,
            100.0 * managed / direct
        );
        pairs.push((managed, direct));
    }
    let ratios: Vec<f64> = pairs.iter().map(|(m, d)| 100.0 * m / d).collect();
    let (min, max) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    println!(
        "\n  completed orders/s: process manager {:.0}, direct {:.0}: {:.1}% of direct ({min:.1}..{max:.1}); target 50%",
        median(pairs.iter().map(|p| p.0).collect()),
        median(pairs.iter().map(|p| p.1).collect()),
        median(ratios),
    );

    let latencies = paced(&services, &runner, &pool, orders.min(1_000)).await?;
    println!(
        "  OrderPlaced → OrderConfirmed at 200 orders/s: median {:.1} ms, p99 {:.1} ms ({} orders)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.len()
    );
    running.stop().await?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    let i = ((sorted_ms.len() as f64 - 1.0) * p).round() as usize;
    sorted_ms[i.min(sorted_ms.len() - 1)]
}

fn sku(n: u32) -> String {
    format!("p{}", n % PRODUCTS)
}

/// One client, three commands per order, one after the other.
async fn direct(
    services: &OrderServices<PgEventStore>,
    round: u64,
    orders: u32,
) -> Result<f64, Error> {
    let started = Instant::now();
    for n in 0..orders {
        let order_id = format!("d{round}-{n}");
        services
            .orders
            .execute(OrderCommand::Place {
                order_id: order_id.clone(),
                sku: sku(n),
                quantity: 1,
                amount: 100,
            })
            .await?;
        services
            .inventory
            .execute(InventoryCommand::Reserve {
                sku: sku(n),
                order_id: order_id.clone(),
                quantity: 1,
            })
            .await?;
        services
            .orders
            .execute(OrderCommand::Confirm { order_id })
            .await?;
    }
    Ok(f64::from(orders) / started.elapsed().as_secs_f64())
}

/// One client places the orders; the process manager does the rest. Timed until every
/// instance has completed.
async fn managed(
    services: &OrderServices<PgEventStore>,
    runner: &ProcessRunner<ThreeSteps, PgProcessStore>,
    round: u64,
    orders: u32,
) -> Result<f64, Error> {
    let before = runner.status().counts.completed;
    let started = Instant::now();
    for n in 0..orders {
        services
            .place(&format!("m{round}-{n}"), &sku(n), 1, 100)
            .await?;
    }
    while runner.status().counts.completed < before + u64::from(orders) {
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("orders not completed: {:?}", runner.status()).into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(f64::from(orders) / started.elapsed().as_secs_f64())
}

/// Orders placed at 200 per second; returns the sorted latencies (ms) from the stored
/// `OrderPlaced` to the stored `OrderConfirmed`.
async fn paced(
    services: &OrderServices<PgEventStore>,
    runner: &ProcessRunner<ThreeSteps, PgProcessStore>,
    pool: &sqlx::PgPool,
    orders: u32,
) -> Result<Vec<f64>, Error> {
    let before = runner.status().counts.completed;
    let started = Instant::now();
    for n in 0..orders {
        let due = started + Duration::from_millis(u64::from(n) * 5);
        tokio::time::sleep_until(due.into()).await;
        services.place(&format!("l-{n}"), &sku(n), 1, 100).await?;
    }
    while runner.status().counts.completed < before + u64::from(orders) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut latencies: Vec<f64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT extract(epoch FROM c.recorded_at - p.recorded_at)::float8 * 1000
         FROM {SCHEMA}.events p JOIN {SCHEMA}.events c
           ON c.aggregate_type = 'order' AND c.aggregate_id = p.aggregate_id
          AND c.event_type = 'OrderConfirmed'
         WHERE p.aggregate_type = 'order' AND p.event_type = 'OrderPlaced'
           AND p.aggregate_id LIKE 'l-%'"
    )))
    .fetch_all(pool)
    .await?;
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}
