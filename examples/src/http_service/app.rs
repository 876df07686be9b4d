//! [`HttpService`]: the routes, the state they share, and the projection running beside them.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{Router, middleware, routing};
use esframe_core::{
    CommandHandler, EventStore, GlobalLog,
    projection::{
        CheckpointStore, ProjectionError, ProjectionKey, ProjectionRunner, ProjectionStore,
        RunningProjection, Typed, TypedProjection,
    },
};
use tokio::net::TcpListener;

use crate::bank_account::BalanceQuery;

use super::{Backend, CheckedAccount, correlate, routes};

/// How long `GET /accounts/{id}?min_position=..` waits by default for the read model to catch up.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the routes share: the command handler (writes), the read model (reads), and the
/// projection's checkpoints (to wait on for read-your-writes).
#[derive(Debug)]
pub(crate) struct AppState<S, C, B> {
    pub(crate) accounts: CommandHandler<CheckedAccount, S>,
    pub(crate) balances: B,
    pub(crate) checkpoints: C,
    pub(crate) projection: ProjectionKey,
    pub(crate) read_timeout: Duration,
}

/// The bank account as a JSON API: the routes of [`super`], and the balances projection that
/// keeps their read model, running in the background from its checkpoint.
#[derive(Debug)]
pub struct HttpService {
    router: Router,
    projection: RunningProjection,
}

impl HttpService {
    /// Starts the balances projection on `backend` and builds the routes. A `GET` with
    /// `min_position` waits up to `read_timeout` (say [`DEFAULT_READ_TIMEOUT`]) for it.
    pub fn start<S, C, B>(
        backend: Backend<S, C, B>,
        read_timeout: Duration,
    ) -> Result<Self, ProjectionError>
    where
        S: GlobalLog,
        C: ProjectionStore,
        B: TypedProjection<C::Tx> + BalanceQuery + Clone,
    {
        let Backend {
            store,
            checkpoints,
            balances,
        } = backend;
        let runner =
            ProjectionRunner::new(store.clone(), checkpoints.clone(), Typed(balances.clone()));
        let state = AppState {
            accounts: CommandHandler::new(store),
            balances,
            checkpoints,
            projection: runner.key()?.clone(),
            read_timeout,
        };
        Ok(Self {
            router: router(state),
            projection: runner.spawn(),
        })
    }

    /// The routes, to serve or to call directly.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Serves HTTP on `listener` until `shutdown` completes (requests in flight are finished),
    /// then stops the projection.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        axum::serve(listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await?;
        self.projection.shutdown().await?;
        Ok(())
    }
}

/// The routes on `state`, each request inside [`correlate`].
fn router<S, C, B>(state: AppState<S, C, B>) -> Router
where
    S: EventStore,
    C: CheckpointStore,
    B: BalanceQuery + Send + Sync + 'static,
{
    Router::new()
        .route("/accounts", routing::post(routes::open::<S, C, B>))
        .route("/accounts/{id}", routing::get(routes::balance::<S, C, B>))
        .route(
            "/accounts/{id}/deposits",
            routing::post(routes::deposit::<S, C, B>),
        )
        .route(
            "/accounts/{id}/withdrawals",
            routing::post(routes::withdraw::<S, C, B>),
        )
        .fallback(routes::no_route)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(middleware::from_fn(correlate))
        .with_state(Arc::new(state))
}
