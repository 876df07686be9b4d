//! The esframe book, compiled.
//!
//! The book in `src/` is built by mdBook (`mdbook build docs`). This crate only makes
//! `cargo test` compile and run every Rust code block of every chapter as a doctest, so a chapter
//! whose code stops compiling fails the workspace's tests. Blocks marked `no_run` (they need
//! PostgreSQL) are compiled but not run; blocks marked `ignore` show code included from files that
//! are compiled elsewhere (`{{#include ...}}`).

/// One module per chapter; only `cargo test` (rustdoc's doctest pass) sees them.
macro_rules! chapters {
    ($($module:ident => $path:literal,)*) => {
        $(
            #[cfg(doctest)]
            #[doc = include_str!($path)]
            pub mod $module {}
        )*
    };
}

chapters! {
    introduction => "src/introduction.md",
    quick_start => "src/quick-start.md",
    concepts_events => "src/concepts/events.md",
    concepts_commands => "src/concepts/commands.md",
    concepts_aggregates => "src/concepts/aggregates.md",
    concepts_stores => "src/concepts/stores.md",
    concepts_concurrency => "src/concepts/concurrency.md",
    concepts_idempotency => "src/concepts/idempotency.md",
    concepts_snapshots => "src/concepts/snapshots.md",
    concepts_versioning => "src/concepts/versioning.md",
    concepts_projections => "src/concepts/projections.md",
    concepts_scale_out => "src/concepts/scale-out.md",
    concepts_publishing => "src/concepts/publishing.md",
    concepts_process_managers => "src/concepts/process-managers.md",
    concepts_global_log => "src/concepts/global-log.md",
    concepts_testing => "src/concepts/testing.md",
    guides_bank_account => "src/guides/bank-account.md",
    guides_http_service => "src/guides/http-service.md",
    guides_publishing_example => "src/guides/publishing-example.md",
    guides_postgres => "src/guides/postgres.md",
    guides_store_backend => "src/guides/store-backend.md",
    reference_errors => "src/reference/errors.md",
    reference_configuration => "src/reference/configuration.md",
    reference_benchmarks => "src/reference/benchmarks.md",
    comparison => "src/comparison.md",
}
