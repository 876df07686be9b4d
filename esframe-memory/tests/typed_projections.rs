//! Typed projections on the memory store: a `#[derive(ProjectionEvents)]` enum over two
//! aggregates that both have a `Created` event, and a single `#[derive(Event)]` enum, run by the
//! projection runner from commands handled by the command handler.

use std::{
    fmt::Debug,
    sync::{Arc, Mutex},
    time::Duration,
};

use esframe_core::projection::{
    HandlerError, HandlerRetry, Interest, ProjectedEvent, ProjectionContext, ProjectionEvents,
    ProjectionRunner, Typed, TypedProjection,
};
use esframe_core::{
    Aggregate, Command, CommandContext, CommandHandler, Decision, Event, EventEnvelope, EventStore,
    ExpectedVersion, NewEvent, Position, StreamId,
};
use esframe_memory::{MemoryCheckpoints, MemoryStore};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
#[error("refused")]
struct Refused;

// --- Orders ---------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum OrderEvent {
    Created { customer: String },
    LineAdded { sku: String, quantity: u32 },
}

#[derive(Debug, Command)]
#[command(aggregate_id = order_id)]
enum OrderCommand {
    Create {
        order_id: String,
        customer: String,
    },
    AddLine {
        order_id: String,
        sku: String,
        quantity: u32,
    },
}

#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
#[aggregate(name = "order", command = OrderCommand, event = OrderEvent, error = Refused)]
struct Order {
    lines: u32,
}

impl Order {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &OrderCommand,
        _services: &(),
    ) -> Result<(), Refused> {
        decision.emit(match command {
            OrderCommand::Create { customer, .. } => OrderEvent::Created {
                customer: customer.clone(),
            },
            OrderCommand::AddLine { sku, quantity, .. } => OrderEvent::LineAdded {
                sku: sku.clone(),
                quantity: *quantity,
            },
        });
        Ok(())
    }

    fn apply(&mut self, event: &OrderEvent) {
        if let OrderEvent::LineAdded { .. } = event {
            self.lines += 1;
        }
    }
}

// --- Products: the same event type name, `Created`, with another payload ---------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum ProductEvent {
    Created { sku: String, price: u64 },
    Restocked { quantity: u32 },
}

#[derive(Debug, Command)]
#[command(aggregate_id = product_id)]
enum ProductCommand {
    Create {
        product_id: String,
        sku: String,
        price: u64,
    },
    Restock {
        product_id: String,
        quantity: u32,
    },
}

#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
#[aggregate(name = "product", command = ProductCommand, event = ProductEvent, error = Refused)]
struct Product {
    stock: u32,
}

impl Product {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &ProductCommand,
        _services: &(),
    ) -> Result<(), Refused> {
        decision.emit(match command {
            ProductCommand::Create { sku, price, .. } => ProductEvent::Created {
                sku: sku.clone(),
                price: *price,
            },
            ProductCommand::Restock { quantity, .. } => ProductEvent::Restocked {
                quantity: *quantity,
            },
        });
        Ok(())
    }

    fn apply(&mut self, event: &ProductEvent) {
        if let ProductEvent::Restocked { quantity } = event {
            self.stock += quantity;
        }
    }
}

// --- Customers: not in the union; their `Created` decodes as neither of the others -----------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum CustomerEvent {
    Created { name: String },
}

#[derive(Debug, Command)]
struct Register {
    #[command(aggregate_id)]
    customer_id: String,
    name: String,
}

#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
#[aggregate(name = "customer", command = Register, event = CustomerEvent, error = Refused)]
struct Customer {
    registered: bool,
}

impl Customer {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &Register,
        _services: &(),
    ) -> Result<(), Refused> {
        decision.emit(CustomerEvent::Created {
            name: command.name.clone(),
        });
        Ok(())
    }

    fn apply(&mut self, _event: &CustomerEvent) {
        self.registered = true;
    }
}

/// Orders by type, products by type name.
#[derive(Debug, Clone, PartialEq, ProjectionEvents)]
enum ShopEvent {
    #[events(aggregate = Order)]
    Order(OrderEvent),
    #[events(aggregate = "product")]
    Product(ProductEvent),
}

// --- A projection that records what it is given ---------------------------------------------

/// One applied event: the decoded event and its envelope's fields.
#[derive(Debug, Clone, PartialEq)]
struct Seen<E> {
    event: E,
    aggregate_type: String,
    aggregate_id: String,
    stream_version: u64,
    global_position: Position,
    event_id: Uuid,
    correlation_id: Option<Uuid>,
}

impl<E> Seen<E> {
    /// What the projection should see for an event the command handler stored.
    fn stored<T>(envelope: &EventEnvelope<T>, event: E) -> Self {
        Self {
            event,
            aggregate_type: envelope.aggregate_type().to_owned(),
            aggregate_id: envelope.aggregate_id().to_owned(),
            stream_version: envelope.stream_version,
            global_position: envelope.global_position,
            event_id: envelope.event_id,
            correlation_id: envelope.metadata.correlation_id,
        }
    }
}

/// Records every event it is given, in order.
struct Recording<E> {
    seen: Arc<Mutex<Vec<Seen<E>>>>,
}

impl<E> Recording<E> {
    fn new() -> (Self, Arc<Mutex<Vec<Seen<E>>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        (Self { seen: seen.clone() }, seen)
    }
}

impl<E: ProjectionEvents + Clone + Debug> TypedProjection for Recording<E> {
    type Event = E;

    fn name(&self) -> &str {
        "recording"
    }

    async fn apply(
        &self,
        event: ProjectedEvent<'_, E>,
        _ctx: &mut ProjectionContext<'_, ()>,
    ) -> Result<(), HandlerError> {
        let seen = Seen {
            aggregate_type: event.aggregate_type().to_owned(),
            aggregate_id: event.aggregate_id().to_owned(),
            stream_version: event.stream_version(),
            global_position: event.global_position(),
            event_id: event.event_id(),
            correlation_id: event.metadata().correlation_id,
            event: event.event,
        };
        self.seen.lock().unwrap().push(seen);
        Ok(())
    }
}

/// Two quick tries, so that a failing event is parked at once.
fn quick_retry() -> HandlerRetry {
    HandlerRetry {
        attempts: 2,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
    }
}

fn runner<E: ProjectionEvents + Clone + Debug>(
    store: &MemoryStore,
    projection: Recording<E>,
) -> ProjectionRunner<MemoryStore, MemoryCheckpoints, Typed<Recording<E>>> {
    ProjectionRunner::new(store.clone(), MemoryCheckpoints::new(), Typed(projection))
        .retry(quick_retry())
}

struct Shop {
    store: MemoryStore,
    orders: CommandHandler<Order, MemoryStore>,
    products: CommandHandler<Product, MemoryStore>,
    customers: CommandHandler<Customer, MemoryStore>,
}

impl Shop {
    fn new() -> Self {
        let store = MemoryStore::new();
        Self {
            orders: CommandHandler::new(store.clone()),
            products: CommandHandler::new(store.clone()),
            customers: CommandHandler::new(store.clone()),
            store,
        }
    }
}

fn create_product(id: &str, price: u64) -> ProductCommand {
    ProductCommand::Create {
        product_id: id.into(),
        sku: format!("sku-{id}"),
        price,
    }
}

#[tokio::test]
async fn each_event_arrives_decoded_as_its_aggregates_variant_with_its_envelope() {
    let shop = Shop::new();
    let correlation = Uuid::now_v7();
    // Three aggregates with an id "1" and a `Created` each.
    let product = shop
        .products
        .execute_with(
            create_product("1", 4),
            CommandContext::new().correlation_id(correlation),
        )
        .await
        .unwrap();
    let customer = shop
        .customers
        .execute(Register {
            customer_id: "1".into(),
            name: "ada".into(),
        })
        .await
        .unwrap();
    let order = shop
        .orders
        .execute(OrderCommand::Create {
            order_id: "1".into(),
            customer: "ada".into(),
        })
        .await
        .unwrap();
    let line = shop
        .orders
        .execute_with(
            OrderCommand::AddLine {
                order_id: "1".into(),
                sku: "sku-1".into(),
                quantity: 2,
            },
            CommandContext::new().correlation_id(correlation),
        )
        .await
        .unwrap();
    let restock = shop
        .products
        .execute(ProductCommand::Restock {
            product_id: "1".into(),
            quantity: 10,
        })
        .await
        .unwrap();

    let (projection, seen) = Recording::<ShopEvent>::new();
    let runner = runner(&shop.store, projection);
    let reached = runner.catch_up().await.expect("catch up");
    assert_eq!(reached, restock.events[0].global_position);

    let product_created = Seen::stored(
        &product.events[0],
        ShopEvent::Product(ProductEvent::Created {
            sku: "sku-1".into(),
            price: 4,
        }),
    );
    let expected = vec![
        product_created,
        Seen::stored(
            &order.events[0],
            ShopEvent::Order(OrderEvent::Created {
                customer: "ada".into(),
            }),
        ),
        Seen::stored(
            &line.events[0],
            ShopEvent::Order(OrderEvent::LineAdded {
                sku: "sku-1".into(),
                quantity: 2,
            }),
        ),
        Seen::stored(
            &restock.events[0],
            ShopEvent::Product(ProductEvent::Restocked { quantity: 10 }),
        ),
    ];
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, expected);

    // The envelopes, spelled out: both `Created`s are version 1 of a stream "1", told apart by
    // aggregate type; the order follows the global log; a correlation id given through the
    // context arrives with the event (without one, it is the command's id).
    let parts: Vec<(&str, &str, u64)> = seen
        .iter()
        .map(|s| {
            (
                s.aggregate_type.as_str(),
                s.aggregate_id.as_str(),
                s.stream_version,
            )
        })
        .collect();
    assert_eq!(
        parts,
        [
            ("product", "1", 1),
            ("order", "1", 1),
            ("order", "1", 2),
            ("product", "1", 2)
        ]
    );
    assert!(seen.is_sorted_by_key(|s| s.global_position));
    assert_eq!(seen[0].correlation_id, Some(correlation));
    assert_eq!(seen[2].correlation_id, Some(correlation));
    assert_ne!(seen[1].correlation_id, Some(correlation));
    assert!(seen[1].correlation_id.is_some());

    // The customer's `Created` (at a position between them) was never decoded: it would not
    // decode as either `Created`, and nothing failed.
    let customer_position = customer.events[0].global_position;
    assert!(customer_position > seen[0].global_position);
    assert!(seen.iter().all(|s| s.global_position != customer_position));
    assert!(runner.dead_letters().await.unwrap().is_empty());
    let stored_customer = esframe_core::GlobalLog::read_all_batch(&shop.store, Position::START, 10)
        .await
        .unwrap()
        .events
        .into_iter()
        .find(|event| event.global_position == customer_position)
        .unwrap();
    assert!(!ShopEvent::interest().matches(&stored_customer));
    assert!(ShopEvent::decode(&stored_customer).unwrap().is_none());
    assert!(stored_customer.decode::<ProductEvent>().is_err());
    assert!(stored_customer.decode::<OrderEvent>().is_err());
}

#[tokio::test]
async fn a_corrupt_payload_of_a_known_type_is_parked_as_a_dead_letter_naming_the_decode_error() {
    let shop = Shop::new();
    let before = shop.products.execute(create_product("1", 4)).await.unwrap();
    // A product `Created` whose `sku` is a number, appended behind the handler's back.
    let corrupt = NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Created".into(),
        schema_version: 1,
        payload: json!({ "sku": 5, "price": 4 }),
        metadata: Default::default(),
    };
    let corrupt_id = corrupt.event_id;
    let stream = StreamId::new(Product::TYPE, "2").unwrap();
    let appended = shop
        .store
        .append(&stream, ExpectedVersion::NoStream, vec![corrupt])
        .await
        .unwrap();
    let after = shop
        .products
        .execute(ProductCommand::Restock {
            product_id: "1".into(),
            quantity: 3,
        })
        .await
        .unwrap();

    let (projection, seen) = Recording::<ShopEvent>::new();
    let runner = runner(&shop.store, projection);
    let reached = runner.catch_up().await.expect("catch up");
    assert_eq!(
        reached, after.events[0].global_position,
        "the runner moved past the corrupt event"
    );
    let seen_ids: Vec<Uuid> = seen.lock().unwrap().iter().map(|s| s.event_id).collect();
    assert_eq!(
        seen_ids,
        [before.events[0].event_id, after.events[0].event_id]
    );

    let parked = runner.dead_letters().await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    let letter = &parked[0].event;
    assert_eq!(letter.event_id, corrupt_id);
    assert_eq!(letter.stream_id.parts(), ("product", "2"));
    assert_eq!(letter.global_position, appended.positions[0]);
    assert_eq!(
        (letter.event_type.as_str(), letter.attempts),
        ("Created", 2)
    );
    for part in [
        "cannot decode event `Created` (schema v1) at version 1 of stream `product/2`",
        "the payload does not match the event",
    ] {
        assert!(letter.error.contains(part), "{}", letter.error);
    }
}

#[tokio::test]
async fn a_single_event_enum_is_read_by_its_event_type_names() {
    let shop = Shop::new();
    let created = shop.products.execute(create_product("1", 4)).await.unwrap();
    // An order event of a type the product events do not have: skipped by the interest.
    let line = shop
        .orders
        .execute(OrderCommand::AddLine {
            order_id: "1".into(),
            sku: "sku-1".into(),
            quantity: 1,
        })
        .await
        .unwrap();
    let restocked = shop
        .products
        .execute(ProductCommand::Restock {
            product_id: "1".into(),
            quantity: 7,
        })
        .await
        .unwrap();

    let (projection, seen) = Recording::<ProductEvent>::new();
    let runner = runner(&shop.store, projection);
    assert_eq!(
        runner.catch_up().await.unwrap(),
        restocked.events[0].global_position
    );
    let expected = vec![
        Seen::stored(
            &created.events[0],
            ProductEvent::Created {
                sku: "sku-1".into(),
                price: 4,
            },
        ),
        Seen::stored(
            &restocked.events[0],
            ProductEvent::Restocked { quantity: 7 },
        ),
    ];
    assert_eq!(*seen.lock().unwrap(), expected);
    assert!(runner.dead_letters().await.unwrap().is_empty());
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .all(|s| s.global_position != line.events[0].global_position)
    );

    // The blanket impl goes by event type name, from streams of any aggregate type.
    assert_eq!(
        ProductEvent::interest(),
        Interest::event_types(["Created", "Restocked"])
    );
}
