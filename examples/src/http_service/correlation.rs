//! Correlation ids: one id follows a request into its log lines and its events.
//!
//! [`correlate`] runs around every request. It takes the request's [`CORRELATION_ID`] header, a
//! UUID (or makes a new UUIDv7 when there is none), and
//! - opens the request's tracing span, `request{method path correlation_id}`, so every log line
//!   of the request carries the id;
//! - hands the id to the route as a [`CorrelationId`] extension, which the routes pass to the
//!   command handler ([`CommandContext::correlation_id`](esframe_core::CommandContext)): every
//!   event the request stores has it as its metadata's `correlation_id`;
//! - echoes it in the response's [`CORRELATION_ID`] header, errors included.
//!
//! A header that is not a UUID is refused with 400 (`invalid_correlation_id`), since the events'
//! metadata keeps UUIDs.

use axum::{
    extract::Request,
    http::HeaderValue,
    middleware::Next,
    response::{IntoResponse, Response},
};
use tracing::Instrument;
use uuid::Uuid;

use super::ApiError;

/// The request and response header carrying the correlation id.
pub const CORRELATION_ID: &str = "x-correlation-id";

/// The request's correlation id, set by [`correlate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorrelationId(pub Uuid);

// ANCHOR: correlate
/// The middleware: reads or makes the id, runs the request in its span,
/// echoes the id.
pub async fn correlate(mut request: Request, next: Next) -> Response {
    let id = match request.headers().get(CORRELATION_ID) {
        None => Uuid::now_v7(),
        Some(value) => match value.to_str().ok().map(str::trim).map(Uuid::parse_str) {
            Some(Ok(id)) => id,
            _ => {
                return ApiError::bad_request(
                    "invalid_correlation_id",
                    format!(
                        "the {CORRELATION_ID} header must be a UUID, \
                         not {value:?}"
                    ),
                )
                .into_response();
            }
        },
    };
    request.extensions_mut().insert(CorrelationId(id));
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        correlation_id = %id,
    );
    async move {
        let mut response = next.run(request).await;
        tracing::info!(status = response.status().as_u16(), "answered");
        let value = HeaderValue::from_str(&id.to_string());
        let value = value.expect("a UUID is a valid header value");
        response.headers_mut().insert(CORRELATION_ID, value);
        response
    }
    .instrument(span)
    .await
}
// ANCHOR_END: correlate
