//! The client's expected version: an optimistic concurrency check a client can ask for.
//!
//! A client that saw an account at version 3 and wants its deposit to count only if nothing
//! happened to the account since sends `Expected-Version: 3`. The check runs inside the
//! aggregate's decision, against the version the decision is taken on, and the command handler
//! appends expecting that same version: the check and the write are one atomic step. If another
//! write slips in between, the append conflicts, the handler decides again on the new state, and
//! the check refuses it with [`CheckedError::VersionMismatch`].

use axum::{extract::FromRequestParts, http::request::Parts};
use esframe_core::{Aggregate, Command, Decision};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bank_account::{Account, AccountCommand, AccountError, AccountEvent};

use super::ApiError;

/// The request header naming the version the client expects the account to be at.
pub const EXPECTED_VERSION: &str = "expected-version";

/// The bank account with the expected-version check: the same state, events and rules, under
/// the same aggregate type (`"account"`), so it reads and writes the same streams as
/// [`Account`] and the same read model follows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CheckedAccount(pub Account);

/// An account command, and the version the client expects the account to be at (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCommand {
    /// What to do.
    pub command: AccountCommand,
    /// Refuse the command unless the account is at this version.
    pub expected_version: Option<u64>,
}

impl Command for CheckedCommand {
    fn aggregate_id(&self) -> String {
        self.command.aggregate_id()
    }
}

/// Why a [`CheckedCommand`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckedError {
    /// The account's own rules refused it.
    #[error(transparent)]
    Account(#[from] AccountError),
    /// The account is not at the version the client expected.
    #[error("the account is at version {actual}, not at the expected version {expected}")]
    VersionMismatch {
        /// The version the client expected.
        expected: u64,
        /// The version the account is at.
        actual: u64,
    },
}

impl Aggregate for CheckedAccount {
    const TYPE: &'static str = Account::TYPE;
    const SNAPSHOT_VERSION: u32 = Account::SNAPSHOT_VERSION;

    type Command = CheckedCommand;
    type Event = AccountEvent;
    type Error = CheckedError;
    type Services = ();

    // ANCHOR: check
    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &CheckedCommand,
        _services: &(),
    ) -> Result<(), CheckedError> {
        let actual = decision.loaded_version();
        if let Some(expected) = command.expected_version
            && expected != actual
        {
            return Err(CheckedError::VersionMismatch { expected, actual });
        }
        // The account's own rules decide, on a copy of the state; their events are
        // emitted here.
        let mut account = decision.0.clone();
        let mut inner = Decision::new(&mut account, decision.stream_id(), actual);
        <Account as Aggregate>::handle(&mut inner, &command.command, &()).await?;
        for event in inner.into_emitted() {
            decision.emit(event);
        }
        Ok(())
    }
    // ANCHOR_END: check

    fn apply(&mut self, event: &AccountEvent) {
        Aggregate::apply(&mut self.0, event);
    }

    fn to_snapshot(&self) -> Result<Value, serde_json::Error> {
        Aggregate::to_snapshot(&self.0)
    }

    fn from_snapshot(state: &Value) -> Result<Self, serde_json::Error> {
        <Account as Aggregate>::from_snapshot(state).map(Self)
    }
}

/// The [`EXPECTED_VERSION`] header of a request: absent, or a stream version (a whole number,
/// as the `version` of an earlier response). Anything else is refused with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExpectedVersionHeader(pub(crate) Option<u64>);

impl<S: Send + Sync> FromRequestParts<S> for ExpectedVersionHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(EXPECTED_VERSION) else {
            return Ok(Self(None));
        };
        let version = value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok());
        version.map(|v| Self(Some(v))).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_expected_version",
                format!(
                    "the {EXPECTED_VERSION} header must be a whole number (the `version` of an \
                     earlier response), not {value:?}"
                ),
            )
        })
    }
}
