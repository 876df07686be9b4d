//! The upcasting checks: every read path of a store built with [`sample_upcasters`] brings old
//! events to their current version. Run them with [`upcasting_suite!`](crate::upcasting_suite).

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use futures_util::StreamExt;

use crate::{
    Aggregate, Command, CommandHandler, Decision, DecodeErrorKind, Event, EventMetadata, EventType,
    ExpectedVersion, GlobalLog, NewEvent, Payload, Position, RecordedEvent, StoreError, StreamId,
    upcast::{Upcast, Upcasters, upcaster},
};

/// The current event type of the fixture: `Sampled` v3 `{ "amount": n, "currency": c }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The amount.
    pub amount: u64,
    /// The currency.
    pub currency: String,
}

impl Event for Sampled {
    fn event_types() -> &'static [EventType] {
        const TYPES: &[EventType] = &[EventType::new("Sampled", 3)];
        TYPES
    }
    fn event_type(&self) -> &'static str {
        "Sampled"
    }
    fn schema_version(&self) -> u32 {
        3
    }
    fn to_payload(&self) -> Result<Value, serde_json::Error> {
        Ok(json!({ "amount": self.amount, "currency": self.currency }))
    }
    fn from_payload(event_type: &str, payload: &Payload) -> Result<Self, DecodeErrorKind> {
        let parsed = (event_type == "Sampled")
            .then(|| {
                Some((
                    payload["amount"].as_u64()?,
                    payload["currency"].as_str()?.to_owned(),
                ))
            })
            .flatten();
        match parsed {
            Some((amount, currency)) => Ok(Self { amount, currency }),
            None if event_type != "Sampled" => Err(DecodeErrorKind::UnknownType),
            None => Err(DecodeErrorKind::Payload(serde::de::Error::custom(format!(
                "not a Sampled v3 payload: {payload}"
            )))),
        }
    }
}

/// The fixture aggregate over [`Sampled`]: the sum of the amounts and how many events made it.
/// Its command, [`AddSample`], emits one `Sampled` in EUR.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SampledTotal {
    /// The sum of the amounts applied.
    pub total: u64,
    /// How many events were applied.
    pub events: u64,
}

/// Adds one sample of `amount` to the stream `id`.
#[derive(Debug, Clone)]
pub struct AddSample {
    /// The stream.
    pub id: String,
    /// The amount.
    pub amount: u64,
}

impl Command for AddSample {
    fn aggregate_id(&self) -> String {
        self.id.clone()
    }
}

/// `SampledTotal` never refuses a command.
#[derive(Debug, thiserror::Error)]
#[error("never happens")]
pub struct NeverRefused;

impl Aggregate for SampledTotal {
    const TYPE: &'static str = "sample";
    type Command = AddSample;
    type Event = Sampled;
    type Error = NeverRefused;
    type Services = ();

    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &AddSample,
        _: &(),
    ) -> Result<(), NeverRefused> {
        decision.emit(Sampled {
            amount: command.amount,
            currency: "EUR".into(),
        });
        Ok(())
    }

    fn apply(&mut self, event: &Sampled) {
        self.total += event.amount;
        self.events += 1;
    }

    fn to_snapshot(&self) -> Result<Value, serde_json::Error> {
        Ok(json!({ "total": self.total, "events": self.events }))
    }

    fn from_snapshot(state: &Value) -> Result<Self, serde_json::Error> {
        let field = |name: &str| {
            state[name]
                .as_u64()
                .ok_or_else(|| serde::de::Error::custom(format!("`{name}` is not a number")))
        };
        Ok(Self {
            total: field("total")?,
            events: field("events")?,
        })
    }
}

/// The fixture chain: `Sampled` v1 `{amt}` -> v2 `{amount}` -> v3 `{amount, currency: "EUR"}`;
/// the retired `OldSampled` v1 is renamed to `Sampled` v2; `Noise` v1 is dropped; `Pair` v2
/// `{a, b}` is split into two `Sampled` v3 in EUR. A v1 payload whose `amt` is not a number
/// makes the first step fail.
pub fn sample_upcasters() -> Upcasters {
    Upcasters::builder()
        .current::<Sampled>()
        .register(upcaster("Sampled", 1, |payload: Value| {
            let amount = payload["amt"].as_u64().ok_or("`amt` is not a number")?;
            Ok(Upcast::Next(json!({ "amount": amount })))
        }))
        .register(upcaster("Sampled", 2, |mut payload: Value| {
            payload["currency"] = json!("EUR");
            Ok(Upcast::Next(payload))
        }))
        .register(
            upcaster("OldSampled", 1, |payload| {
                Ok(Upcast::Renamed {
                    event_type: "Sampled".into(),
                    payload,
                })
            })
            .outputs(["Sampled"]),
        )
        .register(upcaster("Noise", 1, |_| Ok(Upcast::Drop)).outputs([]))
        .register(
            upcaster("Pair", 2, |payload| {
                let part = |amount: &Value| json!({ "amount": amount, "currency": "EUR" });
                Ok(Upcast::Split(vec![
                    ("Sampled".into(), part(&payload["a"])),
                    ("Sampled".into(), part(&payload["b"])),
                ]))
            })
            .outputs(["Sampled"]),
        )
        .build()
        .expect("the fixture chain is complete")
}

fn raw(event_type: &'static str, schema_version: u32, payload: Value) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: event_type.into(),
        schema_version,
        payload,
        metadata: EventMetadata::default(),
    }
}

fn decoded(events: &[RecordedEvent]) -> Vec<Sampled> {
    events
        .iter()
        .map(|e| {
            e.decode::<Sampled>()
                .expect("every event reads as the current type")
        })
        .collect()
}

/// Old events, stored as their old JSON, come back at the current version from every read path.
pub async fn old_events_are_read_at_their_current_version<S: GlobalLog>(store: S) {
    let stream = StreamId::new(SampledTotal::TYPE, "upcast-history").expect("valid id");
    let history = vec![
        raw("Sampled", 1, json!({ "amt": 1 })),
        raw("Noise", 1, json!({ "loud": true })),
        raw("OldSampled", 1, json!({ "amount": 2 })),
        raw("Sampled", 2, json!({ "amount": 3 })),
        raw("Sampled", 3, json!({ "amount": 4, "currency": "USD" })),
    ];
    store
        .append(&stream, ExpectedVersion::NoStream, history)
        .await
        .expect("append");
    let expected = vec![
        Sampled {
            amount: 1,
            currency: "EUR".into(),
        },
        Sampled {
            amount: 2,
            currency: "EUR".into(),
        },
        Sampled {
            amount: 3,
            currency: "EUR".into(),
        },
        Sampled {
            amount: 4,
            currency: "USD".into(),
        },
    ];

    let by_stream = store.read_stream(&stream, 1).await.expect("read_stream");
    assert_eq!(decoded(&by_stream), expected, "read_stream upcasts");
    let for_state = store
        .read_stream_for_state(&stream, 1)
        .await
        .expect("read_stream_for_state");
    assert_eq!(
        for_state,
        by_stream
            .iter()
            .cloned()
            .map(crate::LoadedEvent::from_recorded)
            .collect::<Vec<_>>(),
        "read_stream_for_state upcasts, and only the events that need it"
    );
    assert!(
        by_stream
            .iter()
            .all(|e| e.schema_version == 3 && e.event_type == "Sampled")
    );
    assert_eq!(
        by_stream
            .iter()
            .map(|e| e.stream_version)
            .collect::<Vec<_>>(),
        vec![1, 3, 4, 5],
        "stored versions are kept; the dropped event leaves a hole"
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let global = loop {
        let events = store
            .read_all(Position::START, 100)
            .await
            .expect("read_all");
        if events.len() >= 4 || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(decoded(&global), expected, "read_all upcasts");

    // Batches of one: the dropped event is a whole batch that returns nothing, and the
    // subscription must still move past it.
    let mut subscription = store.subscribe(Position::START).batch_size(1);
    let mut live = Vec::new();
    for _ in 0..4 {
        let next = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("an event within 10 s")
            .expect("a following subscription never ends")
            .expect("subscription");
        live.push(next);
    }
    assert_eq!(decoded(&live), expected, "subscriptions upcast");
    assert_eq!(
        store.stream_version(&stream).await.expect("version"),
        Some(5)
    );
}

/// A command handler applies every part of a split event and a dropped one leaves its version
/// taken: the state sees all amounts and the next command appends after the stored version.
pub async fn the_handler_applies_split_and_dropped_events<S: GlobalLog>(store: S) {
    let stream = StreamId::new(SampledTotal::TYPE, "upcast-handler").expect("valid id");
    let history = vec![
        raw("Pair", 2, json!({ "a": 1, "b": 2 })),
        raw("Noise", 1, json!({ "loud": true })),
        raw("Pair", 2, json!({ "a": 3, "b": 4 })),
        raw("Noise", 1, json!({ "loud": false })),
    ];
    store
        .append(&stream, ExpectedVersion::NoStream, history)
        .await
        .expect("append");
    let handler = CommandHandler::<SampledTotal, _>::new(store).without_state_cache();
    let loaded = handler.load(stream.id()).await.expect("load");
    assert_eq!(
        (loaded.state.total, loaded.state.events, loaded.version),
        (10, 4, 4),
        "both parts of both splits applied, at the stored version"
    );
    let outcome = handler
        .execute(AddSample {
            id: stream.id().into(),
            amount: 5,
        })
        .await
        .expect("a command after the history");
    assert_eq!(
        outcome.version, 5,
        "appended after the dropped event's version"
    );
    let loaded = handler.load(stream.id()).await.expect("load");
    assert_eq!((loaded.state.total, loaded.state.events), (15, 5));
}

/// Past states (`load_at`, `load_as_of`) are rebuilt through the same upcasters: a split
/// event's parts share its version, a dropped one applies nothing.
pub async fn past_states_are_rebuilt_through_upcasters<S: GlobalLog>(store: S) {
    let stream = StreamId::new(SampledTotal::TYPE, "upcast-past").expect("valid id");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![
                raw("Sampled", 1, json!({ "amt": 1 })),
                raw("Pair", 2, json!({ "a": 2, "b": 3 })),
            ],
        )
        .await
        .expect("append");
    tokio::time::sleep(Duration::from_millis(20)).await;
    store
        .append(
            &stream,
            ExpectedVersion::Exact(2),
            vec![
                raw("Noise", 1, json!({ "loud": true })),
                raw("Sampled", 3, json!({ "amount": 10, "currency": "EUR" })),
            ],
        )
        .await
        .expect("append");
    let handler = CommandHandler::<SampledTotal, _>::new(store.clone());
    let at = |version: u64| {
        let handler = handler.clone();
        async move {
            let loaded = handler
                .load_at("upcast-past", version)
                .await
                .expect("load_at");
            (loaded.version, loaded.state.total, loaded.state.events)
        }
    };
    assert_eq!(at(0).await, (0, 0, 0), "before the first event");
    assert_eq!(at(1).await, (1, 1, 1));
    assert_eq!(
        at(2).await,
        (2, 6, 3),
        "both parts of the split, at its version"
    );
    assert_eq!(at(3).await, (3, 6, 3), "the dropped event applies nothing");
    assert_eq!(at(4).await, (4, 16, 4));
    assert_eq!(at(99).await, (4, 16, 4), "past the end: the current state");

    let stored = store.load_stream(&stream, 1).await.expect("stored rows");
    let first_append = stored[1].recorded_at;
    let as_of = |moment| {
        let handler = handler.clone();
        async move {
            let loaded = handler
                .load_as_of("upcast-past", moment)
                .await
                .expect("load_as_of");
            (loaded.version, loaded.state.total)
        }
    };
    assert_eq!(as_of(first_append).await, (2, 6), "the first append only");
    assert_eq!(
        as_of(stored[0].recorded_at - chrono::TimeDelta::milliseconds(1)).await,
        (0, 0),
        "before anything was recorded"
    );
    assert_eq!(as_of(chrono::Utc::now()).await, (4, 16));
}

/// A payload an upcaster cannot convert is a typed error naming the event; nothing changes.
pub async fn failing_upcasters_are_typed_errors<S: GlobalLog>(store: S) {
    let stream = StreamId::new(SampledTotal::TYPE, "upcast-broken").expect("valid id");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![raw("Sampled", 1, json!({ "amt": "many" }))],
        )
        .await
        .expect("append");
    for _ in 0..2 {
        match store.read_stream(&stream, 1).await {
            Err(StoreError::Upcast {
                stream: s,
                version,
                event_type,
                schema_version,
                source,
            }) => {
                assert_eq!(
                    (s, version, event_type.as_str(), schema_version),
                    (stream.clone(), 1, "Sampled", 1)
                );
                assert_eq!(source.to_string(), "`amt` is not a number");
            }
            other => panic!("expected StoreError::Upcast, got {other:?}"),
        }
    }
    assert_eq!(
        store.stream_version(&stream).await.expect("version"),
        Some(1),
        "the event is still stored"
    );
}
