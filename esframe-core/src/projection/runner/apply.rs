//! Applying a batch: the whole batch in one transaction, or, when it fails, event by event to
//! find the failing unit, which is retried with backoff and then parked or stops the runner.

use tokio::sync::watch;

use crate::{GlobalLog, Position, RecordedEvent};

use super::{
    super::{
        CheckpointCommit, CheckpointError, Delivery, HandlerError, LeaseStore, NewDeadLetter,
        Projection, ProjectionContext, ProjectionError, ProjectionStore,
    },
    OnFailure,
    cursor::Cursor,
    guarded,
    worker::{StepError, Worker},
};

impl<S, C, P> Worker<'_, S, C, P>
where
    S: GlobalLog,
    C: ProjectionStore,
    P: Projection<C::Tx>,
{
    /// Applies a batch and moves the checkpoint to `to`.
    pub(super) async fn apply(
        &self,
        cursor: &mut Cursor,
        events: Vec<RecordedEvent>,
        to: Position,
        stop: &watch::Receiver<bool>,
        lease: &<C as LeaseStore>::Lease,
    ) -> Result<(), StepError> {
        let interest = self.projection().interest();
        let wanted: Vec<RecordedEvent> =
            events.into_iter().filter(|e| interest.matches(e)).collect();
        // The common case: the whole batch in one go.
        let failed = self.attempt(cursor, &wanted, to, 1, true).await?;
        let Some((mut index, mut error)) = failed else {
            return Ok(());
        };
        let retry = self.runner.retry;
        let mut rest: &[RecordedEvent] = &wanted;
        loop {
            // The failing "unit": every part of the stored event that failed (an upcaster may
            // have split it); they commit together or not at all.
            let position = rest[index].global_position;
            let start = rest[..index]
                .iter()
                .rposition(|e| e.global_position != position)
                .map_or(0, |i| i + 1);
            let end = rest[index..]
                .iter()
                .position(|e| e.global_position != position)
                .map_or(rest.len(), |i| index + i);
            if start > 0 && cursor.position() < position.before() {
                // Commit what came before it. Exactly once, the failed transaction took their
                // writes with it, so they are handled again (unless a narrowed-down commit
                // already stored them); at least once, they took effect already and only the
                // checkpoint moves.
                let done = cursor.position();
                let before: &[RecordedEvent] = match self.checkpoints().delivery() {
                    Delivery::ExactlyOnce => {
                        let first = rest[..start]
                            .iter()
                            .position(|e| e.global_position > done)
                            .unwrap_or(start);
                        &rest[first..start]
                    }
                    Delivery::AtLeastOnce => &[],
                };
                let skipped = start - before.len();
                if let Some((i, err)) = self
                    .attempt(cursor, before, position.before(), 1, false)
                    .await?
                {
                    // Failed before the unit this time (a flaky handler): start over there.
                    index = skipped + i;
                    error = err;
                    continue;
                }
            }
            let unit = &rest[start..end];
            let failing = rest[index].clone();
            let mut attempts = 1;
            let mut handled = false;
            while attempts < retry.attempts.max(1) {
                let wait = retry.backoff(attempts);
                tracing::warn!(projection = %self.key, stream = %failing.stream_id, version = failing.stream_version, attempt = attempts, error = %error, retry_in_ms = wait.as_millis() as u64, "projection handler failed; retrying");
                let mut stop = stop.clone();
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|stop| *stop) => return Err(StepError::Stopped),
                }
                // A runner that lost its lease stops retrying: the new holder handles the event.
                if !self.checkpoints().lease_held(lease) {
                    return Err(StepError::LeaseLost);
                }
                attempts += 1;
                match self
                    .attempt(cursor, unit, position, attempts, false)
                    .await?
                {
                    None => {
                        handled = true;
                        break;
                    }
                    Some((_, err)) => error = err,
                }
            }
            if !handled {
                self.give_up(cursor, &failing, attempts, error).await?;
            }
            rest = &rest[end..];
            if rest.is_empty() {
                if cursor.position() < to {
                    self.attempt(cursor, &[], to, 1, false).await?;
                }
                return Ok(());
            }
            match self.attempt(cursor, rest, to, 1, false).await? {
                None => return Ok(()),
                Some((i, err)) => {
                    index = i;
                    error = err;
                }
            }
        }
    }

    /// Parks `event` (moving the checkpoint past it) or stops, per [`OnFailure`].
    async fn give_up(
        &self,
        cursor: &mut Cursor,
        event: &RecordedEvent,
        attempts: u32,
        error: HandlerError,
    ) -> Result<(), StepError> {
        if self.runner.on_failure == OnFailure::Stop {
            return Err(StepError::Fatal(ProjectionError::Handler {
                projection: self.key.clone(),
                stream: event.stream_id.clone(),
                stream_version: event.stream_version,
                event_type: event.event_type.to_string(),
                global_position: event.global_position,
                attempts,
                source: error,
            }));
        }
        tracing::error!(projection = %self.key, stream = %event.stream_id, version = event.stream_version, attempts, error = %error, "projection handler failed every retry; event parked as a dead letter");
        let tx = self
            .checkpoints()
            .begin()
            .await
            .map_err(|err| self.checkpoint_error(err))?;
        let target = cursor.at(event.global_position);
        let mut commit =
            CheckpointCommit::advance(&self.key, cursor.checkpoint, target).fenced(cursor.fence);
        commit.park = Some(NewDeadLetter {
            global_position: event.global_position,
            event_id: event.event_id,
            stream_id: event.stream_id.clone(),
            stream_version: event.stream_version,
            event_type: event.event_type.to_string(),
            error: error.to_string(),
            attempts,
        });
        self.checkpoints()
            .commit(tx, commit)
            .await
            .map_err(|err| self.commit_failed(err))?;
        cursor.checkpoint = Some(target);
        Ok(())
    }

    /// Handles `events` in one transaction and, if all succeed, commits it with the checkpoint
    /// moved to `to`. Returns the index and error of the first failing event (the transaction
    /// is then rolled back); a commit the database refuses counts as a failure of the first
    /// event, so that the caller narrows it down to the unit at fault. `as_batch` uses
    /// [`Projection::handle_batch`] if the store is exactly-once; at least once, a rollback
    /// cannot undo the writes of the events before a failure, so they go one by one to learn
    /// which event failed.
    async fn attempt(
        &self,
        cursor: &mut Cursor,
        events: &[RecordedEvent],
        to: Position,
        attempt: u32,
        as_batch: bool,
    ) -> Result<Option<(usize, HandlerError)>, StepError> {
        let mut tx = self
            .checkpoints()
            .begin()
            .await
            .map_err(|err| self.checkpoint_error(err))?;
        let as_batch = as_batch && self.checkpoints().delivery() == Delivery::ExactlyOnce;
        let failed = {
            let mut ctx = ProjectionContext::new(&mut tx, cursor.replaying(), attempt);
            if as_batch {
                if events.is_empty() {
                    None
                } else {
                    guarded(self.projection().handle_batch(events, &mut ctx))
                        .await
                        .err()
                        .map(|err| (0, err))
                }
            } else {
                let mut failed = None;
                for (i, event) in events.iter().enumerate() {
                    if let Err(err) = guarded(self.projection().handle(event, &mut ctx)).await {
                        failed = Some((i, err));
                        break;
                    }
                }
                failed
            }
        };
        if let Some((index, err)) = failed {
            self.checkpoints().rollback(tx).await;
            if as_batch {
                // Which event failed is unknown: go through the batch one by one.
                tracing::debug!(projection = %self.key, error = %err, "batch failed; handling its events one by one");
                return Box::pin(self.attempt(cursor, events, to, attempt, false)).await;
            }
            return Ok(Some((index, err)));
        }
        let target = cursor.at(to);
        match self
            .checkpoints()
            .commit(
                tx,
                CheckpointCommit::advance(&self.key, cursor.checkpoint, target)
                    .fenced(cursor.fence),
            )
            .await
        {
            Ok(()) => {
                cursor.checkpoint = Some(target);
                Ok(None)
            }
            // The database refused what the handlers wrote (a deferred constraint, or a handler
            // that swallowed an error and left the transaction aborted). Exactly once, the
            // rollback undid every write, so the events are committed unit by unit to find the
            // one at fault; at least once, their writes are already done and only the first
            // unit can be blamed.
            Err(CheckpointError::Rejected(err))
                if self.checkpoints().delivery() == Delivery::ExactlyOnce
                    && events
                        .first()
                        .zip(events.last())
                        .is_some_and(|(a, b)| a.global_position != b.global_position) =>
            {
                tracing::debug!(projection = %self.key, error = %err, "commit refused; committing its events unit by unit to find the one at fault");
                Box::pin(self.attempt_by_unit(cursor, events, to, attempt)).await
            }
            Err(CheckpointError::Rejected(err)) if !events.is_empty() => Ok(Some((
                0,
                format!("the database refused the commit of the handler's writes: {err}").into(),
            ))),
            Err(err) => Err(self.commit_failed(err)),
        }
    }

    /// [`Self::attempt`] for each unit of `events` (the parts of one stored event) in its own
    /// transaction, the checkpoint moving to each unit and to `to` after the last. Stops at
    /// the first failing unit, returning the index (in `events`) and error of its failure.
    async fn attempt_by_unit(
        &self,
        cursor: &mut Cursor,
        events: &[RecordedEvent],
        to: Position,
        attempt: u32,
    ) -> Result<Option<(usize, HandlerError)>, StepError> {
        let mut start = 0;
        while start < events.len() {
            let position = events[start].global_position;
            let end = events[start..]
                .iter()
                .position(|e| e.global_position != position)
                .map_or(events.len(), |i| start + i);
            let target = if end == events.len() { to } else { position };
            if let Some((i, err)) = self
                .attempt(cursor, &events[start..end], target, attempt, false)
                .await?
            {
                return Ok(Some((start + i, err)));
            }
            start = end;
        }
        Ok(None)
    }
}
