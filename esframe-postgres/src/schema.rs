//! The Postgres schema esframe writes to, and the embedded migrations that create it.

use std::fmt;

use sqlx::{AssertSqlSafe, PgPool};

use crate::PgStoreError;

/// A validated Postgres schema name: 1 to 63 characters, ASCII letters, digits and `_`, not
/// starting with a digit, and not a `pg_` system name. It is the only text esframe puts into SQL
/// by formatting; every value is a bound parameter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    /// Validates `name`.
    ///
    /// ```
    /// use esframe_postgres::SchemaName;
    /// assert!(SchemaName::new("esframe").is_ok());
    /// assert!(SchemaName::new("events; DROP TABLE x").is_err());
    /// ```
    pub fn new(name: impl Into<String>) -> Result<Self, PgStoreError> {
        let name = name.into();
        let valid_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let starts_ok = name.chars().next().is_some_and(|c| !c.is_ascii_digit());
        if name.is_empty()
            || name.len() > 63
            || !valid_chars
            || !starts_ok
            || name.to_ascii_lowercase().starts_with("pg_")
        {
            return Err(PgStoreError::InvalidSchemaName(name));
        }
        Ok(Self(name))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name quoted as an SQL identifier.
    pub(crate) fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        Self("esframe".to_owned())
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One embedded migration.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in order. Never edit a released one: add a new file.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events",
        sql: include_str!("../migrations/0001_events.sql"),
    },
    Migration {
        version: 2,
        name: "projections",
        sql: include_str!("../migrations/0002_projections.sql"),
    },
    Migration {
        version: 3,
        name: "projection_replays",
        sql: include_str!("../migrations/0003_projection_replays.sql"),
    },
    Migration {
        version: 4,
        name: "projection_partitions",
        sql: include_str!("../migrations/0004_projection_partitions.sql"),
    },
    Migration {
        version: 5,
        name: "namespaced_streams",
        sql: include_str!("../migrations/0005_namespaced_streams.sql"),
    },
    Migration {
        version: 6,
        name: "process_managers",
        sql: include_str!("../migrations/0006_process_managers.sql"),
    },
    Migration {
        version: 7,
        name: "partitioned_projections",
        sql: include_str!("../migrations/0007_partitioned_projections.sql"),
    },
];

/// The newest migration version this release knows.
pub const SCHEMA_VERSION: i32 = 7;

/// Creates the schema and applies pending migrations.
///
/// Safe when several processes start at once: everything runs in one transaction holding a
/// transaction-scoped advisory lock derived from the schema name, so one process migrates and
/// the others wait, then find nothing to do. A database migrated by a newer release (a version
/// this code does not know) is refused rather than used.
pub(crate) async fn migrate(pool: &PgPool, schema: &SchemaName) -> Result<(), PgStoreError> {
    let quoted = schema.quoted();
    let mut tx = crate::transaction::begin(pool).await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('esframe.migrate.' || $1, 0))")
        .bind(schema.as_str())
        .execute(&mut *tx)
        .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {quoted}"
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {quoted}.esframe_migrations (
             version    INTEGER     PRIMARY KEY,
             name       TEXT        NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )"
    )))
    .execute(&mut *tx)
    .await?;
    let applied: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT max(version) FROM {quoted}.esframe_migrations"
    )))
    .fetch_one(&mut *tx)
    .await?;
    let applied = applied.unwrap_or(0);
    if applied > SCHEMA_VERSION {
        return Err(PgStoreError::SchemaTooNew {
            schema: schema.to_string(),
            found: applied,
            known: SCHEMA_VERSION,
        });
    }
    for migration in MIGRATIONS.iter().filter(|m| m.version > applied) {
        tracing::info!(schema = %schema, version = migration.version, name = migration.name, "applying esframe migration");
        sqlx::raw_sql(AssertSqlSafe(migration.sql.replace("{schema}", &quoted)))
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {quoted}.esframe_migrations (version, name) VALUES ($1, $2)"
        )))
        .bind(migration.version)
        .bind(migration.name)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for ok in ["esframe", "tenant_42", "_x", "A"] {
            assert!(SchemaName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "a\"b",
            "x;drop",
            "pg_catalog",
            &"a".repeat(64),
        ] {
            assert!(SchemaName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn migrations_are_ordered_and_end_at_the_schema_version() {
        assert!(
            MIGRATIONS
                .windows(2)
                .all(|w| w[0].version + 1 == w[1].version)
        );
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(SCHEMA_VERSION));
        assert!(MIGRATIONS.iter().all(|m| m.sql.contains("{schema}")));
    }
}
