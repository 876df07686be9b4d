//! Event versioning: upcasters that read old stored events as current ones.
//!
//! Events are stored forever, while the code that reads them changes. An [`Upcaster`] turns a
//! stored event of one type at schema version N into version N + 1: the same type with a new
//! payload, a renamed type, several events, or nothing (a retired event). It works on the stored
//! JSON, so the old Rust types need not be kept. [`Upcasters`] collects them, checks when it is
//! built that every chain is complete, and is given to a store, which applies it on every read;
//! stored events are never rewritten.
//!
//! ```
//! use esframe_core::upcast::{Upcast, Upcasters, upcaster};
//! use esframe_core::{Event, EventType, DecodeErrorKind};
//! use serde_json::{Value, json};
//!
//! # struct AccountEvent;
//! # impl Event for AccountEvent {
//! #     fn event_types() -> &'static [EventType] { const T: &[EventType] = &[EventType::new("MoneyDeposited", 2)]; T }
//! #     fn event_type(&self) -> &'static str { "MoneyDeposited" }
//! #     fn schema_version(&self) -> u32 { 2 }
//! #     fn to_payload(&self) -> Result<Value, serde_json::Error> { Ok(Value::Null) }
//! #     fn from_payload(_: &str, _: &esframe_core::Payload) -> Result<Self, DecodeErrorKind> { Ok(AccountEvent) }
//! # }
//! // v1 deposits had no currency: they were all in euros.
//! let upcasters = Upcasters::builder()
//!     .register(upcaster("MoneyDeposited", 1, |mut payload: Value| {
//!         payload["currency"] = json!("EUR");
//!         Ok(Upcast::Next(payload))
//!     }))
//!     .current::<AccountEvent>()
//!     .build()
//!     .expect("a complete chain");
//! ```

use std::{borrow::Cow, collections::HashMap, fmt, sync::Arc};

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{CorruptData, Event, RecordedEvent, StoreError};

/// What one upcast step produces from a stored event at version N. Every output is at version
/// N + 1 of its own type, including a renamed type or the parts of a split; the chain then goes
/// on from there until each output reaches its current version.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Upcast {
    /// The same event type at version N + 1.
    Next(Value),
    /// The event under another type name, at version N + 1 of that type.
    Renamed {
        /// The new type name.
        event_type: Cow<'static, str>,
        /// The payload at version N + 1.
        payload: Value,
    },
    /// Several events, each at version N + 1 of its type (an event split in two, say).
    Split(Vec<(Cow<'static, str>, Value)>),
    /// The event is retired: reads no longer return it.
    Drop,
}

/// Why an upcaster could not convert a payload.
pub type UpcastFailure = Box<dyn std::error::Error + Send + Sync>;

/// Converts stored events of one type from one schema version to the next.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an esframe upcaster",
    label = "not an `Upcaster`",
    note = "build one from a function with `esframe_core::upcast::upcaster(\"Type\", from_version, f)` or `typed_upcaster`, or declare it on the event with `#[event(upcast(vN = f))]`"
)]
pub trait Upcaster: Send + Sync + 'static {
    /// The stored event type this upcaster reads.
    fn event_type(&self) -> &str;
    /// The schema version it reads; it produces `source_version() + 1`.
    fn source_version(&self) -> u32;
    /// The type names its output can have; by default only [`Upcaster::event_type`]. Used to
    /// check chains when [`Upcasters`] is built.
    fn output_types(&self) -> Vec<Cow<'static, str>> {
        vec![Cow::Owned(self.event_type().to_owned())]
    }
    /// Converts one payload.
    fn upcast(&self, payload: Value) -> Result<Upcast, UpcastFailure>;
}

/// An upcaster from a closure on the stored JSON, keeping the type name.
pub fn upcaster<F>(event_type: &'static str, from_version: u32, convert: F) -> FnUpcaster<F>
where
    F: Fn(Value) -> Result<Upcast, UpcastFailure> + Send + Sync + 'static,
{
    FnUpcaster {
        event_type,
        from_version,
        outputs: vec![Cow::Borrowed(event_type)],
        convert,
    }
}

/// An upcaster from a typed conversion: the stored payload is read as `Old` and `convert`'s
/// result is stored as the next version of the same type.
///
/// ```
/// use esframe_core::upcast::typed_upcaster;
/// use serde::{Deserialize, Serialize};
/// #[derive(Deserialize)] struct DepositV1 { amount: u64 }
/// #[derive(Serialize)] struct DepositV2 { amount: u64, currency: String }
/// let up = typed_upcaster("MoneyDeposited", 1, |old: DepositV1| DepositV2 {
///     amount: old.amount,
///     currency: "EUR".into(),
/// });
/// ```
pub fn typed_upcaster<Old, New, F>(
    event_type: &'static str,
    from_version: u32,
    convert: F,
) -> FnUpcaster<impl Fn(Value) -> Result<Upcast, UpcastFailure> + Send + Sync + 'static>
where
    Old: DeserializeOwned,
    New: Serialize,
    F: Fn(Old) -> New + Send + Sync + 'static,
{
    upcaster(event_type, from_version, move |payload| {
        let old: Old = serde_json::from_value(payload)?;
        Ok(Upcast::Next(serde_json::to_value(convert(old))?))
    })
}

/// An [`Upcaster`] made from a closure; see [`upcaster`].
pub struct FnUpcaster<F> {
    event_type: &'static str,
    from_version: u32,
    outputs: Vec<Cow<'static, str>>,
    convert: F,
}

impl<F> FnUpcaster<F> {
    /// Declares the type names the closure may produce (for renames and splits).
    #[must_use]
    pub fn outputs(mut self, types: impl IntoIterator<Item = &'static str>) -> Self {
        self.outputs = types.into_iter().map(Cow::Borrowed).collect();
        self
    }
}

impl<F> fmt::Debug for FnUpcaster<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnUpcaster")
            .field("event_type", &self.event_type)
            .field("from_version", &self.from_version)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

impl<F> Upcaster for FnUpcaster<F>
where
    F: Fn(Value) -> Result<Upcast, UpcastFailure> + Send + Sync + 'static,
{
    fn event_type(&self) -> &str {
        self.event_type
    }
    fn source_version(&self) -> u32 {
        self.from_version
    }
    fn output_types(&self) -> Vec<Cow<'static, str>> {
        self.outputs.clone()
    }
    fn upcast(&self, payload: Value) -> Result<Upcast, UpcastFailure> {
        (self.convert)(payload)
    }
}

/// A broken upcaster chain, found when [`Upcasters`] is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpcastChainError {
    /// Two upcasters read the same type and version.
    #[error("two upcasters convert `{event_type}` v{from_version}; keep one")]
    DuplicateStep {
        /// The event type.
        event_type: String,
        /// The version both read.
        from_version: u32,
    },
    /// A chain skips a version.
    #[error(
        "the upcaster chain of `{event_type}` has a gap: nothing converts v{missing_from} to v{}, on the way to the current v{current}",
        missing_from.saturating_add(1)
    )]
    MissingStep {
        /// The event type.
        event_type: String,
        /// The version nothing converts.
        missing_from: u32,
        /// The current version of the type.
        current: u32,
    },
    /// An upcaster reads a version the code already writes (or a newer one).
    #[error(
        "an upcaster converts `{event_type}` v{from_version}, but v{current} is the current version: it would never run or would produce a version the code does not know"
    )]
    BeyondCurrent {
        /// The event type.
        event_type: String,
        /// The version it reads.
        from_version: u32,
        /// The current version.
        current: u32,
    },
    /// A chain ends in a type no registered event enum knows.
    #[error(
        "the upcaster chain from `{from_type}` v{from_version} leads to `{event_type}` v{version}, which no event type of this application declares"
    )]
    DeadEnd {
        /// Where the chain starts.
        from_type: String,
        /// The version it starts at.
        from_version: u32,
        /// The unknown type reached.
        event_type: String,
        /// The version reached.
        version: u32,
    },
    /// Two event enums declare the same type name at different versions; names must be unique
    /// across the store's events, since stored events are looked up by name.
    #[error(
        "event type `{event_type}` is declared at version {first} and at version {second}: event type names must be unique across the enums given to `current`"
    )]
    ConflictingCurrent {
        /// The type name.
        event_type: String,
        /// One declared version.
        first: u32,
        /// The other.
        second: u32,
    },
    /// `Upcasters::build` was called without any current event type.
    #[error("no current event types given: call `.current::<YourEvent>()` before `build()`")]
    NoCurrentTypes,
}

/// An upcaster returned an event type it does not declare in [`Upcaster::output_types`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the upcaster produced an event of type `{produced}`, which it does not declare (it declares {}); add it to its `output_types`",
    .declared.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ")
)]
pub struct UndeclaredOutput {
    /// The type produced.
    pub produced: String,
    /// The types the upcaster declares.
    pub declared: Vec<String>,
}

fn undeclared_output(produced: &str, upcaster: &dyn Upcaster) -> UpcastFailure {
    Box::new(UndeclaredOutput {
        produced: produced.to_owned(),
        declared: upcaster
            .output_types()
            .iter()
            .map(|t| t.to_string())
            .collect(),
    })
}

/// Validated upcaster chains for every stored event type, applied by stores on read.
///
/// Cheap to clone. Guarantees, checked by [`UpcastersBuilder::build`]: at most one upcaster per
/// (type, version); every chain climbs one version per step, without gaps, to the current
/// version of a type some registered event enum declares (so no chain can loop).
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: Arc<Steps>,
}

/// Upcasters by the type and version they read.
type Steps = HashMap<String, HashMap<u32, Arc<dyn Upcaster>>>;

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut steps: Vec<(&str, u32)> = self
            .steps
            .iter()
            .flat_map(|(t, vs)| vs.keys().map(move |v| (t.as_str(), *v)))
            .collect();
        steps.sort_unstable();
        f.debug_struct("Upcasters").field("steps", &steps).finish()
    }
}

/// Collects upcasters and the current event types; see [`Upcasters::builder`].
#[derive(Default)]
#[must_use]
pub struct UpcastersBuilder {
    upcasters: Vec<Arc<dyn Upcaster>>,
    current: HashMap<String, u32>,
    conflict: Option<UpcastChainError>,
}

impl fmt::Debug for UpcastersBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpcastersBuilder")
            .field("upcasters", &self.upcasters.len())
            .field("current", &self.current)
            .finish()
    }
}

impl UpcastersBuilder {
    /// Adds an upcaster.
    pub fn register(mut self, upcaster: impl Upcaster) -> Self {
        self.upcasters.push(Arc::new(upcaster));
        self
    }

    /// Declares the current event types (and versions) of `E`, and registers the upcasters its
    /// `#[derive(Event)]` declares.
    pub fn current<E: Event>(mut self) -> Self {
        for event_type in E::event_types() {
            match self.current.get(event_type.name) {
                Some(&first) if first != event_type.version => {
                    // Stored events are looked up by name alone: two current versions of one
                    // name cannot both be right. Reported by `build`.
                    self.conflict
                        .get_or_insert(UpcastChainError::ConflictingCurrent {
                            event_type: event_type.name.to_owned(),
                            first,
                            second: event_type.version,
                        });
                }
                Some(_) => {}
                None => {
                    self.current
                        .insert(event_type.name.to_owned(), event_type.version);
                }
            }
        }
        self.upcasters.extend(E::upcasters());
        self
    }

    /// Checks every chain and returns the registry.
    pub fn build(self) -> Result<Upcasters, UpcastChainError> {
        if let Some(conflict) = self.conflict {
            return Err(conflict);
        }
        if self.current.is_empty() {
            return Err(UpcastChainError::NoCurrentTypes);
        }
        let mut steps: Steps = HashMap::new();
        for upcaster in self.upcasters {
            let (event_type, from) = (upcaster.event_type().to_owned(), upcaster.source_version());
            let versions = steps.entry(event_type.clone()).or_default();
            if versions.insert(from, upcaster).is_some() {
                return Err(UpcastChainError::DuplicateStep {
                    event_type,
                    from_version: from,
                });
            }
        }
        let mut starts: Vec<(&String, u32)> = steps
            .iter()
            .flat_map(|(t, vs)| vs.keys().map(move |v| (t, *v)))
            .collect();
        starts.sort_unstable();
        for (event_type, from) in starts {
            if let Some(&current) = self.current.get(event_type)
                && from >= current
            {
                return Err(UpcastChainError::BeyondCurrent {
                    event_type: event_type.clone(),
                    from_version: from,
                    current,
                });
            }
            let upcaster = &steps[event_type][&from];
            for output in upcaster.output_types() {
                check_reaches_current(
                    &steps,
                    &self.current,
                    event_type,
                    from,
                    &output,
                    from.saturating_add(1),
                )?;
            }
        }
        Ok(Upcasters {
            steps: Arc::new(steps),
        })
    }
}

/// Follows the chain from (`event_type`, `version`) until a current version, failing on gaps
/// and dead ends. Versions only grow, so this always ends.
fn check_reaches_current(
    steps: &Steps,
    current: &HashMap<String, u32>,
    from_type: &str,
    from_version: u32,
    event_type: &str,
    version: u32,
) -> Result<(), UpcastChainError> {
    match current.get(event_type) {
        Some(&now) if version == now => Ok(()),
        Some(&now) if version > now => Err(UpcastChainError::BeyondCurrent {
            event_type: event_type.to_owned(),
            from_version: version - 1,
            current: now,
        }),
        Some(&now) => match steps.get(event_type).and_then(|vs| vs.get(&version)) {
            // The step itself is checked when the outer loop reaches it.
            Some(_) => Ok(()),
            None => Err(UpcastChainError::MissingStep {
                event_type: event_type.to_owned(),
                missing_from: version,
                current: now,
            }),
        },
        None => match steps.get(event_type).and_then(|vs| vs.get(&version)) {
            Some(_) => Ok(()),
            None => Err(UpcastChainError::DeadEnd {
                from_type: from_type.to_owned(),
                from_version,
                event_type: event_type.to_owned(),
                version,
            }),
        },
    }
}

impl Upcasters {
    /// Starts collecting upcasters.
    pub fn builder() -> UpcastersBuilder {
        UpcastersBuilder::default()
    }

    /// No upcasters: what a store without any returns from
    /// [`EventStore::upcasters`](crate::EventStore::upcasters).
    pub fn none() -> &'static Upcasters {
        static NONE: std::sync::LazyLock<Upcasters> = std::sync::LazyLock::new(Upcasters::default);
        &NONE
    }

    /// Whether no upcaster is registered (reads then cost nothing extra).
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Whether an upcaster converts `event_type` at `schema_version` (the first step of
    /// [`Upcasters::apply`]).
    pub fn applies_to(&self, event_type: &str, schema_version: u32) -> bool {
        self.steps
            .get(event_type)
            .is_some_and(|versions| versions.contains_key(&schema_version))
    }

    /// Brings `event` to its current version, pushing the result(s) onto `out`: usually one
    /// event, none for a retired one, several for a split. Events no upcaster reads pass through
    /// unchanged (decoding then reports an unknown type or version).
    pub fn apply(
        &self,
        mut event: RecordedEvent,
        out: &mut Vec<RecordedEvent>,
    ) -> Result<(), StoreError> {
        let upcaster = if self.steps.is_empty() {
            None
        } else {
            self.steps
                .get(event.event_type.as_ref())
                .and_then(|versions| versions.get(&event.schema_version))
        };
        let Some(upcaster) = upcaster else {
            out.push(event);
            return Ok(());
        };
        let fail = |event: &RecordedEvent, source: UpcastFailure| StoreError::Upcast {
            stream: event.stream_id.clone(),
            version: event.stream_version,
            event_type: event.event_type.to_string(),
            schema_version: event.schema_version,
            source,
        };
        let payload = match std::mem::take(&mut event.payload).into_value() {
            Ok(payload) => payload,
            Err(unreadable) => {
                return Err(StoreError::Corrupt(
                    CorruptData::new(
                        event.stream_id.clone(),
                        event.stream_version,
                        format!("payload: {unreadable}"),
                    )
                    .event_type(event.event_type.to_string()),
                ));
            }
        };
        let converted = upcaster
            .upcast(payload)
            .map_err(|source| fail(&event, source))?;
        // The chains were checked against the types each upcaster declares; an output of
        // another type would escape that check (and could loop or dead-end).
        let produced: &[Cow<'static, str>] = match &converted {
            Upcast::Renamed { event_type, .. } => std::slice::from_ref(event_type),
            Upcast::Split(parts) => {
                if let Some((undeclared, _)) = parts
                    .iter()
                    .find(|(t, _)| !upcaster.output_types().contains(t))
                {
                    return Err(fail(
                        &event,
                        undeclared_output(undeclared, upcaster.as_ref()),
                    ));
                }
                &[]
            }
            _ => &[],
        };
        if let Some(undeclared) = produced
            .iter()
            .find(|t| !upcaster.output_types().contains(t))
        {
            return Err(fail(
                &event,
                undeclared_output(undeclared, upcaster.as_ref()),
            ));
        }
        event.schema_version = event.schema_version.saturating_add(1);
        match converted {
            Upcast::Next(payload) => {
                event.payload = payload.into();
                self.apply(event, out)
            }
            Upcast::Renamed {
                event_type,
                payload,
            } => {
                event.event_type = event_type;
                event.payload = payload.into();
                self.apply(event, out)
            }
            Upcast::Split(parts) => {
                for (event_type, payload) in parts {
                    let mut part = event.clone();
                    part.event_type = event_type;
                    part.payload = payload.into();
                    self.apply(part, out)?;
                }
                Ok(())
            }
            Upcast::Drop => Ok(()),
        }
    }

    /// [`Upcasters::apply`] over a batch of events read from a store.
    pub fn apply_all(&self, events: Vec<RecordedEvent>) -> Result<Vec<RecordedEvent>, StoreError> {
        if self.is_empty() {
            return Ok(events);
        }
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            self.apply(event, &mut out)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{DecodeErrorKind, EventType, StreamId};

    /// Current types: `MoneyDeposited` v3, `AccountClosed` v3.
    struct Current;
    impl Event for Current {
        fn event_types() -> &'static [EventType] {
            const T: &[EventType] = &[
                EventType::new("MoneyDeposited", 3),
                EventType::new("AccountClosed", 3),
            ];
            T
        }
        fn event_type(&self) -> &'static str {
            "MoneyDeposited"
        }
        fn schema_version(&self) -> u32 {
            3
        }
        fn to_payload(&self) -> Result<Value, serde_json::Error> {
            Ok(Value::Null)
        }
        fn from_payload(_: &str, _: &crate::Payload) -> Result<Self, DecodeErrorKind> {
            Ok(Current)
        }
    }

    fn next(event_type: &'static str, from: u32) -> impl Upcaster {
        upcaster(event_type, from, |p| Ok(Upcast::Next(p)))
    }

    /// A step added to a builder.
    type AddStep = Box<dyn FnOnce(UpcastersBuilder) -> UpcastersBuilder>;

    fn build(upcasters: Vec<AddStep>) -> Result<Upcasters, UpcastChainError> {
        upcasters
            .into_iter()
            .fold(Upcasters::builder().current::<Current>(), |b, add| add(b))
            .build()
    }

    #[test]
    fn a_complete_chain_builds() {
        let built = build(vec![
            Box::new(|b| b.register(next("MoneyDeposited", 1))),
            Box::new(|b| b.register(next("MoneyDeposited", 2))),
        ]);
        assert!(built.is_ok(), "{built:?}");
    }

    #[test]
    fn every_broken_chain_is_refused_with_its_step() {
        let cases: Vec<(Vec<AddStep>, UpcastChainError, &str)> = vec![
            (
                vec![Box::new(|b| b.register(next("MoneyDeposited", 1)))],
                UpcastChainError::MissingStep {
                    event_type: "MoneyDeposited".into(),
                    missing_from: 2,
                    current: 3,
                },
                "the upcaster chain of `MoneyDeposited` has a gap: nothing converts v2 to v3, on the way to the current v3",
            ),
            (
                vec![
                    Box::new(|b| b.register(next("MoneyDeposited", 2))),
                    Box::new(|b| b.register(next("MoneyDeposited", 2))),
                ],
                UpcastChainError::DuplicateStep {
                    event_type: "MoneyDeposited".into(),
                    from_version: 2,
                },
                "two upcasters convert `MoneyDeposited` v2; keep one",
            ),
            (
                vec![Box::new(|b| b.register(next("MoneyDeposited", 3)))],
                UpcastChainError::BeyondCurrent {
                    event_type: "MoneyDeposited".into(),
                    from_version: 3,
                    current: 3,
                },
                "an upcaster converts `MoneyDeposited` v3, but v3 is the current version: it would never run or would produce a version the code does not know",
            ),
            (
                vec![Box::new(|b| b.register(next("Deposited", 1)))],
                UpcastChainError::DeadEnd {
                    from_type: "Deposited".into(),
                    from_version: 1,
                    event_type: "Deposited".into(),
                    version: 2,
                },
                "the upcaster chain from `Deposited` v1 leads to `Deposited` v2, which no event type of this application declares",
            ),
            (
                vec![Box::new(|b| {
                    b.register(
                        upcaster("Deposited", 1, |p| {
                            Ok(Upcast::Renamed {
                                event_type: "MoneyDeposited".into(),
                                payload: p,
                            })
                        })
                        .outputs(["MoneyDeposited"]),
                    )
                })],
                UpcastChainError::MissingStep {
                    event_type: "MoneyDeposited".into(),
                    missing_from: 2,
                    current: 3,
                },
                "the upcaster chain of `MoneyDeposited` has a gap: nothing converts v2 to v3, on the way to the current v3",
            ),
        ];
        for (steps, expected, message) in cases {
            let err = build(steps).unwrap_err();
            assert_eq!(err, expected);
            assert_eq!(err.to_string(), message);
        }
        assert_eq!(
            Upcasters::builder().build().unwrap_err(),
            UpcastChainError::NoCurrentTypes
        );
    }

    fn stored(event_type: &'static str, schema_version: u32, payload: Value) -> RecordedEvent {
        RecordedEvent {
            event_id: uuid::Uuid::now_v7(),
            stream_id: StreamId::new("account", "s").unwrap(),
            stream_version: 4,
            global_position: crate::Position::new(9),
            recorded_at: chrono::Utc::now(),
            event_type: event_type.into(),
            schema_version,
            payload: payload.into(),
            metadata: Default::default(),
        }
    }

    #[test]
    fn an_unreadable_stored_payload_is_corrupt_data_naming_the_event() {
        let upcasters = Upcasters::builder()
            .current::<Current>()
            .register(next("MoneyDeposited", 1))
            .register(next("MoneyDeposited", 2))
            .build()
            .unwrap();
        let mut event = stored("MoneyDeposited", 1, Value::Null);
        event.payload = crate::Payload::from_json_text("[".repeat(200) + &"]".repeat(200));
        match upcasters.apply_all(vec![event]).unwrap_err() {
            StoreError::Corrupt(corrupt) => {
                assert_eq!((corrupt.stream.id(), corrupt.version), ("s", 4));
                assert_eq!(corrupt.event_type.as_deref(), Some("MoneyDeposited"));
                assert!(corrupt.problem.contains("recursion limit"), "{corrupt}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn renames_splits_and_drops_reach_current_versions() {
        let upcasters = Upcasters::builder()
            .current::<Current>()
            .register(
                upcaster("Deposited", 1, |p| {
                    Ok(Upcast::Renamed {
                        event_type: "MoneyDeposited".into(),
                        payload: p,
                    })
                })
                .outputs(["MoneyDeposited"]),
            )
            .register(upcaster("MoneyDeposited", 2, |mut p| {
                p["currency"] = json!("EUR");
                Ok(Upcast::Next(p))
            }))
            .register(
                upcaster("DepositedAndClosed", 2, |p| {
                    Ok(Upcast::Split(vec![
                        ("MoneyDeposited".into(), p),
                        ("AccountClosed".into(), json!({})),
                    ]))
                })
                .outputs(["MoneyDeposited", "AccountClosed"]),
            )
            .register(upcaster("Audited", 1, |_| Ok(Upcast::Drop)).outputs([]))
            .build()
            .unwrap();
        let read = upcasters
            .apply_all(vec![
                stored("Deposited", 1, json!({"amount": 5})),
                stored("DepositedAndClosed", 2, json!({"amount": 7})),
                stored("Audited", 1, json!({})),
                stored("MoneyDeposited", 3, json!({"amount": 1, "currency": "USD"})),
            ])
            .unwrap();
        let summary: Vec<(&str, u32, &Value)> = read
            .iter()
            .map(|e| (e.event_type.as_ref(), e.schema_version, &*e.payload))
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "MoneyDeposited",
                    3,
                    &json!({"amount": 5, "currency": "EUR"})
                ),
                // The split's part is born at v3: the v2 -> v3 step does not apply to it.
                ("MoneyDeposited", 3, &json!({"amount": 7})),
                ("AccountClosed", 3, &json!({})),
                (
                    "MoneyDeposited",
                    3,
                    &json!({"amount": 1, "currency": "USD"})
                ),
            ]
        );
        assert!(
            read.iter()
                .all(|e| e.stream_version == 4 && e.global_position == crate::Position::new(9))
        );
    }

    #[test]
    fn two_enums_declaring_one_type_at_different_versions_are_refused() {
        struct Older;
        impl Event for Older {
            fn event_types() -> &'static [EventType] {
                const T: &[EventType] = &[EventType::new("MoneyDeposited", 2)];
                T
            }
            fn event_type(&self) -> &'static str {
                "MoneyDeposited"
            }
            fn schema_version(&self) -> u32 {
                2
            }
            fn to_payload(&self) -> Result<Value, serde_json::Error> {
                Ok(Value::Null)
            }
            fn from_payload(_: &str, _: &crate::Payload) -> Result<Self, DecodeErrorKind> {
                Ok(Older)
            }
        }
        let err = Upcasters::builder()
            .current::<Current>()
            .current::<Older>()
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            UpcastChainError::ConflictingCurrent {
                event_type: "MoneyDeposited".into(),
                first: 3,
                second: 2,
            }
        );
        // The same enum given twice is fine.
        assert!(
            Upcasters::builder()
                .current::<Current>()
                .current::<Current>()
                .build()
                .is_ok()
        );
    }

    #[test]
    fn an_upcaster_producing_a_type_it_did_not_declare_is_a_typed_error() {
        let upcasters = Upcasters::builder()
            .current::<Current>()
            .register(
                upcaster("Deposited", 1, |p| {
                    Ok(Upcast::Renamed {
                        event_type: "Surprise".into(),
                        payload: p,
                    })
                })
                .outputs(["MoneyDeposited"]),
            )
            .register(
                upcaster("Pair", 2, |p| {
                    Ok(Upcast::Split(vec![
                        ("MoneyDeposited".into(), p.clone()),
                        ("Unannounced".into(), p),
                    ]))
                })
                .outputs(["MoneyDeposited"]),
            )
            .register(next("MoneyDeposited", 2))
            .build()
            .unwrap();
        for (event_type, version, produced) in
            [("Deposited", 1, "Surprise"), ("Pair", 2, "Unannounced")]
        {
            let err = upcasters
                .apply_all(vec![stored(event_type, version, json!({}))])
                .unwrap_err();
            let StoreError::Upcast { source, .. } = &err else {
                panic!("expected Upcast, got {err:?}");
            };
            let undeclared = source.to_string();
            assert!(
                undeclared.contains(&format!("`{produced}`"))
                    && undeclared.contains("declares `MoneyDeposited`"),
                "{undeclared}"
            );
        }
    }

    #[test]
    fn a_failing_upcaster_is_a_typed_error_naming_the_event() {
        let upcasters = Upcasters::builder()
            .current::<Current>()
            .register(typed_upcaster("MoneyDeposited", 1, |old: u64| old))
            .register(next("MoneyDeposited", 2))
            .build()
            .unwrap();
        let err = upcasters
            .apply_all(vec![stored("MoneyDeposited", 1, json!({"amount": "x"}))])
            .unwrap_err();
        match &err {
            StoreError::Upcast {
                stream,
                version,
                event_type,
                schema_version,
                ..
            } => {
                assert_eq!(
                    (stream.id(), *version, event_type.as_str(), *schema_version),
                    ("s", 4, "MoneyDeposited", 1)
                );
            }
            other => panic!("expected Upcast, got {other:?}"),
        }
        assert!(
            err.to_string()
                .contains("at version 4 of stream `account/s`"),
            "{err}"
        );
    }
}
