//! The bank, publishing its account events to NATS JetStream.
//!
//! `cargo run --example publish_to_nats [-- --follow]`: opens three accounts (new ids on each
//! run), deposits and withdraws, and publishes every account event to the JetStream stream
//! `BANK` (subjects `bank.account.{event type}`); with `--follow`, keeps running one command a
//! second until Ctrl-C. Each command is shown as it goes: stored, then acknowledged by
//! JetStream. The events and the publisher's checkpoint are in the schema `esframe_bank` of
//! the database at `DATABASE_URL`; NATS is at `NATS_URL` (defaults: the local servers).
//! `cargo run --example consume_from_nats` is the service on the other side.

use std::time::Duration;

use esframe_core::{
    CommandError, Position,
    publish::{OutgoingMessage, Published, RunningPublisher},
};
use esframe_examples::{
    bank_account::{AccountCommand, AccountEvent},
    publishing::{
        BANK_SCHEMA, Bank, Channel, ObservedSink, cents, connect, follow_command,
        published_through, sample_commands,
    },
};
use esframe_nats::JetStreamSink;
use uuid::Uuid;

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
    let follow = std::env::args().any(|arg| arg == "--follow");
    let (nats_url, database_url) = (connect::nats_url(), connect::database_url());
    // ANCHOR: wiring
    let jetstream = connect::jetstream(&nats_url).await?;
    let channel = Channel::bank();
    channel.ensure(&jetstream).await?; // the stream BANK, for the subjects bank.>
    let pool = connect::postgres(&database_url).await?;
    let bank = Bank::open(pool, BANK_SCHEMA).await?;
    // ANCHOR_END: wiring
    println!(
        "bank: events in {database_url}, schema {BANK_SCHEMA}; publishing to {nats_url}, \
         stream {}, subjects {}.>\n",
        channel.stream(),
        channel.subject_prefix()
    );

    // ANCHOR: spawn
    // Follows the log from its checkpoint on a task of its own; `announce`
    // prints each message JetStream acknowledged.
    let sink = ObservedSink::new(JetStreamSink::new(jetstream), announce);
    let publisher = bank.publisher(&channel, sink)?.spawn();
    // ANCHOR_END: spawn

    let run = Uuid::now_v7().simple().to_string();
    let run = &run[run.len() - 6..];
    for command in sample_commands(run) {
        execute(&bank, &publisher, command).await?;
    }
    if follow {
        println!("\n--follow: a command a second until Ctrl-C");
        // One listener for the whole loop, so that a Ctrl-C during a command counts too.
        let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
        let mut tick = 0;
        loop {
            tokio::select! {
                _ = &mut interrupted => break,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            execute(&bank, &publisher, follow_command(run, tick)).await?;
            tick += 1;
        }
    }

    let status = publisher.status();
    publisher.shutdown().await;
    println!(
        "\npublisher {}: checkpoint at position {}, {} messages published this run \
         ({} duplicates), {} failed sends",
        esframe_examples::publishing::PUBLISHER,
        status.position,
        status.published,
        status.duplicates,
        status.failures
    );
    Ok(())
}

/// Runs one command with a new correlation id, shows its events, and waits until JetStream
/// acknowledged them.
async fn execute(
    bank: &Bank,
    publisher: &RunningPublisher,
    command: AccountCommand,
) -> Result<(), Error> {
    let correlation_id = Uuid::now_v7();
    println!("{}  correlation {correlation_id}", describe(&command));
    match bank.execute(command, correlation_id).await {
        Ok(outcome) => {
            let mut last = Position::START;
            for event in &outcome.events {
                println!(
                    "    stored    {} v{} at position {}: {}",
                    event.stream_id,
                    event.stream_version,
                    event.global_position,
                    show(&event.payload)
                );
                last = event.global_position;
            }
            published_through(publisher, last, Duration::from_secs(30)).await?;
        }
        Err(CommandError::Rejected(refused)) => {
            println!("    refused: {refused} (nothing stored, nothing published)");
        }
        Err(err) => return Err(err.into()),
    }
    Ok(())
}

/// Shows a message JetStream acknowledged.
fn announce(message: &OutgoingMessage, published: Published) {
    let stored = if published.duplicate {
        "a duplicate, dropped by JetStream"
    } else {
        "stored"
    };
    println!(
        "    published {}  Nats-Msg-Id {}  ({stored})",
        message.subject, message.id
    );
}

fn describe(command: &AccountCommand) -> String {
    match command {
        AccountCommand::Open { account_id, owner } => format!("open {account_id} for {owner}"),
        AccountCommand::Deposit { account_id, amount } => {
            format!("deposit {} on {account_id}", cents(signed(*amount)))
        }
        AccountCommand::Withdraw { account_id, amount } => {
            format!("withdraw {} from {account_id}", cents(signed(*amount)))
        }
    }
}

fn show(event: &AccountEvent) -> String {
    match event {
        AccountEvent::AccountOpened { owner } => format!("AccountOpened, owner {owner}"),
        AccountEvent::MoneyDeposited { amount, currency } => {
            format!("MoneyDeposited {} {currency}", cents(signed(*amount)))
        }
        AccountEvent::MoneyWithdrawn { amount } => {
            format!("MoneyWithdrawn {}", cents(signed(*amount)))
        }
    }
}

fn signed(amount: u64) -> i64 {
    i64::try_from(amount).unwrap_or(i64::MAX)
}
