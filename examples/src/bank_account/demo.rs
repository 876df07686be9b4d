//! The bank-account walkthrough: commands, a refused overdraft, and a replay from the store.

use std::io::Write;

use esframe_core::{
    Aggregate, CommandError, CommandHandler, ExpectedVersion, NewEvent, SnapshotStore, StreamId,
};

use super::{Account, AccountCommand, AccountError, AccountEvent};

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
}

type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the walkthrough against `store`, printing what happens to `out`. Account ids end in
/// `run`, so runs against a persistent store do not collide.
pub async fn run_demo<S: SnapshotStore>(
    store: S,
    run: &str,
    out: &mut impl Write,
) -> Result<DemoReport, DemoError> {
    let accounts = CommandHandler::<Account, S>::new(store.clone());
    let (ada, bob) = (format!("account-ada-{run}"), format!("account-bob-{run}"));
    let (ada, bob) = (ada.as_str(), bob.as_str());

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
    // What release 1 of this application wrote: `{"amount": n}` at schema version 1. The store
    // was built with the account's upcasters, so every read sees it as v2, in euros.
    let stream = StreamId::new(ada)?;
    let version = store.stream_version(&stream).await?.unwrap_or(0);
    let old_deposit = NewEvent {
        event_id: uuid::Uuid::now_v7(),
        aggregate_type: "account".into(),
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
        let verb = if deposit { "deposited" } else { "withdrew" };
        writeln!(
            out,
            "{id}: {verb} {} -> version {}",
            cents(amount),
            done.version
        )?;
    }

    writeln!(out, "\n== An overdraft is refused")?;
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
        other => return Err(format!("the overdraft was not refused: {other:?}").into()),
    };
    writeln!(out, "{bob}: withdrawing 1000.00 refused: {overdraft_error}")?;

    let live = accounts.load(ada).await?;
    writeln!(out, "\n== Replaying {ada} from the store")?;
    // ANCHOR: replay
    let mut rebuilt = Account::default();
    let (mut deposits, mut deposit_count) = (0, 0);
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

    let mut stream_events = 0;
    for id in [ada, bob] {
        stream_events += store.read_stream(&StreamId::new(id)?, 1).await?.len();
    }
    writeln!(out, "\n{stream_events} events stored in the two accounts")?;
    Ok(DemoReport {
        live_balance: live.state.balance,
        replayed_balance: rebuilt.balance,
        replayed_deposits: deposits,
        deposit_count,
        overdraft_error,
        stream_events,
    })
}

fn cents(amount: u64) -> String {
    format!("{}.{:02}", amount / 100, amount % 100)
}
