//! [`ApiError`]: every way a request can fail, as an HTTP status and a JSON body.
//!
//! The body is always `{ "error": "<what went wrong, in a sentence>", "code": "<stable
//! machine-readable name>", ... }`, with details of some errors beside (the balance of a refused
//! withdrawal, the versions of a mismatch). Failures of the server itself (a store that is down,
//! data it cannot read) are logged in full, inside the request's span and so with its correlation
//! id, and answered with a short message: their details are not the client's business.

use axum::{
    Json,
    extract::rejection::{JsonRejection, PathRejection, QueryRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use esframe_core::{
    CommandError, InvalidStreamId, StoreError, StoreErrorKind,
    projection::{HandlerError, ProjectionError},
};
use serde_json::{Map, Value};

use crate::bank_account::AccountError;

use super::CheckedError;

/// A failed request: its status, a stable code, a message, and details for the body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable name for the kind of error (`insufficient_funds`), for programs.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// More fields of the JSON body.
    pub details: Map<String, Value>,
}

impl ApiError {
    /// An error with `status`, `code` and `message`, and no details.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    /// 400: the request itself is wrong.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404: no account with this id (the read model has not seen one, or the store has none).
    pub fn account_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "account_not_found",
            format!("there is no account `{id}`"),
        )
    }

    /// Adds `key: value` to the body.
    #[must_use]
    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// 503: the read model could not be read.
    pub fn read_model(err: &HandlerError) -> Self {
        Self::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "read_model_unavailable",
            err.as_ref(),
        )
    }

    /// A failure of the server, not of the request: logged in full, answered in short.
    fn server(status: StatusCode, code: &'static str, error: &dyn std::error::Error) -> Self {
        tracing::error!(code, error = %error, "request failed");
        let message = match status {
            StatusCode::SERVICE_UNAVAILABLE => "the service is unavailable; try again shortly",
            _ => {
                "internal server error; the server log has the details under this request's correlation id"
            }
        };
        Self::new(status, code, message)
    }

    /// A store failure, by what it means for the data ([`StoreError::kind`]).
    fn store(err: &StoreError) -> Self {
        match err.kind() {
            StoreErrorKind::Conflict => Self::new(
                StatusCode::CONFLICT,
                "concurrency_conflict",
                err.to_string(),
            ),
            StoreErrorKind::InvalidInput => Self::bad_request(
                "invalid_input",
                format!("the store refused the data: {err}"),
            ),
            StoreErrorKind::Unavailable => {
                Self::server(StatusCode::SERVICE_UNAVAILABLE, "unavailable", err)
            }
            StoreErrorKind::OutcomeUnknown => {
                tracing::error!(error = %err, "the outcome of a write is unknown");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "outcome_unknown",
                    "the store failed while committing: the write may or may not be stored; \
                     read the account before trying again",
                )
            }
            StoreErrorKind::CorruptData => {
                Self::server(StatusCode::INTERNAL_SERVER_ERROR, "corrupt_data", err)
            }
            StoreErrorKind::Rejected => {
                Self::server(StatusCode::INTERNAL_SERVER_ERROR, "rejected_by_store", err)
            }
            // `StoreErrorKind` is non-exhaustive: a kind added later is a server error until
            // it is mapped here.
            _ => Self::server(StatusCode::INTERNAL_SERVER_ERROR, "store_error", err),
        }
    }
}

/// `{ "error": message, "code": code, ...details }`; 503s also say `Retry-After: 1`.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("error".to_owned(), self.message.into());
        body.insert("code".to_owned(), self.code.into());
        body.extend(self.details);
        let mut response = (self.status, Json(Value::Object(body))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

// ANCHOR: mapping
/// The account's rules: 404 for an account never opened, 409 for opening one twice,
/// 422 for the rest (a zero amount, an overdraft); 409 for an expected version that
/// does not hold.
impl From<CheckedError> for ApiError {
    fn from(err: CheckedError) -> Self {
        let message = err.to_string();
        match err {
            CheckedError::Account(AccountError::NotOpen) => Self::new(
                StatusCode::NOT_FOUND,
                "account_not_found",
                "there is no account with this id (it was never opened)",
            ),
            CheckedError::Account(AccountError::AlreadyOpen) => {
                Self::new(StatusCode::CONFLICT, "account_exists", message)
            }
            CheckedError::Account(AccountError::ZeroAmount) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "zero_amount", message)
            }
            CheckedError::Account(AccountError::InsufficientFunds {
                balance,
                requested: asked,
            }) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "insufficient_funds",
                message,
            )
            .detail("balance", balance)
            .detail("requested", asked),
            CheckedError::VersionMismatch { expected, actual } => {
                Self::new(StatusCode::CONFLICT, "version_mismatch", message)
                    .detail("expected_version", expected)
                    .detail("actual_version", actual)
            }
        }
    }
}

/// Every [`CommandError`] variant, mapped by what it means for the client.
impl From<CommandError<CheckedError>> for ApiError {
    fn from(err: CommandError<CheckedError>) -> Self {
        match err {
            CommandError::Rejected(rejection) => rejection.into(),
            CommandError::Conflict { attempts, .. } => Self::new(
                StatusCode::CONFLICT,
                "concurrency_conflict",
                format!("{err}: other writers kept changing the account; try again"),
            )
            .detail("attempts", attempts),
            CommandError::InvalidAggregateId(invalid) => invalid.into(),
            CommandError::Store(ref store) => Self::store(store),
            CommandError::BatchFailed { ref source, .. } => Self::store(source),
            CommandError::QueueStopped { .. } => {
                Self::server(StatusCode::SERVICE_UNAVAILABLE, "queue_stopped", &err)
            }
            CommandError::Decode(_) | CommandError::Encode { .. } => {
                Self::server(StatusCode::INTERNAL_SERVER_ERROR, "corrupt_data", &err)
            }
            // `CommandError` is non-exhaustive: a variant added later is a server
            // error until it is mapped here.
            _ => {
                let status = StatusCode::INTERNAL_SERVER_ERROR;
                Self::server(status, "command_failed", &err)
            }
        }
    }
}
// ANCHOR_END: mapping

/// An id that cannot name an account (empty, too long, a control character): 400.
impl From<InvalidStreamId> for ApiError {
    fn from(err: InvalidStreamId) -> Self {
        Self::bad_request("invalid_id", format!("invalid account id: {err}"))
    }
}

/// Waiting for the read model: 503 when it did not catch up in time (or its checkpoint could
/// not be read), so the client tries again.
impl From<ProjectionError> for ApiError {
    fn from(err: ProjectionError) -> Self {
        match err {
            ProjectionError::Timeout {
                target, reached, ..
            } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "read_model_behind",
                format!(
                    "the read model has not caught up with position {target} yet (it is at \
                     {reached}); try again shortly"
                ),
            )
            .detail("min_position", target.get())
            .detail("reached_position", reached.get()),
            other => Self::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "read_model_unavailable",
                &other,
            ),
        }
    }
}

/// A body that is not the JSON the route takes: 400 (415 without a JSON content type).
impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = match rejection {
            JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, "invalid_body", rejection.body_text())
    }
}

/// A path segment that cannot be read (not UTF-8 once percent-decoded): 400.
impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request("invalid_path", rejection.body_text())
    }
}

/// A query string that cannot be read (`min_position` not a whole number): 400.
impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request("invalid_query", rejection.body_text())
    }
}
