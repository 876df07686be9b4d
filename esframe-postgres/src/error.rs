//! Errors of the PostgreSQL store and how database errors are classified.
//!
//! Database errors are told apart by SQLSTATE and constraint name (structured fields of the
//! server's error), never by message text.

/// SQLSTATE codes esframe reacts to.
pub(crate) mod sqlstate {
    /// `unique_violation`
    pub(crate) const UNIQUE_VIOLATION: &str = "23505";
    /// `serialization_failure`
    pub(crate) const SERIALIZATION_FAILURE: &str = "40001";
    /// `deadlock_detected`
    pub(crate) const DEADLOCK_DETECTED: &str = "40P01";
}

/// Constraint names from the migrations, used to classify unique violations.
pub(crate) mod constraint {
    /// `(stream_id, stream_version)`: another writer took this version.
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
    /// `append_in` was called in a transaction that had already written something.
    #[error(
        "the append to stream `{stream}` must be the first write of its transaction: an earlier write gives the transaction an id older than the events it follows, which would reorder the global log"
    )]
    AppendNotFirstWrite {
        /// The stream appended to.
        stream: String,
    },
    /// `append_in` was called on a store that updates inline projections: they run in the
    /// store's own append transaction, which the caller's transaction cannot be.
    #[error(
        "the append to stream `{stream}` cannot run in the caller's transaction: this store updates inline projections ({projections}) in its own; use `append`, or a store without inline projections"
    )]
    InlineProjectionsNeedOwnTransaction {
        /// The stream appended to.
        stream: String,
        /// The inline projections' names.
        projections: String,
    },
    /// More events in one append than a global position can number.
    #[error(
        "append of {events} events to stream `{stream}` exceeds the limit of 65536 per append; split it"
    )]
    AppendTooLarge {
        /// The stream appended to.
        stream: String,
        /// Events in the refused append.
        events: usize,
    },
    /// PostgreSQL could not be reached or refused a statement.
    #[error("PostgreSQL error: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<PgStoreError> for esframe_core::StoreError {
    fn from(err: PgStoreError) -> Self {
        Self::backend(err)
    }
}
