//! The process-manager test kit on the order flow: given events, when an event (or time
//! passes), then these commands, timers, messages, completion; no store.

use std::time::Duration;

use esframe_core::process::ProcessTest;
use esframe_examples::orders::{
    OrderFulfilment,
    domain::{
        Inventory, InventoryCommand, InventoryError, InventoryEvent, Order, OrderCommand,
        OrderEvent, Payment, PaymentCommand, PaymentEvent, Shipment, ShipmentEvent,
    },
    process::PAYMENT_TIMEOUT,
};

fn placed() -> OrderEvent {
    OrderEvent::OrderPlaced {
        sku: "pen".into(),
        quantity: 2,
        amount: 300,
    }
}

fn reserved() -> InventoryEvent {
    InventoryEvent::StockReserved {
        order_id: "o1".into(),
        quantity: 2,
    }
}

fn test() -> ProcessTest<OrderFulfilment> {
    ProcessTest::new(OrderFulfilment::default())
}

#[test]
fn a_placed_order_starts_a_flow_that_reserves_its_stock() {
    let mut test = test();
    let then = test.when::<Order>("o1", placed());
    assert_eq!(then.started, ["o1"]);
    assert_eq!(
        then.sent::<Inventory>(),
        [&InventoryCommand::Reserve {
            sku: "pen".into(),
            order_id: "o1".into(),
            quantity: 2,
        }]
    );
    assert!(then.sent::<Payment>().is_empty());
}

#[test]
fn reserved_stock_requests_the_payment_with_a_deadline() {
    let mut test = test().given::<Order>("o1", [placed()]);
    let then = test.when::<Inventory>("pen", reserved());
    assert_eq!(
        then.sent::<Payment>(),
        [&PaymentCommand::Request {
            order_id: "o1".into(),
            amount: 300,
        }]
    );
    let due = test.now() + chrono::Duration::seconds(30);
    assert_eq!(
        then.scheduled,
        [("o1".to_owned(), PAYMENT_TIMEOUT.to_owned(), due)]
    );
}

#[test]
fn a_payment_that_never_answers_expires_when_its_timer_fires() {
    let mut test = test()
        .given::<Order>("o1", [placed()])
        .given::<Inventory>("pen", [reserved()]);
    let early = test.advance_clock(Duration::from_secs(29));
    assert!(early.fired.is_empty() && early.commands.is_empty());
    let then = test.advance_clock(Duration::from_secs(2));
    assert_eq!(then.fired, [("o1".to_owned(), PAYMENT_TIMEOUT.to_owned())]);
    assert_eq!(
        then.sent::<Payment>(),
        [&PaymentCommand::Expire {
            order_id: "o1".into()
        }]
    );
    // The expiry's event compensates: stock released, order cancelled.
    let then = test.when::<Payment>("o1", PaymentEvent::PaymentExpired);
    assert_eq!(
        then.sent::<Inventory>(),
        [&InventoryCommand::Release {
            sku: "pen".into(),
            order_id: "o1".into(),
        }]
    );
    assert!(matches!(
        then.sent::<Order>()[..],
        [OrderCommand::Cancel { .. }]
    ));
}

#[test]
fn a_declined_payment_releases_the_stock_cancels_the_order_and_its_timer() {
    let mut test = test()
        .given::<Order>("o1", [placed()])
        .given::<Inventory>("pen", [reserved()])
        .given::<Payment>("o1", [PaymentEvent::PaymentRequested { amount: 300 }]);
    let then = test.when::<Payment>(
        "o1",
        PaymentEvent::PaymentDeclined {
            reason: "card declined".into(),
        },
    );
    assert!(then.cancelled(PAYMENT_TIMEOUT));
    assert!(test.timers().is_empty());
    assert_eq!(then.sent::<Inventory>().len(), 1);
    assert_eq!(
        then.sent::<Order>(),
        [&OrderCommand::Cancel {
            order_id: "o1".into(),
            reason: "payment declined: card declined".into(),
        }]
    );
}

#[test]
fn a_refused_reservation_is_compensated_by_cancelling_the_order() {
    let mut test = test().refusing::<Inventory>(|command| match command {
        InventoryCommand::Reserve { quantity, .. } => Some(InventoryError::OutOfStock {
            available: 1,
            requested: *quantity,
        }),
        _ => None,
    });
    let then = test.when::<Order>("o1", placed());
    assert_eq!(then.refused.len(), 1);
    assert_eq!(
        then.sent::<Order>(),
        [&OrderCommand::Cancel {
            order_id: "o1".into(),
            reason: "out of stock".into(),
        }]
    );
}

#[test]
fn a_confirmed_order_completes_tells_the_customer_and_ignores_what_comes_later() {
    let mut test = test()
        .given::<Order>("o1", [placed()])
        .given::<Inventory>("pen", [reserved()])
        .given::<Payment>("o1", [PaymentEvent::PaymentCaptured { amount: 300 }]);
    let then = test.when::<Shipment>(
        "o1",
        ShipmentEvent::ShipmentPrepared {
            sku: "pen".into(),
            quantity: 2,
        },
    );
    assert_eq!(
        then.sent::<Order>(),
        [&OrderCommand::Confirm {
            order_id: "o1".into()
        }]
    );
    let then = test.when::<Order>("o1", OrderEvent::OrderConfirmed);
    assert!(then.completed("o1"));
    assert_eq!(then.published_types(), ["OrderOnItsWay"]);
    assert!(test.is_complete("o1"));
    // A completed flow is a tombstone: a late event, even a starting one, does nothing.
    let late = test.when::<Order>("o1", placed());
    assert!(late.ignored && late.commands.is_empty() && late.started.is_empty());
}
