//! # esframe-derive
//!
//! The derive macros of esframe: `#[derive(Event)]`, `#[derive(Command)]`,
//! `#[derive(Aggregate)]` and `#[derive(ProjectionEvents)]`. Use them through `esframe_core`,
//! which re-exports each derive under the name of the trait it implements (as serde does), so
//! one import brings both (`ProjectionEvents` from `esframe_core::projection`, beside its
//! trait):
//!
//! ```
//! use esframe_core::{Aggregate, Command, Decision, Event};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
//! enum AccountEvent {
//!     #[event(name = "AccountOpened")]
//!     Opened { owner: String },
//!     #[event(version = 2)]
//!     Deposited { amount: u64 },
//! }
//!
//! #[derive(Command)]
//! #[command(aggregate_id = account_id)]
//! enum AccountCommand {
//!     Open { account_id: String, owner: String },
//!     Deposit { account_id: String, amount: u64 },
//! }
//!
//! #[derive(Debug, thiserror::Error)]
//! enum AccountError {
//!     #[error("the account is already open")]
//!     AlreadyOpen,
//! }
//!
//! #[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
//! #[aggregate(name = "account", command = AccountCommand, event = AccountEvent, error = AccountError)]
//! struct Account {
//!     owner: Option<String>,
//!     balance: u64,
//! }
//!
//! impl Account {
//!     async fn handle(
//!         decision: &mut Decision<'_, Self>,
//!         command: &AccountCommand,
//!         _services: &(),
//!     ) -> Result<(), AccountError> {
//!         match command {
//!             AccountCommand::Open { .. } if decision.owner.is_some() => {
//!                 return Err(AccountError::AlreadyOpen);
//!             }
//!             AccountCommand::Open { owner, .. } => {
//!                 decision.emit(AccountEvent::Opened { owner: owner.clone() });
//!             }
//!             AccountCommand::Deposit { amount, .. } => {
//!                 decision.emit(AccountEvent::Deposited { amount: *amount });
//!             }
//!         }
//!         Ok(())
//!     }
//!
//!     fn apply(&mut self, event: &AccountEvent) {
//!         match event {
//!             AccountEvent::Opened { owner } => self.owner = Some(owner.clone()),
//!             AccountEvent::Deposited { amount } => self.balance += amount,
//!         }
//!     }
//! }
//!
//! # fn main() {
//! let opened = AccountEvent::Opened { owner: "ada".into() };
//! assert_eq!(opened.event_type(), "AccountOpened");
//! assert_eq!(opened.to_payload().unwrap(), serde_json::json!({"owner": "ada"}));
//! let deposit = AccountCommand::Deposit { account_id: "acc-1".into(), amount: 5 };
//! assert_eq!(deposit.aggregate_id(), "acc-1");
//! assert_eq!(Account::TYPE, "account");
//! # }
//! ```
//!
//! `Event`, `Command` and `Aggregate` accept type parameters (bounds the generated code needs
//! are added to the impl's `where` clause) and reject lifetime parameters: events, commands and
//! aggregates own their data (the traits require `'static`). `ProjectionEvents` rejects both.
//!
//! ## `#[derive(Event)]`
//!
//! Implements [`Event`] for an enum with one variant per event type. Unit, tuple and struct
//! variants are all supported. The enum must also implement serde's `Serialize` and
//! `Deserialize`; without them the error is reported on the enum's name.
//!
//! | attribute | on | meaning | default |
//! |---|---|---|---|
//! | `#[event(version = N)]` | the enum | schema version of every variant | `1` |
//! | `#[event(version = N)]` | a variant | schema version of this event type, overriding the enum's | the enum's |
//! | `#[event(name = "...")]` | a variant | the stored event type name | the variant's name as written (`r#` removed) |
//! | `#[event(upcast(vN = path, ...))]` | a variant | the upcasters from older versions of this event type | none |
//!
//! Versions are integer literals of at least 1. Names are not empty, contain no whitespace or
//! control characters, and are unique within the enum.
//!
//! **Stored form.** An event is stored as its type name, its schema version and a payload: the
//! JSON serde produces for the variant's data alone (`null` for a unit variant, the value for a
//! one-field tuple variant, an array for a longer tuple variant, an object for a struct
//! variant). The name is stored beside the payload, so the variant's Rust name and its serde name
//! do not matter to stored data. Reading decodes the payload as the variant at the position the
//! name maps to, so serde attributes that rename (`rename`, `rename_all`, `alias`) or fill in
//! fields (`default`) keep working. What is rejected, on the attribute:
//!
//! - `#[serde(tag = "...")]`, `#[serde(content = "...")]` and `#[serde(untagged)]` on the enum:
//!   the event type is stored beside the data, not inside it;
//! - `#[serde(skip)]`, `skip_serializing`, `skip_deserializing`, `other` and `untagged` on a
//!   variant: every variant must serialize and deserialize as itself, at its own position.
//!
//! The generated impl:
//!
//! - `event_types()` lists `EventType::new(name, version)` for every variant, in declaration
//!   order;
//! - `event_type(&self)` and `schema_version(&self)` match on the variant;
//! - `to_payload(&self)` serializes the variant's data;
//! - `from_payload(event_type, payload)` maps the name to the variant and decodes the payload as
//!   that variant; an unknown name is `DecodeErrorKind::UnknownType`;
//! - `upcasters()`, only if a variant declares `upcast(...)`, builds one
//!   `esframe_core::upcast::upcaster(name, N, path)` per declared `vN = path`.
//!
//! **Upcasters.** When a variant's data changes shape, raise its `version` and declare, next to
//! it, the functions that bring payloads stored under older versions up to date. `vN = path`
//! registers the function `path`, a `fn(serde_json::Value) -> Result<Upcast, UpcastFailure>`
//! (see `esframe_core::upcast`), as the upcaster of this variant's stored event type name from
//! schema version N to N + 1:
//!
//! ```
//! use esframe_core::upcast::{Upcast, UpcastFailure};
//! use esframe_core::{Event, Upcasters};
//! use serde::{Deserialize, Serialize};
//! use serde_json::{Value, json};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
//! enum AccountEvent {
//!     #[event(version = 3, upcast(v1 = deposit_v1_to_v2, v2 = deposit_v2_to_v3))]
//!     MoneyDeposited { amount: u64, currency: String, note: Option<String> },
//! }
//!
//! /// v1 deposits had no currency: they were all in euros.
//! fn deposit_v1_to_v2(mut payload: Value) -> Result<Upcast, UpcastFailure> {
//!     payload["currency"] = json!("EUR");
//!     Ok(Upcast::Next(payload))
//! }
//!
//! /// v3 added an optional note.
//! fn deposit_v2_to_v3(mut payload: Value) -> Result<Upcast, UpcastFailure> {
//!     payload["note"] = Value::Null;
//!     Ok(Upcast::Next(payload))
//! }
//!
//! # fn main() {
//! // `current::<AccountEvent>()` registers the upcasters the derive declares.
//! let upcasters = Upcasters::builder().current::<AccountEvent>().build().unwrap();
//! assert!(!upcasters.is_empty());
//! assert_eq!(AccountEvent::upcasters().len(), 2);
//! # }
//! ```
//!
//! The derive overrides `Event::upcasters()` with these, lowest version first, when any variant
//! declares one, and checks at compile time, on the tokens written:
//!
//! - keys are `v1`, `v2`, ...: the version the upcaster reads, at least 1, each given once per
//!   variant (over all its `upcast(...)` lists);
//! - every key is below the variant's version: `v2` upcasts to v3, so the variant is at version
//!   3 or more;
//! - the keys climb one version at a time to the variant's version: the highest is `version - 1`
//!   and none is skipped between the lowest and it. The lowest may be above `v1`, for an event
//!   type first stored at a later version;
//! - the value is a path to a function with the upcaster signature; another signature is a type
//!   error on that path;
//! - `upcast` is written on variants, not on the enum.
//!
//! Each declared upcaster keeps the event type's name. One that renames or splits an event
//! (`Upcast::Renamed`, `Upcast::Split`) must declare the types it produces with
//! `FnUpcaster::outputs`, so register it by hand with `UpcastersBuilder::register`.
//!
//! ## `#[derive(Command)]`
//!
//! Implements [`Command`] for a struct or an enum: `aggregate_id()` is the
//! [`Display`](std::fmt::Display) text of the field that names the target aggregate, and
//! `command_id()` the field that carries the command's own id, if one is marked.
//!
//! | attribute | on | meaning |
//! |---|---|---|
//! | `#[command(aggregate_id)]` | a field | this field names the target aggregate; its type implements `Display` |
//! | `#[command(command_id)]` | a field | this field is the command's id; its type is `Uuid` or `Option<Uuid>` |
//! | `#[command(aggregate_id = field)]` | an enum | every variant has a field `field` naming the target aggregate |
//! | `#[command(command_id = field)]` | an enum | every variant has a field `field` holding the command's id |
//!
//! `field` is a field name, or a position (`aggregate_id = 0`) for tuple variants. Every struct
//! and every variant needs exactly one `aggregate_id` field: marked on the field, or named on the
//! enum (not both). `command_id` is optional: variants without one have no command id.
//!
//! ```
//! use esframe_core::Command;
//! use uuid::Uuid;
//!
//! #[derive(Command)]
//! struct Deposit {
//!     #[command(aggregate_id)]
//!     account_id: String,
//!     #[command(command_id)]
//!     request: Option<Uuid>,
//!     amount: u64,
//! }
//!
//! #[derive(Command)]
//! struct Close(#[command(aggregate_id)] Uuid, #[command(command_id)] Uuid);
//!
//! #[derive(Command)]
//! enum Transfer {
//!     Send { #[command(aggregate_id)] from: String, to: String, amount: u64 },
//!     Cancel(#[command(aggregate_id)] String),
//! }
//!
//! # fn main() {
//! let id = Uuid::from_u128(1);
//! assert_eq!(Close(id, id).command_id(), Some(id));
//! assert_eq!(Transfer::Cancel("acc-2".into()).aggregate_id(), "acc-2");
//! # }
//! ```
//!
//! ## `#[derive(Aggregate)]`
//!
//! Implements [`Aggregate`] for a struct or an enum. The impl names the associated types and
//! delegates to two **inherent** functions you write in an `impl` block of the type:
//!
//! ```text
//! async fn handle(decision: &mut Decision<'_, Self>, command: &C, services: &S) -> Result<(), E>
//! fn apply(&mut self, event: &Ev)
//! ```
//!
//! The future `handle` returns must be `Send`. The state is snapshotted with serde, so the type
//! also implements `Default`, `Serialize` and `Deserialize`.
//!
//! | key of `#[aggregate(...)]` | meaning | default |
//! |---|---|---|
//! | `command = Type` | `Aggregate::Command`, the commands it handles | required |
//! | `event = Type` | `Aggregate::Event`, the events it emits and applies | required |
//! | `error = Type` | `Aggregate::Error`, the domain error a rejected command returns | required |
//! | `services = Type` | `Aggregate::Services`, what `handle` may call (clock, pricing, ...) | `()` |
//! | `name = "..."` | `Aggregate::TYPE`, the stable name stored with every event | the type's name as written |
//! | `snapshot_version = N` | `Aggregate::SNAPSHOT_VERSION`; snapshots of another version are ignored | `1` |
//!
//! The keys may be spread over several `#[aggregate(...)]` attributes; each is given once.
//!
//! Because the inherent functions have the same names as the trait's, forgetting one would make
//! the call resolve to the trait method itself. The derive turns that into a compile error on the
//! type's name, "multiple `handle` found", whose candidates include a trait named
//! `AddAnInherentFnHandle` (or `AddAnInherentFnApply`): add the inherent function it names.
//!
//! ## `#[derive(ProjectionEvents)]`
//!
//! Implements `ProjectionEvents` for an enum with one variant per aggregate, each holding that
//! aggregate's event type and naming the aggregate with `#[events(aggregate = Type)]` or
//! `#[events(aggregate = "name")]`: the events a typed projection over several aggregates
//! reads, told apart by aggregate type even where two aggregates use the same event type name.
//! See [its documentation](derive@ProjectionEvents) for an example and the generated impl.
//!
//! ## Diagnostics
//!
//! Mistakes are reported on the tokens that hold them (the key, the value, the variant, the
//! field), all in one compile, and the derive still emits an impl whose bodies never run so that
//! one mistake does not turn into many errors where the type is used. A misspelled key or field
//! name is reported with the one it is closest to ("did you mean `command`?"); a misspelled key's
//! value is still read as that key's. A type without serde's traits, and a `handle` that is not
//! an `async fn`, are one error each, on the type's name, saying what to add.
//!
//! [`Event`]: https://docs.rs/esframe-core/latest/esframe_core/trait.Event.html
//! [`Command`]: https://docs.rs/esframe-core/latest/esframe_core/trait.Command.html
//! [`Aggregate`]: https://docs.rs/esframe-core/latest/esframe_core/trait.Aggregate.html

mod aggregate;
mod attr;
mod command;
mod errors;
mod event;
mod generics;
mod projection_events;
mod upcast;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

/// Derives `esframe_core::Aggregate`, delegating to the inherent `handle` and `apply`; see the
/// [crate documentation](crate#deriveaggregate) for `#[aggregate(...)]`.
#[proc_macro_derive(Aggregate, attributes(aggregate))]
pub fn derive_aggregate(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    aggregate::derive(&input).into()
}

/// Derives `esframe_core::Command` from the field marked `#[command(aggregate_id)]`; see the
/// [crate documentation](crate#derivecommand).
#[proc_macro_derive(Command, attributes(command))]
pub fn derive_command(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    command::derive(&input).into()
}

/// Derives `esframe_core::Event` for an enum with one variant per event type; see the
/// [crate documentation](crate#deriveevent).
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    event::derive(&input).into()
}

/// Derives `esframe_core::projection::ProjectionEvents` for an enum over several aggregates'
/// events, the `Event` of a `TypedProjection` that reads more than one aggregate. Import it with
/// its trait: `use esframe_core::projection::ProjectionEvents;`.
///
/// Each variant holds one aggregate's event type (an `#[derive(Event)]` enum, usually its
/// `Aggregate::Event`) as its one field, and names the aggregate with
/// `#[events(aggregate = ...)]`: a type implementing `Aggregate` (its `TYPE` is used), or the
/// aggregate type name as a string literal (for an aggregate defined elsewhere).
///
/// ```
/// use esframe_core::projection::ProjectionEvents;
/// use esframe_core::{Aggregate, Event, EventMetadata, Position, RecordedEvent, StreamId};
/// # use esframe_core::{Command, Decision};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
/// enum OrderEvent {
///     Created { customer: String },
///     Shipped,
/// }
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
/// enum InventoryEvent {
///     Created { sku: String },
///     Restocked { quantity: u32 },
/// }
///
/// // The order aggregate: `#[aggregate(name = "order", event = OrderEvent, ...)]`.
/// # #[derive(Command)]
/// # struct Ship(#[command(aggregate_id)] String);
/// # #[derive(Debug, thiserror::Error)]
/// # #[error("no")]
/// # struct Refused;
/// #[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
/// #[aggregate(name = "order", command = Ship, event = OrderEvent, error = Refused)]
/// struct Order {
///     shipped: bool,
/// }
/// # impl Order {
/// #     async fn handle(d: &mut Decision<'_, Self>, _: &Ship, _: &()) -> Result<(), Refused> {
/// #         d.emit(OrderEvent::Shipped);
/// #         Ok(())
/// #     }
/// #     fn apply(&mut self, _: &OrderEvent) {}
/// # }
///
/// /// What the shop's read models read: orders and inventory.
/// #[derive(Debug, PartialEq, ProjectionEvents)]
/// enum ShopEvent {
///     #[events(aggregate = Order)]
///     Order(OrderEvent),
///     #[events(aggregate = "inventory")]
///     Inventory(InventoryEvent),
/// }
///
/// # fn main() {
/// let stored = |aggregate_type: &str, event_type: &'static str, payload| RecordedEvent {
///     event_id: Default::default(),
///     stream_id: StreamId::new(aggregate_type, "42").unwrap(),
///     stream_version: 1,
///     global_position: Position::new(1),
///     recorded_at: Default::default(),
///     event_type: event_type.into(),
///     schema_version: 1,
///     payload,
///     metadata: EventMetadata::default(),
/// };
/// // Both aggregates have a `Created`: the stream's aggregate type tells them apart.
/// let created = stored("inventory", "Created", serde_json::json!({"sku": "tea"}).into());
/// assert_eq!(
///     ShopEvent::decode(&created).unwrap(),
///     Some(ShopEvent::Inventory(InventoryEvent::Created { sku: "tea".into() })),
/// );
/// let interest = ShopEvent::interest();
/// assert!(interest.matches(&created));
/// assert!(!interest.matches(&stored("customer", "Created", serde_json::json!({}).into())));
/// # }
/// ```
///
/// A `TypedProjection` with `type Event = ShopEvent;` then gets each order and inventory event
/// as a `ShopEvent`, with its envelope, and never sees the events of other aggregates.
///
/// The generated impl:
///
/// - `interest()` is the events of the variants' aggregate types whose event type one of the
///   variants' event types has (`Interest::aggregates([..]).and_event_types([..])`);
/// - `decode(event)` picks the variant of `event.aggregate_type()` and decodes the event as its
///   type (through that type's own `ProjectionEvents`, by event type name). It is `Ok(None)`
///   for an event of another aggregate type, or of a type name that variant's type does not
///   know (one only another aggregate uses); an event of a known type that does not decode is
///   the `EventDecodeError`, which the projection runner retries and then parks as a dead
///   letter.
///
/// Checked at compile time: the input is an enum with at least one variant and no generic
/// parameters; every variant is a one-field tuple variant with `#[events(aggregate = ...)]`
/// (`aggregate` is the only key, given once); no two variants read the same aggregate type
/// (names compared by the derive, types by the compiler); each aggregate type implements
/// `Aggregate` and each held type implements `Event` (reported on that type). Mistakes are
/// reported as the other derives report them (see
/// [Diagnostics](https://docs.rs/esframe-derive/latest/esframe_derive/#diagnostics)).
#[proc_macro_derive(ProjectionEvents, attributes(events))]
pub fn derive_projection_events(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    projection_events::derive(&input).into()
}
