//! The runner's clock: the system's, or one a test moves by hand.

use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

/// Where a [`ProcessRunner`](super::ProcessRunner) reads the time that timers are due by.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    manual: Option<Arc<Manual>>,
}

#[derive(Debug)]
struct Manual {
    now: Mutex<DateTime<Utc>>,
    moved: watch::Sender<()>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// A clock that stands at `start` until [`advance`](Self::advance) moves it: tests decide
    /// when timers come due.
    pub fn manual(start: DateTime<Utc>) -> Self {
        Self {
            manual: Some(Arc::new(Manual {
                now: Mutex::new(start),
                moved: watch::channel(()).0,
            })),
        }
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            None => Utc::now(),
            Some(m) => *m.now.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Moves a manual clock forward by `by`, waking runners so due timers fire at once. Does
    /// nothing to the system clock.
    pub fn advance(&self, by: std::time::Duration) {
        if let Some(m) = &self.manual {
            {
                let mut now = m.now.lock().unwrap_or_else(PoisonError::into_inner);
                *now += chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
            }
            m.moved.send_replace(());
        }
    }

    /// Whether it is a manual clock.
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }

    /// A receiver that changes when a manual clock moves (`None` for the system clock).
    pub(crate) fn moved(&self) -> Option<watch::Receiver<()>> {
        self.manual.as_ref().map(|m| m.moved.subscribe())
    }
}
