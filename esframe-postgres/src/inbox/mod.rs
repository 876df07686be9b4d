//! [`PgInbox`]: the consumer's half of publishing. A service that receives another service's
//! events applies each one exactly once to its own PostgreSQL state.

mod dead_letters;

use std::future::Future;

use esframe_core::{StreamId, projection::HandlerError, publish::IncomingEvent};
use sqlx::{AssertSqlSafe, PgPool};

use crate::{PgTransaction, SchemaName};

pub use dead_letters::{InboxDeadLetter, RetryOutcome};

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
    /// A dead letter cannot be retried, skipped or discarded as asked.
    #[error("inbox `{consumer}`: dead letter {id}: {problem}")]
    DeadLetter {
        /// The consumer.
        consumer: String,
        /// The dead letter's row id.
        id: i64,
        /// What stands in the way.
        problem: String,
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
///
/// Messages a consumer cannot handle are parked in the inbox's dead letters
/// ([`park`](Self::park), [`dead_letters`](Self::dead_letters)), esframe events with the
/// event itself: once the cause is fixed, [`retry_parked`](Self::retry_parked) applies a
/// stream's parked events in order, [`skip_parked`](Self::skip_parked) gives one up so that
/// its stream goes on, and [`discard_parked`](Self::discard_parked) removes a dead letter.
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
    /// The oldest parked message of a stream that holds its event, by version.
    next_parked: String,
    /// One dead letter's event, by id.
    parked_event: String,
    remove: String,
    set_error: String,
    count_parked: String,
    applied_version: String,
    is_parked: String,
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
                 parked_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
                 event          JSONB
             );
             DO $$ BEGIN
                 -- Tables made before dead letters kept their event. Checked first, so that
                 -- opening an inbox takes no table lock when there is nothing to change.
                 IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                                WHERE table_schema = '{schema}'
                                  AND table_name = 'inbox_dead_letters'
                                  AND column_name = 'event') THEN
                     ALTER TABLE {s}.inbox_dead_letters ADD COLUMN event JSONB;
                 END IF;
                 IF to_regclass('{s}.inbox_dead_letters_stream_idx') IS NULL THEN
                     CREATE INDEX inbox_dead_letters_stream_idx
                         ON {s}.inbox_dead_letters (consumer, stream, version, id);
                 END IF;
             END $$;"
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
                         (consumer, message_id, stream, version, error, headers, body, event)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                ),
                list: format!(
                    "SELECT id, message_id, stream, version, error, headers, body,
                            event IS NOT NULL
                     FROM {s}.inbox_dead_letters WHERE consumer = $1 ORDER BY id"
                ),
                next_parked: format!(
                    "SELECT id, event FROM {s}.inbox_dead_letters
                     WHERE consumer = $1 AND stream = $2 AND event IS NOT NULL
                     ORDER BY version, id LIMIT 1"
                ),
                parked_event: format!(
                    "SELECT event FROM {s}.inbox_dead_letters WHERE consumer = $1 AND id = $2"
                ),
                remove: format!(
                    "DELETE FROM {s}.inbox_dead_letters WHERE consumer = $1 AND id = $2"
                ),
                set_error: format!(
                    "UPDATE {s}.inbox_dead_letters SET error = $3 WHERE consumer = $1 AND id = $2"
                ),
                is_parked: format!(
                    "SELECT EXISTS (SELECT 1 FROM {s}.inbox_dead_letters
                                    WHERE consumer = $1 AND stream = $2 AND version = $3)"
                ),
                applied_version: format!(
                    "SELECT version FROM {s}.inbox
                     WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3"
                ),
                count_parked: format!(
                    "SELECT count(*) FROM {s}.inbox_dead_letters WHERE consumer = $1 AND stream = $2"
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

    /// Maps a database failure to this consumer's [`InboxError::Database`].
    fn database(&self) -> impl Fn(sqlx::Error) -> InboxError + Copy + '_ {
        |source| InboxError::Database {
            consumer: self.consumer.clone(),
            source,
        }
    }

    /// The last version of the producer's `stream` this consumer applied (skipped ones
    /// included), or `None` before its first.
    pub async fn applied_version(&self, stream: &StreamId) -> Result<Option<u64>, InboxError> {
        let (aggregate_type, id) = stream.parts();
        let version: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.applied_version.as_str()))
                .bind(&self.consumer)
                .bind(aggregate_type)
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(self.database())?;
        // A stream's row is created at version 0 with its first event's lock.
        Ok(version
            .and_then(|v| u64::try_from(v).ok())
            .filter(|&v| v > 0))
    }

    /// Applies `event` with `handler` exactly once: in one transaction, the stream's inbox row
    /// is locked (created, for a stream's first event) and checked, the handler runs, and the
    /// row records the event; a duplicate or an early event runs nothing.
    pub async fn apply(
        &self,
        event: &IncomingEvent,
        handler: &impl InboxHandler,
    ) -> Result<InboxOutcome, InboxError> {
        let database = self.database();
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
}
