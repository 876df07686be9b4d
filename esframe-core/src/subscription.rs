//! Following the global log: stored events first, then live ones, as a `futures::Stream`.

use std::{
    collections::VecDeque,
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::Stream;

use crate::{GlobalBatch, GlobalLog, Position, RecordedEvent, StoreError};

/// Default number of events a [`Subscription`] reads per batch.
pub const DEFAULT_BATCH_SIZE: usize = 512;

type Pending<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// What the subscription is waiting for.
enum Step {
    Idle,
    Head(Pending<Position>),
    Read(Pending<GlobalBatch>),
    Wait(Pending<()>),
}

/// A cursor over the global log, as a [`Stream`] of events (use `futures::StreamExt` to
/// `.next().await` it).
///
/// Delivers every event after the start position exactly once, in log order, whatever the
/// store's live-notification mechanism does (a missed wake-up only delays). It follows the log
/// for ever unless made with [`Subscription::until_head`], which ends the stream once it has
/// delivered everything stored when it started. An error does not end it: polling again retries
/// from the same position.
///
/// ```
/// use esframe_core::{GlobalLog, Position};
/// use futures_util::TryStreamExt;
/// # async fn read<S: GlobalLog>(store: S) -> Result<(), esframe_core::StoreError> {
/// // Everything stored so far, then the end.
/// let events: Vec<_> = store.subscribe(Position::START).until_head().try_collect().await?;
/// # Ok(()) }
/// ```
pub struct Subscription<S> {
    store: S,
    position: Position,
    batch_size: usize,
    buffer: VecDeque<RecordedEvent>,
    /// How far the last batch looked.
    scanned_to: Position,
    /// `Some(None)`: stop at the head, not yet known; `Some(Some(head))`: stop there.
    until: Option<Option<Position>>,
    step: Step,
    /// The batch after a full one, read while the full one is handed out: from where, and the
    /// read, running or done.
    ahead: Option<(Position, Ahead)>,
}

/// A batch read ahead: still running, or done.
enum Ahead {
    Running(AheadTask),
    Done(Result<GlobalBatch, StoreError>),
}

/// A read ahead on a task of its own, so that it runs to its end (and hands its connection
/// back to the pool) whether or not the subscription is being polled. Aborted when dropped.
struct AheadTask(tokio::task::JoinHandle<Result<GlobalBatch, StoreError>>);

impl Drop for AheadTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Future for AheadTask {
    type Output = Result<GlobalBatch, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| {
            // The task is only ever aborted by dropping this, so a join error is a panic in
            // the store's read: reported as a failed read, which the next poll tries again.
            joined.unwrap_or_else(|err| Err(StoreError::unavailable(None, err)))
        })
    }
}

// The store is never pinned structurally: only cloned into the boxed futures.
impl<S> Unpin for Subscription<S> {}

impl<S> fmt::Debug for Subscription<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("position", &self.position)
            .field("batch_size", &self.batch_size)
            .field("buffered", &self.buffer.len())
            .field("until", &self.until)
            .finish_non_exhaustive()
    }
}

impl<S: GlobalLog> Subscription<S> {
    /// Starts after `after` ([`Position::START`]: from the beginning), following the log.
    pub fn new(store: S, after: Position) -> Self {
        Self {
            store,
            position: after,
            batch_size: DEFAULT_BATCH_SIZE,
            buffer: VecDeque::new(),
            scanned_to: after,
            until: None,
            step: Step::Idle,
            ahead: None,
        }
    }

    /// Sets how many events are read per batch.
    #[must_use]
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Catch up and end: the stream ends once it has delivered every event stored (committed)
    /// when it is first polled, waiting for events still held back by transactions that were
    /// running then.
    #[must_use]
    pub fn until_head(mut self) -> Self {
        self.until = Some(None);
        self
    }

    /// How far the log has been consumed: the position of the last event returned, or past it
    /// when retired events followed it, or just before it while more parts of the same (split)
    /// stored event are still to come. Resuming after this position never loses an event.
    pub fn position(&self) -> Position {
        self.position
    }

    fn read(&self, after: Position) -> Pending<GlobalBatch> {
        let (store, limit) = (self.store.clone(), self.batch_size);
        Box::pin(async move { store.read_all_batch(after, limit).await })
    }

    /// Reads the next batch, or takes the one read ahead from here.
    fn start_read(&mut self) -> Option<Result<GlobalBatch, StoreError>> {
        match self.ahead.take() {
            Some((after, Ahead::Done(batch))) if after == self.position => return Some(batch),
            Some((after, Ahead::Running(task))) if after == self.position => {
                self.step = Step::Read(Box::pin(task));
            }
            _ => self.step = Step::Read(self.read(self.position)),
        }
        None
    }

    /// Lets a batch read ahead make progress while buffered events are handed out.
    fn poll_ahead(&mut self, cx: &mut Context<'_>) {
        if let Some((_, Ahead::Running(task))) = &mut self.ahead
            && let Poll::Ready(batch) = Pin::new(task).poll(cx)
            && let Some((_, ahead)) = &mut self.ahead
        {
            *ahead = Ahead::Done(batch);
        }
    }

    /// Takes a read batch in: buffers its events, or says what to do when it has none.
    /// `Some(None)` ends the stream; `Some(Some(err))` reports an error.
    fn take_batch(&mut self, batch: Result<GlobalBatch, StoreError>) -> Option<Option<StoreError>> {
        let batch = match batch {
            Ok(batch) => batch,
            Err(err) => return Some(Some(err)),
        };
        if !batch.events.is_empty() {
            let full = batch.events.len() >= self.batch_size;
            self.scanned_to = batch.scanned_to;
            self.buffer.extend(batch.events);
            // More is likely stored: read it while these are handed out. Reading early skips
            // nothing (a read returns every event below the horizon at its time); the batch is
            // used only if the subscription then stands where it was read from.
            // Only inside a Tokio runtime, which runs the read on its own task.
            if full
                && !matches!(self.until, Some(Some(head)) if self.scanned_to >= head)
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                let task = AheadTask(runtime.spawn(self.read(self.scanned_to)));
                self.ahead = Some((self.scanned_to, Ahead::Running(task)));
            }
        } else if batch.scanned_to > self.position {
            // Everything read was retired by upcasters: move past it.
            self.position = batch.scanned_to;
        } else if matches!(self.until, Some(Some(head)) if self.position >= head) {
            return Some(None);
        } else {
            self.start_wait();
        }
        None
    }

    fn start_wait(&mut self) {
        let (store, after) = (self.store.clone(), self.position);
        self.step = Step::Wait(Box::pin(async move { store.wait_for_events(after).await }));
    }

    /// Takes the next buffered event, moving the position.
    fn pop(&mut self) -> Option<RecordedEvent> {
        let event = self.buffer.pop_front()?;
        self.position = match self.buffer.front() {
            // More parts of one stored event (an upcaster split it) follow: its position is not
            // consumed until the last part is, so resuming here repeats parts rather than losing
            // them.
            Some(next) if next.global_position == event.global_position => {
                event.global_position.before()
            }
            Some(_) => event.global_position,
            // Past any retired events that followed it in the batch.
            None => self.scanned_to.max(event.global_position),
        };
        Some(event)
    }
}

fn poll_step<T>(pending: &mut Pending<T>, cx: &mut Context<'_>) -> Poll<Result<T, StoreError>> {
    pending.as_mut().poll(cx)
}

impl<S: GlobalLog> Stream for Subscription<S> {
    type Item = Result<RecordedEvent, StoreError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.pop() {
                this.poll_ahead(cx);
                return Poll::Ready(Some(Ok(event)));
            }
            match &mut this.step {
                Step::Idle => match this.until {
                    Some(None) => {
                        let store = this.store.clone();
                        this.step =
                            Step::Head(Box::pin(async move { store.head_position().await }));
                    }
                    Some(Some(head)) if this.position >= head => return Poll::Ready(None),
                    _ => {
                        if let Some(batch) = this.start_read() {
                            match this.take_batch(batch) {
                                Some(None) => return Poll::Ready(None),
                                Some(Some(err)) => return Poll::Ready(Some(Err(err))),
                                None => {}
                            }
                        }
                    }
                },
                Step::Head(pending) => {
                    let head = match poll_step(pending, cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(result) => result,
                    };
                    this.step = Step::Idle;
                    match head {
                        Ok(head) => this.until = Some(Some(head)),
                        Err(err) => return Poll::Ready(Some(Err(err))),
                    }
                }
                Step::Read(pending) => {
                    let batch = match poll_step(pending, cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(result) => result,
                    };
                    this.step = Step::Idle;
                    match this.take_batch(batch) {
                        Some(None) => return Poll::Ready(None),
                        Some(Some(err)) => return Poll::Ready(Some(Err(err))),
                        None => {}
                    }
                }
                Step::Wait(pending) => {
                    let waited = match poll_step(pending, cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(result) => result,
                    };
                    this.step = Step::Idle;
                    if let Err(err) = waited {
                        return Poll::Ready(Some(Err(err)));
                    }
                }
            }
        }
    }
}
