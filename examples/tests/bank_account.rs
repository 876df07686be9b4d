//! The bank account's business rules with the given/when/then test kit, and the demo end to end.

use esframe_core::testkit::AggregateTest;
use esframe_examples::bank_account::{
    Account, AccountCommand, AccountError, AccountEvent, run_demo,
};
use esframe_memory::MemoryStore;

fn opened() -> AccountEvent {
    AccountEvent::AccountOpened {
        owner: "Ada".into(),
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
        .then_expect_events([AccountEvent::MoneyDeposited { amount: 5 }])
        .await;
}

#[tokio::test]
async fn withdrawing_within_the_balance() {
    AggregateTest::<Account>::given([opened(), AccountEvent::MoneyDeposited { amount: 100 }])
        .when(withdraw(60))
        .then_expect_state(|account| assert_eq!(account.balance, 40))
        .await;
}

#[tokio::test]
async fn an_overdraft_is_refused() {
    AggregateTest::<Account>::given([
        opened(),
        AccountEvent::MoneyDeposited { amount: 100 },
        AccountEvent::MoneyWithdrawn { amount: 30 },
    ])
    .when(withdraw(71))
    .then_expect_error(AccountError::InsufficientFunds {
        balance: 70,
        requested: 71,
    })
    .await;
}

#[tokio::test]
#[should_panic(expected = "the command emitted other events than expected")]
async fn the_test_kit_fails_on_wrong_events() {
    AggregateTest::<Account>::given([opened()])
        .when(deposit(5))
        .then_expect_events([AccountEvent::MoneyDeposited { amount: 6 }])
        .await;
}

#[tokio::test]
#[should_panic(expected = "but the command emitted")]
async fn the_test_kit_fails_when_an_expected_error_does_not_happen() {
    AggregateTest::<Account>::given([opened(), AccountEvent::MoneyDeposited { amount: 100 }])
        .when(withdraw(10))
        .then_expect_error(AccountError::ZeroAmount)
        .await;
}

#[tokio::test]
async fn the_demo_replays_deposits_to_the_live_balance() {
    let mut out = Vec::new();
    let report = run_demo(MemoryStore::new(), "test", &mut out)
        .await
        .unwrap();
    // Ada: +100.00 -50.00 +25.00 +12.34
    assert_eq!(report.live_balance, 8_734);
    assert_eq!(report.replayed_balance, report.live_balance);
    assert_eq!(report.replayed_deposits, 13_734);
    assert_eq!(report.deposit_count, 3);
    assert!(
        report.overdraft_error.contains("insufficient funds"),
        "{}",
        report.overdraft_error
    );
    assert_eq!(report.stream_events, 8);
    let printed = String::from_utf8(out).unwrap();
    assert!(
        printed.contains("the rebuilt balance equals the live one"),
        "{printed}"
    );
}
