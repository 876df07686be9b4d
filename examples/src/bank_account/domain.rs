//! The bank-account aggregate: events, commands, errors and business rules.

use esframe_core::{
    Aggregate, Command, Decision, Event, Upcasters,
    upcast::{Upcast, UpcastFailure},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

// ANCHOR: events
/// What can happen to an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum AccountEvent {
    /// The account was opened.
    AccountOpened {
        /// Who owns it.
        owner: String,
    },
    /// Money was paid in. Version 2 added the currency; version 1 deposits, stored
    /// before accounts had currencies, were all in euros and are read through
    /// [`money_deposited_v1`].
    #[event(version = 2, upcast(v1 = money_deposited_v1))]
    MoneyDeposited {
        /// Cents deposited.
        amount: u64,
        /// ISO 4217 currency code.
        currency: String,
    },
    /// Money was taken out.
    MoneyWithdrawn {
        /// Cents withdrawn.
        amount: u64,
    },
}
// ANCHOR_END: events

// ANCHOR: upcasters
/// Reads a version 1 `MoneyDeposited` (`{"amount": n}`) as version 2: deposits were
/// in euros.
pub fn money_deposited_v1(mut payload: Value) -> Result<Upcast, UpcastFailure> {
    if !payload["amount"].is_u64() {
        let problem = format!("a v1 deposit needs a whole `amount`, got {payload}");
        return Err(problem.into());
    }
    payload["currency"] = json!("EUR");
    Ok(Upcast::Next(payload))
}

/// The account's upcaster chains, for the store: every stored version reads as the
/// current one.
pub fn upcasters() -> Upcasters {
    Upcasters::builder()
        .current::<AccountEvent>()
        .build()
        .expect("the account's upcaster chains are complete")
}
// ANCHOR_END: upcasters

// ANCHOR: commands
/// What can be asked of an account.
#[derive(Debug, Clone, PartialEq, Eq, Command)]
#[command(aggregate_id = account_id)]
pub enum AccountCommand {
    /// Open a new account.
    Open {
        /// The account to open.
        account_id: String,
        /// Its owner.
        owner: String,
    },
    /// Pay money in.
    Deposit {
        /// The account.
        account_id: String,
        /// Cents to deposit.
        amount: u64,
    },
    /// Take money out, if the balance covers it.
    Withdraw {
        /// The account.
        account_id: String,
        /// Cents to withdraw.
        amount: u64,
    },
}
// ANCHOR_END: commands

// ANCHOR: errors
/// Why the account refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// `Open` on an account that exists.
    #[error("the account is already open")]
    AlreadyOpen,
    /// A deposit or withdrawal on an account that was never opened.
    #[error("the account is not open")]
    NotOpen,
    /// A deposit or withdrawal of zero.
    #[error("the amount must be positive")]
    ZeroAmount,
    /// A withdrawal larger than the balance.
    #[error(
        "insufficient funds: the balance is {balance} cents, \
         {requested} requested"
    )]
    InsufficientFunds {
        /// Cents on the account.
        balance: u64,
        /// Cents asked for.
        requested: u64,
    },
}
// ANCHOR_END: errors

// ANCHOR: state
/// The account's state, rebuilt from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Aggregate)]
#[aggregate(
    name = "account",
    command = AccountCommand,
    event = AccountEvent,
    error = AccountError
)]
pub struct Account {
    /// Whether `AccountOpened` happened.
    pub open: bool,
    /// The owner's name.
    pub owner: String,
    /// Balance in cents.
    pub balance: u64,
}
// ANCHOR_END: state

// ANCHOR: rules
impl Account {
    async fn handle(
        decision: &mut Decision<'_, Self>,
        command: &AccountCommand,
        _services: &(),
    ) -> Result<(), AccountError> {
        match command {
            AccountCommand::Open { owner, .. } => {
                if decision.open {
                    return Err(AccountError::AlreadyOpen);
                }
                decision.emit(AccountEvent::AccountOpened {
                    owner: owner.clone(),
                });
            }
            AccountCommand::Deposit { amount, .. } => {
                decision.require_open(*amount)?;
                decision.emit(AccountEvent::MoneyDeposited {
                    amount: *amount,
                    currency: "EUR".to_owned(),
                });
            }
            AccountCommand::Withdraw { amount, .. } => {
                decision.require_open(*amount)?;
                if *amount > decision.balance {
                    return Err(AccountError::InsufficientFunds {
                        balance: decision.balance,
                        requested: *amount,
                    });
                }
                decision.emit(AccountEvent::MoneyWithdrawn { amount: *amount });
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::AccountOpened { owner } => {
                self.open = true;
                self.owner.clone_from(owner);
            }
            AccountEvent::MoneyDeposited { amount, .. } => self.balance += amount,
            AccountEvent::MoneyWithdrawn { amount } => self.balance -= amount,
        }
    }

    fn require_open(&self, amount: u64) -> Result<(), AccountError> {
        if !self.open {
            return Err(AccountError::NotOpen);
        }
        if amount == 0 {
            return Err(AccountError::ZeroAmount);
        }
        Ok(())
    }
}
// ANCHOR_END: rules
