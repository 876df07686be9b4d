//! Partitions: the log split by stream, fenced leases, the stored count, partitioned runners
//! sharing the work.

use std::{collections::HashMap, time::Duration};

use crate::{
    GlobalLog, LogPartition, Position, RecordedEvent,
    projection::{
        Checkpoint, CheckpointCommit, CheckpointError, ProjectionError, ProjectionKey,
        ProjectionRunner, ProjectionStore,
    },
};

use super::{
    fixtures::{Tally, append, stored},
    recorder::Recorder,
};

/// Every event of one partition, read to the end in batches of `batch`.
async fn read_partition<S: GlobalLog>(
    store: &S,
    partition: LogPartition,
    batch: usize,
) -> Vec<RecordedEvent> {
    let (mut events, mut after) = (Vec::new(), Position::START);
    loop {
        let read = store
            .read_partition_batch(after, batch, partition)
            .await
            .expect("partition read");
        if read.scanned_to <= after && read.events.is_empty() {
            return events;
        }
        assert!(read.scanned_to >= after, "a read never goes back");
        after = read.scanned_to;
        events.extend(read.events);
    }
}

/// The partitions of a count are disjoint, hold every event together, keep each stream whole
/// in one partition, and return their events in log order, whatever the batch size.
pub async fn the_partitions_of_the_log_hold_each_stream_whole_and_every_event_once<S, C, R>(
    store: S,
    _checkpoints: C,
    _recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    for stream in 0..40 {
        append(&store, &format!("p-{stream}"), &[1, 2, 3]).await;
    }
    let all = stored(&store, 120).await;
    assert_eq!(all.len(), 120);
    for (count, batch) in [(2, 7), (3, 1000), (16, 5), (256, 2)] {
        let mut seen: Vec<RecordedEvent> = Vec::new();
        let mut owner: HashMap<String, u16> = HashMap::new();
        for index in 0..count {
            let partition = LogPartition::new(index, count).expect("partition");
            let events = read_partition(&store, partition, batch).await;
            assert!(
                events
                    .windows(2)
                    .all(|w| w[0].global_position < w[1].global_position),
                "partition {partition} in log order"
            );
            for event in &events {
                let previous = owner.insert(event.stream_id.to_string(), index);
                assert!(
                    previous.is_none_or(|p| p == index),
                    "stream {} split between partitions {previous:?} and {index} of {count}",
                    event.stream_id
                );
            }
            seen.extend(events);
        }
        seen.sort_by_key(|e| e.global_position);
        assert_eq!(
            seen.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            all.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            "{count} partitions hold every event once"
        );
        if count == 16 {
            let used = owner
                .values()
                .collect::<std::collections::HashSet<_>>()
                .len();
            assert!(used >= 8, "40 streams spread over {used} of 16 partitions");
        }
    }
}

/// A lease that changed hands fences the old holder: its commit is refused with
/// [`CheckpointError::Fenced`], and nothing of it is kept; the new holder's commits go through.
pub async fn a_commit_with_a_stale_fencing_token_is_refused<S, C, R>(
    _store: S,
    checkpoints: C,
    _recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let key = ProjectionKey::new("fenced", 3).expect("key");
    let at = |position| Checkpoint {
        position: Position::new(position),
        version: 1,
        replay_until: None,
    };
    let first = checkpoints
        .try_lease(&key)
        .await
        .expect("lease")
        .expect("free");
    let old_token = checkpoints.fence(&first);
    let tx = checkpoints.begin().await.expect("begin");
    checkpoints
        .commit(
            tx,
            CheckpointCommit::advance(&key, None, at(5)).fenced(old_token),
        )
        .await
        .expect("the holder commits");
    checkpoints.release(first).await;
    let second = checkpoints
        .try_lease(&key)
        .await
        .expect("lease")
        .expect("free again");
    let new_token = checkpoints.fence(&second);
    if let (Some(old), Some(new)) = (old_token, new_token) {
        assert!(new > old, "the token grows when the lease changes hands");
        let tx = checkpoints.begin().await.expect("begin");
        let err = checkpoints
            .commit(
                tx,
                CheckpointCommit::advance(&key, Some(at(5)), at(9)).fenced(old_token),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, CheckpointError::Fenced { token, .. } if token == old),
            "{err}"
        );
        assert!(err.to_string().contains("fenced#3"), "{err}");
    }
    assert_eq!(
        checkpoints
            .load(&key)
            .await
            .expect("load")
            .map(|c| c.position),
        Some(Position::new(5)),
        "the fenced commit changed nothing"
    );
    let tx = checkpoints.begin().await.expect("begin");
    checkpoints
        .commit(
            tx,
            CheckpointCommit::advance(&key, Some(at(5)), at(9)).fenced(new_token),
        )
        .await
        .expect("the new holder commits");
    checkpoints.release(second).await;
}

/// The partition count is stored with the projection: the first runner's count wins, a
/// projection that ran unsplit before is recorded as one partition, and a runner asking for
/// another count is refused with a typed error until a rebuild changes it.
pub async fn the_partition_count_is_stored_and_a_change_needs_a_rebuild<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    assert_eq!(checkpoints.partition_count("counted", 4).await.unwrap(), 4);
    assert_eq!(checkpoints.partition_count("counted", 8).await.unwrap(), 4);

    for stream in 0..12 {
        append(&store, &format!("c-{stream}"), &[stream, 1]).await;
    }
    let total: i64 = (0..12).map(|s| s + 1).sum();
    // Unsplit first: it is recorded as one partition.
    ProjectionRunner::new(
        store.clone(),
        checkpoints.clone(),
        Tally::new("regrown", &recorder),
    )
    .catch_up()
    .await
    .expect("unsplit catch-up");
    let split = ProjectionRunner::new(
        store.clone(),
        checkpoints.clone(),
        Tally::new("regrown", &recorder),
    )
    .partitions(4);
    let err = split.catch_up().await.unwrap_err();
    assert!(
        matches!(
            err,
            ProjectionError::PartitionCountChanged {
                stored: 1,
                requested: 4,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("rebuild"), "{err}");
    // The rebuild changes the count, resets once and replays every partition.
    let report = split.rebuild(Position::START).await.expect("rebuild");
    assert_eq!(report.events, 24);
    let recorded = recorder.recorded("regrown").await;
    assert_eq!(recorded.resets, 1);
    assert_eq!(
        recorded.applied.len(),
        24,
        "every event once after the reset"
    );
    assert_eq!(
        recorded.applied.iter().map(|a| a.amount).sum::<i64>(),
        total
    );
    assert_eq!(checkpoints.partition_count("regrown", 1).await.unwrap(), 4);
    for stream in 0..12 {
        assert_eq!(recorded.total(&format!("c-{stream}")), stream + 1);
    }
    // Now an unsplit runner is the one refused.
    let unsplit = ProjectionRunner::new(
        store.clone(),
        checkpoints.clone(),
        Tally::new("regrown", &recorder),
    );
    assert!(matches!(
        unsplit.catch_up().await,
        Err(ProjectionError::PartitionCountChanged {
            stored: 4,
            requested: 1,
            ..
        })
    ));
    // Out-of-range counts are typed errors.
    let zero = ProjectionRunner::new(
        store.clone(),
        checkpoints.clone(),
        Tally::new("zero", &recorder),
    )
    .partitions(0);
    assert!(matches!(
        zero.catch_up().await,
        Err(ProjectionError::InvalidPartitions(_))
    ));
}

/// Three runners of one projection split into 8 partitions share them without a leader: every
/// event is applied once, each stream's in order; when one runner stops, the others take its
/// partitions over; the status names a holder for every partition and no lag at the end.
pub async fn partitioned_runners_share_the_partitions_and_apply_every_event_once<S, C, R>(
    store: S,
    checkpoints: C,
    recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let runner = |member: &str| {
        ProjectionRunner::new(
            store.clone(),
            checkpoints.clone(),
            Tally::new("shared-split", &recorder),
        )
        .partitions(8)
        .batch_size(16)
        .standby_poll(Duration::from_millis(20))
        .rebalance_interval(Duration::from_millis(50))
        .member_name(member)
    };
    let running: Vec<_> = ["a", "b", "c"].iter().map(|m| runner(m).spawn()).collect();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    append(&store, &format!("s-{}", (w * 7 + i) % 24), &[1]).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let mut running = running.into_iter();
    running
        .next()
        .expect("runner a")
        .shutdown()
        .await
        .expect("a stops cleanly");
    for stream in 0..24 {
        append(&store, &format!("s-{stream}"), &[100]).await;
    }
    let all = stored(&store, 160 + 24).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let recorded = recorder.recorded("shared-split").await;
        let status = runner("observer").status().await.expect("status");
        if recorded.applied.len() >= all.len() && status.lag_events() == Some(0) {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "applied {} of {}; status {status:?}",
            recorded.applied.len(),
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.partitions.len(), 8);
    assert_eq!(
        status.unowned(),
        0,
        "b and c hold every partition: {status:?}"
    );
    for rest in running {
        rest.shutdown().await.expect("clean shutdown");
    }
    let recorded = recorder.recorded("shared-split").await;
    let mut ids: Vec<_> = recorded.ids();
    ids.sort();
    let mut expected: Vec<_> = all.iter().map(|e| e.event_id).collect();
    expected.sort();
    assert_eq!(ids, expected, "every event once");
    // Per stream, in version order: the recorder keeps application order.
    let mut order: HashMap<String, Vec<uuid::Uuid>> = HashMap::new();
    for applied in &recorded.applied {
        order
            .entry(applied.stream.clone())
            .or_default()
            .push(applied.event_id);
    }
    for (stream, applied) in order {
        let stored: Vec<_> = all
            .iter()
            .filter(|e| e.aggregate_id() == stream)
            .map(|e| e.event_id)
            .collect();
        assert_eq!(applied, stored, "stream {stream} in version order");
    }
}
