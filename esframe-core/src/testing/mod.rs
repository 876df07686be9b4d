//! The conformance suite: one set of tests every [`EventStore`](crate::EventStore) backend runs
//! unchanged (feature `testing`).
//!
//! A backend's test file calls [`conformance_suite!`](crate::conformance_suite) with an
//! expression that makes a fresh, empty store; it expands to one `#[tokio::test]` per check:
//!
//! ```ignore
//! esframe_core::conformance_suite!(async { esframe_memory::MemoryStore::new() });
//! ```
//!
//! The calling crate needs `tokio` (features `macros`, `rt-multi-thread`) as a dev-dependency.
//! Each check is also a public async function here, to run one on its own.

mod conformance;
pub mod upcasting;

pub use conformance::*;

/// Expands to one `#[tokio::test]` per conformance check; `$make_store` is an expression whose
/// value is a future of a fresh, empty store, evaluated once per test.
#[macro_export]
macro_rules! conformance_suite {
    ($make_store:expr) => {
        $crate::__conformance_tests! {
            $make_store;
            append_to_new_stream_starts_at_version_one,
            expected_version_any,
            expected_version_no_stream,
            expected_version_stream_exists,
            expected_version_exact,
            empty_append_checks_expected_version,
            multi_event_append_is_atomic,
            idempotent_append_returns_original_outcome,
            reused_event_id_with_other_content_is_refused,
            partial_duplicate_batch_is_refused,
            read_stream_from_version,
            read_all_is_globally_ordered_in_batches,
            envelope_fields_round_trip,
            hostile_stream_ids_round_trip,
            snapshots_keep_the_latest,
            append_with_snapshot_stores_both_or_neither,
            concurrent_writers_one_stream_exactly_one_winner_per_version,
            concurrent_writers_one_stream_lose_nothing,
            concurrent_writers_many_streams,
            subscription_delivers_stored_then_live_events
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($make_store:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let store = $make_store.await;
                $crate::testing::$check(store).await;
            }
        )*
    };
}

/// Expands to one `#[tokio::test]` per upcasting check; `$make_store` is a closure taking the
/// fixture [`Upcasters`](crate::Upcasters) and returning a future of a fresh store that applies
/// them, e.g. `|upcasters| async move { MemoryStore::with_upcasters(upcasters) }`.
#[macro_export]
macro_rules! upcasting_suite {
    ($make_store:expr) => {
        $crate::__upcasting_tests! {
            $make_store;
            old_events_are_read_at_their_current_version,
            failing_upcasters_are_typed_errors
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __upcasting_tests {
    ($make_store:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let make = $make_store;
                let store = make($crate::testing::upcasting::sample_upcasters()).await;
                $crate::testing::upcasting::$check(store).await;
            }
        )*
    };
}
