//! Wake-ups for subscriptions: one `LISTEN` connection per store, started on first use.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{PgPool, Postgres, pool::PoolConnection, postgres::PgListener};
use tokio::{sync::watch, task::JoinHandle};

/// First key of the shared advisory lock every LISTEN connection of esframe holds while it
/// listens (the second is `hashtext(channel)`), so that notifiers can tell whether anyone
/// listens at all: `b"esfr"`.
const LISTENING_LOCK: i32 = 0x6573_6672;

/// How long a notifier trusts its last look at who listens.
const LISTENERS_RECHECK: Duration = Duration::from_millis(250);

/// Counts notifications on the store's channel. Subscribers wait for the count to change.
///
/// If the listening connection drops, the count is bumped anyway (a notification may have been
/// missed) and the connection is re-established; subscribers also poll, so a lost notification
/// only delays delivery.
pub(crate) struct Waker {
    pool: PgPool,
    channel: String,
    sender: watch::Sender<u64>,
    /// Backend pid of this store's LISTEN connection (0: none), which its own notifier need not
    /// wake: local subscribers are woken directly.
    own_pid: Arc<AtomicI32>,
    /// Whether to keep a LISTEN connection at all (not behind a transaction pooler).
    listen: bool,
    task: BackgroundTask,
}

/// A background task started on first use, restarted if it ended, and aborted with its owner.
#[derive(Default)]
pub(crate) struct BackgroundTask(Mutex<Option<JoinHandle<()>>>);

impl BackgroundTask {
    pub(crate) fn ensure_running(&self, start: impl FnOnce() -> JoinHandle<()>) {
        let mut task = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if task.as_ref().is_none_or(JoinHandle::is_finished) {
            *task = Some(start());
        }
    }
}

impl Drop for BackgroundTask {
    fn drop(&mut self) {
        if let Some(task) = self
            .0
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

impl Waker {
    pub(crate) fn new(
        pool: PgPool,
        channel: String,
        own_pid: Arc<AtomicI32>,
        listen: bool,
    ) -> Self {
        Self {
            pool,
            channel,
            sender: watch::Sender::new(0),
            own_pid,
            listen,
            task: BackgroundTask::default(),
        }
    }

    /// Wakes this process's subscriptions after a local append.
    pub(crate) fn wake_local(&self) {
        if self.sender.receiver_count() > 0 {
            self.sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A receiver that sees every wake-up from now on; starts the listener if needed.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        let receiver = self.sender.subscribe();
        if !self.listen {
            return receiver;
        }
        self.task.ensure_running(|| {
            let (pool, channel, sender) =
                (self.pool.clone(), self.channel.clone(), self.sender.clone());
            tokio::spawn(listen(pool, channel, sender, Arc::clone(&self.own_pid)))
        });
        receiver
    }
}

/// Announces that `listener` listens on `channel` (a shared advisory lock, held as long as its
/// session lives) and records its backend pid.
async fn announce(
    listener: &mut PgListener,
    channel: &str,
    own_pid: &AtomicI32,
) -> Result<(), sqlx::Error> {
    let pid: i32 = sqlx::query_scalar(
        "SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock_shared($1, hashtext($2))) l",
    )
    .bind(LISTENING_LOCK)
    .bind(channel)
    .fetch_one(&mut *listener)
    .await?;
    own_pid.store(pid, Ordering::SeqCst);
    Ok(())
}

async fn listen(
    pool: PgPool,
    channel: String,
    sender: watch::Sender<u64>,
    own_pid: Arc<AtomicI32>,
) {
    let bump = |sender: &watch::Sender<u64>| sender.send_modify(|n| *n = n.wrapping_add(1));
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(error = %err, "esframe LISTEN connection failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(err) = listener.listen(&channel).await {
            tracing::warn!(error = %err, channel, "esframe LISTEN failed; retrying in 1 s");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if let Err(err) = announce(&mut listener, &channel, &own_pid).await {
            tracing::warn!(error = %err, channel, "esframe LISTEN announcement failed; retrying in 1 s");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Anything committed while we were not listening must be looked at.
        bump(&sender);
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => bump(&sender),
                Ok(None) => {
                    // sqlx reconnected and listens again; the announcement died with the old
                    // session.
                    tracing::debug!(channel, "esframe LISTEN connection lost; reconnected");
                    bump(&sender);
                    if let Err(err) = announce(&mut listener, &channel, &own_pid).await {
                        tracing::warn!(error = %err, channel, "esframe LISTEN announcement failed; reconnecting");
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, channel, "esframe LISTEN connection failed; reconnecting");
                    bump(&sender);
                    break;
                }
            }
        }
    }
}

/// Sends `NOTIFY` after appends commit, from a background task on its own connection.
///
/// `poke` only sets a flag and wakes the task, so an append never waits for it; pokes that
/// arrive while a notification is being sent are coalesced into one more. Sending it outside
/// the append's transaction keeps appends from queueing on PostgreSQL's notification lock, which
/// a notifying transaction holds through its commit. Notifications are only sent while some
/// other store listens on the channel (every LISTEN connection announces itself with a shared
/// advisory lock, looked up at most every 250 ms), so a process whose events nobody follows
/// elsewhere pays nothing for them.
pub(crate) struct Notifier {
    pool: PgPool,
    channel: String,
    min_interval: Duration,
    pending: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    own_pid: Arc<AtomicI32>,
    /// Until when (nanoseconds since `epoch`) nobody else is known to listen: pokes are
    /// dropped without waking the task.
    quiet_until: Arc<AtomicU64>,
    epoch: Instant,
    task: BackgroundTask,
}

fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl Notifier {
    pub(crate) fn new(
        pool: PgPool,
        channel: String,
        min_interval: Duration,
        own_pid: Arc<AtomicI32>,
    ) -> Self {
        Self {
            pool,
            channel,
            min_interval,
            pending: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(tokio::sync::Notify::new()),
            own_pid,
            quiet_until: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
            task: BackgroundTask::default(),
        }
    }

    /// Asks for a notification to be sent soon.
    pub(crate) fn poke(&self) {
        if nanos_since(self.epoch) < self.quiet_until.load(Ordering::Relaxed) {
            return;
        }
        self.pending.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        self.task.ensure_running(|| {
            let (pool, channel) = (self.pool.clone(), self.channel.clone());
            let (pending, wake) = (Arc::clone(&self.pending), Arc::clone(&self.wake));
            let own_pid = Arc::clone(&self.own_pid);
            let (quiet_until, epoch) = (Arc::clone(&self.quiet_until), self.epoch);
            let min_interval = self.min_interval;
            tokio::spawn(async move {
                // Kept across notifications: a connection going back to the pool costs a ping.
                let mut connection = None;
                let mut listeners: Option<(Instant, bool)> = None;
                loop {
                    wake.notified().await;
                    while pending.swap(false, Ordering::SeqCst) {
                        let sent = tokio::time::Instant::now();
                        let own = own_pid.load(Ordering::SeqCst);
                        match notify(&pool, &mut connection, &channel, own, &mut listeners).await
                        {
                            Ok(true) => {}
                            Ok(false) => {
                                // Nobody else listens: stay asleep until it is time to look
                                // again.
                                let until = nanos_since(epoch)
                                    + LISTENERS_RECHECK.as_nanos() as u64;
                                quiet_until.store(until, Ordering::Relaxed);
                                continue;
                            }
                            Err(err) => {
                                connection = None;
                                tracing::warn!(error = %err, channel, "esframe NOTIFY failed; subscribers fall back to polling");
                            }
                        }
                        // Under a steady stream of appends, one notification per interval wakes
                        // every subscriber just as well as one per append.
                        tokio::time::sleep_until(sent + min_interval).await;
                    }
                }
            })
        });
    }
}

/// Sends one notification on `connection` (taking one from the pool if there is none), if
/// anyone but `own_pid` listens, which is looked up again when `listeners` is too old. Returns
/// whether anyone listens.
async fn notify(
    pool: &PgPool,
    connection: &mut Option<PoolConnection<Postgres>>,
    channel: &str,
    own_pid: i32,
    listeners: &mut Option<(Instant, bool)>,
) -> Result<bool, sqlx::Error> {
    let connection = match connection {
        Some(connection) => connection,
        None => connection.insert(pool.acquire().await?),
    };
    let anyone = match *listeners {
        Some((at, anyone)) if at.elapsed() < LISTENERS_RECHECK => anyone,
        _ => {
            let anyone: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_locks
                                WHERE locktype = 'advisory' AND objsubid = 2
                                  AND database = (SELECT oid FROM pg_database
                                                  WHERE datname = current_database())
                                  AND classid = $1::int4::oid AND objid = hashtext($2)::oid
                                  AND pid <> $3)",
            )
            .bind(LISTENING_LOCK)
            .bind(channel)
            .bind(own_pid)
            .fetch_one(&mut **connection)
            .await?;
            *listeners = Some((Instant::now(), anyone));
            anyone
        }
    };
    if anyone {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(channel)
            .execute(&mut **connection)
            .await?;
    }
    Ok(anyone)
}
