//! Errors of the PostgreSQL store, and how database errors are classified.
//!
//! Database errors are told apart by SQLSTATE and constraint name (structured fields of the
//! server's error), never by message text, and where they happen: store code keeps the
//! `sqlx::Error` ([`Failure::Db`]) until it has decided what it means, then turns it into the
//! [`StoreError`] variant that says what happened to the data. Nothing downcasts.

use esframe_core::{StoreError, StreamId};

/// SQLSTATE codes esframe reacts to.
pub(crate) mod sqlstate {
    /// `unique_violation`
    pub(crate) const UNIQUE_VIOLATION: &str = "23505";
    /// `serialization_failure`
    pub(crate) const SERIALIZATION_FAILURE: &str = "40001";
    /// `deadlock_detected`
    pub(crate) const DEADLOCK_DETECTED: &str = "40P01";
    /// `lock_not_available`: `lock_timeout` expired.
    pub(crate) const LOCK_NOT_AVAILABLE: &str = "55P03";
    /// `admin_shutdown`, `crash_shutdown`, `cannot_connect_now`: the server ended the session
    /// or is restarting.
    pub(crate) const SERVER_GOING_AWAY: [&str; 3] = ["57P01", "57P02", "57P03"];
    /// `idle_in_transaction_session_timeout`: the server ended a session whose transaction sat
    /// idle too long (a runner paused past its lease).
    pub(crate) const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
}

/// Constraint names from the migrations, used to classify unique violations.
pub(crate) mod constraint {
    /// `(aggregate_type, aggregate_id, stream_version)`: another writer took this version.
    pub(crate) const STREAM_VERSION: &str = "events_stream_version_key";
    /// `event_id`: another writer stored this event id concurrently.
    pub(crate) const EVENT_ID: &str = "events_event_id_key";
    /// `global_position`: two appends in one transaction.
    pub(crate) const POSITION: &str = "events_pkey";
}

/// What a failed statement means for an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppendFailure {
    /// Another writer committed the same stream version first.
    VersionTaken,
    /// Another writer stored one of the event ids first.
    EventIdTaken,
    /// The transaction already holds a global position (two appends in one transaction).
    PositionTaken,
    /// Serialization failure or deadlock: safe to run again.
    Transient,
    /// Anything else.
    Other,
}

pub(crate) fn classify(err: &sqlx::Error) -> AppendFailure {
    let Some(db) = err.as_database_error() else {
        return AppendFailure::Other;
    };
    match db.code().as_deref() {
        Some(sqlstate::UNIQUE_VIOLATION) => match db.constraint() {
            Some(constraint::STREAM_VERSION) => AppendFailure::VersionTaken,
            Some(constraint::EVENT_ID) => AppendFailure::EventIdTaken,
            Some(constraint::POSITION) => AppendFailure::PositionTaken,
            _ => AppendFailure::Other,
        },
        Some(sqlstate::SERIALIZATION_FAILURE | sqlstate::DEADLOCK_DETECTED) => {
            AppendFailure::Transient
        }
        _ => AppendFailure::Other,
    }
}

/// Whether `err` says the connection was already dead or died under the statement: the socket
/// failed, or the server ended the session (`57P01` admin shutdown, `57P02` crash shutdown,
/// `57P03` cannot connect now, `25P03` idle in transaction too long).
pub(crate) fn connection_lost(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            sqlstate::SERVER_GOING_AWAY.contains(&code.as_ref())
                || code == sqlstate::IDLE_IN_TRANSACTION_TIMEOUT
        }),
        _ => false,
    }
}

/// A failed store operation, before it becomes a [`StoreError`]: the database's error is kept
/// so that the store can decide (reconnect, retry, which variant) without downcasting.
#[derive(Debug)]
pub(crate) enum Failure {
    /// esframe's own verdict (a conflict, a corrupt row, ...): final.
    Store(StoreError),
    /// The database failed.
    Db(sqlx::Error),
}

impl From<StoreError> for Failure {
    fn from(err: StoreError) -> Self {
        Self::Store(err)
    }
}

impl From<sqlx::Error> for Failure {
    fn from(err: sqlx::Error) -> Self {
        Self::Db(err)
    }
}

impl Failure {
    /// Whether the connection died (and the operation may run again on another).
    pub(crate) fn connection_lost(&self) -> bool {
        matches!(self, Self::Db(err) if connection_lost(err))
    }

    /// The error of a read (or of an append known not to have reached a commit): a database
    /// failure is [`StoreError::Unavailable`].
    pub(crate) fn unavailable(self, stream: Option<&StreamId>) -> StoreError {
        match self {
            Self::Store(err) => err,
            Self::Db(err) => StoreError::unavailable(stream, err),
        }
    }

    /// The error of an append that ran its own transaction: if a connection died under one of
    /// its statements (`interrupted`), the commit may have happened, so the outcome is unknown;
    /// any other database failure (none could be had, or the server refused the statement)
    /// stored nothing.
    pub(crate) fn of_append(self, stream: &StreamId, interrupted: bool) -> StoreError {
        match self {
            Self::Store(err) => err,
            Self::Db(err) if interrupted => StoreError::OutcomeUnknown {
                stream: stream.clone(),
                source: Box::new(err),
            },
            Self::Db(err) => StoreError::unavailable(Some(stream), err),
        }
    }
}

/// Errors setting up or administering the PostgreSQL store (store operations return
/// [`esframe_core::StoreError`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgStoreError {
    /// The configured schema name is not a plain identifier.
    #[error(
        "invalid schema name {0:?}: use 1 to 63 ASCII letters, digits or `_`, not starting with a digit or `pg_`"
    )]
    InvalidSchemaName(String),
    /// The database was migrated by a newer esframe release.
    #[error(
        "schema `{schema}` is at esframe migration {found}, newer than the {known} this release knows; upgrade esframe-postgres"
    )]
    SchemaTooNew {
        /// The schema.
        schema: String,
        /// The version found in the database.
        found: i32,
        /// The newest version this release knows.
        known: i32,
    },
    /// An inline projection's name cannot be kept as a projection key.
    #[error(transparent)]
    InvalidProjectionName(#[from] esframe_core::projection::InvalidProjectionKey),
    /// PostgreSQL could not be reached or refused a statement.
    #[error("PostgreSQL error: {0}")]
    Database(#[from] sqlx::Error),
    /// Process managers store their commands' events in their own transaction, which inline
    /// projections cannot join.
    #[error(
        "process managers cannot run on a store with inline projections ({projections:?}): their events are stored in the process manager's transaction; run those projections with a ProjectionRunner, or give the process manager a store built without them"
    )]
    InlineProjectionsWithProcessManagers {
        /// The inline projections.
        projections: Vec<String>,
    },
}
