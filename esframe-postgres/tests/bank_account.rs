//! The bank-account demo on PostgreSQL: the balances read model kept exactly once by a
//! projection, queried after the commands, and rebuilt from history.

mod common;

use esframe_examples::bank_account::{BalanceQuery, PgBalances, run_demo, upcasters};
use esframe_postgres::PgEventStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_keeps_and_rebuilds_the_balances_read_model_in_postgres() {
    let pool = common::pool(10).await;
    let schema = common::fresh_schema(&pool, "demo").await;
    let store = PgEventStore::builder(pool.clone())
        .schema(schema.as_str())
        .unwrap()
        .upcasters(upcasters())
        .build()
        .await
        .unwrap();
    let balances = PgBalances::create(pool.clone(), &schema).await.unwrap();
    let mut out = Vec::new();
    let report = run_demo(
        store.clone(),
        store.checkpoints(),
        balances.clone(),
        "pg",
        &mut out,
    )
    .await
    .unwrap_or_else(|err| panic!("{err}\n{}", String::from_utf8_lossy(&out)));
    assert_eq!(report.live_balance, 9_434);
    assert_eq!(report.read_model_balance, 9_434);
    assert_eq!(report.rebuilt_read_model_balance, 9_434);
    assert_eq!(report.rebuild_events, 9);
    // Ada at version 4 (+7.00 +100.00 -50.00), by version and by time.
    assert_eq!(
        (report.balance_at_version_4, report.balance_as_of_version_4),
        (5_700, 5_700)
    );

    // The table itself holds both accounts, exactly once each.
    let bob = balances.balance("account-bob-pg").await.unwrap().unwrap();
    assert_eq!(
        (
            bob.owner.as_str(),
            bob.balance,
            bob.deposits,
            bob.withdrawals
        ),
        ("Bob", 1_500, 1, 1)
    );
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}\".account_balances"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(rows, 2);
}

/// Past states on PostgreSQL, where a cold load reads the snapshot and its events in one
/// statement: a snapshot above the target is never used, one at or below it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_states_never_start_from_a_newer_snapshot() {
    use esframe_core::{CommandHandler, SnapshotPolicy};
    use esframe_examples::bank_account::{Account, AccountCommand};
    let store = common::store("past").await;
    let accounts =
        CommandHandler::<Account, _>::new(store.clone()).snapshot_policy(SnapshotPolicy::every(10));
    let id = "account-past";
    accounts
        .execute(AccountCommand::Open {
            account_id: id.into(),
            owner: "Ada".into(),
        })
        .await
        .unwrap();
    for amount in 1..=24 {
        accounts
            .execute(AccountCommand::Deposit {
                account_id: id.into(),
                amount,
            })
            .await
            .unwrap();
    }
    // Version v holds the deposits 1..v-1; snapshots were taken at 10 and 20.
    for version in [5, 10, 15, 20, 25] {
        let past = accounts.load_at(id, version).await.unwrap();
        assert_eq!(past.version, version);
        assert_eq!(
            past.state.balance,
            (1..version).sum::<u64>(),
            "at v{version}"
        );
    }
    let now = accounts.load_as_of(id, chrono::Utc::now()).await.unwrap();
    assert_eq!((now.version, now.state.balance), (25, (1..25).sum::<u64>()));
}
