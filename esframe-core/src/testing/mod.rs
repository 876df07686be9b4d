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

mod fixtures;
mod log;
pub mod projections;
pub mod publishing;
mod snapshots;
mod streams;
pub mod upcasting;
mod validation;

pub use log::*;
pub use snapshots::*;
pub use streams::*;
pub use validation::*;

/// Expands to one `#[tokio::test]` per conformance check; `$make_store` is an expression whose
/// value is a future of a fresh, empty store, evaluated once per test.
///
/// With no capability list it runs every check, for a store that implements
/// [`EventStore`](crate::EventStore), [`GlobalLog`](crate::GlobalLog) and
/// [`SnapshotStore`](crate::SnapshotStore). A store with fewer capabilities names the ones it
/// has: `conformance_suite!(make; streams, log)`. The input rules are checked with each
/// capability they concern (`streams`: events; `snapshots`: snapshots).
#[macro_export]
macro_rules! conformance_suite {
    ($make_store:expr) => {
        $crate::conformance_suite!($make_store; streams, log, snapshots);
    };
    ($make_store:expr; $($capability:ident),+ $(,)?) => {
        $( $crate::__conformance_capability!($capability, $make_store); )+
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_capability {
    (streams, $make_store:expr) => {
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
            reused_ids_are_reported_in_the_batch_order,
            partial_duplicate_batch_is_refused,
            read_stream_from_version,
            state_reads_match_full_reads,
            one_id_under_two_aggregate_types_is_two_streams,
            hostile_stream_ids_round_trip,
            concurrent_writers_one_stream_exactly_one_winner_per_version,
            concurrent_writers_one_stream_lose_nothing,
            oversized_appends_are_refused,
            numbers_out_of_range_are_refused,
            nul_characters_are_refused,
            invalid_names_are_refused,
            json_nested_too_deep_is_refused,
            values_at_the_limits_round_trip
        }
    };
    (log, $make_store:expr) => {
        $crate::__conformance_tests! {
            $make_store;
            read_all_is_globally_ordered_in_batches,
            envelope_fields_round_trip,
            concurrent_writers_many_streams,
            subscription_delivers_stored_then_live_events,
            subscriptions_reading_ahead_deliver_every_event_once,
            subscription_until_head_ends_after_the_stored_events,
            head_position_is_the_last_stored_event
        }
    };
    (snapshots, $make_store:expr) => {
        $crate::__conformance_tests! {
            $make_store;
            snapshots_keep_the_latest,
            append_with_snapshot_stores_both_or_neither,
            delete_snapshot_only_removes_that_version,
            invalid_snapshots_are_refused,
            snapshots_are_namespaced_by_aggregate_type,
            cold_loads_read_the_snapshot_and_the_events_from_its_version
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
            the_handler_applies_split_and_dropped_events,
            past_states_are_rebuilt_through_upcasters,
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

/// Expands to one `#[tokio::test]` per publisher check ([`publishing`]); `$make` is an
/// expression whose value is a future of a fresh `(store, checkpoints)`: an empty
/// [`GlobalLog`](crate::GlobalLog) and an empty checkpoint and lease store.
///
/// ```ignore
/// esframe_core::publisher_suite!(async { (MemoryStore::new(), MemoryCheckpoints::new()) });
/// ```
#[macro_export]
macro_rules! publisher_suite {
    ($make:expr) => {
        $crate::__publisher_tests! {
            $make;
            partitioned_publishers_share_the_partitions_and_send_every_event_once,
            changing_the_partition_count_resumes_from_the_lowest_checkpoint
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __publisher_tests {
    ($make:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let (store, checkpoints) = $make.await;
                $crate::testing::publishing::$check(store, checkpoints).await;
            }
        )*
    };
}

/// Expands to one `#[tokio::test]` per projection check ([`projections`]); `$make` is an
/// expression whose value is a future of a fresh `(store, checkpoints, recorder)`: an empty
/// [`GlobalLog`](crate::GlobalLog), an empty
/// [`ProjectionStore`](crate::projection::ProjectionStore) and a
/// [`Recorder`](projections::Recorder) writing through its transaction.
///
/// ```ignore
/// esframe_core::projection_suite!(async {
///     (MemoryStore::new(), MemoryCheckpoints::new(), esframe_core::testing::projections::MemoryRecorder::default())
/// });
/// ```
#[macro_export]
macro_rules! projection_suite {
    ($make:expr) => {
        $crate::__projection_tests! {
            $make;
            live_projection_applies_every_event_of_concurrent_writers_once,
            a_poison_event_is_retried_parked_and_retried_again_after_a_fix,
            a_dead_letter_with_nothing_left_to_handle_says_so,
            on_failure_stop_halts_before_the_event_and_a_restart_tries_it_again,
            a_failing_batch_commits_the_events_before_the_failure_and_goes_on_after_it,
            batches_read_ahead_apply_every_event_once_in_order,
            only_one_runner_processes_and_the_other_takes_over_when_it_dies,
            a_rebuild_reaches_the_live_read_model_and_reports_progress,
            a_newer_projection_version_resets_and_replays_and_an_older_one_is_refused,
            interest_skips_other_events_but_checkpoints_past_them,
            rebuilds_need_a_reset_and_waits_time_out_with_a_clear_error,
            an_invalid_projection_name_fails_at_once,
            a_catch_up_while_a_runner_holds_the_lease_is_refused,
            a_runner_rides_out_backend_failures_and_stops_on_refusals,
            an_interrupted_rebuild_goes_on_as_a_replay_and_drops_stale_dead_letters,
            a_panicking_handler_is_retried_and_parked_instead_of_killing_the_runner,
            dead_letters_belong_to_their_projection,
            partitions_keep_their_own_checkpoints_leases_and_dead_letters,
            the_partitions_of_the_log_hold_each_stream_whole_and_every_event_once,
            a_commit_with_a_stale_fencing_token_is_refused,
            the_partition_count_is_stored_and_a_change_needs_a_rebuild,
            partitioned_runners_share_the_partitions_and_apply_every_event_once
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __projection_tests {
    ($make:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let (store, checkpoints, recorder) = $make.await;
                $crate::testing::projections::$check(store, checkpoints, recorder).await;
            }
        )*
    };
}
