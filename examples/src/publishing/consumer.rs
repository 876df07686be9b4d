//! The reporting service: it consumes the bank's account events from JetStream through an
//! inbox and keeps its own read model of account activity in its own schema.

use chrono::{DateTime, Utc};
use esframe_core::{Aggregate, projection::HandlerError, publish::IncomingEvent};
use esframe_nats::{JetStreamInbox, async_nats::jetstream};
use esframe_postgres::{InboxError, InboxHandler, PgInbox, PgTransaction};
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

use super::{CONSUMER, Channel};
use crate::bank_account::{Account, AccountEvent};

/// One account as the reporting service sees it: a row of `account_activity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountActivity {
    /// The account's id (the producer's stream is `account/{id}`).
    pub account_id: String,
    /// Its owner.
    pub owner: String,
    /// Number of deposits.
    pub deposits: i64,
    /// Cents deposited, in all.
    pub total_deposited: i64,
    /// Number of withdrawals.
    pub withdrawals: i64,
    /// Cents withdrawn, in all.
    pub total_withdrawn: i64,
    /// Events applied to this row.
    pub events: i64,
    /// The version of the last event applied (the producer's stream version).
    pub last_version: i64,
    /// When the bank recorded the last event (the CloudEvent's `time`).
    pub last_event_at: DateTime<Utc>,
    /// The correlation id of the last event: the bank's command that caused it.
    pub last_correlation_id: Option<Uuid>,
}

impl AccountActivity {
    /// Deposits less withdrawals, in cents.
    pub fn balance(&self) -> i64 {
        self.total_deposited - self.total_withdrawn
    }
}

type ActivityRow = (
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    DateTime<Utc>,
    Option<Uuid>,
);

/// The correlation id a received event carries (`ce-correlationid`), if any.
pub fn correlation_id(event: &IncomingEvent) -> Option<Uuid> {
    let id = event.cloud_event.extensions.get("correlationid")?;
    Uuid::parse_str(id).ok()
}

/// Keeps `account_activity` up to date: an [`InboxHandler`], so each write commits in the
/// inbox's transaction, with the inbox's record of the event, or not at all.
#[derive(Debug, Clone)]
pub struct ActivityHandler {
    upsert: String,
}

/// What one event changes in an account's row.
#[derive(Debug, Default)]
struct Change {
    owner: Option<String>,
    deposits: i64,
    deposited: i64,
    withdrawals: i64,
    withdrawn: i64,
}

impl Change {
    fn of(event: &AccountEvent) -> Result<Self, HandlerError> {
        Ok(match event {
            AccountEvent::AccountOpened { owner } => Self {
                owner: Some(owner.clone()),
                ..Self::default()
            },
            AccountEvent::MoneyDeposited { amount, .. } => Self {
                deposits: 1,
                deposited: i64::try_from(*amount)?,
                ..Self::default()
            },
            AccountEvent::MoneyWithdrawn { amount } => Self {
                withdrawals: 1,
                withdrawn: i64::try_from(*amount)?,
                ..Self::default()
            },
        })
    }
}

// ANCHOR: handler
impl InboxHandler for ActivityHandler {
    async fn handle(
        &self,
        tx: &mut PgTransaction,
        event: &IncomingEvent,
    ) -> Result<(), HandlerError> {
        if event.stream_id.aggregate_type() != Account::TYPE {
            return Err(format!("{} is not an account", event.stream_id).into());
        }
        // The bank's own event type, read from the CloudEvent's data, with its
        // type and schema version checked (`MoneyDeposited.v2`).
        let change = Change::of(&event.decode::<AccountEvent>()?)?;
        let recorded_at = DateTime::parse_from_rfc3339(&event.cloud_event.time)?;
        sqlx::query(AssertSqlSafe(self.upsert.as_str()))
            .bind(event.stream_id.id())
            .bind(change.owner)
            .bind(change.deposits)
            .bind(change.deposited)
            .bind(change.withdrawals)
            .bind(change.withdrawn)
            .bind(i64::try_from(event.stream_version)?)
            .bind(recorded_at.with_timezone(&Utc))
            .bind(correlation_id(event))
            .execute(tx.as_mut())
            .await?;
        Ok(())
    }
}
// ANCHOR_END: handler

/// The consuming service: its inbox and its read model, both in its own schema.
#[derive(Debug, Clone)]
pub struct Reporting {
    pool: PgPool,
    inbox: PgInbox,
    handler: ActivityHandler,
    select: String,
}

impl Reporting {
    /// The reporting service on `pool`: the inbox of the consumer [`CONSUMER`] and the table
    /// `account_activity`, in `schema` (created on first use).
    pub async fn open(pool: PgPool, schema: &str) -> Result<Self, InboxError> {
        // The inbox checks the schema's name (it would refuse one that needs quoting), so
        // it can go into the SQL below.
        let inbox = PgInbox::open(pool.clone(), schema, CONSUMER).await?;
        let table = format!("\"{schema}\".account_activity");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                 account_id          TEXT        PRIMARY KEY,
                 owner               TEXT        NOT NULL,
                 deposits            BIGINT      NOT NULL,
                 total_deposited     BIGINT      NOT NULL,
                 withdrawals         BIGINT      NOT NULL,
                 total_withdrawn     BIGINT      NOT NULL,
                 events              BIGINT      NOT NULL,
                 last_version        BIGINT      NOT NULL,
                 last_event_at       TIMESTAMPTZ NOT NULL,
                 last_correlation_id UUID
             )"
        )))
        .execute(&pool)
        .await
        .map_err(|source| InboxError::Database {
            consumer: CONSUMER.to_owned(),
            source,
        })?;
        let upsert = format!(
            "INSERT INTO {table} AS a (account_id, owner, deposits, total_deposited,
                 withdrawals, total_withdrawn, events, last_version, last_event_at,
                 last_correlation_id)
             VALUES ($1, COALESCE($2, ''), $3, $4, $5, $6, 1, $7, $8, $9)
             ON CONFLICT (account_id) DO UPDATE SET
                 owner = COALESCE($2, a.owner),
                 deposits = a.deposits + $3,
                 total_deposited = a.total_deposited + $4,
                 withdrawals = a.withdrawals + $5,
                 total_withdrawn = a.total_withdrawn + $6,
                 events = a.events + 1,
                 last_version = $7,
                 last_event_at = $8,
                 last_correlation_id = $9"
        );
        let select = format!(
            "SELECT account_id, owner, deposits, total_deposited, withdrawals,
                 total_withdrawn, events, last_version, last_event_at, last_correlation_id
             FROM {table}"
        );
        Ok(Self {
            pool,
            inbox,
            handler: ActivityHandler { upsert },
            select,
        })
    }

    /// The inbox: per bank stream, the last version applied; and the parked messages.
    pub fn inbox(&self) -> &PgInbox {
        &self.inbox
    }

    /// The handler that keeps `account_activity`.
    pub fn handler(&self) -> &ActivityHandler {
        &self.handler
    }

    // ANCHOR: consumer
    /// The JetStream consumer of the account events on `channel`: the durable
    /// consumer [`CONSUMER`], each event applied once through the inbox by
    /// [`ActivityHandler`].
    pub fn consumer(
        &self,
        jetstream: jetstream::Context,
        channel: &Channel,
    ) -> JetStreamInbox<ActivityHandler> {
        self.consumer_with(jetstream, channel, self.handler.clone())
    }

    /// The same consumer with another handler (the test wraps [`ActivityHandler`]
    /// in one that records what it saw).
    pub fn consumer_with<H: InboxHandler + 'static>(
        &self,
        jetstream: jetstream::Context,
        channel: &Channel,
        handler: H,
    ) -> JetStreamInbox<H> {
        let inbox = self.inbox.clone();
        JetStreamInbox::new(jetstream, channel.stream(), CONSUMER, inbox, handler)
            .filter_subject(channel.account_subjects())
    }
    // ANCHOR_END: consumer

    // ANCHOR: query
    /// The account's row, once the service has seen its opening.
    pub async fn activity(&self, id: &str) -> sqlx::Result<Option<AccountActivity>> {
        let query = format!("{} WHERE account_id = $1", self.select);
        let row: Option<ActivityRow> = sqlx::query_as(AssertSqlSafe(query))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(activity))
    }
    // ANCHOR_END: query

    /// Every row, by account id.
    pub async fn all_activity(&self) -> Result<Vec<AccountActivity>, sqlx::Error> {
        let query = format!("{} ORDER BY account_id", self.select);
        let rows: Vec<ActivityRow> = sqlx::query_as(AssertSqlSafe(query))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(activity).collect())
    }

    /// What JetStream still holds for this service: messages not yet delivered to the
    /// durable consumer, and messages delivered but not acknowledged (being applied, or sent
    /// back to come again). Both 0: the service has caught up with what was published.
    pub async fn backlog(
        &self,
        jetstream: &jetstream::Context,
        channel: &Channel,
    ) -> Result<Backlog, String> {
        let stream = jetstream
            .get_stream(channel.stream())
            .await
            .map_err(|err| format!("stream {}: {err}", channel.stream()))?;
        let info = stream
            .consumer_info(CONSUMER)
            .await
            .map_err(|err| format!("consumer {CONSUMER}: {err}"))?;
        Ok(Backlog {
            undelivered: info.num_pending,
            unacknowledged: u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX),
        })
    }
}

/// What JetStream still holds for a consumer ([`Reporting::backlog`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Messages not delivered yet.
    pub undelivered: u64,
    /// Messages delivered and not acknowledged yet.
    pub unacknowledged: u64,
}

impl Backlog {
    /// Nothing left: every message published so far was applied (or parked) and acknowledged.
    pub fn is_empty(&self) -> bool {
        self.undelivered == 0 && self.unacknowledged == 0
    }
}

fn activity(row: ActivityRow) -> AccountActivity {
    let (account_id, owner, deposits, total_deposited, withdrawals, total_withdrawn) =
        (row.0, row.1, row.2, row.3, row.4, row.5);
    AccountActivity {
        account_id,
        owner,
        deposits,
        total_deposited,
        withdrawals,
        total_withdrawn,
        events: row.6,
        last_version: row.7,
        last_event_at: row.8,
        last_correlation_id: row.9,
    }
}
