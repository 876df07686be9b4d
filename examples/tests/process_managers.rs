//! Process managers, tested through the order flow (`esframe_examples::orders`) on the memory
//! store and on the PostgreSQL at `DATABASE_URL` (a fresh schema per test): the scenarios,
//! tombstones, quarantine, state versions, 1,000 concurrent orders, a runner killed at random
//! points, and two runners with one taking over.

#[path = "../../esframe-postgres/tests/common/mod.rs"]
mod common;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use esframe_core::{
    CommandContext, EventStore, ExpectedVersion, GlobalLog, NewEvent, Position, RecordedEvent,
    StreamId,
    process::{
        Clock, InstanceStatus, ProcessError, ProcessManager, ProcessRunner, ProcessRunnerBuilder,
        ProcessStore,
    },
};
use esframe_examples::orders::{
    OrderFulfilment, OrderServices, Stage,
    domain::{InventoryCommand, OrderCommand, PaymentCommand},
};
use esframe_memory::{MemoryCheckpoints, MemoryProcessStore, MemoryStore};
use esframe_postgres::{PgEventStore, PgProcessStore};
use futures_util::StreamExt;
use tokio::task::JoinHandle;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// Every aggregate the order flow sends commands to.
const ALL: &[&str] = &["order", "inventory", "payment", "shipment"];

/// What the payment provider answers for an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Capture,
    Decline,
    Never,
}

/// The shop under test: the four aggregates' handlers, the runner, its manual clock.
struct Shop<E: EventStore, S: ProcessStore> {
    store: E,
    services: OrderServices<E>,
    process_store: S,
    clock: Clock,
}

impl<E: EventStore + GlobalLog, S: ProcessStore> Shop<E, S> {
    fn runner(&self) -> ProcessRunner<OrderFulfilment, S> {
        self.services
            .runner(
                OrderFulfilment::default(),
                self.process_store.clone(),
                self.clock.clone(),
            )
            .expect("a valid runner")
    }

    /// A builder with the handlers of `aggregates` only (some of `ALL`), the shop's clock and
    /// retries a few milliseconds apart.
    fn builder(&self, aggregates: &[&str]) -> ProcessRunnerBuilder<OrderFulfilment, S> {
        let mut builder =
            ProcessRunner::builder(OrderFulfilment::default(), self.process_store.clone())
                .clock(self.clock.clone())
                .backoff(esframe_core::publish::Backoff {
                    min: Duration::from_millis(1),
                    max: Duration::from_millis(5),
                });
        let services = &self.services;
        for aggregate in aggregates {
            builder = match *aggregate {
                "order" => builder.handler(services.orders.clone()),
                "inventory" => builder.handler(services.inventory.clone()),
                "payment" => builder.handler(services.payments.clone()),
                "shipment" => builder.handler(services.shipments.clone()),
                other => panic!("no aggregate {other}"),
            };
        }
        builder
    }

    async fn restock(&self, sku: &str, quantity: u32) {
        self.services
            .inventory
            .execute(InventoryCommand::Restock {
                sku: sku.into(),
                quantity,
            })
            .await
            .expect("restock");
    }

    /// Answers every payment request as `rule` says for its order id, following the log.
    fn gateway(&self, rule: impl Fn(&str) -> Answer + Send + Sync + 'static) -> JoinHandle<()> {
        let store = self.store.clone();
        let payments = self.services.payments.clone();
        tokio::spawn(async move {
            let mut after = Position::START;
            loop {
                let mut log = store.subscribe(after);
                while let Some(event) = log.next().await {
                    let Ok(event) = event else { break };
                    after = event.global_position;
                    if event.event_type != "PaymentRequested" {
                        continue;
                    }
                    let order_id = event.aggregate_id().to_owned();
                    let command = match rule(&order_id) {
                        Answer::Capture => PaymentCommand::Capture { order_id },
                        Answer::Decline => PaymentCommand::Decline {
                            order_id,
                            reason: "card declined".into(),
                        },
                        Answer::Never => continue,
                    };
                    let context = CommandContext::new()
                        .command_id(Uuid::new_v5(&event.event_id, b"answer"))
                        .correlation_id(event.metadata.correlation_id.unwrap_or(event.event_id))
                        .causation_id(event.event_id);
                    // Transient failures (a connection killed by a test) are tried again; a
                    // refusal (the payment expired first) is an answer too late.
                    for _ in 0..100 {
                        match payments
                            .execute_with(command.clone(), context.clone())
                            .await
                        {
                            Ok(_) | Err(esframe_core::CommandError::Rejected(_)) => break,
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }
}

fn memory_shop() -> Shop<MemoryStore, MemoryProcessStore> {
    let store = MemoryStore::new();
    Shop {
        services: OrderServices::new(store.clone()),
        process_store: MemoryProcessStore::new(store.clone(), MemoryCheckpoints::new()),
        store,
        clock: Clock::manual(chrono::Utc::now()),
    }
}

async fn pg_store(label: &str, app: Option<&str>) -> PgEventStore {
    let pool = common::pool(4).await;
    let schema = common::fresh_schema(&pool, label).await;
    pool.close().await;
    let mut options: sqlx::postgres::PgConnectOptions =
        common::database_url().parse().expect("a database URL");
    if let Some(app) = app {
        options = options.application_name(app);
    }
    let pool = PgEventStore::pool_options()
        .max_connections(24)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .expect("connect");
    PgEventStore::builder(pool)
        .schema(schema)
        .expect("valid schema")
        .poll_interval(Duration::from_millis(100))
        .build()
        .await
        .expect("open the store")
}

async fn pg_shop(label: &str) -> Shop<PgEventStore, PgProcessStore> {
    pg_shop_named(label, None).await
}

async fn pg_shop_named(label: &str, app: Option<&str>) -> Shop<PgEventStore, PgProcessStore> {
    let store = pg_store(label, app).await;
    Shop {
        services: OrderServices::new(store.clone()),
        process_store: PgProcessStore::new(&store).expect("no inline projections"),
        store,
        clock: Clock::manual(chrono::Utc::now()),
    }
}

/// The events of one stream, as type names.
async fn types_of(store: &impl EventStore, aggregate: &str, id: &str) -> Vec<String> {
    store
        .read_stream(&StreamId::new(aggregate, id).expect("valid"), 1)
        .await
        .expect("read")
        .into_iter()
        .map(|e| e.event_type.to_string())
        .collect()
}

/// Waits until `done` holds for the runner's status, advancing the clock by `tick` between
/// looks (if given).
async fn wait_until<P: esframe_core::process::ProcessManager, S: ProcessStore>(
    runner: &ProcessRunner<P, S>,
    tick: Option<Duration>,
    mut done: impl FnMut(&esframe_core::process::ProcessStatus) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = runner.status();
        if done(&status) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out; runner status: {status:?}"
        );
        if let Some(tick) = tick {
            runner.clock().advance(tick);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// --- The scenarios --------------------------------------------------------------------------

async fn scenarios<E: EventStore + GlobalLog, S: ProcessStore>(shop: Shop<E, S>) {
    let runner = shop.runner();
    let running = runner.spawn();
    let report = esframe_examples::orders::run_demo(&shop.services, &runner, "t")
        .await
        .expect("the demo runs");
    running.stop().await.expect("the runner stops cleanly");
    let expect = [
        (
            "order-1-t",
            Stage::Confirmed,
            vec!["PaymentRequested", "PaymentCaptured"],
            1,
        ),
        (
            "order-2-t",
            Stage::Cancelled,
            vec!["PaymentRequested", "PaymentDeclined"],
            0,
        ),
        (
            "order-3-t",
            Stage::Cancelled,
            vec!["PaymentRequested", "PaymentExpired"],
            0,
        ),
        ("order-4-t", Stage::Cancelled, vec![], 0),
    ];
    for (order, stage, payment, shipped) in expect {
        let instance = runner.instance(order).await.unwrap().expect("an instance");
        assert_eq!(instance.state.stage, stage, "{order}: {report}");
        assert_eq!(instance.record.status, InstanceStatus::Completed, "{order}");
        assert_eq!(
            types_of(&shop.store, "payment", order).await,
            payment,
            "{order}"
        );
        assert_eq!(
            types_of(&shop.store, "shipment", order).await.len(),
            shipped
        );
        assert!(
            runner.timers(order).await.unwrap().is_empty(),
            "{order}: timers left"
        );
    }
    let stock = shop.services.inventory.load("book-t").await.unwrap().state;
    assert_eq!(stock.available, 8, "2 units confirmed, the others released");
    assert_eq!(
        stock.reserved,
        BTreeMap::from([("order-1-t".to_owned(), 2)])
    );
    // Correlation and causation flowed: every event of order 1's flow carries its id, and
    // each was caused by the one before it (a chain of seven, the customer notice last).
    let flow = runner
        .instance("order-1-t")
        .await
        .unwrap()
        .unwrap()
        .record
        .correlation_id;
    let trace = runner.trace(flow).await.unwrap();
    let types: Vec<&str> = trace.iter().map(|e| e.event_type.as_ref()).collect();
    assert_eq!(
        types,
        [
            "OrderPlaced",
            "StockReserved",
            "PaymentRequested",
            "PaymentCaptured",
            "ShipmentPrepared",
            "OrderConfirmed",
            "OrderOnItsWay"
        ]
    );
    for pair in trace.windows(2) {
        assert_eq!(pair[1].metadata.correlation_id, Some(flow));
        assert_eq!(
            pair[1].metadata.causation_id,
            Some(pair[0].event_id),
            "{} was caused by {}",
            pair[1].event_type,
            pair[0].event_type
        );
    }
    assert!(
        report.contains("└─ OrderConfirmed [order/order-1-t v2]"),
        "{report}"
    );
    assert!(
        report.contains("└─ OrderCancelled [order/order-4-t v2]"),
        "{report}"
    );
}

#[tokio::test]
async fn the_scenarios_end_as_they_should_in_memory() {
    scenarios(memory_shop()).await;
}

#[tokio::test]
async fn the_scenarios_end_as_they_should_on_postgres() {
    scenarios(pg_shop("pm_scenarios").await).await;
}

// --- Tombstones and routing -------------------------------------------------------------------

async fn tombstones<E: EventStore + GlobalLog, S: ProcessStore>(shop: Shop<E, S>) {
    shop.restock("pen", 5).await;
    let runner = shop.runner();
    let running = runner.spawn();
    let flow = shop.services.place("o1", "pen", 1, 100).await.unwrap();
    runner
        .wait_for_instance("o1", WAIT, |i| i.state.stage == Stage::Paying)
        .await
        .unwrap();
    shop.services.answer_payment("o1", true).await.unwrap();
    runner
        .wait_for_instance("o1", WAIT, |i| i.record.status == InstanceStatus::Completed)
        .await
        .unwrap();
    runner.wait_settled(flow, WAIT).await.unwrap();
    let stored = runner.store().log().head_position().await.unwrap();

    // A late event for the completed order, and an `OrderPlaced` again under its id (a rule
    // that may start instances): counted no-ops, nothing sent.
    let late = |event_type: &str, payload: serde_json::Value| NewEvent {
        event_id: Uuid::now_v7(),
        event_type: event_type.to_owned().into(),
        schema_version: 1,
        payload,
        metadata: Default::default(),
    };
    let payment = StreamId::new("payment", "o1").unwrap();
    let order = StreamId::new("order", "o1").unwrap();
    shop.store
        .append(
            &payment,
            ExpectedVersion::Any,
            vec![late("PaymentCaptured", serde_json::json!({"amount": 100}))],
        )
        .await
        .unwrap();
    shop.store
        .append(
            &order,
            ExpectedVersion::Any,
            vec![late(
                "OrderPlaced",
                serde_json::json!({"sku": "pen", "quantity": 1, "amount": 100}),
            )],
        )
        .await
        .unwrap();
    // An event routed by a rule that never starts an instance, for an order that has none.
    shop.store
        .append(
            &StreamId::new("payment", "nobody").unwrap(),
            ExpectedVersion::Any,
            vec![late("PaymentCaptured", serde_json::json!({"amount": 1}))],
        )
        .await
        .unwrap();
    let head = runner.store().log().head_position().await.unwrap();
    wait_until(&runner, None, |s| s.position >= head).await;
    running.stop().await.unwrap();

    let status = runner.status();
    assert_eq!(status.counts.ignored, 2, "{status:?}");
    assert_eq!(status.counts.unrouted, 1, "{status:?}");
    assert_eq!(status.counts.started, 1, "{status:?}");
    let o1 = runner.instance("o1").await.unwrap().unwrap();
    assert_eq!(o1.record.status, InstanceStatus::Completed);
    assert_eq!(o1.record.ignored, 2);
    assert!(runner.instance("nobody").await.unwrap().is_none());
    // Nothing was sent: the log holds only the three appended events since.
    let after: Vec<RecordedEvent> = runner.store().log().read_all(stored, 100).await.unwrap();
    assert_eq!(after.len(), 3, "{after:?}");
}

#[tokio::test]
async fn a_completed_instance_is_a_tombstone_in_memory() {
    tombstones(memory_shop()).await;
}

#[tokio::test]
async fn a_completed_instance_is_a_tombstone_on_postgres() {
    tombstones(pg_shop("pm_tombstones").await).await;
}

// --- Quarantine --------------------------------------------------------------------------------

/// An order for a product whose id is too long to be a stream id: reserving it fails for a
/// reason that is not a refusal, every time.
fn poison_sku() -> String {
    "x".repeat(esframe_core::MAX_STREAM_ID_LEN + 1)
}

async fn quarantine<E: EventStore + GlobalLog, S: ProcessStore>(shop: Shop<E, S>) {
    shop.restock("pen", 1_000).await;
    let runner = shop.builder(ALL).max_attempts(3).build().unwrap();
    let running = runner.spawn();
    let gateway = shop.gateway(|_| Answer::Capture);
    shop.services
        .place("poison", &poison_sku(), 1, 100)
        .await
        .unwrap();
    for n in 0..100 {
        shop.services
            .place(&format!("o{n}"), "pen", 1, 100)
            .await
            .unwrap();
    }
    wait_until(&runner, None, |s| s.counts.completed == 100).await;

    let quarantined = runner.quarantined().await.unwrap();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    let poison = &quarantined[0];
    assert_eq!(poison.id, "poison");
    let error = poison.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("Reserve") && error.contains("the limit is 512"),
        "{error}"
    );
    // A later event of the poisoned flow is held, in order, not handled.
    shop.services
        .orders
        .execute(OrderCommand::Cancel {
            order_id: "poison".into(),
            reason: "given up".into(),
        })
        .await
        .unwrap();
    let head = runner.store().log().head_position().await.unwrap();
    wait_until(&runner, None, |s| s.position >= head).await;
    let poison = runner.instance("poison").await.unwrap().unwrap().record;
    assert_eq!(
        poison.held.len(),
        2,
        "the failing OrderPlaced and the cancellation: {poison:?}"
    );
    assert_eq!(poison.status, InstanceStatus::Quarantined);

    // Retrying fails again (nothing changes); discarding leaves a tombstone.
    let retried = runner.retry("poison").await;
    assert!(
        matches!(retried, Err(ProcessError::RetryFailed { .. })),
        "{retried:?}"
    );
    assert_eq!(runner.quarantined().await.unwrap().len(), 1);
    runner.discard("poison").await.unwrap();
    let poison = runner.instance("poison").await.unwrap().unwrap().record;
    assert_eq!(poison.status, InstanceStatus::Discarded);
    assert!(poison.held.is_empty());
    assert!(runner.quarantined().await.unwrap().is_empty());
    let again = runner.discard("poison").await;
    assert!(
        matches!(again, Err(ProcessError::NotQuarantined { .. })),
        "{again:?}"
    );
    running.stop().await.unwrap();
    gateway.abort();
    for n in 0..100 {
        let order = runner.instance(&format!("o{n}")).await.unwrap().unwrap();
        assert_eq!(order.state.stage, Stage::Confirmed, "o{n}");
    }
}

#[tokio::test]
async fn a_poison_instance_is_quarantined_while_100_others_complete_in_memory() {
    quarantine(memory_shop()).await;
}

#[tokio::test]
async fn a_poison_instance_is_quarantined_while_100_others_complete_on_postgres() {
    quarantine(pg_shop("pm_quarantine").await).await;
}

/// A runner deployed without the payment handler quarantines the flows that need it; a runner
/// with it retries them to the end.
#[tokio::test]
async fn a_quarantined_instance_retried_after_a_fix_completes() {
    let shop = memory_shop();
    shop.restock("pen", 10).await;
    let broken = shop
        .builder(&["order", "inventory"])
        .max_attempts(2)
        .build()
        .unwrap();
    shop.services.place("o1", "pen", 2, 100).await.unwrap();
    broken.run_until_idle().await.unwrap();
    let quarantined = broken.quarantined().await.unwrap();
    assert_eq!(quarantined.len(), 1);
    let error = quarantined[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("no command handler for aggregate type `payment`"),
        "{error}"
    );

    let fixed = shop.runner();
    let retried = fixed.retry("o1").await.unwrap();
    assert_eq!(retried.status, InstanceStatus::Active);
    assert!(retried.held.is_empty());
    let gateway = shop.gateway(|_| Answer::Capture);
    let running = fixed.spawn();
    fixed
        .wait_for_instance("o1", WAIT, |i| i.record.status == InstanceStatus::Completed)
        .await
        .unwrap();
    running.stop().await.unwrap();
    gateway.abort();
    assert_eq!(
        types_of(&shop.store, "order", "o1").await,
        ["OrderPlaced", "OrderConfirmed"]
    );
}

// --- State versions ----------------------------------------------------------------------------

/// The order flow with another state version: stored states of version 1 are rebuilt from
/// the instance's events.
struct Version2(OrderFulfilment);

impl esframe_core::process::ProcessManager for Version2 {
    const NAME: &'static str = OrderFulfilment::NAME;
    const STATE_VERSION: u32 = 2;
    type Events = <OrderFulfilment as esframe_core::process::ProcessManager>::Events;
    type State = <OrderFulfilment as esframe_core::process::ProcessManager>::State;
    type Timer = <OrderFulfilment as esframe_core::process::ProcessManager>::Timer;

    fn route(
        &self,
        event: &esframe_core::projection::ProjectedEvent<'_, Self::Events>,
    ) -> esframe_core::process::Route {
        self.0.route(event)
    }

    fn evolve(
        &self,
        state: &mut Self::State,
        event: &esframe_core::projection::ProjectedEvent<'_, Self::Events>,
    ) {
        self.0.evolve(state, event);
    }

    fn react(
        &self,
        state: &Self::State,
        input: esframe_core::process::Input<'_, Self>,
        effects: &mut esframe_core::process::Effects<Self>,
    ) -> Result<(), esframe_core::process::ReactError> {
        // The same decisions: re-wrap the input and effects of the inner process manager.
        let mut inner = esframe_core::process::Effects::<OrderFulfilment>::detached(effects.now());
        let input = match input {
            esframe_core::process::Input::Event(e) => esframe_core::process::Input::Event(e),
            esframe_core::process::Input::Timer(t) => esframe_core::process::Input::Timer(t),
            esframe_core::process::Input::Refused(r) => esframe_core::process::Input::Refused(r),
        };
        self.0.react(state, input, &mut inner)?;
        effects.absorb(inner);
        Ok(())
    }
}

#[tokio::test]
async fn a_new_state_version_rebuilds_running_instances_from_their_events() {
    let shop = memory_shop();
    shop.restock("pen", 10).await;
    shop.services.place("o1", "pen", 3, 100).await.unwrap();
    let v1 = shop.runner();
    v1.run_until_idle().await.unwrap();
    let stored = v1.instance("o1").await.unwrap().unwrap();
    assert_eq!(stored.record.state_version, 1);
    assert_eq!(stored.state.stage, Stage::Paying);

    let v2 = ProcessRunner::builder(
        Version2(OrderFulfilment::default()),
        shop.process_store.clone(),
    )
    .handler(shop.services.orders.clone())
    .handler(shop.services.inventory.clone())
    .handler(shop.services.payments.clone())
    .handler(shop.services.shipments.clone())
    .clock(shop.clock.clone())
    .build()
    .unwrap();
    shop.services.answer_payment("o1", true).await.unwrap();
    v2.run_until_idle().await.unwrap();
    let done = v2.instance("o1").await.unwrap().unwrap();
    assert_eq!(done.record.state_version, 2);
    assert_eq!(done.state.stage, Stage::Confirmed);
    // The shipment was prepared from the rebuilt state (sku and quantity come from
    // OrderPlaced, folded again under version 2).
    let shipment = shop
        .store
        .read_stream(&StreamId::new("shipment", "o1").unwrap(), 1)
        .await
        .unwrap();
    let payload = shipment[0].payload.value().unwrap().clone();
    assert_eq!(payload, serde_json::json!({"sku": "pen", "quantity": 3}));
}

// --- Many concurrent orders on PostgreSQL ------------------------------------------------------

/// A number from 0 to 99 that looks random but is the same for the same order.
fn dice(order_id: &str) -> u8 {
    let hash = Uuid::new_v5(&Uuid::NAMESPACE_OID, order_id.as_bytes());
    hash.as_bytes()[0] % 100
}

fn answer_for(order_id: &str) -> Answer {
    match dice(order_id) {
        0..=14 => Answer::Decline,
        15..=24 => Answer::Never,
        _ => Answer::Capture,
    }
}

/// Checks the end state of `orders` (order id → (sku, quantity)) after every flow ended:
/// stock balances exactly, every stream holds what its flow says once, and returns how many
/// orders were confirmed.
async fn check_end_state<E: EventStore + GlobalLog, S: ProcessStore>(
    shop: &Shop<E, S>,
    runner: &ProcessRunner<OrderFulfilment, S>,
    orders: &BTreeMap<String, (String, u32)>,
    restocked: u32,
) -> usize {
    let mut confirmed_units: BTreeMap<String, u32> = BTreeMap::new();
    let mut confirmed = 0;
    for (order_id, (sku, quantity)) in orders {
        let instance = runner
            .instance(order_id)
            .await
            .unwrap()
            .expect("an instance per order");
        assert_eq!(
            instance.record.status,
            InstanceStatus::Completed,
            "{order_id}: {instance:?}"
        );
        let order = types_of(&shop.store, "order", order_id).await;
        let payment = types_of(&shop.store, "payment", order_id).await;
        let shipment = types_of(&shop.store, "shipment", order_id).await;
        match order.as_slice() {
            [placed, confirmed_event]
                if placed == "OrderPlaced" && confirmed_event == "OrderConfirmed" =>
            {
                assert_eq!(
                    payment,
                    ["PaymentRequested", "PaymentCaptured"],
                    "{order_id}"
                );
                assert_eq!(shipment, ["ShipmentPrepared"], "{order_id}");
                *confirmed_units.entry(sku.clone()).or_default() += quantity;
                confirmed += 1;
            }
            [placed, cancelled] if placed == "OrderPlaced" && cancelled == "OrderCancelled" => {
                assert!(shipment.is_empty(), "{order_id}: {shipment:?}");
                assert!(
                    payment.is_empty()
                        || payment == ["PaymentRequested", "PaymentDeclined"]
                        || payment == ["PaymentRequested", "PaymentExpired"],
                    "{order_id}: {payment:?}"
                );
            }
            other => panic!("{order_id}: order stream {other:?}"),
        }
    }
    let skus: std::collections::BTreeSet<&String> = orders.values().map(|(s, _)| s).collect();
    for sku in skus {
        let stock = shop.services.inventory.load(sku).await.unwrap().state;
        let reserved: u32 = stock.reserved.values().sum();
        assert_eq!(stock.available + reserved, restocked, "{sku}: {stock:?}");
        assert_eq!(
            reserved,
            confirmed_units.get(sku).copied().unwrap_or(0),
            "{sku}"
        );
        for order_id in stock.reserved.keys() {
            assert_eq!(
                types_of(&shop.store, "order", order_id).await[1],
                "OrderConfirmed"
            );
        }
    }
    confirmed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_orders_balance_exactly_on_postgres() {
    let shop = pg_shop("pm_thousand").await;
    let skus: Vec<String> = (0..10).map(|i| format!("sku-{i}")).collect();
    for sku in &skus {
        shop.restock(sku, 150).await;
    }
    let runner = shop.runner();
    let running = runner.spawn();
    let gateway = shop.gateway(answer_for);
    let mut orders = BTreeMap::new();
    for n in 0..1_000u32 {
        let id = format!("o{n}");
        let sku = skus[usize::from(dice(&id)) % skus.len()].clone();
        orders.insert(id, (sku, 1 + n % 3));
    }
    let orders = Arc::new(orders);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let services = shop.services.clone();
            let orders = orders.clone();
            tokio::spawn(async move {
                for (id, (sku, quantity)) in orders.iter().skip(w).step_by(8) {
                    services
                        .place(id, sku, *quantity, 1_000)
                        .await
                        .expect("place");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    // Time passes: the requests nobody answers expire.
    wait_until(&runner, Some(Duration::from_secs(31)), |s| {
        s.counts.completed == 1_000
    })
    .await;
    running.stop().await.unwrap();
    gateway.abort();
    let status = runner.status();
    assert_eq!(
        status.counts.started, 1_000,
        "no instance created twice: {status:?}"
    );
    let confirmed = check_end_state(&shop, &runner, &orders, 150).await;
    assert!(
        confirmed > 300 && confirmed < 1_000,
        "confirmed {confirmed}"
    );
    assert!(
        status.counts.refused > 0,
        "some reservations ran out of stock: {status:?}"
    );
}

/// The thousand orders again, decided by three runners sharing eight partitions of the
/// instances (one leaves halfway), each partition reading the whole log and deciding only its
/// own instances, partition 0's holder firing the timers: every instance starts once and
/// completes, and the stock balances exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_orders_over_three_runners_of_eight_partitions_balance_exactly_on_postgres() {
    let shop = pg_shop("pm_partitioned").await;
    let skus: Vec<String> = (0..10).map(|i| format!("sku-{i}")).collect();
    for sku in &skus {
        shop.restock(sku, 150).await;
    }
    let runners: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|member| {
            shop.builder(ALL)
                .partitions(8)
                .rebalance_interval(Duration::from_millis(50))
                .member_name(member)
                .build()
                .expect("a valid runner")
        })
        .collect();
    let mut running: Vec<_> = runners.iter().map(ProcessRunner::spawn).collect();
    let gateway = shop.gateway(answer_for);
    let mut orders = BTreeMap::new();
    for n in 0..1_000u32 {
        let id = format!("o{n}");
        let sku = skus[usize::from(dice(&id)) % skus.len()].clone();
        orders.insert(id, (sku, 1 + n % 3));
    }
    let orders = Arc::new(orders);
    let place = |from: usize, to: usize| {
        (0..8)
            .map(|w| {
                let services = shop.services.clone();
                let orders = orders.clone();
                tokio::spawn(async move {
                    for (id, (sku, quantity)) in
                        orders.iter().skip(from).take(to - from).skip(w).step_by(8)
                    {
                        services
                            .place(id, sku, *quantity, 1_000)
                            .await
                            .expect("place");
                    }
                })
            })
            .collect::<Vec<_>>()
    };
    for writer in place(0, 500) {
        writer.await.unwrap();
    }
    // One runner leaves: the other two take its partitions.
    running.pop().expect("runner c").stop().await.unwrap();
    for writer in place(500, 1_000) {
        writer.await.unwrap();
    }
    // (started, completed) over the runners.
    let total = |runners: &[ProcessRunner<OrderFulfilment, PgProcessStore>]| {
        runners.iter().fold((0, 0), |(started, completed), r| {
            let counts = r.status().counts;
            (started + counts.started, completed + counts.completed)
        })
    };
    // Time passes: the requests nobody answers expire.
    let deadline = tokio::time::Instant::now() + WAIT;
    while total(&runners).1 < 1_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {:?}",
            total(&runners)
        );
        shop.clock.advance(Duration::from_secs(31));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for runner in running {
        runner.stop().await.unwrap();
    }
    gateway.abort();
    let (started, completed) = total(&runners);
    assert_eq!(started, 1_000, "no instance created twice");
    assert_eq!(completed, 1_000);
    for runner in &runners[..2] {
        assert!(
            runner.status().counts.started > 0,
            "the work was shared: {:?}",
            runner.status()
        );
    }
    let confirmed = check_end_state(&shop, &runners[0], &orders, 150).await;
    assert!(
        confirmed > 300 && confirmed < 1_000,
        "confirmed {confirmed}"
    );
    // Every partition moved: its checkpoint is stored.
    for index in 0..8 {
        let key =
            esframe_core::projection::ProjectionKey::new(runners[0].key().name(), index).unwrap();
        let stored =
            esframe_core::projection::CheckpointStore::load(shop.process_store.checkpoints(), &key)
                .await
                .unwrap();
        assert!(stored.is_some(), "partition {index} never checkpointed");
    }
}

/// A process manager that ran unsplit goes on in four partitions, then in two, with orders
/// placed between the changes: each change starts the new partitions from the lowest old
/// checkpoint, every instance starts once across the changes, and every flow ends as it
/// would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changing_a_process_managers_partition_count_starts_every_instance_once() {
    let shop = memory_shop();
    shop.restock("pen", 10_000).await;
    let mut orders = BTreeMap::new();
    let gateway = shop.gateway(answer_for);
    let mut started = 0;
    for (count, upto) in [(1u16, 40u32), (4, 80), (2, 120)] {
        for n in upto - 40..upto {
            let id = format!("o{n}");
            shop.services.place(&id, "pen", 1, 500).await.unwrap();
            orders.insert(id, ("pen".to_owned(), 1));
        }
        let runner = shop
            .builder(ALL)
            .partitions(count)
            .build()
            .expect("a valid runner");
        // Every payment answered (or never to be), then the clock moves past the deadlines.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let status = runner.run_until_idle().await.expect("run");
            if all_answered(&shop, &orders) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{status:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shop.clock.advance(Duration::from_secs(31));
        started += runner.run_until_idle().await.expect("run").counts.started;
    }
    gateway.abort();
    assert_eq!(
        started, 120,
        "every instance started once, across the changes"
    );
    assert!(all_flows_ended(&shop, &orders), "every flow ended");
    let runner = shop.builder(ALL).partitions(2).build().unwrap();
    check_end_state(&shop, &runner, &orders, 10_000).await;
}

// --- A runner killed at random points ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_killed_at_random_points_reaches_the_undisturbed_end_state_on_postgres() {
    let app = format!("esframe-pm-kill-{}", std::process::id());
    let shop = pg_shop_named("pm_kill", Some(&app)).await;
    shop.restock("pen", 100_000).await;
    let mut orders = BTreeMap::new();
    for n in 0..200u32 {
        let id = format!("o{n}");
        // One order in 20 asks for more than there is: refused, compensated.
        let quantity = if dice(&id).is_multiple_of(20) {
            1_000_000
        } else {
            1 + n % 3
        };
        orders.insert(id, ("pen".to_owned(), quantity));
    }
    for (id, (sku, quantity)) in &orders {
        shop.services.place(id, sku, *quantity, 500).await.unwrap();
    }
    let gateway = shop.gateway(answer_for);
    let killer = common::pool(2).await;
    for round in 0..30 {
        let running = shop.runner().spawn();
        tokio::time::sleep(Duration::from_millis(fastrand::u64(5..150))).await;
        if round % 3 == 2 {
            // The database ends the runner's (and everyone's in this store's pool) sessions.
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(&app)
            .execute(&killer)
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(fastrand::u64(5..50))).await;
        }
        running.abort();
    }
    // Undisturbed from here: every flow waits for its answer, then the clock moves on.
    let runner = shop.runner();
    let running = runner.spawn();
    // The clock moves only once every answer is in, so no timer races an answer.
    wait_until(&runner, None, |_| all_answered(&shop, &orders)).await;
    wait_until(&runner, Some(Duration::from_secs(31)), |_| {
        all_flows_ended(&shop, &orders)
    })
    .await;
    running.stop().await.unwrap();
    gateway.abort();
    check_end_state(&shop, &runner, &orders, 100_000).await;
    // And exactly the end state the rules give, order by order.
    for (id, (_, quantity)) in &orders {
        let last = types_of(&shop.store, "order", id).await.pop().unwrap();
        let expected = if *quantity == 1_000_000 || answer_for(id) != Answer::Capture {
            "OrderCancelled"
        } else {
            "OrderConfirmed"
        };
        assert_eq!(last, expected, "{id}");
    }
}

/// Whether every flow is as far as it goes without the clock: ended (out of stock), or its
/// payment answered as [`answer_for`] says, or requested and never to be answered.
fn all_answered<E: EventStore + GlobalLog, S: ProcessStore>(
    shop: &Shop<E, S>,
    orders: &BTreeMap<String, (String, u32)>,
) -> bool {
    let store = shop.store.clone();
    let ids: Vec<String> = orders.keys().cloned().collect();
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            for id in ids {
                if types_of(&store, "order", &id).await.len() >= 2 {
                    continue;
                }
                let payment = types_of(&store, "payment", &id).await.len();
                let answered = match answer_for(&id) {
                    Answer::Never => payment == 1,
                    Answer::Capture | Answer::Decline => payment == 2,
                };
                if !answered {
                    return false;
                }
            }
            true
        })
    })
}

/// Whether every order's flow has ended (read from the order streams, so it holds across
/// runners).
fn all_flows_ended<E: EventStore + GlobalLog, S: ProcessStore>(
    shop: &Shop<E, S>,
    orders: &BTreeMap<String, (String, u32)>,
) -> bool {
    let store = shop.store.clone();
    let ids: Vec<String> = orders.keys().cloned().collect();
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            for id in ids {
                if types_of(&store, "order", &id).await.len() < 2 {
                    return false;
                }
            }
            true
        })
    })
}

// --- Two runners ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_runner_takes_over_and_each_due_timer_fires_once_on_postgres() {
    let shop = pg_shop("pm_standby").await;
    shop.restock("pen", 1_000).await;
    let build = || {
        shop.builder(ALL)
            .standby_poll(Duration::from_millis(50))
            .batch_size(16)
            .build()
            .unwrap()
    };
    let (first, second) = (build(), build());
    let active = first.spawn();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let standby = second.spawn();
    for n in 0..50 {
        shop.services
            .place(&format!("o{n}"), "pen", 1, 100)
            .await
            .unwrap();
    }
    // Nobody answers: every flow waits on its payment timer.
    let head = first.store().log().head_position().await.unwrap();
    wait_until(&first, None, |s| s.position >= head && s.active).await;
    assert!(!second.status().active, "one runner active at a time");
    for n in 0..50 {
        first
            .wait_for_instance(&format!("o{n}"), WAIT, |i| i.state.stage == Stage::Paying)
            .await
            .unwrap();
    }
    // The timers come due and the active runner dies while firing them.
    shop.clock.advance(Duration::from_secs(31));
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..30))).await;
    active.abort();
    wait_until(&second, None, |s| s.active).await;
    let mut orders = BTreeMap::new();
    for n in 0..50 {
        orders.insert(format!("o{n}"), ("pen".to_owned(), 1));
    }
    wait_until(&second, None, |_| all_flows_ended(&shop, &orders)).await;
    let head = second.store().log().head_position().await.unwrap();
    wait_until(&second, None, |s| s.position >= head).await;
    standby.stop().await.unwrap();
    for n in 0..50 {
        let id = format!("o{n}");
        assert_eq!(
            types_of(&shop.store, "payment", &id).await,
            ["PaymentRequested", "PaymentExpired"],
            "{id}: the timer fired once"
        );
        assert_eq!(
            types_of(&shop.store, "order", &id).await,
            ["OrderPlaced", "OrderCancelled"]
        );
        assert!(second.timers(&id).await.unwrap().is_empty());
    }
    check_end_state(&shop, &second, &orders, 1_000).await;
}

// --- A runner process killed with SIGKILL -----------------------------------------------------

/// Set in a child's environment: [`process_runner_child`] runs a runner on this schema.
const CHILD_SCHEMA: &str = "ESFRAME_PM_CHILD_SCHEMA";

/// Not a test of its own: the entry point of the child process the SIGKILL test starts (this
/// test binary run again with `process_runner_child --exact`). Without [`CHILD_SCHEMA`] it does
/// nothing. The child runs the order runner until its stdin closes, so it never outlives the
/// test that started it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_runner_child() {
    let Ok(schema) = std::env::var(CHILD_SCHEMA) else {
        return;
    };
    let pool = common::pool(8).await;
    let store = PgEventStore::builder(pool)
        .schema(schema)
        .expect("valid schema")
        .poll_interval(Duration::from_millis(100))
        .build()
        .await
        .expect("open the store");
    let services = OrderServices::new(store.clone());
    let runner = services
        .runner(
            OrderFulfilment::default(),
            PgProcessStore::new(&store)
                .expect("no inline projections")
                // A killed runner's lease lapses quickly, so the next one takes over at once.
                .lease_time(Duration::from_millis(500)),
            Clock::system(),
        )
        .expect("a runner");
    let running = runner.spawn();
    let _ = tokio::task::spawn_blocking(|| {
        use std::io::Read;
        let mut byte = [0u8; 1];
        while std::io::stdin().read(&mut byte).is_ok_and(|n| n > 0) {}
    })
    .await;
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_process_killed_with_sigkill_loses_and_repeats_nothing_on_postgres() {
    let shop = pg_shop("pm_sigkill").await;
    shop.restock("pen", 100_000).await;
    let schema = shop.store.schema().to_string();
    let gateway = shop.gateway(answer_for);
    // Orders keep arriving while runner processes are started and killed.
    let writer = {
        let services = shop.services.clone();
        tokio::spawn(async move {
            let mut orders = BTreeMap::new();
            for n in 0..300u32 {
                let id = format!("o{n}");
                services.place(&id, "pen", 1, 500).await.expect("place");
                orders.insert(id, ("pen".to_owned(), 1));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            orders
        })
    };
    let exe = std::env::current_exe().expect("the test binary");
    let mut kills = 0;
    let mut ended_while_killing = 0;
    while !writer.is_finished() || kills < 20 {
        let mut child = std::process::Command::new(&exe)
            .args(["process_runner_child", "--exact", "--nocapture"])
            .env(CHILD_SCHEMA, &schema)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start a runner process");
        tokio::time::sleep(Duration::from_millis(fastrand::u64(150..600))).await;
        child.kill().expect("SIGKILL the runner process");
        let status = child.wait().expect("reap it");
        assert!(
            std::os::unix::process::ExitStatusExt::signal(&status) == Some(9),
            "the runner process ended by itself: {status:?}"
        );
        kills += 1;
        ended_while_killing = shop
            .process_store
            .instances(OrderFulfilment::NAME, InstanceStatus::Completed, usize::MAX)
            .await
            .unwrap()
            .len();
    }
    let orders = writer.await.unwrap();
    assert!(
        ended_while_killing > 0,
        "the killed runners did some of the work ({kills} kills)"
    );
    let runner = shop.runner();
    let running = runner.spawn();
    wait_until(&runner, None, |_| all_answered(&shop, &orders)).await;
    wait_until(&runner, Some(Duration::from_secs(31)), |_| {
        all_flows_ended(&shop, &orders)
    })
    .await;
    let head = runner.store().log().head_position().await.unwrap();
    wait_until(&runner, None, |s| s.position >= head).await;
    running.stop().await.unwrap();
    gateway.abort();
    check_end_state(&shop, &runner, &orders, 100_000).await;
    for id in orders.keys() {
        let last = types_of(&shop.store, "order", id).await.pop().unwrap();
        let expected = if answer_for(id) == Answer::Capture {
            "OrderConfirmed"
        } else {
            "OrderCancelled"
        };
        assert_eq!(last, expected, "{id}");
        assert_eq!(
            types_of(&shop.store, OrderFulfilment::NAME, id).await.len(),
            1,
            "{id}: one customer notice"
        );
    }
}

/// An instance whose timer fails (here: the runner that fires it has no payment handler) is
/// quarantined holding no events; retried by a runner that has one, it is active again and
/// its timer fires.
#[tokio::test]
async fn an_instance_quarantined_by_its_timer_is_retried_and_the_timer_fires() {
    let shop = memory_shop();
    shop.restock("pen", 10).await;
    shop.services.place("o1", "pen", 1, 100).await.unwrap();
    let full = shop.runner();
    full.run_until_idle().await.unwrap();
    assert_eq!(
        full.instance("o1").await.unwrap().unwrap().state.stage,
        Stage::Paying
    );
    let without_payments = shop
        .builder(&["order", "inventory"])
        .max_attempts(2)
        .build()
        .unwrap();
    shop.clock.advance(Duration::from_secs(31));
    without_payments.run_until_idle().await.unwrap();
    let quarantined = without_payments.quarantined().await.unwrap();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(quarantined[0].held.is_empty());
    assert!(
        quarantined[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("payment"))
    );
    assert_eq!(
        full.timers("o1").await.unwrap().len(),
        1,
        "the timer is kept"
    );

    let retried = full.retry("o1").await.unwrap();
    assert_eq!(retried.status, InstanceStatus::Active);
    full.run_until_idle().await.unwrap();
    full.run_until_idle().await.unwrap();
    let done = full.instance("o1").await.unwrap().unwrap();
    assert_eq!(done.record.status, InstanceStatus::Completed, "{done:?}");
    assert_eq!(
        types_of(&shop.store, "payment", "o1").await,
        ["PaymentRequested", "PaymentExpired"]
    );
}

/// A process manager added to a store with history starts after it when asked to: the
/// orders placed before its first run start no instance.
#[tokio::test]
async fn a_new_process_manager_can_start_after_the_history() {
    let shop = memory_shop();
    shop.restock("pen", 10).await;
    shop.services.place("old", "pen", 1, 100).await.unwrap();
    let runner = shop
        .builder(&["order", "inventory", "payment"])
        .start_from_now()
        .build()
        .unwrap();
    runner.run_until_idle().await.unwrap();
    shop.services.place("new", "pen", 1, 100).await.unwrap();
    runner.run_until_idle().await.unwrap();
    assert!(runner.instance("old").await.unwrap().is_none());
    let new = runner.instance("new").await.unwrap().expect("started");
    assert_eq!(new.state.stage, Stage::Paying);
    assert_eq!(types_of(&shop.store, "payment", "old").await.len(), 0);
}

/// Keeps each order's product in its state; the state of the product `poison` holds a NUL
/// character, which PostgreSQL's `jsonb` cannot store.
struct Products;

impl ProcessManager for Products {
    const NAME: &'static str = "products";
    type Events = esframe_examples::orders::domain::OrderEvent;
    type State = String;
    type Timer = ();

    fn route(
        &self,
        event: &esframe_core::projection::ProjectedEvent<'_, Self::Events>,
    ) -> esframe_core::process::Route {
        use esframe_examples::orders::domain::OrderEvent as O;
        match event.event {
            O::OrderPlaced { .. } => esframe_core::process::Route::start(event.aggregate_id()),
            O::OrderConfirmed | O::OrderCancelled { .. } => esframe_core::process::Route::Skip,
        }
    }

    fn evolve(
        &self,
        state: &mut String,
        event: &esframe_core::projection::ProjectedEvent<'_, Self::Events>,
    ) {
        if let esframe_examples::orders::domain::OrderEvent::OrderPlaced { sku, .. } = &event.event
        {
            *state = if sku == "poison" {
                "\0".to_owned()
            } else {
                sku.clone()
            };
        }
    }

    fn react(
        &self,
        _: &String,
        _: esframe_core::process::Input<'_, Self>,
        effects: &mut esframe_core::process::Effects<Self>,
    ) -> Result<(), esframe_core::process::ReactError> {
        effects.complete();
        Ok(())
    }
}

/// A batch whose write PostgreSQL refuses (one instance's state it cannot store) is narrowed
/// down to that instance, which is quarantined; the others in the same batch complete, and the
/// runner goes on.
#[tokio::test]
async fn an_instance_whose_state_the_database_refuses_is_quarantined_alone_on_postgres() {
    let shop = pg_shop("pm_refused").await;
    for n in 0..20 {
        let sku = if n == 7 { "poison" } else { "pen" };
        shop.services
            .place(&format!("o{n}"), sku, 1, 100)
            .await
            .unwrap();
    }
    let runner = ProcessRunner::builder(Products, shop.process_store.clone())
        .clock(shop.clock.clone())
        .max_attempts(2)
        .backoff(esframe_core::publish::Backoff {
            min: Duration::from_millis(1),
            max: Duration::from_millis(5),
        })
        .build()
        .unwrap();
    runner.run_until_idle().await.expect("the runner goes on");
    let quarantined = runner.quarantined().await.unwrap();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(quarantined[0].id, "o7");
    let error = quarantined[0].error.clone().unwrap_or_default();
    assert!(error.contains("refused"), "{error}");
    for n in (0..20).filter(|n| *n != 7) {
        let instance = runner.instance(&format!("o{n}")).await.unwrap().unwrap();
        assert_eq!(instance.record.status, InstanceStatus::Completed, "o{n}");
        assert_eq!(instance.state, "pen");
    }
    let status = runner.status();
    // o7 is stored too, quarantined at its first event; the batch decided again after the
    // narrowing skipped the instances already written as repeats, not as late events.
    assert_eq!(status.counts.started, 20, "{status:?}");
    assert_eq!(status.counts.ignored, 0, "{status:?}");
}
