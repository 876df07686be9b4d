//! The order-flow walkthrough: four scenarios, each printed as its causation chain.

use std::{collections::HashMap, fmt::Write as _, time::Duration};

use esframe_core::{
    CommandContext, CommandError, CommandHandler, EventStore, RecordedEvent, StreamId,
    process::{ProcessError, ProcessRunner, ProcessStore},
};
use uuid::Uuid;

use super::{
    domain::{Inventory, InventoryCommand, Order, OrderCommand, Payment, PaymentCommand, Shipment},
    process::{OrderFulfilment, Stage},
};

/// The command handlers of the four aggregates on one event store.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // the handlers hold caches and services
pub struct OrderServices<E: EventStore> {
    /// Orders.
    pub orders: CommandHandler<Order, E>,
    /// Stock.
    pub inventory: CommandHandler<Inventory, E>,
    /// Payments.
    pub payments: CommandHandler<Payment, E>,
    /// Shipments.
    pub shipments: CommandHandler<Shipment, E>,
}

impl<E: EventStore> OrderServices<E> {
    /// Handlers on `store`.
    pub fn new(store: E) -> Self {
        Self {
            orders: CommandHandler::new(store.clone()),
            inventory: CommandHandler::new(store.clone()),
            payments: CommandHandler::new(store.clone()),
            shipments: CommandHandler::new(store),
        }
    }

    /// The order-fulfilment runner on `process_store`, sending commands through these
    /// handlers.
    pub fn runner<S: ProcessStore>(
        &self,
        process: OrderFulfilment,
        process_store: S,
        clock: esframe_core::process::Clock,
    ) -> Result<ProcessRunner<OrderFulfilment, S>, ProcessError> {
        ProcessRunner::builder(process, process_store)
            .handler(self.orders.clone())
            .handler(self.inventory.clone())
            .handler(self.payments.clone())
            .handler(self.shipments.clone())
            .clock(clock)
            .timer_poll(Duration::from_millis(20))
            .build()
    }

    /// Places an order as a new flow; returns the flow's correlation id.
    pub async fn place(
        &self,
        order_id: &str,
        sku: &str,
        quantity: u32,
        amount: u64,
    ) -> Result<Uuid, CommandError<super::domain::OrderError>> {
        let flow = Uuid::now_v7();
        self.orders
            .execute_with(
                OrderCommand::Place {
                    order_id: order_id.into(),
                    sku: sku.into(),
                    quantity,
                    amount,
                },
                CommandContext::new().correlation_id(flow),
            )
            .await?;
        Ok(flow)
    }

    /// The payment provider's answer to the request of `order_id`: `capture` or decline. It
    /// carries the request's correlation id (the flow's) and the request as causation. Without a
    /// request, the payment refuses it (`PaymentError::NotRequested`).
    pub async fn answer_payment(
        &self,
        order_id: &str,
        capture: bool,
    ) -> Result<(), CommandError<super::domain::PaymentError>> {
        let stream = StreamId::new("payment", order_id)?;
        let events = self
            .payments
            .store()
            .read_stream(&stream, 1)
            .await
            .map_err(CommandError::Store)?;
        let Some(request) = events.iter().find(|e| e.event_type == "PaymentRequested") else {
            return Err(CommandError::Rejected(
                super::domain::PaymentError::NotRequested,
            ));
        };
        let context = CommandContext::new()
            .correlation_id(request.metadata.correlation_id.unwrap_or(request.event_id))
            .causation_id(request.event_id);
        let command = if capture {
            PaymentCommand::Capture {
                order_id: order_id.into(),
            }
        } else {
            PaymentCommand::Decline {
                order_id: order_id.into(),
                reason: "card declined".into(),
            }
        };
        self.payments.execute_with(command, context).await?;
        Ok(())
    }
}

/// One of the walkthrough's flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Stock, payment captured, shipment, confirmed.
    HappyPath,
    /// The provider declines: stock released, order cancelled.
    PaymentDeclined,
    /// The provider never answers: the timer expires the payment, stock released, order
    /// cancelled.
    PaymentTimeout,
    /// Not enough stock: the reservation is refused and the order cancelled.
    OutOfStock,
}

/// Runs the four scenarios on a running `runner` (whose clock must be manual) and returns the
/// printed causation chains. `run` is appended to the ids (`order-1-<run>`, `book-<run>`), so
/// the demo can run again on the same database.
pub async fn run_demo<E: EventStore, S: ProcessStore>(
    services: &OrderServices<E>,
    runner: &ProcessRunner<OrderFulfilment, S>,
    run: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let wait = Duration::from_secs(10);
    let mut out = String::new();
    let sku = format!("book-{run}");
    services
        .inventory
        .execute(InventoryCommand::Restock {
            sku: sku.clone(),
            quantity: 10,
        })
        .await?;
    let scenarios = [
        (1, 2, Scenario::HappyPath),
        (2, 1, Scenario::PaymentDeclined),
        (3, 1, Scenario::PaymentTimeout),
        (4, 50, Scenario::OutOfStock),
    ];
    for (n, quantity, scenario) in scenarios {
        let order_id = &format!("order-{n}-{run}");
        let flow = services.place(order_id, &sku, quantity, 1_500).await?;
        if scenario != Scenario::OutOfStock {
            runner
                .wait_for_instance(order_id, wait, |i| i.state.stage == Stage::Paying)
                .await?;
        }
        match scenario {
            Scenario::HappyPath | Scenario::PaymentDeclined => {
                let capture = scenario == Scenario::HappyPath;
                services.answer_payment(order_id, capture).await?;
            }
            Scenario::PaymentTimeout => runner.clock().advance(Duration::from_secs(31)),
            Scenario::OutOfStock => {}
        }
        let done = runner
            .wait_for_instance(order_id, wait, |i| i.record.status.is_ended())
            .await?;
        runner.wait_settled(flow, wait).await?;
        let _ = writeln!(out, "{scenario:?} ({order_id}: {:?})", done.state.stage);
        out.push_str(&print_chain(&runner.trace(flow).await?));
        out.push('\n');
    }
    let stock = services.inventory.load(&sku).await?;
    let _ = writeln!(
        out,
        "stock of `{sku}`: {} available, reserved {:?}",
        stock.state.available, stock.state.reserved
    );
    Ok(out)
}

/// A flow's events as a causation tree: each event under the event that caused it (through
/// the command it led to); a root whose cause is not an event (a client's command, a timer)
/// starts a new line at the left.
pub fn print_chain(trace: &[RecordedEvent]) -> String {
    let ids: HashMap<Uuid, usize> = trace
        .iter()
        .enumerate()
        .map(|(i, e)| (e.event_id, i))
        .collect();
    let mut depth = vec![0usize; trace.len()];
    let mut out = String::new();
    for (i, event) in trace.iter().enumerate() {
        let parent = event
            .metadata
            .causation_id
            .and_then(|c| ids.get(&c).copied());
        depth[i] = parent.map_or(0, |p| depth[p] + 1);
        let timer = event
            .metadata
            .extra
            .get("process_timer")
            .and_then(|t| t.as_str());
        let cause = match (parent, timer) {
            (Some(_), _) => String::new(),
            (None, Some(timer)) => format!("  (timer `{timer}`)"),
            (None, None) => "  (command)".into(),
        };
        let _ = writeln!(
            out,
            "  {}{} {} [{} v{}]{cause}",
            "  ".repeat(depth[i]),
            if depth[i] > 0 { "└─" } else { "•" },
            event.event_type,
            event.stream_id,
            event.stream_version,
        );
    }
    out
}
