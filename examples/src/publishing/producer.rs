//! The bank: account commands stored in PostgreSQL, and a publisher that sends every account
//! event to JetStream.

use std::{fmt, sync::Arc, time::Duration};

use esframe_core::{
    Aggregate, CommandContext, CommandError, CommandHandler, CommandOutcome, Position,
    projection::Interest,
    publish::{
        MessageSink, OutgoingMessage, PublishError, Published, Publisher, RunningPublisher,
        SinkError,
    },
};
use esframe_postgres::{PgCheckpoints, PgEventStore, PgStoreError};
use sqlx::PgPool;
use uuid::Uuid;

use super::{Channel, PUBLISHER, SOURCE};
use crate::bank_account::{Account, AccountCommand, AccountError, AccountEvent, upcasters};

/// The bank's publisher, on its event store and checkpoints, with the sink `K`.
pub type BankPublisher<K> = Publisher<PgEventStore, PgCheckpoints, K>;

/// The producing service: the account aggregate on a [`PgEventStore`] in its own schema.
#[derive(Debug, Clone)]
pub struct Bank {
    store: PgEventStore,
    accounts: CommandHandler<Account, PgEventStore>,
}

impl Bank {
    /// The bank on `pool`, its events and its publisher's checkpoint in `schema` (created, with
    /// its tables, on first use).
    pub async fn open(pool: PgPool, schema: &str) -> Result<Self, PgStoreError> {
        // The store reads every stored version of an event as the current one, so the
        // publisher, which reads the log through it, only ever sends current versions.
        let store = PgEventStore::builder(pool)
            .schema(schema)?
            .upcasters(upcasters())
            .build()
            .await?;
        let accounts = CommandHandler::new(store.clone());
        Ok(Self { store, accounts })
    }

    /// The event store.
    pub fn store(&self) -> &PgEventStore {
        &self.store
    }

    // ANCHOR: execute
    /// Runs `command`; each event it stores carries `correlation_id` in its
    /// metadata, and so does each message the publisher makes of them
    /// (`ce-correlationid`).
    pub async fn execute(
        &self,
        command: AccountCommand,
        correlation_id: Uuid,
    ) -> Result<CommandOutcome<AccountEvent>, CommandError<AccountError>> {
        let context = CommandContext::new().correlation_id(correlation_id);
        self.accounts.execute_with(command, context).await
    }
    // ANCHOR_END: execute

    // ANCHOR: publisher
    /// The publisher of the account events to `channel` through `sink`: named
    /// [`PUBLISHER`] (its checkpoint and lease live in the bank's schema), from
    /// [`SOURCE`], on the subjects `{prefix}.account.{event type}`.
    ///
    /// The account has three event types and all three are public, so nothing is
    /// dropped or changed on the way out; an internal event type would be left out
    /// with `.interest(..)` (by event type) or `.transform(..)`.
    pub fn publisher<K: MessageSink>(
        &self,
        channel: &Channel,
        sink: K,
    ) -> Result<BankPublisher<K>, PublishError> {
        let (log, checkpoints) = (self.store.clone(), self.store.checkpoints());
        let publisher = Publisher::new(log, checkpoints, sink, PUBLISHER, SOURCE)?
            .interest(Interest::aggregates([Account::TYPE]))
            .subject_prefix(channel.subject_prefix());
        Ok(publisher)
    }
    // ANCHOR_END: publisher
}

/// Waits until `publisher`'s checkpoint reaches `position`: every event up to it was
/// acknowledged by the broker. Fails after `within`, with the publisher's last error.
pub async fn published_through(
    publisher: &RunningPublisher,
    position: Position,
    within: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let status = publisher.status();
        if status.position >= position {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "the publisher did not reach position {position} within {within:?} (it is at {}; \
                 last error: {})",
                status.position,
                status.last_error.as_deref().unwrap_or("none")
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The demo's commands: three accounts opened, deposits and withdrawals, and an overdraft the
/// account refuses (it stores nothing, so nothing is published). Account ids end in `run`, so
/// runs against the same database do not collide.
pub fn sample_commands(run: &str) -> Vec<AccountCommand> {
    let [ada, bob, cyd] = account_ids(run);
    let open = |id: &String, owner: &str| AccountCommand::Open {
        account_id: id.clone(),
        owner: owner.to_owned(),
    };
    let deposit = |id: &String, amount| AccountCommand::Deposit {
        account_id: id.clone(),
        amount,
    };
    let withdraw = |id: &String, amount| AccountCommand::Withdraw {
        account_id: id.clone(),
        amount,
    };
    vec![
        open(&ada, "Ada"),
        open(&bob, "Bob"),
        open(&cyd, "Cyd"),
        deposit(&ada, 10_000),
        deposit(&bob, 2_500),
        withdraw(&ada, 3_000),
        deposit(&cyd, 1_200),
        withdraw(&bob, 4_000), // refused: Bob has 25.00
        deposit(&ada, 750),
        withdraw(&cyd, 200),
        deposit(&bob, 1_000),
    ]
}

/// The command of second `tick` of `--follow`: a deposit or a small withdrawal on one of the
/// three accounts in turn.
pub fn follow_command(run: &str, tick: u64) -> AccountCommand {
    let ids = account_ids(run);
    let account_id = ids[usize::try_from(tick % 3).unwrap_or(0)].clone();
    if tick.is_multiple_of(2) {
        AccountCommand::Deposit {
            account_id,
            amount: 100 + (tick % 10) * 25,
        }
    } else {
        AccountCommand::Withdraw {
            account_id,
            amount: 50,
        }
    }
}

/// The three accounts of a run.
pub fn account_ids(run: &str) -> [String; 3] {
    ["ada", "bob", "cyd"].map(|name| format!("{name}-{run}"))
}

type Observer = Arc<dyn Fn(&OutgoingMessage, Published) + Send + Sync>;

/// A [`MessageSink`] that tells an observer about each message once its broker acknowledged
/// it: how the command-line producer shows what left, and how the test sees it.
#[derive(Clone)]
pub struct ObservedSink<K> {
    sink: K,
    observe: Observer,
}

impl<K: MessageSink> ObservedSink<K> {
    /// `sink`, with `observe` called after each acknowledged message.
    pub fn new(
        sink: K,
        observe: impl Fn(&OutgoingMessage, Published) + Send + Sync + 'static,
    ) -> Self {
        Self {
            sink,
            observe: Arc::new(observe),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for ObservedSink<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedSink")
            .field("sink", &self.sink)
            .finish_non_exhaustive()
    }
}

impl<K: MessageSink> MessageSink for ObservedSink<K> {
    async fn publish(&self, message: &OutgoingMessage) -> Result<Published, SinkError> {
        let published = self.sink.publish(message).await?;
        (self.observe)(message, published);
        Ok(published)
    }
}
