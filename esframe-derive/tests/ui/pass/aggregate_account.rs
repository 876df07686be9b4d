//! The aggregate of the book: every key of `#[aggregate(...)]`, a handle that emits two events
//! and sees the state after the first, apply, and snapshots.

use esframe_core::{Aggregate, Command, Decision, Event, StreamId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum AccountEvent {
    Opened { owner: String },
    Deposited { amount: i64 },
    BonusPaid { amount: i64 },
}

#[derive(Command)]
enum AccountCommand {
    Open {
        #[command(aggregate_id)]
        id: String,
        owner: String,
    },
    Deposit {
        #[command(aggregate_id)]
        id: String,
        amount: i64,
    },
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum AccountError {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is not open")]
    NotOpen,
}

#[derive(Debug, Default)]
struct BankServices {
    bonus_threshold: i64,
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize, Aggregate)]
#[aggregate(
    name = "account",
    command = AccountCommand,
    event = AccountEvent,
    error = AccountError,
    services = BankServices,
    snapshot_version = 2,
)]
struct Account {
    owner: Option<String>,
    balance: i64,
}

impl Account {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &AccountCommand,
        services: &BankServices,
    ) -> Result<(), AccountError> {
        match command {
            AccountCommand::Open { owner, .. } => {
                if decision.owner.is_some() {
                    return Err(AccountError::AlreadyOpen);
                }
                decision.emit(AccountEvent::Opened {
                    owner: owner.clone(),
                });
            }
            AccountCommand::Deposit { amount, .. } => {
                if decision.owner.is_none() {
                    return Err(AccountError::NotOpen);
                }
                // The state after this event decides the next one.
                let after = decision.emit(AccountEvent::Deposited { amount: *amount });
                if after.balance >= services.bonus_threshold {
                    decision.emit(AccountEvent::BonusPaid { amount: 1 });
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { owner } => self.owner = Some(owner.clone()),
            AccountEvent::Deposited { amount } | AccountEvent::BonusPaid { amount } => {
                self.balance += amount
            }
        }
    }
}

fn main() {
    assert_eq!(Account::TYPE, "account");
    assert_eq!(Account::SNAPSHOT_VERSION, 2);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let stream = StreamId::new("account", "1").unwrap();
    let services = BankServices {
        bonus_threshold: 100,
    };
    let mut state = Account::default();

    let run = |state: &mut Account, command: AccountCommand| {
        assert_eq!(command.aggregate_id(), "1");
        let mut decision = Decision::new(state, &stream, 0);
        // Through the trait, as the command handler calls it.
        let result = runtime.block_on(<Account as Aggregate>::handle(
            &mut decision,
            &command,
            &services,
        ));
        result.map(|()| decision.into_emitted())
    };

    let deposit = |amount| AccountCommand::Deposit {
        id: "1".into(),
        amount,
    };
    assert_eq!(run(&mut state, deposit(5)), Err(AccountError::NotOpen));
    let open = || AccountCommand::Open {
        id: "1".into(),
        owner: "ada".into(),
    };
    assert_eq!(
        run(&mut state, open()),
        Ok(vec![AccountEvent::Opened {
            owner: "ada".into()
        }])
    );
    assert_eq!(run(&mut state, open()), Err(AccountError::AlreadyOpen));
    assert_eq!(
        run(&mut state, deposit(60)),
        Ok(vec![AccountEvent::Deposited { amount: 60 }])
    );
    // 60 + 50 crosses the threshold only after the first event is applied.
    assert_eq!(
        run(&mut state, deposit(50)),
        Ok(vec![
            AccountEvent::Deposited { amount: 50 },
            AccountEvent::BonusPaid { amount: 1 },
        ])
    );
    assert_eq!(state.balance, 111);

    let mut replayed = Account::default();
    for event in [
        AccountEvent::Opened {
            owner: "ada".into(),
        },
        AccountEvent::Deposited { amount: 7 },
    ] {
        <Account as Aggregate>::apply(&mut replayed, &event);
    }
    assert_eq!(replayed.balance, 7);

    let snapshot = state.to_snapshot().unwrap();
    assert_eq!(
        snapshot,
        serde_json::json!({"owner": "ada", "balance": 111})
    );
    assert_eq!(Account::from_snapshot(&snapshot).unwrap(), state);
}
