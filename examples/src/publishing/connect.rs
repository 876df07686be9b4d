//! Reaching NATS and PostgreSQL, with errors that say which one is down and how to start it.

use std::time::Duration;

use esframe_nats::async_nats::{self, jetstream};
use esframe_postgres::PgEventStore;
use sqlx::PgPool;

/// `NATS_URL`, or the local server (`nats://127.0.0.1:4222`).
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// `DATABASE_URL`, or the local server (`postgres://postgres@127.0.0.1:5432/test`).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A JetStream context on the server at `url`; gives up after 10 seconds.
pub async fn jetstream(url: &str) -> Result<jetstream::Context, String> {
    let unreachable = |why: &str| {
        format!(
            "cannot reach NATS at {url} ({why}): start a server with JetStream \
             (`nats-server -js`) or point NATS_URL at one"
        )
    };
    let connecting = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url);
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(Ok(client)) => Ok(jetstream::new(client)),
        Ok(Err(err)) => Err(unreachable(&err.to_string())),
        Err(_) => Err(unreachable("timed out")),
    }
}

/// A pool on the database at `url` (esframe's pool settings); gives up after 10 seconds.
pub async fn postgres(url: &str) -> Result<PgPool, String> {
    PgEventStore::pool_options()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .map_err(|err| {
            format!(
                "cannot reach PostgreSQL at {url} ({err}): start it or point DATABASE_URL \
                 at one"
            )
        })
}
