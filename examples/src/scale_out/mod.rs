//! A projection spread over several processes: the [`Ledger`] read model (strict: it refuses
//! an event applied twice or out of order), the worker a process runs ([`run_worker`]), the
//! deposits writers append, and the check of the read model against the log. Used by the
//! scale-out tests (`tests/scale_out.rs`) and the benchmark (`benches/scale_out.rs`).

use std::time::Duration;

use esframe_core::{
    ExpectedVersion, NewEvent, RecordedEvent, StreamId,
    projection::{HandlerError, Projection, ProjectionContext, ProjectionRunner},
};
use esframe_postgres::{PgEventStore, PgTransaction};
use serde_json::json;
use sqlx::{AssertSqlSafe, PgPool, Row};

/// The projection's name.
pub const LEDGER: &str = "ledger";

/// Sums deposits per account in `ledger_balances`, and records every applied event id in
/// `ledger_applied`. Strict, to catch what exactly-once and per-stream order forbid: an event
/// whose version is not the account's next one, or whose id was applied before, fails the
/// handler (and would be parked as a dead letter). `delay` is slept once per batch, after its
/// writes, to stand for a remote call.
#[derive(Debug, Clone)]
pub struct Ledger {
    schema: String,
    delay: Duration,
}

impl Ledger {
    /// The ledger in `schema`; `delay` per batch.
    pub fn new(schema: impl Into<String>, delay: Duration) -> Self {
        Self {
            schema: schema.into(),
            delay,
        }
    }

    /// Creates its tables, if missing.
    pub async fn create_tables(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let s = &self.schema;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS \"{s}\".ledger_balances (
                 account TEXT PRIMARY KEY, total BIGINT NOT NULL, version BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS \"{s}\".ledger_applied (event_id UUID PRIMARY KEY);"
        )))
        .execute(pool)
        .await?;
        Ok(())
    }
}

impl Projection<PgTransaction> for Ledger {
    fn name(&self) -> &str {
        LEDGER
    }

    async fn handle(
        &self,
        event: &RecordedEvent,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        let s = &self.schema;
        let amount = event.payload["amount"]
            .as_i64()
            .ok_or("a deposit without an amount")?;
        let account = event.aggregate_id();
        let version = i64::try_from(event.stream_version)?;
        let tx = ctx.tx().as_mut();
        let fresh = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{s}\".ledger_applied (event_id) VALUES ($1) ON CONFLICT DO NOTHING"
        )))
        .bind(event.event_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if fresh != 1 {
            return Err(format!("event {} applied twice", event.event_id).into());
        }
        let moved = if version == 1 {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO \"{s}\".ledger_balances (account, total, version) VALUES ($1, $2, 1)
                 ON CONFLICT DO NOTHING"
            )))
            .bind(account)
            .bind(amount)
            .execute(&mut *tx)
            .await?
        } else {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE \"{s}\".ledger_balances SET total = total + $2, version = $3
                 WHERE account = $1 AND version = $3 - 1"
            )))
            .bind(account)
            .bind(amount)
            .bind(version)
            .execute(&mut *tx)
            .await?
        };
        if moved.rows_affected() != 1 {
            return Err(
                format!("{account} version {version} is not the account's next one").into(),
            );
        }
        Ok(())
    }

    async fn handle_batch(
        &self,
        events: &[RecordedEvent],
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        for event in events {
            self.handle(event, ctx).await?;
        }
        // After the writes, as a call to another service would be before the commit.
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(())
    }

    async fn reset(
        &self,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        let s = &self.schema;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "TRUNCATE \"{s}\".ledger_balances, \"{s}\".ledger_applied"
        )))
        .execute(ctx.tx().as_mut())
        .await?;
        Ok(())
    }
}

/// A read model that stands for a remote write: for every batch it waits `delay` and stores
/// one row with the batch's size in `tally_batches` (by projection name), so that what was
/// applied can be counted exactly. The benchmark's handler.
#[derive(Debug, Clone)]
pub struct BatchTally {
    name: String,
    schema: String,
    delay: Duration,
}

impl BatchTally {
    /// The tally `name` in `schema`.
    pub fn new(name: impl Into<String>, schema: impl Into<String>, delay: Duration) -> Self {
        Self {
            name: name.into(),
            schema: schema.into(),
            delay,
        }
    }

    /// Creates its table, if missing.
    pub async fn create_table(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".tally_batches (
                 projection TEXT NOT NULL, events INTEGER NOT NULL,
                 at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
             CREATE INDEX IF NOT EXISTS tally_batches_projection_idx
                 ON \"{schema}\".tally_batches (projection);"
        )))
        .execute(pool)
        .await?;
        Ok(())
    }

    async fn store(
        &self,
        events: usize,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".tally_batches (projection, events) VALUES ($1, $2)",
            self.schema
        )))
        .bind(&self.name)
        .bind(i32::try_from(events)?)
        .execute(ctx.tx().as_mut())
        .await?;
        Ok(())
    }
}

impl Projection<PgTransaction> for BatchTally {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(
        &self,
        _event: &RecordedEvent,
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        self.store(1, ctx).await
    }

    async fn handle_batch(
        &self,
        events: &[RecordedEvent],
        ctx: &mut ProjectionContext<'_, PgTransaction>,
    ) -> Result<(), HandlerError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.store(events.len(), ctx).await
    }
}

/// A deposit of `amount`.
pub fn deposit(amount: i64) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "Deposited".into(),
        schema_version: 1,
        payload: json!({ "amount": amount }),
        metadata: Default::default(),
    }
}

/// Appends one deposit to account `account`.
pub async fn append_deposit(store: &PgEventStore, account: &str, amount: i64) {
    let stream = StreamId::new("account", account).expect("a valid account id");
    esframe_core::EventStore::append(store, &stream, ExpectedVersion::Any, vec![deposit(amount)])
        .await
        .expect("append a deposit");
}

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerCheck {
    /// Events in the log.
    pub events: i64,
    /// Events the ledger applied.
    pub applied: i64,
    /// Accounts whose total or version differs from the log's.
    pub wrong_accounts: Vec<String>,
    /// Dead letters of the ledger.
    pub dead_letters: i64,
}

impl LedgerCheck {
    /// Every event applied once, every account right, nothing parked.
    pub fn exact(&self) -> bool {
        self.events == self.applied && self.wrong_accounts.is_empty() && self.dead_letters == 0
    }
}

/// Compares the ledger with the log: events against applied ids, each account's total and
/// version against its stream's.
pub async fn check(pool: &PgPool, schema: &str) -> Result<LedgerCheck, sqlx::Error> {
    let s = schema;
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT (SELECT count(*) FROM \"{s}\".events) AS events,
                (SELECT count(*) FROM \"{s}\".ledger_applied) AS applied,
                (SELECT count(*) FROM \"{s}\".projection_dead_letters
                 WHERE projection = '{LEDGER}') AS dead_letters"
    )))
    .fetch_one(pool)
    .await?;
    let wrong_accounts: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT coalesce(e.account, b.account) FROM
             (SELECT aggregate_id AS account, sum((payload->>'amount')::bigint) AS total,
                     max(stream_version) AS version
              FROM \"{s}\".events GROUP BY aggregate_id) e
         FULL JOIN \"{s}\".ledger_balances b ON b.account = e.account
         WHERE b.total IS DISTINCT FROM e.total OR b.version IS DISTINCT FROM e.version
         ORDER BY 1 LIMIT 20"
    )))
    .fetch_all(pool)
    .await?;
    Ok(LedgerCheck {
        events: row.try_get("events")?,
        applied: row.try_get("applied")?,
        wrong_accounts,
        dead_letters: row.try_get("dead_letters")?,
    })
}

/// How a worker process runs the ledger.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The database (or a pooler in front of it).
    pub url: String,
    /// The store's schema.
    pub schema: String,
    /// Partitions of the ledger.
    pub partitions: u16,
    /// The leases' lifetime.
    pub lease_time: Duration,
    /// How often the worker rebalances.
    pub rebalance: Duration,
    /// Events per batch.
    pub batch_size: usize,
    /// The ledger's delay per batch.
    pub delay: Duration,
    /// Whether the store LISTENs (not behind a transaction pooler).
    pub listen: bool,
    /// The store's poll interval.
    pub poll: Duration,
    /// The size of the worker's connection pool.
    pub connections: u32,
    /// Run a [`BatchTally`] of this name instead of the ledger.
    pub tally: Option<String>,
    /// Partitions processed at once by the worker ([`ProjectionRunner::concurrency`]; `None`:
    /// all it holds).
    pub concurrency: Option<usize>,
}

impl WorkerConfig {
    /// The configuration a parent passes in the environment (`ESFRAME_WORKER_*`), `None`
    /// without `ESFRAME_WORKER_SCHEMA`.
    pub fn from_env() -> Option<Self> {
        let var = |name: &str| std::env::var(format!("ESFRAME_WORKER_{name}")).ok();
        let millis = |name: &str, default: u64| {
            Duration::from_millis(var(name).and_then(|v| v.parse().ok()).unwrap_or(default))
        };
        Some(Self {
            schema: var("SCHEMA")?,
            url: var("URL")?,
            partitions: var("PARTITIONS").and_then(|v| v.parse().ok()).unwrap_or(16),
            lease_time: millis("LEASE_MS", 1000),
            rebalance: millis("REBALANCE_MS", 100),
            batch_size: var("BATCH").and_then(|v| v.parse().ok()).unwrap_or(100),
            delay: millis("DELAY_MS", 0),
            listen: var("LISTEN").is_none_or(|v| v != "0"),
            poll: millis("POLL_MS", 100),
            connections: var("CONNECTIONS").and_then(|v| v.parse().ok()).unwrap_or(8),
            tally: var("TALLY"),
            concurrency: var("CONCURRENCY").and_then(|v| v.parse().ok()),
        })
    }

    /// The environment that [`WorkerConfig::from_env`] reads back.
    pub fn to_env(&self) -> Vec<(String, String)> {
        [
            ("SCHEMA", self.schema.clone()),
            ("URL", self.url.clone()),
            ("PARTITIONS", self.partitions.to_string()),
            ("LEASE_MS", self.lease_time.as_millis().to_string()),
            ("REBALANCE_MS", self.rebalance.as_millis().to_string()),
            ("BATCH", self.batch_size.to_string()),
            ("DELAY_MS", self.delay.as_millis().to_string()),
            ("LISTEN", if self.listen { "1" } else { "0" }.to_owned()),
            ("POLL_MS", self.poll.as_millis().to_string()),
            ("CONNECTIONS", self.connections.to_string()),
        ]
        .into_iter()
        .chain(self.tally.clone().map(|t| ("TALLY", t)))
        .chain(self.concurrency.map(|c| ("CONCURRENCY", c.to_string())))
        .map(|(k, v)| (format!("ESFRAME_WORKER_{k}"), v))
        .collect()
    }

    /// The store this worker reads from.
    pub async fn store(&self) -> PgEventStore {
        let pool = PgEventStore::pool_options()
            .max_connections(self.connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&self.url)
            .await
            .unwrap_or_else(|err| panic!("cannot reach PostgreSQL at {}: {err}", self.url));
        PgEventStore::builder(pool)
            .schema(&self.schema)
            .expect("a valid schema")
            .listen(self.listen)
            .poll_interval(self.poll)
            .build()
            .await
            .expect("open the store")
    }

    /// The ledger's runner in this configuration.
    pub fn runner(
        &self,
        store: &PgEventStore,
    ) -> ProjectionRunner<PgEventStore, esframe_postgres::PgCheckpoints, Ledger> {
        self.configure(ProjectionRunner::new(
            store.clone(),
            store.checkpoints().lease_time(self.lease_time),
            Ledger::new(&self.schema, self.delay),
        ))
    }

    /// The runner of the tally `name` in this configuration.
    pub fn tally_runner(
        &self,
        store: &PgEventStore,
        name: &str,
    ) -> ProjectionRunner<PgEventStore, esframe_postgres::PgCheckpoints, BatchTally> {
        self.configure(ProjectionRunner::new(
            store.clone(),
            store.checkpoints().lease_time(self.lease_time),
            BatchTally::new(name, &self.schema, self.delay),
        ))
    }

    fn configure<P: Projection<PgTransaction>>(
        &self,
        runner: ProjectionRunner<PgEventStore, esframe_postgres::PgCheckpoints, P>,
    ) -> ProjectionRunner<PgEventStore, esframe_postgres::PgCheckpoints, P> {
        let runner = runner
            .partitions(self.partitions)
            .batch_size(self.batch_size)
            .rebalance_interval(self.rebalance)
            .standby_poll(self.rebalance);
        match self.concurrency {
            Some(n) => runner.concurrency(n),
            None => runner,
        }
    }
}

/// Runs the ledger (or the configured tally) as one worker of a group until `shutdown`
/// resolves, then leaves it cleanly.
pub async fn run_worker(config: &WorkerConfig, shutdown: impl Future<Output = ()> + Send) {
    let store = config.store().await;
    let result = match &config.tally {
        Some(name) => config.tally_runner(&store, name).run(shutdown).await,
        None => config.runner(&store).run(shutdown).await,
    };
    if let Err(err) = result {
        eprintln!("worker stopped with an error: {err}");
        std::process::exit(3);
    }
}
