//! Given/when/then tests for aggregates, without a store.
//!
//! ```ignore
//! AggregateTest::<Account>::given(vec![AccountEvent::Opened { owner: "ada".into() }])
//!     .when(AccountCommand::Deposit { account_id: "a".into(), amount: 10 })
//!     .then_expect_events(vec![AccountEvent::MoneyDeposited { amount: 10 }])
//!     .await;
//! ```
//!
//! Every emitted event is also checked to survive the trip through its stored JSON form
//! (`to_payload` then `from_payload`), so a serde attribute that would corrupt stored events
//! fails the test that emits it.

use std::fmt::Debug;

use crate::{Aggregate, Decision, Event, StreamId};

/// The stream id used by tests that do not set one.
pub const TEST_STREAM_ID: &str = "test-aggregate";

/// A given/when/then test of aggregate `A`.
#[derive(Debug)]
pub struct AggregateTest<A: Aggregate> {
    services: A::Services,
    stream: StreamId,
    given: Vec<A::Event>,
}

impl<A: Aggregate> AggregateTest<A>
where
    A::Services: Default,
{
    /// Starts from the state these past events produce.
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        Self::with_services(A::Services::default()).and(events)
    }

    /// Starts from a new aggregate (no events).
    pub fn given_no_events() -> Self {
        Self::with_services(A::Services::default())
    }
}

impl<A: Aggregate> AggregateTest<A> {
    /// Starts a test whose handler gets `services`; add history with [`AggregateTest::and`].
    pub fn with_services(services: A::Services) -> Self {
        Self {
            services,
            stream: StreamId::new(A::TYPE, TEST_STREAM_ID).expect("the test stream id is valid"),
            given: Vec::new(),
        }
    }

    /// Adds past events.
    #[must_use]
    pub fn and(mut self, events: impl IntoIterator<Item = A::Event>) -> Self {
        self.given.extend(events);
        self
    }

    /// The command under test.
    pub fn when(self, command: A::Command) -> When<A> {
        When {
            test: self,
            command,
        }
    }
}

/// A test with its command, waiting for an expectation.
pub struct When<A: Aggregate> {
    test: AggregateTest<A>,
    command: A::Command,
}

impl<A: Aggregate> std::fmt::Debug for When<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("When")
            .field("aggregate", &A::TYPE)
            .field("given", &self.test.given.len())
            .finish_non_exhaustive()
    }
}

/// What handling the command produced: the state after the emitted events, and the events.
#[derive(Debug)]
pub struct Handled<A: Aggregate> {
    /// State after the given and the emitted events.
    pub state: A,
    /// Events the command emitted.
    pub events: Vec<A::Event>,
}

impl<A: Aggregate> When<A> {
    /// Runs the command and returns the outcome, for custom assertions.
    pub async fn run(self) -> Result<Handled<A>, A::Error> {
        let mut state = A::default();
        for event in &self.test.given {
            state.apply(event);
        }
        let version = self.test.given.len() as u64;
        let mut decision = Decision::new(&mut state, &self.test.stream, version);
        A::handle(&mut decision, &self.command, &self.test.services).await?;
        let events = decision.into_emitted();
        for event in &events {
            assert_round_trip(event);
        }
        Ok(Handled { state, events })
    }

    /// Asserts that the command emits exactly `expected`, in order.
    ///
    /// # Panics
    /// If the command fails, or emits other events.
    pub async fn then_expect_events(self, expected: impl IntoIterator<Item = A::Event>)
    where
        A::Event: PartialEq + Debug,
        A::Error: Debug,
    {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.run().await {
            Ok(handled) => assert_eq!(
                handled.events, expected,
                "the command emitted other events than expected"
            ),
            Err(err) => panic!("expected events {expected:?}, but the command failed: {err:?}"),
        }
    }

    /// Asserts that the command emits nothing and succeeds.
    ///
    /// # Panics
    /// If the command fails or emits events.
    pub async fn then_expect_no_events(self)
    where
        A::Event: PartialEq + Debug,
        A::Error: Debug,
    {
        self.then_expect_events(Vec::new()).await;
    }

    /// Asserts that the command is rejected with `expected`.
    ///
    /// # Panics
    /// If the command succeeds or fails with another error.
    pub async fn then_expect_error(self, expected: A::Error)
    where
        A::Event: Debug,
        A::Error: PartialEq + Debug,
    {
        match self.run().await {
            Ok(handled) => panic!(
                "expected error {expected:?}, but the command emitted {:?}",
                handled.events
            ),
            Err(err) => assert_eq!(err, expected, "the command failed with another error"),
        }
    }

    /// Asserts that the command is rejected with an error whose message is `message`, for error
    /// types without `PartialEq`.
    ///
    /// # Panics
    /// If the command succeeds or fails with another message.
    pub async fn then_expect_error_message(self, message: &str)
    where
        A::Event: Debug,
    {
        match self.run().await {
            Ok(handled) => panic!(
                "expected error {message:?}, but the command emitted {:?}",
                handled.events
            ),
            Err(err) => assert_eq!(err.to_string(), message),
        }
    }

    /// Asserts on the state after the command's events, e.g. a balance.
    ///
    /// # Panics
    /// If the command fails, or `check` panics.
    pub async fn then_expect_state(self, check: impl FnOnce(&A))
    where
        A::Error: Debug,
    {
        match self.run().await {
            Ok(handled) => check(&handled.state),
            Err(err) => panic!("expected the command to succeed, but it failed: {err:?}"),
        }
    }
}

/// Checks that `event` is read back unchanged from its stored form.
fn assert_round_trip<E: Event>(event: &E) {
    let event_type = event.event_type();
    let payload = event
        .to_payload()
        .unwrap_or_else(|err| panic!("event `{event_type}` cannot be serialized: {err}"));
    // Read back both ways a store hands payloads over: as JSON text (PostgreSQL) and parsed
    // (memory).
    for (form, stored) in [
        (
            "JSON text",
            crate::Payload::from_json_text(payload.to_string()),
        ),
        ("parsed JSON", crate::Payload::from(payload.clone())),
    ] {
        let back = E::from_payload(event_type, &stored).unwrap_or_else(|err| {
            panic!("event `{event_type}` cannot be read back from its stored form {payload} ({form}): {err}")
        });
        let again = back.to_payload().unwrap_or_else(|err| {
            panic!(
                "event `{event_type}` read back from {payload} ({form}) cannot be serialized: {err}"
            )
        });
        assert_eq!(
            again, payload,
            "event `{event_type}` changes when stored and read back from {form}"
        );
    }
}
