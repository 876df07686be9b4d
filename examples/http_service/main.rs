//! The bank account as an HTTP service (the routes: `esframe_examples::http_service`).
//!
//! - `cargo run --example http_service`: on the in-memory store, at `127.0.0.1:3000`.
//! - With `DATABASE_URL` set, or `-- --postgres` (then `DATABASE_URL` defaults to
//!   `postgres://postgres@127.0.0.1:5432/test`): on PostgreSQL, in the schema `esframe_http`,
//!   created on first use. `-- --memory` keeps the in-memory store even with `DATABASE_URL` set.
//! - `-- --addr HOST:PORT`, or `HTTP_ADDR`: where to listen.
//!
//! Each request is logged with its correlation id; Ctrl-C stops the server gracefully.

use std::env;

use esframe_examples::http_service::{Backend, DEFAULT_READ_TIMEOUT, HttpService};
use esframe_postgres::PgEventStore;
use tokio::net::TcpListener;

type Error = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: http_service [--postgres | --memory] [--addr HOST:PORT]";

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .init();
    let (mut postgres, mut addr) = (env::var_os("DATABASE_URL").is_some(), None);
    let mut args = env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--postgres" => postgres = true,
            "--memory" => postgres = false,
            "--addr" => addr = Some(args.next().ok_or(USAGE)?),
            _ => return Err(format!("unknown argument `{arg}`\n{USAGE}").into()),
        }
    }
    let addr = addr
        .or_else(|| env::var("HTTP_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());

    let service = if postgres {
        let url = env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let pool = PgEventStore::pool_options()
            .connect(&url)
            .await
            .map_err(|err| format!("cannot reach PostgreSQL at {url}: {err}"))?;
        tracing::info!("on PostgreSQL at {url}, schema esframe_http");
        HttpService::start(
            Backend::postgres(pool, "esframe_http").await?,
            DEFAULT_READ_TIMEOUT,
        )?
    } else {
        tracing::info!("on the in-memory store");
        HttpService::start(Backend::memory(), DEFAULT_READ_TIMEOUT)?
    };
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|err| format!("cannot listen on {addr}: {err}"))?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    service
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
