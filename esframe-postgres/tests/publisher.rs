//! Publishers on PostgreSQL: the shared publisher suite (partitioned publishers sharing the
//! partitions, a changed partition count), with fenced table leases, a short lease time and
//! partition reads of the log.

mod common;

esframe_core::publisher_suite!(async {
    let store = common::store("publisher_suite").await;
    let checkpoints = store
        .checkpoints()
        .lease_time(std::time::Duration::from_secs(2));
    (store, checkpoints)
});
