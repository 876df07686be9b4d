//! The routes: each turns a request into one command or one read of the read model, and the
//! outcome into JSON. Their bodies and answers are the types below; every failure is an
//! [`ApiError`].

use std::sync::Arc;

use axum::{
    Json,
    extract::{Extension, FromRequest, FromRequestParts, Path, Query, State},
    http::{StatusCode, header},
    response::IntoResponse,
};
use esframe_core::{
    Command, CommandContext, CommandOutcome, EventStore, Position, StreamId,
    projection::{CheckpointStore, wait_for_projections},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bank_account::{Account, AccountBalance, AccountCommand, AccountEvent, BalanceQuery};

use super::{
    ApiError, CheckedCommand, CorrelationId, app::AppState, expected_version::ExpectedVersionHeader,
};

/// `POST /accounts`: who owns the new account, and its id (a new UUID if absent).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAccount {
    /// The owner's name.
    pub owner: String,
    /// The account's id; a client that picks it can retry an opening safely (the retry gets
    /// 409 `account_exists` instead of opening a second account).
    #[serde(default)]
    pub id: Option<String>,
}

/// `POST /accounts/{id}/deposits` and `/withdrawals`: how much, in cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Amount {
    /// Cents; a whole number, not negative (zero is refused by the account's rules).
    pub amount: u64,
}

/// What a write did: the account's version after it, and the global position of its last
/// event, to pass as `min_position` to a `GET` that must see the write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Written {
    /// The account's id.
    pub id: String,
    /// The account's version after the write (for `Expected-Version`).
    pub version: u64,
    /// The global position of the write's last event (for `min_position`).
    pub position: u64,
}

/// `GET /accounts/{id}`: the account as the balances read model shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountView {
    /// The account's id.
    pub id: String,
    /// Its owner.
    pub owner: String,
    /// Balance in cents.
    pub balance: i64,
    /// Number of deposits.
    pub deposits: i64,
    /// Number of withdrawals.
    pub withdrawals: i64,
}

/// `GET /accounts/{id}?min_position=N`: answer only once the read model has processed the
/// event at global position `N` (waiting for it, up to the service's read timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    /// The `position` of a write the answer must include.
    pub min_position: Option<u64>,
}

/// [`axum::Json`], refusing a bad body with an [`ApiError`].
#[derive(Debug, FromRequest)]
#[from_request(via(Json), rejection(ApiError))]
pub(crate) struct JsonBody<T>(pub T);

/// [`axum::extract::Path`], refusing a bad path with an [`ApiError`].
#[derive(Debug, FromRequestParts)]
#[from_request(via(Path), rejection(ApiError))]
pub(crate) struct PathParam<T>(pub T);

/// [`axum::extract::Query`], refusing a bad query string with an [`ApiError`].
#[derive(Debug, FromRequestParts)]
#[from_request(via(Query), rejection(ApiError))]
pub(crate) struct QueryParams<T>(pub T);

type Shared<S, C, B> = State<Arc<AppState<S, C, B>>>;

/// `POST /accounts`: opens an account. 201 with [`Written`] and a `Location` header.
pub(crate) async fn open<S, C, B>(
    State(app): Shared<S, C, B>,
    Extension(correlation): Extension<CorrelationId>,
    JsonBody(body): JsonBody<OpenAccount>,
) -> Result<impl IntoResponse, ApiError>
where
    S: EventStore,
    C: CheckpointStore,
    B: BalanceQuery + Send + Sync + 'static,
{
    let id = body.id.unwrap_or_else(|| Uuid::now_v7().to_string());
    let command = AccountCommand::Open {
        account_id: id.clone(),
        owner: body.owner,
    };
    let written = app.execute(command, None, correlation).await?;
    let location = format!("/accounts/{id}");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(written),
    ))
}

/// `POST /accounts/{id}/deposits`: 200 with [`Written`].
pub(crate) async fn deposit<S, C, B>(
    State(app): Shared<S, C, B>,
    Extension(correlation): Extension<CorrelationId>,
    ExpectedVersionHeader(expected): ExpectedVersionHeader,
    PathParam(id): PathParam<String>,
    JsonBody(Amount { amount }): JsonBody<Amount>,
) -> Result<Json<Written>, ApiError>
where
    S: EventStore,
    C: CheckpointStore,
    B: BalanceQuery + Send + Sync + 'static,
{
    let command = AccountCommand::Deposit {
        account_id: id,
        amount,
    };
    Ok(Json(app.execute(command, expected, correlation).await?))
}

/// `POST /accounts/{id}/withdrawals`: 200 with [`Written`]; 422 on an overdraft.
pub(crate) async fn withdraw<S, C, B>(
    State(app): Shared<S, C, B>,
    Extension(correlation): Extension<CorrelationId>,
    ExpectedVersionHeader(expected): ExpectedVersionHeader,
    PathParam(id): PathParam<String>,
    JsonBody(Amount { amount }): JsonBody<Amount>,
) -> Result<Json<Written>, ApiError>
where
    S: EventStore,
    C: CheckpointStore,
    B: BalanceQuery + Send + Sync + 'static,
{
    let command = AccountCommand::Withdraw {
        account_id: id,
        amount,
    };
    Ok(Json(app.execute(command, expected, correlation).await?))
}

/// `GET /accounts/{id}`: the account from the read model (never from the aggregate), after
/// waiting for `min_position` if given. 404 if the read model has no such account.
pub(crate) async fn balance<S, C, B>(
    State(app): Shared<S, C, B>,
    PathParam(id): PathParam<String>,
    QueryParams(query): QueryParams<ReadQuery>,
) -> Result<Json<AccountView>, ApiError>
where
    S: EventStore,
    C: CheckpointStore,
    B: BalanceQuery + Send + Sync + 'static,
{
    // ANCHOR: read_your_writes
    // The same rule as the commands' ids: an id no account can have is a bad request.
    StreamId::of::<Account>(&id)?;
    if let Some(position) = query.min_position {
        wait_for_projections(
            &app.checkpoints,
            std::slice::from_ref(&app.projection),
            Position::new(position),
            app.read_timeout,
        )
        .await?;
    }
    let row = app
        .balances
        .balance(&id)
        .await
        .map_err(|err| ApiError::read_model(&err))?;
    // ANCHOR_END: read_your_writes
    let AccountBalance {
        account_id,
        owner,
        balance,
        deposits,
        withdrawals,
    } = row.ok_or_else(|| ApiError::account_not_found(&id))?;
    Ok(Json(AccountView {
        id: account_id,
        owner,
        balance,
        deposits,
        withdrawals,
    }))
}

/// Any other path: 404.
pub(crate) async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route")
}

/// A known path with another method: 405.
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take this method",
    )
}

impl<S: EventStore, C, B> AppState<S, C, B> {
    /// Runs `command`, refused unless the account is at `expected_version` (if given), with the
    /// request's correlation id on every event it stores.
    async fn execute(
        &self,
        command: AccountCommand,
        expected_version: Option<u64>,
        correlation: CorrelationId,
    ) -> Result<Written, ApiError> {
        let id = command.aggregate_id();
        // ANCHOR: context
        let context = CommandContext::new().correlation_id(correlation.0);
        let command = CheckedCommand {
            command,
            expected_version,
        };
        let outcome = self.accounts.execute_with(command, context).await?;
        // ANCHOR_END: context
        Ok(written(id, &outcome))
    }
}

fn written(id: String, outcome: &CommandOutcome<AccountEvent>) -> Written {
    Written {
        id,
        version: outcome.version,
        position: outcome
            .events
            .last()
            .map_or(Position::START, |event| event.global_position)
            .get(),
    }
}
