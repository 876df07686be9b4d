//! The publishing example against the real NATS JetStream and PostgreSQL: the bank's commands
//! go out through its publisher, the reporting service takes them in through its inbox, and its
//! read model says exactly what the commands did, each event applied once, with the command's
//! correlation id.
//!
//! Each test has a JetStream stream of its own (`ESF_EX_<uuid>`, subjects `esfex.<uuid>.>`) and
//! two fresh PostgreSQL schemas (`t_pub_bank_...`, `t_pub_reporting_...`), all removed at the
//! end; the esframe-postgres tests drop such schemas, and these tests such streams, once they
//! are an hour old, should a failed run leave them. NATS is the server at `NATS_URL` (default
//! `nats://127.0.0.1:4222`), PostgreSQL the one at `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); the tests fail, saying which one, if either
//! cannot be reached.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use chrono::{DateTime, Utc};
use esframe_core::{
    CommandError, EventStore, StreamId, projection::HandlerError, publish::IncomingEvent,
};
use esframe_examples::{
    bank_account::{AccountCommand, AccountEvent},
    publishing::{
        AccountActivity, ActivityHandler, Bank, Channel, ObservedSink, Reporting, connect,
        correlation_id, follow_command, sample_commands,
    },
};
use esframe_nats::{JetStreamSink, async_nats::jetstream};
use esframe_postgres::{InboxHandler, PgTransaction};
use futures_util::StreamExt;
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

/// The servers, and this test's own stream and schemas.
#[derive(Debug, Clone)]
struct Services {
    jetstream: jetstream::Context,
    pool: PgPool,
    channel: Channel,
    bank_schema: String,
    reporting_schema: String,
}

impl Services {
    async fn start(label: &str) -> Self {
        let jetstream = connect::jetstream(&connect::nats_url())
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        let pool = connect::postgres(&connect::database_url())
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        drop_old_test_streams(&jetstream).await;
        let id = Uuid::now_v7().simple().to_string();
        let channel = Channel::new(format!("ESF_EX_{id}"), format!("esfex.{id}"));
        channel
            .ensure(&jetstream)
            .await
            .unwrap_or_else(|err| panic!("create the test's stream: {err}"));
        Self {
            jetstream,
            pool,
            channel,
            bank_schema: fresh_schema(&format!("pub_bank_{label}")),
            reporting_schema: fresh_schema(&format!("pub_reporting_{label}")),
        }
    }

    /// Runs `test`, then deletes the stream and drops both schemas, whether it passed or not.
    async fn run<F, Fut>(self, test: F)
    where
        F: FnOnce(Self) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let outcome = tokio::spawn(test(self.clone())).await;
        self.remove().await;
        if let Err(failed) = outcome {
            match failed.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(failed) => panic!("the test did not finish: {failed}"),
            }
        }
    }

    async fn remove(self) {
        self.jetstream
            .delete_stream(self.channel.stream())
            .await
            .expect("delete the test's stream");
        for schema in [&self.bank_schema, &self.reporting_schema] {
            sqlx::query(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
                .execute(&self.pool)
                .await
                .expect("drop the test's schema");
        }
    }

    /// How many messages the stream holds.
    async fn stored_messages(&self) -> u64 {
        let mut stream = self
            .jetstream
            .get_stream(self.channel.stream())
            .await
            .expect("the test's stream");
        stream.info().await.expect("its state").state.messages
    }

    /// The inbox's record: per bank stream (`account/{id}`), the last version applied.
    async fn inbox_versions(&self) -> BTreeMap<String, u64> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT aggregate_type, aggregate_id, version FROM \"{}\".inbox \
             WHERE consumer = 'reporting'",
            self.reporting_schema
        )))
        .fetch_all(&self.pool)
        .await
        .expect("read the inbox");
        rows.into_iter()
            .map(|(ty, id, v)| (format!("{ty}/{id}"), u64::try_from(v).unwrap()))
            .collect()
    }
}

/// `t_<label>_<unix seconds>_<pid>_<n>`, the naming the esframe-postgres tests clean up.
fn fresh_schema(label: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let label: String = label.chars().take(24).collect();
    format!("t_{label}_{}_{}_{n}", unix_now(), std::process::id())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Deletes `ESF_EX_` streams more than an hour old, left by runs that failed.
async fn drop_old_test_streams(jetstream: &jetstream::Context) {
    let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
    let mut streams = jetstream.streams();
    let mut old = Vec::new();
    while let Some(Ok(info)) = streams.next().await {
        if info.config.name.starts_with("ESF_EX_") && now - info.created.unix_timestamp() > 3600 {
            old.push(info.config.name.clone());
        }
    }
    for name in old {
        let _ = jetstream.delete_stream(&name).await;
    }
}

/// What the handler saw of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    stream: String,
    version: u64,
    correlation_id: Option<Uuid>,
}

/// The reporting service's handler, recording each event it is called with before it runs.
#[derive(Debug, Clone)]
struct Recording {
    handler: ActivityHandler,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recording {
    fn seen(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl InboxHandler for Recording {
    async fn handle(
        &self,
        tx: &mut PgTransaction,
        event: &IncomingEvent,
    ) -> Result<(), HandlerError> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Seen {
                stream: event.stream_id.to_string(),
                version: event.stream_version,
                correlation_id: correlation_id(event),
            });
        self.handler.handle(tx, event).await
    }
}

/// A stored event as the bank's commands made it.
#[derive(Debug, Clone)]
struct Made {
    event_id: Uuid,
    stream: StreamId,
    version: u64,
    event_type: String,
    correlation_id: Uuid,
}

/// Polls `done` every 20 ms until it holds; fails after `within`, saying `what`.
async fn eventually<F, Fut>(within: Duration, what: impl Fn() -> String, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {}",
            what()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The commands of one account, in order: the demo's, then 30 seconds' worth of `--follow`.
fn commands_by_account(run: &str) -> BTreeMap<String, Vec<AccountCommand>> {
    let mut by_account: BTreeMap<String, Vec<AccountCommand>> = BTreeMap::new();
    let commands = sample_commands(run)
        .into_iter()
        .chain((0..30).map(|tick| follow_command(run, tick)));
    for command in commands {
        let account = match &command {
            AccountCommand::Open { account_id, .. }
            | AccountCommand::Deposit { account_id, .. }
            | AccountCommand::Withdraw { account_id, .. } => account_id.clone(),
        };
        by_account.entry(account).or_default().push(command);
    }
    by_account
}

/// Runs one account's commands in order, each with a new correlation id; the events they
/// stored, and how many commands the account refused.
async fn run_account(bank: Bank, commands: Vec<AccountCommand>) -> (Vec<Made>, usize) {
    let mut made = Vec::new();
    let mut refused = 0;
    for command in commands {
        let correlation_id = Uuid::now_v7();
        match bank.execute(command, correlation_id).await {
            Ok(outcome) => made.extend(outcome.events.iter().map(|e| Made {
                event_id: e.event_id,
                stream: e.stream_id.clone(),
                version: e.stream_version,
                event_type: e.event_type.to_string(),
                correlation_id,
            })),
            Err(CommandError::Rejected(_)) => refused += 1,
            Err(err) => panic!("a command failed: {err}"),
        }
    }
    (made, refused)
}

/// The read model's row the bank's stored events imply for `account_id`.
async fn expected_row(bank: &Bank, account_id: &str, made: &[Made]) -> AccountActivity {
    let stream = StreamId::new("account", account_id).unwrap();
    let stored = bank.store().read_stream(&stream, 1).await.unwrap();
    let mut row = AccountActivity {
        account_id: account_id.to_owned(),
        owner: String::new(),
        deposits: 0,
        total_deposited: 0,
        withdrawals: 0,
        total_withdrawn: 0,
        events: 0,
        last_version: 0,
        last_event_at: DateTime::<Utc>::UNIX_EPOCH,
        last_correlation_id: None,
    };
    for recorded in stored {
        match recorded.decode::<AccountEvent>().unwrap() {
            AccountEvent::AccountOpened { owner } => row.owner = owner,
            AccountEvent::MoneyDeposited { amount, .. } => {
                row.deposits += 1;
                row.total_deposited += i64::try_from(amount).unwrap();
            }
            AccountEvent::MoneyWithdrawn { amount } => {
                row.withdrawals += 1;
                row.total_withdrawn += i64::try_from(amount).unwrap();
            }
        }
        row.events += 1;
        row.last_version = i64::try_from(recorded.stream_version).unwrap();
        row.last_event_at = recorded.recorded_at;
        row.last_correlation_id = made
            .iter()
            .find(|m| m.stream == stream && m.version == recorded.stream_version)
            .map(|m| m.correlation_id);
    }
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reporting_service_sees_each_bank_event_once_with_its_correlation_id() {
    Services::start("once").await.run(each_event_once).await;
}

async fn each_event_once(services: Services) {
    let bank = Bank::open(services.pool.clone(), &services.bank_schema)
        .await
        .expect("the bank's store in a fresh schema");
    let reporting = Reporting::open(services.pool.clone(), &services.reporting_schema)
        .await
        .expect("the reporting service's tables in a fresh schema");

    // The consumer first, then the publisher, then the commands: both follow live.
    let recording = Recording {
        handler: reporting.handler().clone(),
        seen: Arc::default(),
    };
    let consumer = reporting
        .consumer_with(
            services.jetstream.clone(),
            &services.channel,
            recording.clone(),
        )
        .spawn();
    let published = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::clone(&published);
    let sink = ObservedSink::new(
        JetStreamSink::new(services.jetstream.clone()),
        move |message, ack| {
            let mut sent = sent.lock().unwrap_or_else(PoisonError::into_inner);
            sent.push((message.id, message.subject.clone(), ack.duplicate));
        },
    );
    let publisher = bank
        .publisher(&services.channel, sink)
        .expect("a valid publisher")
        .spawn();

    // The three accounts' commands run concurrently, each account's in order.
    let run = &Uuid::now_v7().simple().to_string()[26..];
    let by_account = commands_by_account(run);
    let runs = by_account
        .values()
        .map(|commands| tokio::spawn(run_account(bank.clone(), commands.clone())));
    let mut made = Vec::new();
    let mut refused = 0;
    for run in futures_util::future::join_all(runs).await {
        let (events, refusals) = run.expect("an account's commands");
        made.extend(events);
        refused += refusals;
    }
    let total = made.len();
    assert_eq!(refused, 1, "the demo's overdraft, and only it, is refused");
    assert_eq!(total, 10 + 30, "one event per accepted command");

    let total_u64 = u64::try_from(total).unwrap();
    eventually(
        Duration::from_secs(60),
        || {
            format!(
                "the consumer applied {} of {total} events (publisher: {:?}; consumer: {:?})",
                consumer.status().applied,
                publisher.status(),
                consumer.status()
            )
        },
        || async {
            let applied: i64 = reporting
                .all_activity()
                .await
                .expect("read the read model")
                .iter()
                .map(|row| row.events)
                .sum();
            applied == i64::try_from(total).unwrap()
                && reporting
                    .backlog(&services.jetstream, &services.channel)
                    .await
                    .is_ok_and(|backlog| backlog.is_empty())
        },
    )
    .await;

    // The read model is exactly what the commands imply, per account.
    for account_id in by_account.keys() {
        let row = reporting
            .activity(account_id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{account_id} is in the read model"));
        assert_eq!(row, expected_row(&bank, account_id, &made).await);
    }
    let rows = reporting.all_activity().await.unwrap();
    assert_eq!(rows.len(), by_account.len(), "no other account appears");
    let totals: Vec<(String, i64, i64, i64, i64, i64)> = rows
        .iter()
        .map(|row| {
            (
                row.account_id[..3].to_owned(),
                row.deposits,
                row.total_deposited,
                row.withdrawals,
                row.total_withdrawn,
                row.balance(),
            )
        })
        .collect();
    // sample_commands, then follow_command for ticks 0..30: on account `tick % 3`, even
    // ticks deposit 100 + (tick % 10) * 25 (1,000 in all per account), odd ticks withdraw 50.
    assert_eq!(
        totals,
        vec![
            (
                "ada".to_owned(),
                2 + 5,
                10_750 + 1_000,
                1 + 5,
                3_000 + 250,
                8_500
            ),
            ("bob".to_owned(), 2 + 5, 3_500 + 1_000, 5, 250, 4_250),
            (
                "cyd".to_owned(),
                1 + 5,
                1_200 + 1_000,
                1 + 5,
                200 + 250,
                1_750
            ),
        ],
        "(account, deposits, deposited, withdrawals, withdrawn, balance)"
    );

    // The handler ran once per event, in each stream's order, and saw the correlation id of
    // the command that caused it.
    let seen = recording.seen();
    assert_eq!(
        seen.len(),
        total,
        "the handler ran once per event: {seen:?}"
    );
    let correlation_of: HashMap<(String, u64), Uuid> = made
        .iter()
        .map(|m| ((m.stream.to_string(), m.version), m.correlation_id))
        .collect();
    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for s in &seen {
        assert_eq!(
            s.correlation_id,
            Some(correlation_of[&(s.stream.clone(), s.version)]),
            "{} v{} reached the handler with its command's correlation id",
            s.stream,
            s.version
        );
        versions.entry(&s.stream).or_default().push(s.version);
    }
    for (stream, versions) in &versions {
        let count = made
            .iter()
            .filter(|m| m.stream.to_string() == *stream)
            .count();
        let expected: Vec<u64> = (1..=u64::try_from(count).unwrap()).collect();
        assert_eq!(versions, &expected, "{stream}: each version once, in order");
    }
    let inbox: BTreeMap<String, u64> = versions
        .iter()
        .map(|(stream, v)| ((*stream).to_owned(), *v.last().unwrap()))
        .collect();
    assert_eq!(services.inbox_versions().await, inbox, "the inbox's record");

    // One message per event, its id the event id, its subject the event type's.
    let sent = published
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(sent.len(), total, "one message per event: {sent:?}");
    let by_id: HashMap<Uuid, &Made> = made.iter().map(|m| (m.event_id, m)).collect();
    for (id, subject, duplicate) in &sent {
        let event = by_id
            .get(id)
            .unwrap_or_else(|| panic!("message {id} is an event's"));
        let prefix = services.channel.subject_prefix();
        assert_eq!(subject, &format!("{prefix}.account.{}", event.event_type));
        assert!(!duplicate, "nothing was sent twice");
    }
    assert_eq!(services.stored_messages().await, total_u64);
    let status = consumer.status();
    assert_eq!((status.applied, status.duplicates), (total_u64, 0));
    assert_eq!((status.early, status.parked, status.failures), (0, 0, 0));

    // Delivered again, every message is a duplicate to the inbox: JetStream's deduplication
    // is not involved (the messages are stored once), the inbox's record is. A new durable
    // consumer of the same name delivers the whole stream again.
    consumer.shutdown().await;
    let stream = services
        .jetstream
        .get_stream(services.channel.stream())
        .await
        .unwrap();
    stream
        .delete_consumer(esframe_examples::publishing::CONSUMER)
        .await
        .expect("delete the durable consumer");
    let before = reporting.all_activity().await.unwrap();
    let again = reporting
        .consumer_with(
            services.jetstream.clone(),
            &services.channel,
            recording.clone(),
        )
        .spawn();
    eventually(
        Duration::from_secs(60),
        || format!("the redeliveries: {:?}", again.status()),
        || async {
            again.status().duplicates == total_u64
                && reporting
                    .backlog(&services.jetstream, &services.channel)
                    .await
                    .is_ok_and(|backlog| backlog.is_empty())
        },
    )
    .await;
    let status = again.status();
    assert_eq!((status.delivered, status.applied), (total_u64, 0));
    assert_eq!(recording.seen().len(), total, "the handler never ran again");
    assert_eq!(reporting.all_activity().await.unwrap(), before);
    assert!(reporting.inbox().dead_letters().await.unwrap().is_empty());
    let distinct: HashSet<&Uuid> = sent.iter().map(|(id, _, _)| id).collect();
    assert_eq!(distinct.len(), total);

    again.shutdown().await;
    publisher.shutdown().await;
}
