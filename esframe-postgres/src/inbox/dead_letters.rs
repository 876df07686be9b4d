//! The inbox's dead letters: messages a consumer could not handle, kept with their headers and
//! body, and, for esframe events, the event itself, so that they can be applied again once the
//! cause is fixed ([`PgInbox::retry_parked`]), skipped ([`PgInbox::skip_parked`]) or dropped
//! ([`PgInbox::discard_parked`]).
//!
//! A parked event blocks its stream: the inbox applies a stream's versions in order, so the
//! versions after it are parked behind it by the broker adapters. A retry therefore takes a
//! stream's parked events in version order and stops at the first that fails again.

use std::collections::BTreeMap;

use esframe_core::{
    StreamId,
    publish::{CloudEvent, IncomingEvent},
};
use serde_json::{Map, Value, json};
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use super::{InboxError, InboxHandler, InboxOutcome, PgInbox};
use crate::PgTransaction;

/// A row of `inbox_dead_letters`, in the order `Queries::list` selects it.
type DeadLetterRow = (
    i64,
    Option<Uuid>,
    Option<String>,
    Option<i64>,
    String,
    Value,
    String,
    bool,
);

/// A parked message, as [`PgInbox::dead_letters`] lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxDeadLetter {
    /// Its row id.
    pub id: i64,
    /// The message id, if the message had one.
    pub message_id: Option<Uuid>,
    /// The producer's stream, `aggregate_type/id`, if the message named one.
    pub stream: Option<String>,
    /// The event's version, if the message named one.
    pub stream_version: Option<i64>,
    /// Why it could not be handled (after a failed retry: why the retry failed).
    pub error: String,
    /// The message's headers, as JSON.
    pub headers: Value,
    /// The message's body.
    pub body: String,
    /// Whether it holds an esframe event, which [`PgInbox::retry_parked`] and
    /// [`PgInbox::skip_parked`] can apply; a message that was not one (not a CloudEvent, no
    /// esframe attributes) can only be discarded.
    pub retryable: bool,
}

/// What [`PgInbox::retry_parked`] did with a stream's parked events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOutcome {
    /// Events applied (their dead letters removed).
    pub applied: u64,
    /// Dead letters of events applied before (a redelivery parked twice, say), removed.
    pub duplicates: u64,
    /// The stream's dead letters left: the one that failed again and those behind it.
    pub still_parked: u64,
    /// Why the first one left failed again, if one did.
    pub error: Option<String>,
    /// The inbox waits for this version, which is not parked (it may still be on its way
    /// from the broker): the retry stopped before the parked versions after it.
    pub waiting_for: Option<u64>,
}

/// Applies nothing: a skipped event is recorded as applied without an effect.
struct NoEffect;

impl InboxHandler for NoEffect {
    async fn handle(
        &self,
        _tx: &mut PgTransaction,
        _event: &IncomingEvent,
    ) -> Result<(), esframe_core::projection::HandlerError> {
        Ok(())
    }
}

/// The event as a dead letter keeps it: its CloudEvent attributes and its data, exactly.
fn stored_event(event: &IncomingEvent) -> Value {
    let mut attributes = Map::new();
    event.cloud_event.for_each_attribute(|name, value| {
        attributes.insert(name.to_owned(), Value::String(value.to_owned()));
    });
    json!({ "attributes": attributes, "data": event.cloud_event.data })
}

/// Reads back what [`stored_event`] kept.
fn read_event(stored: &Value) -> Result<IncomingEvent, String> {
    let attributes: BTreeMap<String, String> = stored
        .get("attributes")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|err| format!("its stored attributes cannot be read: {err}"))?
        .ok_or("it stores no attributes")?;
    let data = stored
        .get("data")
        .and_then(Value::as_str)
        .ok_or("it stores no data")?;
    let cloud = CloudEvent::from_binary(attributes, "", data.to_owned())
        .map_err(|err| format!("its stored event is not a CloudEvent: {err}"))?;
    IncomingEvent::from_cloud_event(cloud).map_err(|err| err.to_string())
}

impl PgInbox {
    fn dead_letter_error(&self, id: i64, problem: impl Into<String>) -> InboxError {
        InboxError::DeadLetter {
            consumer: self.consumer.clone(),
            id,
            problem: problem.into(),
        }
    }

    /// Parks a message the consumer cannot handle (not an esframe event, undecodable, refused
    /// by the handler every time), with its headers and body, so that it is not lost. With
    /// `event`, the event is kept too, for [`retry_parked`](Self::retry_parked).
    pub async fn park(
        &self,
        message_id: Option<Uuid>,
        event: Option<&IncomingEvent>,
        error: &str,
        headers: Value,
        body: &str,
    ) -> Result<(), InboxError> {
        sqlx::query(AssertSqlSafe(self.sql.park.as_str()))
            .bind(&self.consumer)
            .bind(message_id.or(event.map(|e| e.message_id)))
            .bind(event.map(|e| e.stream_id.to_string()))
            .bind(event.map(|e| i64::try_from(e.stream_version).unwrap_or(i64::MAX)))
            .bind(error)
            .bind(headers)
            .bind(body)
            .bind(event.map(stored_event))
            .execute(&self.pool)
            .await
            .map_err(self.database())?;
        Ok(())
    }

    /// The parked messages, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<InboxDeadLetter>, InboxError> {
        let rows: Vec<DeadLetterRow> = sqlx::query_as(AssertSqlSafe(self.sql.list.as_str()))
            .bind(&self.consumer)
            .fetch_all(&self.pool)
            .await
            .map_err(self.database())?;
        Ok(rows
            .into_iter()
            .map(
                |(id, message_id, stream, stream_version, error, headers, body, retryable)| {
                    InboxDeadLetter {
                        id,
                        message_id,
                        stream,
                        stream_version,
                        error,
                        headers,
                        body,
                        retryable,
                    }
                },
            )
            .collect())
    }

    /// Whether version `version` of the producer's `stream` is in the dead letters: the broker
    /// adapters park a stream's later versions behind it. One indexed lookup.
    pub async fn is_parked(&self, stream: &StreamId, version: u64) -> Result<bool, InboxError> {
        sqlx::query_scalar(AssertSqlSafe(self.sql.is_parked.as_str()))
            .bind(&self.consumer)
            .bind(stream.to_string())
            .bind(i64::try_from(version).unwrap_or(i64::MAX))
            .fetch_one(&self.pool)
            .await
            .map_err(self.database())
    }

    /// Applies the parked events of `stream` again through `handler`, in version order, each
    /// exactly once as [`apply`](Self::apply) does (duplicates and order checked in its
    /// transaction), removing each dead letter once its event is applied. Stops at the first
    /// that fails again, whose dead letter then carries the new error, and before a version
    /// the inbox is still waiting for. Events the adapters park while it runs are taken in
    /// turn. Once it returns with nothing left parked, the stream flows again: the broker
    /// adapters apply its next messages as they come.
    pub async fn retry_parked(
        &self,
        stream: &StreamId,
        handler: &impl InboxHandler,
    ) -> Result<RetryOutcome, InboxError> {
        let name = stream.to_string();
        let mut outcome = RetryOutcome::default();
        loop {
            let next: Option<(i64, Value)> =
                sqlx::query_as(AssertSqlSafe(self.sql.next_parked.as_str()))
                    .bind(&self.consumer)
                    .bind(&name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(self.database())?;
            let Some((id, stored)) = next else { break };
            let event =
                read_event(&stored).map_err(|problem| self.dead_letter_error(id, problem))?;
            match self.apply(&event, handler).await {
                Ok(InboxOutcome::Applied) => outcome.applied += 1,
                Ok(InboxOutcome::Duplicate) => outcome.duplicates += 1,
                Ok(InboxOutcome::Early { expected }) => {
                    outcome.waiting_for = Some(expected);
                    break;
                }
                Err(InboxError::Handler { source, .. }) => {
                    let error = format!("retried: {source}");
                    self.execute(&self.sql.set_error, id, Some(&error)).await?;
                    outcome.error = Some(error);
                    break;
                }
                Err(err) => return Err(err),
            }
            self.execute(&self.sql.remove, id, None).await?;
        }
        let left: i64 = sqlx::query_scalar(AssertSqlSafe(self.sql.count_parked.as_str()))
            .bind(&self.consumer)
            .bind(&name)
            .fetch_one(&self.pool)
            .await
            .map_err(self.database())?;
        outcome.still_parked = u64::try_from(left).unwrap_or(0);
        Ok(outcome)
    }

    /// Gives up on the parked event `id`: records its version as applied without running any
    /// handler, and removes the dead letter, so that the stream's later versions can be
    /// applied ([`retry_parked`](Self::retry_parked) takes those parked behind it). Only the
    /// stream's next version can be skipped: an earlier one not applied yet gives
    /// [`InboxOutcome::Early`] and changes nothing; one applied before gives
    /// [`InboxOutcome::Duplicate`], and the dead letter is removed.
    pub async fn skip_parked(&self, id: i64) -> Result<InboxOutcome, InboxError> {
        let stored: Option<Option<Value>> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.parked_event.as_str()))
                .bind(&self.consumer)
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(self.database())?;
        let stored = match stored {
            None => return Err(self.dead_letter_error(id, "there is no such dead letter")),
            Some(None) => {
                return Err(self.dead_letter_error(
                    id,
                    "it holds no esframe event, so no stream waits for it: discard it instead",
                ));
            }
            Some(Some(stored)) => stored,
        };
        let event = read_event(&stored).map_err(|problem| self.dead_letter_error(id, problem))?;
        let outcome = self.apply(&event, &NoEffect).await?;
        if !matches!(outcome, InboxOutcome::Early { .. }) {
            self.execute(&self.sql.remove, id, None).await?;
        }
        Ok(outcome)
    }

    /// Removes the dead letter `id` (a message handled by hand, or one that is no esframe
    /// event) without applying anything; `false` if there was none. A stream whose parked
    /// event is discarded stays blocked at that version: skip it instead to let the stream go
    /// on.
    pub async fn discard_parked(&self, id: i64) -> Result<bool, InboxError> {
        Ok(self.execute(&self.sql.remove, id, None).await? > 0)
    }

    /// Runs one of the dead-letter statements on `(consumer, id[, error])`; rows changed.
    async fn execute(&self, sql: &str, id: i64, error: Option<&str>) -> Result<u64, InboxError> {
        let mut query = sqlx::query(AssertSqlSafe(sql))
            .bind(&self.consumer)
            .bind(id);
        if let Some(error) = error {
            query = query.bind(error);
        }
        Ok(query
            .execute(&self.pool)
            .await
            .map_err(self.database())?
            .rows_affected())
    }
}
