//! Type parameters on all three derives, under `#![deny(warnings)]`.
#![deny(warnings)]

use std::{fmt::Debug, marker::PhantomData};

use esframe_core::{Aggregate, Command, Decision, Event, EventType, StreamId};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::json;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(version = 2)]
enum Ledger<T> {
    Credited {
        amount: T,
    },
    Noted(String, T),
    #[event(name = "LedgerReset", version = 3)]
    Reset,
}

#[derive(Command)]
struct Credit<Id, T> {
    #[command(aggregate_id)]
    wallet: Id,
    #[command(command_id)]
    request: Option<Uuid>,
    amount: T,
}

#[derive(Command)]
#[command(aggregate_id = id, command_id = request)]
enum Tagged<Id, R> {
    A { id: Id, request: R },
    B { request: R, id: Id, note: String },
}

trait Currency: Debug + Default + Send + Sync + 'static {
    const CODE: &'static str;
}

#[derive(Debug, Default)]
struct Eur;

impl Currency for Eur {
    const CODE: &'static str = "EUR";
}

#[derive(Debug, thiserror::Error)]
#[error("amounts must be positive")]
struct Negative;

#[derive(Debug, Default)]
struct Limits<C> {
    max: i64,
    currency: PhantomData<C>,
}

#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
#[serde(bound = "")]
#[aggregate(
    command = Credit<String, i64>,
    event = Ledger<i64>,
    error = Negative,
    services = Limits<C>,
)]
struct Wallet<C: Currency> {
    balance: i64,
    #[serde(skip)]
    currency: PhantomData<C>,
}

impl<C: Currency> Wallet<C> {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &Credit<String, i64>,
        limits: &Limits<C>,
    ) -> Result<(), Negative> {
        if command.amount <= 0 {
            return Err(Negative);
        }
        decision.emit(Ledger::Credited {
            amount: command.amount.min(limits.max),
        });
        decision.emit(Ledger::Noted(C::CODE.to_owned(), decision.balance));
        Ok(())
    }

    fn apply(&mut self, event: &Ledger<i64>) {
        if let Ledger::Credited { amount } = event {
            self.balance += amount;
        }
    }
}

fn round_trip<E: Event + PartialEq + Debug>(event: E) {
    let payload = event.to_payload().unwrap();
    let text = esframe_core::Payload::from_json_text(payload.to_string());
    assert_eq!(E::from_payload(event.event_type(), &text).unwrap(), event);
    assert_eq!(
        E::from_payload(event.event_type(), &payload.into()).unwrap(),
        event
    );
}

fn assert_event<E: Event + Serialize + DeserializeOwned>() {}

fn main() {
    assert_event::<Ledger<String>>();
    assert_eq!(
        Ledger::<u8>::event_types(),
        [
            EventType::new("Credited", 2),
            EventType::new("Noted", 2),
            EventType::new("LedgerReset", 3),
        ]
    );
    round_trip(Ledger::Credited {
        amount: "ten".to_owned(),
    });
    round_trip(Ledger::Noted("x".to_owned(), 1.5));
    round_trip(Ledger::<()>::Reset);

    let request = Uuid::from_u128(1);
    let credit = Credit {
        wallet: 42_u64,
        request: Some(request),
        amount: 1,
    };
    assert_eq!(
        (credit.aggregate_id(), credit.command_id()),
        ("42".to_owned(), Some(request))
    );
    let tagged = Tagged::<&'static str, Uuid>::B {
        request,
        id: "w",
        note: String::new(),
    };
    assert_eq!(
        (tagged.aggregate_id(), tagged.command_id()),
        ("w".to_owned(), Some(request))
    );
    let untagged = Tagged::<u8, Option<Uuid>>::A {
        id: 1,
        request: None,
    };
    assert_eq!(untagged.command_id(), None);

    assert_eq!(Wallet::<Eur>::TYPE, "Wallet");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let stream = StreamId::new(Wallet::<Eur>::TYPE, "wallet-1").unwrap();
    let limits = Limits {
        max: 100,
        currency: PhantomData,
    };
    let mut wallet = Wallet::<Eur>::default();
    let mut decision = Decision::new(&mut wallet, &stream, 0);
    let credit = Credit {
        wallet: "1".to_owned(),
        request: None,
        amount: 500,
    };
    runtime
        .block_on(<Wallet<Eur> as Aggregate>::handle(
            &mut decision,
            &credit,
            &limits,
        ))
        .unwrap();
    assert_eq!(
        decision.into_emitted(),
        [
            Ledger::Credited { amount: 100 },
            Ledger::Noted("EUR".to_owned(), 100)
        ]
    );
    assert_eq!(wallet.to_snapshot().unwrap(), json!({"balance": 100}));
    assert_eq!(
        Wallet::<Eur>::from_snapshot(&json!({"balance": 3}))
            .unwrap()
            .balance,
        3
    );
}
