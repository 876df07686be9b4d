//! The reporting service: consumes the bank's account events from NATS JetStream, each applied
//! once through its inbox into its own read model, `account_activity`.
//!
//! `cargo run --example consume_from_nats [-- --until-caught-up [N]]`: runs the durable
//! consumer `reporting` on the stream `BANK` until Ctrl-C, printing each event it applies; with
//! `--until-caught-up`, stops once JetStream holds nothing more for it (and, given N, once it
//! applied at least N events), then prints the read model. Its inbox and read model are in the
//! schema `esframe_reporting` of the database at `DATABASE_URL`; NATS is at `NATS_URL`
//! (defaults: the local servers). `cargo run --example publish_to_nats` is the bank.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use esframe_core::publish::IncomingEvent;
use esframe_examples::{
    bank_account::AccountEvent,
    publishing::{CONSUMER, Channel, REPORTING_SCHEMA, Reporting, cents, connect, correlation_id},
};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let until = args
        .iter()
        .position(|arg| arg == "--until-caught-up")
        .map(|i| {
            args.get(i + 1)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        });
    let (nats_url, database_url) = (connect::nats_url(), connect::database_url());
    // ANCHOR: wiring
    let jetstream = connect::jetstream(&nats_url).await?;
    let channel = Channel::bank();
    channel.ensure(&jetstream).await?; // either service may start first
    let pool = connect::postgres(&database_url).await?;
    let reporting = Reporting::open(pool, REPORTING_SCHEMA).await?;
    // ANCHOR_END: wiring
    println!(
        "reporting: consuming {}, subjects {}, as the durable consumer {CONSUMER} from \
         {nats_url}; inbox and account_activity in {database_url}, schema \
         {REPORTING_SCHEMA}\n",
        channel.stream(),
        channel.account_subjects()
    );

    // ANCHOR: spawn
    // The accounts this run changed; `show` prints each event once it is applied
    // (committed), before its message is acknowledged.
    let touched = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = Arc::clone(&touched);
    let running = reporting
        .consumer(jetstream.clone(), &channel)
        .on_applied(move |event| show(event, &seen))
        .spawn();
    // ANCHOR_END: spawn

    let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            _ = &mut interrupted => break,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let Some(at_least) = until else { continue };
        // Caught up: JetStream has nothing undelivered or unacknowledged for the consumer
        // (not found yet, while the consumer is being created: not caught up).
        let drained = reporting
            .backlog(&jetstream, &channel)
            .await
            .is_ok_and(|backlog| backlog.is_empty());
        if drained && running.status().applied >= at_least {
            break;
        }
    }
    let status = running.status();
    running.shutdown().await;
    println!(
        "\nconsumer {CONSUMER}: {} delivered, {} applied, {} duplicates, {} early, {} parked",
        status.delivered, status.applied, status.duplicates, status.early, status.parked
    );

    let touched = touched
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let rows = reporting.all_activity().await?;
    println!(
        "\naccount_activity: {} accounts, {} changed by this run",
        rows.len(),
        touched.len()
    );
    if !touched.is_empty() {
        println!(
            "{:<12} {:<6} {:>8} {:>10} {:>11} {:>10} {:>8} {:>6}  {:<13}  last correlation",
            "account",
            "owner",
            "deposits",
            "deposited",
            "withdrawals",
            "withdrawn",
            "balance",
            "events",
            "last event"
        );
        for row in rows.iter().filter(|row| touched.contains(&row.account_id)) {
            println!(
                "{:<12} {:<6} {:>8} {:>10} {:>11} {:>10} {:>8} {:>6}  {}  {}",
                row.account_id,
                row.owner,
                row.deposits,
                cents(row.total_deposited),
                row.withdrawals,
                cents(row.total_withdrawn),
                cents(row.balance()),
                row.events,
                row.last_event_at.format("%H:%M:%S%.3fZ"),
                row.last_correlation_id
                    .map_or("none".to_owned(), |id| id.to_string())
            );
        }
    }
    Ok(())
}

/// Shows an applied event, and notes its account.
fn show(event: &IncomingEvent, touched: &Mutex<BTreeSet<String>>) {
    let what = match event.decode::<AccountEvent>() {
        Ok(AccountEvent::AccountOpened { owner }) => format!("opened for {owner}"),
        Ok(AccountEvent::MoneyDeposited { amount, currency }) => {
            format!("deposit {} {currency}", cents(signed(amount)))
        }
        Ok(AccountEvent::MoneyWithdrawn { amount }) => {
            format!("withdrawal {}", cents(signed(amount)))
        }
        Err(err) => format!("unreadable: {err}"),
    };
    let correlation = correlation_id(event).map_or("none".to_owned(), |id| id.to_string());
    println!(
        "applied {} v{} {}.v{} ({what})\n    position {}, correlation {correlation}, \
         Nats-Msg-Id {}",
        event.stream_id,
        event.stream_version,
        event.event_type,
        event.schema_version,
        event.position,
        event.message_id
    );
    touched
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(event.stream_id.id().to_owned());
}

fn signed(amount: u64) -> i64 {
    i64::try_from(amount).unwrap_or(i64::MAX)
}
