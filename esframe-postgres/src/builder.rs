//! [`PgEventStoreBuilder`]: configures and opens a [`PgEventStore`].

use std::{sync::Arc, time::Duration};

use esframe_core::{Upcasters, projection::Projection};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::{
    PgEventStore, PgStoreError, PgTransaction, SchemaName,
    horizon::Stall,
    inline::{self, InlineProjection, Registered},
    listener::{Notifier, Waker},
    schema::migrate,
    sql::Queries,
    stash::ConnectionStash,
    store::Inner,
};

/// Configures and opens a [`PgEventStore`].
///
/// ```no_run
/// # async fn open() -> Result<(), esframe_postgres::PgStoreError> {
/// use esframe_postgres::PgEventStore;
/// use std::time::Duration;
/// let pool = PgEventStore::pool_options().connect("postgres://postgres@127.0.0.1/test").await?;
/// let store = PgEventStore::builder(pool)
///     .schema("billing")?
///     .poll_interval(Duration::from_millis(500))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct PgEventStoreBuilder {
    pool: PgPool,
    schema: SchemaName,
    upcasters: Upcasters,
    notify: bool,
    listen: bool,
    notify_interval: Duration,
    poll_interval: Duration,
    stall_warning_after: Duration,
    reconnect_within: Duration,
    inline: Vec<Arc<dyn InlineProjection>>,
    invalid_inline: Option<esframe_core::projection::InvalidProjectionKey>,
}

impl std::fmt::Debug for PgEventStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEventStoreBuilder")
            .field("schema", &self.schema)
            .field("notify", &self.notify)
            .field("listen", &self.listen)
            .field("poll_interval", &self.poll_interval)
            .field("reconnect_within", &self.reconnect_within)
            .field(
                "inline_projections",
                &self.inline.iter().map(|p| p.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl PgEventStoreBuilder {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self {
            pool,
            schema: SchemaName::default(),
            upcasters: Upcasters::default(),
            notify: true,
            listen: true,
            notify_interval: Duration::from_millis(1),
            poll_interval: Duration::from_secs(1),
            stall_warning_after: Duration::from_secs(10),
            reconnect_within: Duration::from_secs(10),
            inline: Vec::new(),
            invalid_inline: None,
        }
    }

    /// The Postgres schema holding esframe's tables (default `esframe`).
    pub fn schema(mut self, name: impl Into<String>) -> Result<Self, PgStoreError> {
        self.schema = SchemaName::new(name)?;
        Ok(self)
    }

    /// Upcasters applied to every event read (streams, the global log, subscriptions), so
    /// events stored by older code arrive at their current schema version. Stored rows are never
    /// rewritten.
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// Whether appends wake subscriptions in other processes with `NOTIFY` (default `true`).
    /// The notification is sent after the append commits, by a background task on its own
    /// connection, coalescing bursts into one, so appends never wait on PostgreSQL's
    /// notification lock. Subscriptions in this process are woken directly either way; without
    /// it, other processes see new events after at most their poll interval.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Whether the store keeps a connection that `LISTEN`s for other processes' appends
    /// (default `true`). `LISTEN` needs a session of its own: turn it off behind a connection
    /// pooler in transaction mode, where subscriptions and projection runners then see other
    /// processes' events after at most the [poll interval](Self::poll_interval). Nothing else
    /// of the store keeps session state.
    pub fn listen(mut self, listen: bool) -> Self {
        self.listen = listen;
        self
    }

    /// The shortest time between two notifications (default 1 ms): appends within it share one
    /// `NOTIFY`, bounding its cost under heavy load at the price of that much extra latency for
    /// subscribers in other processes.
    pub fn notify_interval(mut self, interval: Duration) -> Self {
        self.notify_interval = interval;
        self
    }

    /// How long an idle subscription waits before polling, in case a notification was missed
    /// (default 1 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long the global log may be held back by an open transaction before a warning naming
    /// that transaction is logged (default 10 s).
    pub fn stall_warning_after(mut self, after: Duration) -> Self {
        self.stall_warning_after = after;
        self
    }

    /// How long an operation whose connection dies (a database restart, a killed session)
    /// keeps trying on new connections, waiting a jittered, growing time between tries (from
    /// 10 ms up to 500 ms) (default 10 s). Appends can run again safely because they are
    /// idempotent by event id; an append whose commit may have happened and that could not be
    /// confirmed within this time is
    /// [`StoreError::OutcomeUnknown`](esframe_core::StoreError::OutcomeUnknown).
    pub fn reconnect_within(mut self, budget: Duration) -> Self {
        self.reconnect_within = budget;
        self
    }

    /// Updates `projection` in the same transaction as every append, for read-your-writes: when
    /// `append` returns, the read model already holds the events, and if the projection fails
    /// the append is rolled back
    /// ([`StoreError::InlineProjection`](esframe_core::StoreError::InlineProjection)) and
    /// nothing is stored.
    ///
    /// An append that updates inline projections costs a few more round trips (`BEGIN`, a shared
    /// advisory lock, the projection's statements, `COMMIT`). Every process that appends must
    /// register the same inline projections. Do not also run a
    /// [`ProjectionRunner`](esframe_core::projection::ProjectionRunner) for it except to
    /// [`rebuild`](esframe_core::projection::ProjectionRunner::rebuild) it: the rebuild holds the
    /// projection's lease, which pauses appends that update it until the rebuild ends, so no
    /// event is applied twice or missed.
    ///
    /// The projection's version ([`Projection::version`]) is recorded when the store is built;
    /// after the code's version changes, appends are refused until the read model is rebuilt.
    pub fn inline_projection<P: Projection<PgTransaction>>(mut self, projection: P) -> Self {
        match Registered::boxed(projection) {
            Ok(registered) => self.inline.push(registered),
            Err(err) => {
                self.invalid_inline.get_or_insert(err);
            }
        }
        self
    }

    /// Applies pending migrations and opens the store.
    pub async fn build(self) -> Result<PgEventStore, PgStoreError> {
        if let Some(err) = self.invalid_inline {
            return Err(err.into());
        }
        if self.pool.options().get_test_before_acquire() {
            tracing::info!(
                "the sqlx pool pings each connection before every statement (test_before_acquire), \
                 doubling the round trips of esframe's one-statement appends; build the pool with \
                 PgEventStore::pool_options() (or test_before_acquire(false)) for full speed"
            );
        }
        migrate(&self.pool, &self.schema).await?;
        let sql = Queries::new(&self.schema);
        inline::register(&self.pool, &sql, &self.inline).await?;
        let stash = ConnectionStash::for_pool(&self.pool);
        let listener_pid = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let channel = format!("esframe_{}", self.schema.as_str().to_ascii_lowercase());
        Ok(PgEventStore {
            inner: Arc::new(Inner {
                sql,
                upcasters: self.upcasters,
                notify: self.notify,
                notifier: Notifier::new(
                    self.pool.clone(),
                    channel.clone(),
                    self.notify_interval,
                    Arc::clone(&listener_pid),
                ),
                waker: Waker::new(
                    self.pool.clone(),
                    channel.clone(),
                    listener_pid,
                    self.listen,
                ),
                pool: self.pool,
                schema: self.schema,
                channel,
                poll_interval: self.poll_interval,
                stall_warning_after: self.stall_warning_after,
                reconnect_within: self.reconnect_within,
                inline: self.inline,
                stash,
                checkpoint_commits: watch::Sender::new(0),
                stall: Stall::default(),
            }),
        })
    }
}
