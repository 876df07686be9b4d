//! Rebuild progress reports.

use std::{fmt, time::Duration};

/// How far a replay has come; passed to the callback of
/// [`ProjectionRunner::on_progress`](super::ProjectionRunner::on_progress) after every batch.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildProgress {
    /// The projection.
    pub projection: String,
    /// Stored events read so far (handled or skipped by the projection's interest).
    pub events_done: u64,
    /// Stored events to read in all, as counted when the replay started (more may arrive); `None`
    /// if the store cannot count them.
    pub events_total: Option<u64>,
    /// The global position reached.
    pub position: crate::Position,
    /// Time since the replay started.
    pub elapsed: Duration,
}

impl RebuildProgress {
    /// Events read per second so far.
    pub fn events_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.events_done as f64 / secs
        } else {
            0.0
        }
    }

    /// Share done, from 0.0 to 1.0, if the total is known.
    pub fn fraction(&self) -> Option<f64> {
        self.events_total.map(|total| {
            if total == 0 {
                1.0
            } else {
                (self.events_done as f64 / total as f64).min(1.0)
            }
        })
    }

    /// Estimated time left at the rate so far, if the total is known.
    pub fn remaining(&self) -> Option<Duration> {
        let total = self.events_total?;
        let rate = self.events_per_second();
        if rate <= 0.0 {
            return None;
        }
        let left = total.saturating_sub(self.events_done) as f64;
        Some(Duration::from_secs_f64(left / rate))
    }
}

/// A one-line progress bar:
/// `balances [##########----------]  50.0%  50000/100000 events  61234 ev/s  eta 0.8s`.
impl fmt::Display for RebuildProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const WIDTH: usize = 20;
        write!(f, "{} ", self.projection)?;
        match (self.fraction(), self.events_total) {
            (Some(fraction), Some(total)) => {
                let filled = ((fraction * WIDTH as f64).round() as usize).min(WIDTH);
                write!(
                    f,
                    "[{}{}] {:5.1}%  {}/{} events",
                    "#".repeat(filled),
                    "-".repeat(WIDTH - filled),
                    fraction * 100.0,
                    self.events_done,
                    total
                )?;
            }
            _ => write!(f, "{} events", self.events_done)?,
        }
        write!(f, "  {:.0} ev/s", self.events_per_second())?;
        if let Some(left) = self.remaining() {
            write!(f, "  eta {:.1}s", left.as_secs_f64())?;
        }
        Ok(())
    }
}

/// What a finished rebuild did.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildReport {
    /// Stored events read.
    pub events: u64,
    /// The global position it reached.
    pub position: crate::Position,
    /// How long it took.
    pub elapsed: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reports_rate_share_and_estimate() {
        let progress = RebuildProgress {
            projection: "balances".into(),
            events_done: 500,
            events_total: Some(1000),
            position: crate::Position::new(500),
            elapsed: Duration::from_secs(2),
        };
        assert_eq!(progress.events_per_second(), 250.0);
        assert_eq!(progress.fraction(), Some(0.5));
        assert_eq!(progress.remaining(), Some(Duration::from_secs(2)));
        let line = progress.to_string();
        assert!(
            line.starts_with("balances [##########----------]  50.0%  500/1000 events  250 ev/s"),
            "{line}"
        );
        assert!(line.ends_with("eta 2.0s"), "{line}");
    }

    #[test]
    fn unknown_total_gives_no_bar_and_no_estimate() {
        let progress = RebuildProgress {
            projection: "p".into(),
            events_done: 10,
            events_total: None,
            position: crate::Position::new(10),
            elapsed: Duration::ZERO,
        };
        assert_eq!(progress.remaining(), None);
        assert_eq!(progress.to_string(), "p 10 events  0 ev/s");
    }
}
