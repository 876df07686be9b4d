//! Wake-ups for subscriptions: one `LISTEN` connection per store, started on first use.

use std::{
    sync::{Mutex, PoisonError},
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
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Waker {
    pub(crate) fn new(pool: PgPool, channel: String) -> Self {
        Self {
            pool,
            channel,
            sender: watch::Sender::new(0),
            task: Mutex::new(None),
        }
    }

    /// A receiver that sees every wake-up from now on; starts the listener if needed.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        let receiver = self.sender.subscribe();
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if task.as_ref().is_none_or(JoinHandle::is_finished) {
            let (pool, channel, sender) =
                (self.pool.clone(), self.channel.clone(), self.sender.clone());
            *task = Some(tokio::spawn(listen(pool, channel, sender)));
        }
        receiver
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        if let Some(task) = self
            .task
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
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
