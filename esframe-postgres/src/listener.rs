//! Wake-ups for subscriptions: one `LISTEN` connection per store, started on first use.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::{PgPool, postgres::PgListener};
use tokio::{sync::watch, task::JoinHandle};

/// Counts notifications on the store's channel. Subscribers wait for the count to change.
///
/// If the listening connection drops, the count is bumped anyway (a notification may have been
/// missed) and the connection is re-established; subscribers also poll, so a lost notification
/// only delays delivery.
pub(crate) struct Waker {
    pool: PgPool,
    channel: String,
    sender: watch::Sender<u64>,
    task: BackgroundTask,
}

/// A background task started on first use, restarted if it ended, and aborted with its owner.
#[derive(Default)]
struct BackgroundTask(Mutex<Option<JoinHandle<()>>>);

impl BackgroundTask {
    fn ensure_running(&self, start: impl FnOnce() -> JoinHandle<()>) {
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
    pub(crate) fn new(pool: PgPool, channel: String) -> Self {
        Self {
            pool,
            channel,
            sender: watch::Sender::new(0),
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
        self.task.ensure_running(|| {
            let (pool, channel, sender) =
                (self.pool.clone(), self.channel.clone(), self.sender.clone());
            tokio::spawn(listen(pool, channel, sender))
        });
        receiver
    }
}

async fn listen(pool: PgPool, channel: String, sender: watch::Sender<u64>) {
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
        // Anything committed while we were not listening must be looked at.
        bump(&sender);
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => bump(&sender),
                Ok(None) => {
                    tracing::debug!(channel, "esframe LISTEN connection lost; reconnected");
                    bump(&sender);
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
/// a notifying transaction holds through its commit.
pub(crate) struct Notifier {
    pool: PgPool,
    channel: String,
    min_interval: Duration,
    pending: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    task: BackgroundTask,
}

impl Notifier {
    pub(crate) fn new(pool: PgPool, channel: String, min_interval: Duration) -> Self {
        Self {
            pool,
            channel,
            min_interval,
            pending: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(tokio::sync::Notify::new()),
            task: BackgroundTask::default(),
        }
    }

    /// Asks for a notification to be sent soon.
    pub(crate) fn poke(&self) {
        self.pending.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        self.task.ensure_running(|| {
            let (pool, channel) = (self.pool.clone(), self.channel.clone());
            let (pending, wake) = (Arc::clone(&self.pending), Arc::clone(&self.wake));
            let min_interval = self.min_interval;
            tokio::spawn(async move {
                loop {
                    wake.notified().await;
                    while pending.swap(false, Ordering::SeqCst) {
                        let sent = tokio::time::Instant::now();
                        if let Err(err) = sqlx::query("SELECT pg_notify($1, '')")
                            .bind(&channel)
                            .execute(&pool)
                            .await
                        {
                            tracing::warn!(error = %err, channel, "esframe NOTIFY failed; subscribers fall back to polling");
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
