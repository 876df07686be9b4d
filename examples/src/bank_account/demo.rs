//! The bank-account walkthrough: commands, a refused overdraft, a balances read model kept by a
//! projection, a replay from the store, and a rebuild of the read model.

use std::{
    io::Write,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use esframe_core::{
    Aggregate, CommandError, CommandHandler, ExpectedVersion, GlobalLog, NewEvent, Position,
    SnapshotPolicy, SnapshotStore, StreamId,
    projection::{
        CheckpointStore, ProjectionKey, ProjectionRunner, ProjectionStore, Typed, TypedProjection,
        wait_for_projections,
    },
};

use super::{Account, AccountCommand, AccountError, AccountEvent, BalanceQuery};

/// What the demo observed, for tests to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoReport {
    /// Ada's balance according to the command handler.
    pub live_balance: u64,
    /// Ada's balance rebuilt by replaying her stored events.
    pub replayed_balance: u64,
    /// Sum of Ada's stored deposits.
    pub replayed_deposits: u64,
    /// Number of deposits replayed.
    pub deposit_count: usize,
    /// The error the overdraft got.
    pub overdraft_error: String,
    /// Events stored in this run's two account streams.
    pub stream_events: usize,
    /// Ada's balance in the read model, once it had caught up with the commands.
    pub read_model_balance: i64,
    /// Ada's balance in the read model after rebuilding it from history.
    pub rebuilt_read_model_balance: i64,
    /// Events the rebuild read.
    pub rebuild_events: u64,
    /// Ada's balance at version 4 (`load_at`).
    pub balance_at_version_4: u64,
    /// Ada's balance as of the moment version 4 was recorded (`load_as_of`).
    pub balance_as_of_version_4: u64,
}

type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the walkthrough against `store`, with the `balances` read model kept by a projection
/// whose checkpoint lives in `checkpoints`, printing what happens to `out`. Account ids end in
/// `run`, so runs against a persistent store do not collide.
pub async fn run_demo<S, C, B>(
    store: S,
    checkpoints: C,
    balances: B,
    run: &str,
    out: &mut impl Write,
) -> Result<DemoReport, DemoError>
where
    S: SnapshotStore + GlobalLog,
    C: ProjectionStore,
    B: TypedProjection<<C as CheckpointStore>::Tx> + BalanceQuery + Clone,
{
    // ANCHOR: handler
    // Snapshots are optional; with them, loading an account reads its latest snapshot
    // and the events after it instead of its whole history.
    let accounts = CommandHandler::<Account, S>::new(store.clone())
        .snapshot_policy(SnapshotPolicy::every(100));
    // ANCHOR_END: handler
    let (ada, bob) = (format!("account-ada-{run}"), format!("account-bob-{run}"));
    let (ada, bob) = (ada.as_str(), bob.as_str());

    // ANCHOR: runner
    // The projection follows the global log in the background from its checkpoint.
    let progress = Arc::new(Mutex::new(Vec::new()));
    let lines = Arc::clone(&progress);
    let (log, read_model) = (store.clone(), Typed(balances.clone()));
    let runner = ProjectionRunner::new(log, checkpoints.clone(), read_model);
    let runner = runner.on_progress(move |p| {
        let mut lines = lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines.push(p.to_string());
    });
    let live_projection = runner.clone().spawn();
    // ANCHOR_END: runner
    let mut last_position = Position::START;

    writeln!(out, "== Opening accounts")?;
    for (id, owner) in [(ada, "Ada"), (bob, "Bob")] {
        let done = accounts
            .execute(AccountCommand::Open {
                account_id: id.into(),
                owner: owner.into(),
            })
            .await?;
        writeln!(out, "opened {id} for {owner} (version {})", done.version)?;
    }

    writeln!(
        out,
        "\n== A deposit stored by the first release (MoneyDeposited v1, no currency)"
    )?;
    // ANCHOR: v1_deposit
    // What release 1 of this application wrote: `{"amount": n}` at schema version 1.
    // The store was built with the account's upcasters, so every read sees it as v2,
    // in euros.
    let stream = StreamId::new("account", ada)?;
    let version = store.stream_version(&stream).await?.unwrap_or(0);
    let old_deposit = NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "MoneyDeposited".into(),
        schema_version: 1,
        payload: serde_json::json!({ "amount": 700 }),
        metadata: Default::default(),
    };
    store
        .append(&stream, ExpectedVersion::Exact(version), vec![old_deposit])
        .await?;
    // ANCHOR_END: v1_deposit
    writeln!(
        out,
        "{ada}: stored {{\"amount\": 700}} as MoneyDeposited v1"
    )?;

    writeln!(out, "\n== Deposits and withdrawals")?;
    let moves = [
        (ada, true, 10_000),
        (ada, false, 5_000),
        (bob, true, 2_000),
        (ada, true, 2_500),
        (ada, true, 1_234),
        (bob, false, 500),
    ];
    for (id, deposit, amount) in moves {
        let command = if deposit {
            AccountCommand::Deposit {
                account_id: id.into(),
                amount,
            }
        } else {
            AccountCommand::Withdraw {
                account_id: id.into(),
                amount,
            }
        };
        let done = accounts.execute(command).await?;
        last_position = done
            .events
            .last()
            .map_or(last_position, |e| e.global_position);
        let verb = if deposit { "deposited" } else { "withdrew" };
        writeln!(
            out,
            "{id}: {verb} {} -> version {}",
            cents(amount),
            done.version
        )?;
    }

    writeln!(out, "\n== An overdraft is refused")?;
    // ANCHOR: overdraft
    let overdraft = accounts
        .execute(AccountCommand::Withdraw {
            account_id: bob.into(),
            amount: 100_000,
        })
        .await;
    let overdraft_error = match overdraft {
        Err(CommandError::Rejected(err @ AccountError::InsufficientFunds { .. })) => {
            err.to_string()
        }
        other => {
            return Err(format!("the overdraft was not refused: {other:?}").into());
        }
    };
    // ANCHOR_END: overdraft
    writeln!(out, "{bob}: withdrawing 1000.00 refused: {overdraft_error}")?;

    writeln!(out, "\n== The balances read model, kept by a projection")?;
    // ANCHOR: read_your_writes
    // Read-your-writes: wait until the projection has processed the last command's
    // events.
    wait_for_projections(
        &checkpoints,
        &[ProjectionKey::single(balances.name())?],
        last_position,
        Duration::from_secs(10),
    )
    .await?;
    let ada_row = balances
        .balance(ada)
        .await?
        .ok_or("Ada's account is missing from the read model")?;
    // ANCHOR_END: read_your_writes
    for id in [ada, bob] {
        if let Some(row) = balances.balance(id).await? {
            writeln!(
                out,
                "{id}: owner {}, balance {}, {} deposits, {} withdrawals",
                row.owner,
                signed_cents(row.balance),
                row.deposits,
                row.withdrawals
            )?;
        }
    }

    let live = accounts.load(ada).await?;
    writeln!(out, "\n== Replaying {ada} from the store")?;
    // ANCHOR: replay
    let mut rebuilt = Account::default();
    let (mut deposits, mut deposit_count) = (0, 0);
    let mut history = Vec::new();
    for recorded in store.read_stream(&stream, 1).await? {
        let event: AccountEvent = recorded.decode()?;
        if let AccountEvent::MoneyDeposited { amount, currency } = &event {
            deposits += amount;
            deposit_count += 1;
            writeln!(
                out,
                "  v{} {} deposit {} {currency}",
                recorded.stream_version,
                recorded.recorded_at.format("%H:%M:%S%.3f"),
                cents(*amount)
            )?;
        }
        rebuilt.apply(&event);
        history.push((
            recorded.stream_version,
            recorded.recorded_at,
            rebuilt.balance,
        ));
    }
    // ANCHOR_END: replay
    writeln!(
        out,
        "{deposit_count} deposits replayed, totalling {}",
        cents(deposits)
    )?;
    writeln!(out, "live balance:    {}", cents(live.state.balance))?;
    writeln!(out, "rebuilt balance: {}", cents(rebuilt.balance))?;
    if rebuilt != live.state {
        return Err("the replayed state differs from the live one".into());
    }
    writeln!(out, "the rebuilt balance equals the live one")?;
    if i64::try_from(live.state.balance).ok() != Some(ada_row.balance) {
        return Err("the read model's balance differs from the aggregate's".into());
    }
    writeln!(out, "the read model's balance equals it too")?;

    writeln!(out, "\n== {ada} in the past")?;
    // ANCHOR: time_travel
    // The state as it was at version 4, and at the moment version 4 was recorded:
    // rebuilt through the same upcasters, never from a snapshot newer than the
    // target.
    let at_version = accounts.load_at(ada, 4).await?;
    let (_, recorded_at, _) = history[3];
    let as_of = accounts.load_as_of(ada, recorded_at).await?;
    // ANCHOR_END: time_travel
    writeln!(
        out,
        "at version {}: balance {}",
        at_version.version,
        cents(at_version.state.balance)
    )?;
    writeln!(
        out,
        "as of {}: balance {} (version {})",
        recorded_at.format("%H:%M:%S%.6f"),
        cents(as_of.state.balance),
        as_of.version
    )?;
    let replayed = |upto: usize| history[..upto].last().map_or(0, |h| h.2);
    let until_version = history.iter().take_while(|h| h.0 <= 4).count();
    let until_time = history.iter().take_while(|h| h.1 <= recorded_at).count();
    if at_version.state.balance != replayed(until_version)
        || as_of.state.balance != replayed(until_time)
    {
        return Err("a past state differs from the replay up to it".into());
    }
    writeln!(out, "both equal the replay up to that point")?;

    writeln!(out, "\n== Rebuilding the read model from history")?;
    live_projection.shutdown().await?;
    // ANCHOR: rebuild
    // Empties the read model and replays every stored event into it, with progress.
    let rebuild = runner.rebuild(Position::START).await?;
    // ANCHOR_END: rebuild
    for line in progress
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        writeln!(out, "  {line}")?;
    }
    let rebuilt_row = balances
        .balance(ada)
        .await?
        .ok_or("Ada's account is missing from the rebuilt read model")?;
    writeln!(
        out,
        "rebuilt from {} events in {:.1} ms: {ada} balance {}",
        rebuild.events,
        rebuild.elapsed.as_secs_f64() * 1000.0,
        signed_cents(rebuilt_row.balance)
    )?;
    if rebuilt_row != ada_row {
        return Err("the rebuilt read model differs from the live one".into());
    }
    writeln!(out, "the rebuilt read model equals the live one")?;

    let mut stream_events = 0;
    for id in [ada, bob] {
        stream_events += store
            .read_stream(&StreamId::new("account", id)?, 1)
            .await?
            .len();
    }
    writeln!(out, "\n{stream_events} events stored in the two accounts")?;
    Ok(DemoReport {
        live_balance: live.state.balance,
        replayed_balance: rebuilt.balance,
        replayed_deposits: deposits,
        deposit_count,
        overdraft_error,
        stream_events,
        read_model_balance: ada_row.balance,
        rebuilt_read_model_balance: rebuilt_row.balance,
        rebuild_events: rebuild.events,
        balance_at_version_4: at_version.state.balance,
        balance_as_of_version_4: as_of.state.balance,
    })
}

fn signed_cents(amount: i64) -> String {
    let sign = if amount < 0 { "-" } else { "" };
    format!("{sign}{}", cents(amount.unsigned_abs()))
}

fn cents(amount: u64) -> String {
    format!("{}.{:02}", amount / 100, amount % 100)
}
