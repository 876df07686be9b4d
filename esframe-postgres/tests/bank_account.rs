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
