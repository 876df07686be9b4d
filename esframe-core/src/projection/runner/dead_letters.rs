//! Listing, retrying and discarding a projection's parked events.

use crate::{GlobalLog, RecordedEvent};

use super::{
    super::{
        CheckpointCommit, DeadLetter, Projection, ProjectionContext, ProjectionError,
        ProjectionStore,
    },
    guarded,
    worker::Worker,
};

/// What [`ProjectionRunner::retry_dead_letter`](super::ProjectionRunner::retry_dead_letter)
/// did. In both cases the dead letter is resolved (deleted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterRetry {
    /// The handler ran on the event (`events` parts of it, more than one for an event an
    /// upcaster splits) and its writes committed with the dead letter's removal.
    Handled {
        /// How many events the handler was given.
        events: usize,
    },
    /// There was nothing to hand the handler: the stored event no longer matches the
    /// projection's interest, or the upcasters now retire it. The handler was not called.
    NothingToHandle,
}

impl<S, C, P> Worker<'_, S, C, P>
where
    S: GlobalLog,
    C: ProjectionStore,
    P: Projection<C::Tx>,
{
    pub(super) async fn dead_letters(&self) -> Result<Vec<DeadLetter>, ProjectionError> {
        self.checkpoints()
            .dead_letters(&self.key)
            .await
            .map_err(|err| self.checkpoint_error(err))
    }

    /// The dead letter `id` if it belongs to this projection partition.
    async fn own_dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, ProjectionError> {
        let letter = self
            .checkpoints()
            .dead_letter(id)
            .await
            .map_err(|err| self.checkpoint_error(err))?;
        match letter {
            Some(letter) if letter.key != self.key => Err(ProjectionError::WrongDeadLetter {
                id,
                projection: self.key.clone(),
                owner: letter.key,
            }),
            letter => Ok(letter),
        }
    }

    pub(super) async fn discard_dead_letter(&self, id: u64) -> Result<bool, ProjectionError> {
        if self.own_dead_letter(id).await?.is_none() {
            return Ok(false);
        }
        self.checkpoints()
            .discard_dead_letter(id)
            .await
            .map_err(|err| self.checkpoint_error(err))
    }

    pub(super) async fn retry_dead_letter(
        &self,
        id: u64,
    ) -> Result<DeadLetterRetry, ProjectionError> {
        let Some(letter) = self.own_dead_letter(id).await? else {
            return Err(ProjectionError::NoSuchDeadLetter { id });
        };
        let position = letter.event.global_position;
        let interest = self.projection().interest();
        let events: Vec<RecordedEvent> = self
            .store()
            .read_all_batch(position.before(), 1)
            .await
            .map_err(|err| self.store_error(err))?
            .events
            .into_iter()
            .filter(|e| e.global_position == position && interest.matches(e))
            .collect();
        let mut tx = self
            .checkpoints()
            .begin()
            .await
            .map_err(|err| self.checkpoint_error(err))?;
        let mut ctx = ProjectionContext::new(&mut tx, false, letter.event.attempts + 1);
        let mut outcome = Ok(());
        for event in &events {
            if let Err(err) = guarded(self.projection().handle(event, &mut ctx)).await {
                outcome = Err(err);
                break;
            }
        }
        match outcome {
            Ok(()) => {
                let mut commit = CheckpointCommit::nothing(&self.key);
                commit.resolve = Some(id);
                self.checkpoints()
                    .commit(tx, commit)
                    .await
                    .map_err(|err| self.checkpoint_error(err))?;
                if events.is_empty() {
                    tracing::warn!(projection = %self.key, id, stream = %letter.event.stream_id, version = letter.event.stream_version, "dead letter resolved without handling: the event no longer matches the projection's interest, or upcasters retire it");
                    Ok(DeadLetterRetry::NothingToHandle)
                } else {
                    Ok(DeadLetterRetry::Handled {
                        events: events.len(),
                    })
                }
            }
            Err(source) => {
                self.checkpoints().rollback(tx).await;
                self.checkpoints()
                    .note_retry_failure(id, &source.to_string())
                    .await
                    .map_err(|err| self.checkpoint_error(err))?;
                Err(ProjectionError::RetryFailed {
                    id,
                    projection: self.key.clone(),
                    source,
                })
            }
        }
    }
}
