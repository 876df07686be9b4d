//! The balances read model: one row per account, kept up to date by a projection.
//!
//! Both are typed projections: they receive each account event decoded, with its envelope.
//! [`PgBalances`] keeps the read model in a PostgreSQL table, exactly once (its writes commit
//! with the projection's checkpoint); [`MemoryBalances`] keeps it in memory for the in-memory
//! demo. A runner takes either as `Typed(balances)`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
};

use esframe_core::{
    Aggregate,
    projection::{HandlerError, Interest, ProjectedEvent, ProjectionContext, TypedProjection},
};
use esframe_postgres::PgTransaction;
use sqlx::{AssertSqlSafe, PgPool};

use super::{Account, AccountEvent};

/// One account as the read model shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountBalance {
    /// The account's id.
    pub account_id: String,
    /// Its owner (empty until the opening is seen).
    pub owner: String,
    /// Balance in cents.
    pub balance: i64,
    /// Number of deposits.
    pub deposits: i64,
    /// Number of withdrawals.
    pub withdrawals: i64,
}

/// What one event, or a batch of events, does to one account.
#[derive(Debug, Default, Clone)]
struct Change {
    owner: Option<String>,
    balance: i64,
    deposits: i64,
    withdrawals: i64,
}

impl Change {
    fn add(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::AccountOpened { owner } => self.owner = Some(owner.clone()),
            AccountEvent::MoneyDeposited { amount, .. } => {
                self.balance += cents(*amount);
                self.deposits += 1;
            }
            AccountEvent::MoneyWithdrawn { amount } => {
                self.balance -= cents(*amount);
                self.withdrawals += 1;
            }
        }
    }
}

fn cents(amount: u64) -> i64 {
    i64::try_from(amount).unwrap_or(i64::MAX)
}

/// Reads the balances read model.
pub trait BalanceQuery {
    /// The account's row, if the read model has seen it.
    fn balance(
        &self,
        account_id: &str,
    ) -> impl Future<Output = Result<Option<AccountBalance>, HandlerError>> + Send;
}

// ANCHOR: pg_projection
/// The balances read model in the PostgreSQL table `<schema>.account_balances`.
#[derive(Debug, Clone)]
pub struct PgBalances {
    pool: PgPool,
    table: String,
}

impl PgBalances {
    /// Creates the table in `schema` if needed.
    pub async fn create(pool: PgPool, schema: &str) -> Result<Self, sqlx::Error> {
        let schema = esframe_postgres::SchemaName::new(schema)
            .map_err(|err| sqlx::Error::Configuration(err.into()))?;
        let table = format!("\"{schema}\".account_balances");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE IF NOT EXISTS {table} (
                 account_id  TEXT PRIMARY KEY,
                 owner       TEXT,
                 balance     BIGINT NOT NULL,
                 deposits    BIGINT NOT NULL,
                 withdrawals BIGINT NOT NULL)"
        )))
        .execute(&pool)
        .await?;
        Ok(Self { pool, table })
    }

    /// Applies per-account changes with one statement.
    async fn upsert(
        &self,
        changes: Vec<(String, Change)>,
        tx: &mut PgTransaction,
    ) -> Result<(), HandlerError> {
        let mut columns = <(Vec<_>, Vec<_>, Vec<_>, Vec<_>, Vec<_>)>::default();
        for (account, change) in changes {
            columns.0.push(account);
            columns.1.push(change.owner);
            columns.2.push(change.balance);
            columns.3.push(change.deposits);
            columns.4.push(change.withdrawals);
        }
        let table = &self.table;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {table} AS t
                 (account_id, owner, balance, deposits, withdrawals)
             SELECT * FROM unnest(
                 $1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[])
             ON CONFLICT (account_id) DO UPDATE SET
                 owner = coalesce(excluded.owner, t.owner),
                 balance = t.balance + excluded.balance,
                 deposits = t.deposits + excluded.deposits,
                 withdrawals = t.withdrawals + excluded.withdrawals"
        )))
        .bind(columns.0)
        .bind(columns.1)
        .bind(columns.2)
        .bind(columns.3)
        .bind(columns.4)
        .execute(tx.as_mut())
        .await?;
        Ok(())
    }
}

impl TypedProjection<PgTransaction> for PgBalances {
    type Event = AccountEvent;

    fn name(&self) -> &str {
        "balances"
    }

    /// The account events, and only from accounts' streams.
    fn interest(&self) -> Interest {
        Interest::events_of::<AccountEvent>().and_aggregates([Account::TYPE])
    }

    async fn apply(
        &self,
        event: ProjectedEvent<'_, AccountEvent>,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        let mut change = Change::default();
        change.add(&event.event);
        self.upsert(vec![(event.aggregate_id().to_owned(), change)], ctx.tx())
            .await
    }

    /// A whole batch with one statement: the changes are summed per account first.
    async fn apply_batch(
        &self,
        events: Vec<ProjectedEvent<'_, AccountEvent>>,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        let mut order = Vec::new();
        let mut changes: HashMap<&str, Change> = HashMap::new();
        for event in &events {
            let account = event.aggregate_id();
            let change = changes.entry(account).or_insert_with(|| {
                order.push(account);
                Change::default()
            });
            change.add(&event.event);
        }
        let changes = order
            .into_iter()
            .map(|account| {
                (
                    account.to_owned(),
                    changes.remove(account).unwrap_or_default(),
                )
            })
            .collect();
        self.upsert(changes, ctx.tx()).await
    }

    async fn reset(
        &self,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        sqlx::query(AssertSqlSafe(format!("TRUNCATE {}", self.table)))
            .execute(ctx.tx().as_mut())
            .await?;
        Ok(())
    }
}
// ANCHOR_END: pg_projection

impl BalanceQuery for PgBalances {
    async fn balance(&self, account_id: &str) -> Result<Option<AccountBalance>, HandlerError> {
        let row: Option<(String, String, i64, i64, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT account_id, coalesce(owner, '') AS owner, balance, deposits, withdrawals
             FROM {} WHERE account_id = $1",
            self.table
        )))
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(
            |(account_id, owner, balance, deposits, withdrawals)| AccountBalance {
                account_id,
                owner,
                balance,
                deposits,
                withdrawals,
            },
        ))
    }
}

/// The balances read model in memory (at least once: see
/// [`MemoryCheckpoints`](esframe_memory::MemoryCheckpoints)).
#[derive(Debug, Clone, Default)]
pub struct MemoryBalances {
    rows: Arc<Mutex<BTreeMap<String, AccountBalance>>>,
}

impl TypedProjection for MemoryBalances {
    type Event = AccountEvent;

    fn name(&self) -> &str {
        "balances"
    }

    /// The account events, and only from accounts' streams.
    fn interest(&self) -> Interest {
        Interest::events_of::<AccountEvent>().and_aggregates([Account::TYPE])
    }

    async fn apply(
        &self,
        event: ProjectedEvent<'_, AccountEvent>,
        _ctx: &mut ProjectionContext<'_, ()>,
    ) -> Result<(), HandlerError> {
        let mut change = Change::default();
        change.add(&event.event);
        let mut rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        let row = rows
            .entry(event.aggregate_id().to_owned())
            .or_insert_with(|| AccountBalance {
                account_id: event.aggregate_id().to_owned(),
                ..AccountBalance::default()
            });
        if let Some(owner) = change.owner {
            row.owner = owner;
        }
        row.balance += change.balance;
        row.deposits += change.deposits;
        row.withdrawals += change.withdrawals;
        Ok(())
    }

    async fn reset(&self, _ctx: &mut ProjectionContext<'_, ()>) -> Result<(), HandlerError> {
        self.rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok(())
    }
}

impl BalanceQuery for MemoryBalances {
    async fn balance(&self, account_id: &str) -> Result<Option<AccountBalance>, HandlerError> {
        Ok(self
            .rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(account_id)
            .cloned())
    }
}
