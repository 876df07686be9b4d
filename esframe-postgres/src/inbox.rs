//! [`PgInbox`]: the consumer's half of publishing. A service that receives another service's
//! events applies each one exactly once to its own PostgreSQL state.

use std::future::Future;

use esframe_core::{projection::HandlerError, publish::IncomingEvent};
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

use crate::{PgTransaction, SchemaName};

/// What [`PgInbox::apply`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxOutcome {
    /// The effect ran and committed with the inbox's record of the event.
    Applied,
    /// The event (or a later one of its stream) was applied before: nothing ran. Acknowledge
    /// the message.
    Duplicate,
    /// An earlier event of the stream has not been applied yet: nothing ran. Let the broker
    /// deliver the message again later (NATS: `nak` with a delay; AMQP: `nack` with requeue).
    Early {
        /// The version the inbox waits for next.
        expected: u64,
    },
}

/// Why the inbox could not record an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// The database failed; nothing was recorded. Let the broker deliver the message again.
    #[error("inbox `{consumer}`: the database failed: {source}")]
    Database {
        /// The consumer.
        consumer: String,
        /// sqlx's error.
        #[source]
        source: sqlx::Error,
    },
    /// The effect failed; its writes were rolled back and nothing was recorded.
    #[error(
        "inbox `{consumer}`: handling version {stream_version} of stream `{stream}` failed: {source}"
    )]
    Handler {
        /// The consumer.
        consumer: String,
        /// The producer's stream.
        stream: String,
        /// The event's version.
        stream_version: u64,
        /// The handler's error.
        #[source]
        source: HandlerError,
    },
}

/// What a consumer does with an event, in the inbox's transaction: its writes commit with the
/// inbox's record of the event, or not at all.
pub trait InboxHandler: Send + Sync {
    /// Applies `event` through `tx`.
    fn handle(
        &self,
        tx: &mut PgTransaction,
        event: &IncomingEvent,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A row of `inbox_dead_letters`, in the order `Queries::list` selects it.
type DeadLetterRow = (
    i64,
    Option<Uuid>,
    Option<String>,
    Option<i64>,
    String,
    serde_json::Value,
    String,
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
    /// Why it could not be handled.
    pub error: String,
    /// The message's headers, as JSON.
    pub headers: serde_json::Value,
    /// The message's body.
    pub body: String,
}

/// An inbox in a PostgreSQL schema of the consumer's: per (producer stream), the last version
/// applied, updated in the same transaction as the consumer's effect.
///
/// Guarantees: an event is applied at most once per consumer, for ever (not within a window):
/// a message whose version is at or below the stream's last applied version is a
/// [`InboxOutcome::Duplicate`]; in order per stream: a version beyond the next one is
/// [`InboxOutcome::Early`] and not applied (unless [`PgInbox::allow_gaps`], for a publisher that
/// filters some of a stream's events out). Two consumers racing on one stream are serialized by
/// the stream's row lock; on its first event, which has no row to lock yet, the one that records
/// second finds the row taken and rolls back (a [`InboxOutcome::Duplicate`]).
#[derive(Debug, Clone)]
pub struct PgInbox {
    pool: PgPool,
    consumer: String,
    allow_gaps: bool,
    sql: std::sync::Arc<Queries>,
}

#[derive(Debug)]
struct Queries {
    lock: String,
    record: String,
    park: String,
    list: String,
}

impl PgInbox {
    /// The inbox of `consumer` in `schema`, creating its tables if needed.
    pub async fn open(pool: PgPool, schema: &str, consumer: &str) -> Result<Self, InboxError> {
        let database = |source| InboxError::Database {
            consumer: consumer.to_owned(),
            source,
        };
        let schema = SchemaName::new(schema)
            .map_err(|err| database(sqlx::Error::Configuration(err.to_string().into())))?;
        let s = format!("\"{schema}\"");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.inbox (
                 consumer       TEXT        NOT NULL,
                 aggregate_type TEXT        NOT NULL,
                 aggregate_id   TEXT        NOT NULL,
                 version        BIGINT      NOT NULL,
                 message_id     UUID        NOT NULL,
                 position       BIGINT      NOT NULL,
                 applied_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
                 CONSTRAINT inbox_pkey PRIMARY KEY (consumer, aggregate_type, aggregate_id)
             );
             CREATE TABLE IF NOT EXISTS {s}.inbox_dead_letters (
                 id             BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 consumer       TEXT        NOT NULL,
                 message_id     UUID,
                 stream         TEXT,
                 version        BIGINT,
                 error          TEXT        NOT NULL,
                 headers        JSONB       NOT NULL,
                 body           TEXT        NOT NULL,
                 parked_at      TIMESTAMPTZ NOT NULL DEFAULT now()
             );"
        )))
        .execute(&pool)
        .await
        .map_err(database)?;
        Ok(Self {
            pool,
            consumer: consumer.to_owned(),
            allow_gaps: false,
            sql: std::sync::Arc::new(Queries {
                // Takes the stream's row lock even for its first event: a new row (version
                // 0) is inserted, or the existing one locked, in one statement, so two
                // consumers of a new stream cannot both see it empty.
                lock: format!(
                    "INSERT INTO {s}.inbox AS i (consumer, aggregate_type, aggregate_id, version,
                         message_id, position)
                     VALUES ($1, $2, $3, 0, '00000000-0000-0000-0000-000000000000', 0)
                     ON CONFLICT (consumer, aggregate_type, aggregate_id)
                         DO UPDATE SET version = i.version
                     RETURNING version"
                ),
                record: format!(
                    "INSERT INTO {s}.inbox (consumer, aggregate_type, aggregate_id, version,
                         message_id, position)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (consumer, aggregate_type, aggregate_id) DO UPDATE SET
                         version = excluded.version, message_id = excluded.message_id,
                         position = excluded.position, applied_at = now()
                     WHERE {s}.inbox.version < excluded.version"
                ),
                park: format!(
                    "INSERT INTO {s}.inbox_dead_letters
                         (consumer, message_id, stream, version, error, headers, body)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)"
                ),
                list: format!(
                    "SELECT id, message_id, stream, version, error, headers, body
                     FROM {s}.inbox_dead_letters WHERE consumer = $1 ORDER BY id"
                ),
            }),
        })
    }

    /// Accepts versions beyond the next one (the publisher leaves some events of a stream
    /// out); duplicates are still refused.
    #[must_use]
    pub fn allow_gaps(mut self, allow: bool) -> Self {
        self.allow_gaps = allow;
        self
    }

    /// The consumer's name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Applies `event` with `handler` exactly once: in one transaction, the stream's inbox row
    /// is locked (created, for a stream's first event) and checked, the handler runs, and the
    /// row records the event; a duplicate or an early event runs nothing.
    pub async fn apply(
        &self,
        event: &IncomingEvent,
        handler: &impl InboxHandler,
    ) -> Result<InboxOutcome, InboxError> {
        let database = |source| InboxError::Database {
            consumer: self.consumer.clone(),
            source,
        };
        let (aggregate_type, id) = event.stream_id.parts();
        let version = i64::try_from(event.stream_version).unwrap_or(i64::MAX);
        let mut tx = crate::transaction::begin(&self.pool)
            .await
            .map_err(database)?;
        let last: i64 = sqlx::query_scalar(AssertSqlSafe(self.sql.lock.as_str()))
            .bind(&self.consumer)
            .bind(aggregate_type)
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(database)?;
        if version <= last {
            let _ = tx.rollback().await;
            return Ok(InboxOutcome::Duplicate);
        }
        if version > last + 1 && !self.allow_gaps {
            let _ = tx.rollback().await;
            return Ok(InboxOutcome::Early {
                expected: u64::try_from(last + 1).unwrap_or(1),
            });
        }
        if let Err(source) = handler.handle(&mut tx, event).await {
            let _ = tx.rollback().await;
            return Err(InboxError::Handler {
                consumer: self.consumer.clone(),
                stream: event.stream_id.to_string(),
                stream_version: event.stream_version,
                source,
            });
        }
        let recorded = sqlx::query(AssertSqlSafe(self.sql.record.as_str()))
            .bind(&self.consumer)
            .bind(aggregate_type)
            .bind(id)
            .bind(version)
            .bind(event.message_id)
            .bind(i64::try_from(event.position.get()).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .map_err(database)?
            .rows_affected();
        if recorded == 0 {
            // A second guard (the row lock taken above already serializes deliveries): another
            // transaction recorded this version or a later one, so its effect stands and this
            // one's is rolled back.
            let _ = tx.rollback().await;
            return Ok(InboxOutcome::Duplicate);
        }
        tx.commit().await.map_err(database)?;
        Ok(InboxOutcome::Applied)
    }

    /// Parks a message the consumer cannot handle (not an esframe event, undecodable, refused
    /// by the handler every time), with its headers and body, so that it is not lost.
    pub async fn park(
        &self,
        message_id: Option<Uuid>,
        event: Option<&IncomingEvent>,
        error: &str,
        headers: serde_json::Value,
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
            .execute(&self.pool)
            .await
            .map_err(|source| InboxError::Database {
                consumer: self.consumer.clone(),
                source,
            })?;
        Ok(())
    }

    /// The parked messages, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<InboxDeadLetter>, InboxError> {
        let rows: Vec<DeadLetterRow> = sqlx::query_as(AssertSqlSafe(self.sql.list.as_str()))
            .bind(&self.consumer)
            .fetch_all(&self.pool)
            .await
            .map_err(|source| InboxError::Database {
                consumer: self.consumer.clone(),
                source,
            })?;
        Ok(rows
            .into_iter()
            .map(
                |(id, message_id, stream, stream_version, error, headers, body)| InboxDeadLetter {
                    id,
                    message_id,
                    stream,
                    stream_version,
                    error,
                    headers,
                    body,
                },
            )
            .collect())
    }
}
