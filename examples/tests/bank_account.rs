//! The bank account's business rules with the given/when/then test kit, and the demo end to end.

use esframe_core::testkit::AggregateTest;
use esframe_examples::bank_account::{
    Account, AccountCommand, AccountError, AccountEvent, MemoryBalances, run_demo, upcasters,
};
use esframe_memory::{MemoryCheckpoints, MemoryStore};

// ANCHOR: helpers
fn opened() -> AccountEvent {
    AccountEvent::AccountOpened {
        owner: "Ada".into(),
    }
}

fn deposited(amount: u64) -> AccountEvent {
    AccountEvent::MoneyDeposited {
        amount,
        currency: "EUR".into(),
    }
}

fn deposit(amount: u64) -> AccountCommand {
    AccountCommand::Deposit {
        account_id: "a".into(),
        amount,
    }
}

fn withdraw(amount: u64) -> AccountCommand {
    AccountCommand::Withdraw {
        account_id: "a".into(),
        amount,
    }
}
// ANCHOR_END: helpers

#[tokio::test]
async fn opening_a_new_account() {
    AggregateTest::<Account>::given_no_events()
        .when(AccountCommand::Open {
            account_id: "a".into(),
            owner: "Ada".into(),
        })
        .then_expect_events([opened()])
        .await;
}

#[tokio::test]
async fn opening_twice_is_refused() {
    AggregateTest::<Account>::given([opened()])
        .when(AccountCommand::Open {
            account_id: "a".into(),
            owner: "Eve".into(),
        })
        .then_expect_error(AccountError::AlreadyOpen)
        .await;
}

// ANCHOR: rules
#[tokio::test]
async fn deposits_need_an_open_account_and_a_positive_amount() {
    AggregateTest::<Account>::given_no_events()
        .when(deposit(5))
        .then_expect_error(AccountError::NotOpen)
        .await;
    AggregateTest::<Account>::given([opened()])
        .when(deposit(0))
        .then_expect_error_message("the amount must be positive")
        .await;
    AggregateTest::<Account>::given([opened()])
        .when(deposit(5))
        .then_expect_events([deposited(5)])
        .await;
}

#[tokio::test]
async fn withdrawing_within_the_balance() {
    AggregateTest::<Account>::given([opened(), deposited(100)])
        .when(withdraw(60))
        .then_expect_state(|account| assert_eq!(account.balance, 40))
        .await;
}

#[tokio::test]
async fn an_overdraft_is_refused() {
    AggregateTest::<Account>::given([
        opened(),
        deposited(100),
        AccountEvent::MoneyWithdrawn { amount: 30 },
    ])
    .when(withdraw(71))
    .then_expect_error(AccountError::InsufficientFunds {
        balance: 70,
        requested: 71,
    })
    .await;
}
// ANCHOR_END: rules

#[tokio::test]
#[should_panic(expected = "the command emitted other events than expected")]
async fn the_test_kit_fails_on_wrong_events() {
    AggregateTest::<Account>::given([opened()])
        .when(deposit(5))
        .then_expect_events([deposited(6)])
        .await;
}

#[tokio::test]
#[should_panic(expected = "but the command emitted")]
async fn the_test_kit_fails_when_an_expected_error_does_not_happen() {
    AggregateTest::<Account>::given([opened(), deposited(100)])
        .when(withdraw(10))
        .then_expect_error(AccountError::ZeroAmount)
        .await;
}

#[tokio::test]
async fn the_demo_replays_deposits_to_the_live_balance() {
    let mut out = Vec::new();
    let report = run_demo(
        MemoryStore::with_upcasters(upcasters()),
        MemoryCheckpoints::new(),
        MemoryBalances::default(),
        "test",
        &mut out,
    )
    .await
    .unwrap();
    // Ada: +7.00 (stored as v1) +100.00 -50.00 +25.00 +12.34
    assert_eq!(report.live_balance, 9_434);
    assert_eq!(report.replayed_balance, report.live_balance);
    assert_eq!(report.replayed_deposits, 14_434);
    assert_eq!(report.deposit_count, 4);
    assert!(
        report.overdraft_error.contains("insufficient funds"),
        "{}",
        report.overdraft_error
    );
    assert_eq!(report.stream_events, 9);
    // The read model, caught up after the commands and rebuilt from history.
    assert_eq!(report.read_model_balance, 9_434);
    assert_eq!(report.rebuilt_read_model_balance, 9_434);
    assert_eq!(report.rebuild_events, 9);
    // Ada at version 4 (+7.00 +100.00 -50.00), by version and by time.
    assert_eq!(
        (report.balance_at_version_4, report.balance_as_of_version_4),
        (5_700, 5_700)
    );
    let printed_v1 = String::from_utf8_lossy(&out);
    assert!(printed_v1.contains("deposit 7.00 EUR"), "{printed_v1}");
    let printed = String::from_utf8(out).unwrap();
    for line in [
        "the rebuilt balance equals the live one",
        "owner Ada, balance 94.34, 4 deposits, 1 withdrawals",
        "the rebuilt read model equals the live one",
        "100.0%",
    ] {
        assert!(printed.contains(line), "{line:?} missing from:\n{printed}");
    }
}

#[tokio::test]
async fn v1_deposits_stored_earlier_replay_into_the_balance() {
    use esframe_core::{CommandHandler, EventStore, ExpectedVersion, NewEvent, StreamId};
    let store = MemoryStore::with_upcasters(upcasters());
    let accounts = CommandHandler::<Account, _>::new(store.clone());
    accounts
        .execute(AccountCommand::Open {
            account_id: "old".into(),
            owner: "Ada".into(),
        })
        .await
        .unwrap();
    let v1 = |amount: u64| NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "MoneyDeposited".into(),
        schema_version: 1,
        payload: serde_json::json!({ "amount": amount }),
        metadata: Default::default(),
    };
    store
        .append(
            &StreamId::new("account", "old").unwrap(),
            ExpectedVersion::Exact(1),
            vec![v1(300), v1(200)],
        )
        .await
        .unwrap();
    accounts.execute(deposit_to("old", 50)).await.unwrap();
    let loaded = accounts.load("old").await.unwrap();
    assert_eq!((loaded.version, loaded.state.balance), (4, 550));
    // Without the upcasters the same events are a clear error, not a wrong balance.
    let unupcast = MemoryStore::new();
    unupcast
        .append(
            &StreamId::new("account", "old").unwrap(),
            ExpectedVersion::Any,
            vec![v1(1)],
        )
        .await
        .unwrap();
    let err = CommandHandler::<Account, _>::new(unupcast)
        .load("old")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("schema version 1 is older than the current version 2"),
        "{err}"
    );
}

fn deposit_to(account_id: &str, amount: u64) -> AccountCommand {
    AccountCommand::Deposit {
        account_id: account_id.into(),
        amount,
    }
}
