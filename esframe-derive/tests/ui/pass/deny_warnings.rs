//! The derives add no warning under the workspace's strict lints.
#![deny(
    warnings,
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    unused_qualifications,
    unused_results,
    rust_2018_idioms,
    trivial_casts,
    trivial_numeric_casts,
    unused_extern_crates,
    unused_import_braces,
    unused_lifetimes,
    single_use_lifetimes,
    variant_size_differences
)]
#![forbid(unsafe_code)]

use esframe_core::{Aggregate, Command, Decision, Event};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Events of a counter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub enum CounterEvent {
    /// Counted up.
    Incremented {
        /// By how much.
        by: u64,
    },
    /// Reset to zero.
    Reset,
    /// Renamed.
    Renamed(String),
}

/// Commands of a counter.
#[derive(Debug, Command)]
pub enum CounterCommand {
    /// Count up.
    Increment {
        /// The counter.
        #[command(aggregate_id)]
        counter: String,
        /// The request.
        #[command(command_id)]
        request: Uuid,
        /// By how much.
        by: u64,
    },
    /// Reset.
    Reset(#[command(aggregate_id)] String),
}

/// A counter went too far.
#[derive(Debug, thiserror::Error)]
#[error("overflow")]
pub struct Overflow;

/// A counter.
#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
#[aggregate(command = CounterCommand, event = CounterEvent, error = Overflow)]
pub struct Counter {
    value: u64,
}

impl Counter {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &CounterCommand,
        _services: &(),
    ) -> Result<(), Overflow> {
        let event = match command {
            CounterCommand::Increment { by, .. } => {
                let _ = decision.value.checked_add(*by).ok_or(Overflow)?;
                CounterEvent::Incremented { by: *by }
            }
            CounterCommand::Reset(_) => CounterEvent::Reset,
        };
        let _ = decision.emit(event);
        Ok(())
    }

    fn apply(&mut self, event: &CounterEvent) {
        match event {
            CounterEvent::Incremented { by } => self.value += by,
            CounterEvent::Reset => self.value = 0,
            CounterEvent::Renamed(_) => {}
        }
    }
}

fn main() {
    let mut counter = Counter::default();
    Aggregate::apply(&mut counter, &CounterEvent::Incremented { by: 2 });
    assert_eq!(counter.value, 2);
    assert_eq!(CounterCommand::Reset("c".into()).aggregate_id(), "c");
    assert_eq!(CounterEvent::Reset.event_type(), "Reset");
}
