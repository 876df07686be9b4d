//! Inline projections: read models updated in the append's own transaction.

use std::{future::Future, panic::AssertUnwindSafe, pin::Pin, sync::Arc};

use esframe_core::{
    RecordedEvent,
    projection::{HandlerError, Interest, Projection, ProjectionContext},
};

use futures_util::FutureExt;

use crate::PgTransaction;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A projection registered with
/// [`PgEventStoreBuilder::inline_projection`](crate::PgEventStoreBuilder::inline_projection),
/// behind a trait object.
pub(crate) trait InlineProjection: Send + Sync {
    fn name(&self) -> &str;
    fn interest(&self) -> &Interest;
    fn apply<'a>(
        &'a self,
        events: &'a [RecordedEvent],
        tx: &'a mut PgTransaction,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// A projection with its interest, asked for once.
pub(crate) struct Registered<P> {
    projection: P,
    interest: Interest,
}

impl<P: Projection<PgTransaction>> Registered<P> {
    pub(crate) fn boxed(projection: P) -> Arc<dyn InlineProjection> {
        let interest = projection.interest();
        Arc::new(Self {
            projection,
            interest,
        })
    }
}

impl<P: Projection<PgTransaction>> InlineProjection for Registered<P> {
    fn name(&self) -> &str {
        self.projection.name()
    }

    fn interest(&self) -> &Interest {
        &self.interest
    }

    fn apply<'a>(
        &'a self,
        events: &'a [RecordedEvent],
        tx: &'a mut PgTransaction,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let mut ctx = ProjectionContext::new(tx, false, 1);
            // A panicking projection fails the append like an erring one, instead of the
            // caller's task.
            match AssertUnwindSafe(self.projection.handle_batch(events, &mut ctx))
                .catch_unwind()
                .await
            {
                Ok(result) => result,
                Err(_) => Err("the projection's handler panicked".into()),
            }
        })
    }
}

/// The advisory-lock key of a projection's lease, shared by runners (exclusive, for the
/// session) and inline appends (shared, for the transaction), so that a rebuild of an inline
/// projection and appends that update it never interleave.
pub(crate) fn lease_key(schema: &crate::SchemaName, projection: &str) -> String {
    format!("esframe.projection.{schema}.{projection}")
}
