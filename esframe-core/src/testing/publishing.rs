//! The publisher suite: checks of partitioned publishers on a log and a checkpoint backend
//! (checkpoints, fenced leases, members, partition counts), run with
//! [`publisher_suite!`](crate::publisher_suite) by every backend unchanged. The broker is a
//! [`MemorySink`] that keeps every message, duplicates included, so the checks see resends.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    time::{Duration, Instant},
};

use serde_json::json;
use uuid::Uuid;

use crate::{
    EventMetadata, EventStore, ExpectedVersion, GlobalLog, LogPartition, NewEvent, Position,
    RecordedEvent, StreamId,
    projection::{CheckpointStore, LeaseStore, ProjectionKey},
    publish::{Backoff, Fault, MemorySink, OutgoingMessage, PublishError, Publisher},
};

fn stream(id: &str) -> StreamId {
    StreamId::new("account", id).expect("a valid stream id")
}

fn deposit(n: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Deposited".into(),
        schema_version: 1,
        payload: json!({ "n": n }),
        metadata: EventMetadata::default(),
    }
}

fn quick() -> Backoff {
    Backoff {
        min: Duration::from_millis(1),
        max: Duration::from_millis(20),
    }
}

/// Appends one event at a time to `streams` streams named `{prefix}-{i}`, `per_stream` each,
/// from `writers` concurrent tasks (each its own streams).
async fn write<S: EventStore>(
    store: &S,
    prefix: &str,
    writers: usize,
    streams: usize,
    per_stream: u64,
) {
    let tasks = (0..writers).map(|w| {
        let store = store.clone();
        let prefix = prefix.to_owned();
        tokio::spawn(async move {
            for n in 1..=per_stream {
                for s in (w..streams).step_by(writers) {
                    store
                        .append(
                            &stream(&format!("{prefix}-{s}")),
                            ExpectedVersion::Any,
                            vec![deposit(n)],
                        )
                        .await
                        .expect("append");
                }
            }
        })
    });
    for task in tasks.collect::<Vec<_>>() {
        task.await.expect("writer");
    }
}

/// The log, once all `expected` events are readable (the never-skip horizon of a shared
/// database can trail the last commits a moment).
async fn every_event<S: GlobalLog>(store: &S, expected: usize) -> Vec<RecordedEvent> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = store
            .read_all(Position::START, usize::MAX)
            .await
            .expect("read the log");
        if events.len() >= expected || Instant::now() >= deadline {
            assert_eq!(events.len(), expected, "the log holds what was written");
            return events;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits up to 30 s for `done`, failing with `what` when it does not come.
async fn eventually<F: Future<Output = bool>>(what: impl Fn() -> String, done: impl Fn() -> F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether the sink holds a message of every event.
fn holds_all(sink: &MemorySink, events: &[RecordedEvent]) -> bool {
    let sent: HashSet<Uuid> = sink.messages().iter().map(|m| m.id).collect();
    events.iter().all(|e| sent.contains(&e.event_id))
}

/// Each stream's versions, in the order the sink stored them.
fn versions_per_stream(messages: &[OutgoingMessage]) -> HashMap<StreamId, Vec<u64>> {
    let mut seen: HashMap<StreamId, Vec<u64>> = HashMap::new();
    for m in messages {
        seen.entry(m.stream_id.clone())
            .or_default()
            .push(m.stream_version);
    }
    seen
}

/// Every partition's checkpoint is at or after its last event (the store says which events
/// are in which partition: backends hash streams their own way).
async fn checkpoints_cover<S: GlobalLog, C: CheckpointStore>(
    store: &S,
    checkpoints: &C,
    name: &str,
    count: u16,
) {
    for index in 0..count {
        let partition = LogPartition::new(index, count).expect("partition");
        let key = ProjectionKey::new(name, index).expect("key");
        let at = checkpoints
            .load(&key)
            .await
            .expect("load the checkpoint")
            .map_or(Position::START, |c| c.position);
        let (mut last, mut after) = (None, Position::START);
        loop {
            let read = store
                .read_partition_batch(after, 100, partition)
                .await
                .expect("read the partition");
            if read.scanned_to <= after && read.events.is_empty() {
                break;
            }
            after = read.scanned_to;
            last = read.events.last().map(|e| e.global_position).or(last);
        }
        if let Some(last) = last {
            assert!(
                at >= last,
                "partition {index} of {count} checkpointed at {at}, before its last event at {last}"
            );
        }
    }
}

/// Three runners of a publisher split in 8 partitions, started together while 4 writers
/// append, share the partitions (at most `ceil(8 / 3)` each, all 8 held); one stops and the
/// other two take its share. Every event reaches the sink exactly once (hand-overs happen at
/// a batch boundary, after the messages in flight are acknowledged), each stream's in
/// version order, and every partition's checkpoint covers its events.
pub async fn partitioned_publishers_share_the_partitions_and_send_every_event_once<S, C>(
    store: S,
    checkpoints: C,
) where
    S: GlobalLog,
    C: CheckpointStore + LeaseStore,
{
    const NAME: &str = "partitioned_out";
    const COUNT: u16 = 8;
    let sink = MemorySink::new();
    let start = |member: &str| {
        Publisher::new(
            store.clone(),
            checkpoints.clone(),
            sink.clone(),
            NAME,
            &format!("/suite/{member}"),
        )
        .expect("a valid publisher")
        .partitions(COUNT)
        .member_name(member)
        .rebalance_interval(Duration::from_millis(20))
        .batch_size(5)
        .backoff(quick())
        .spawn()
    };
    let mut runners: Vec<_> = ["a", "b", "c"].into_iter().map(start).collect();
    write(&store, "pp", 4, 24, 10).await;
    let events = every_event(&store, 240).await;
    eventually(
        || {
            format!(
                "not every event was sent: {} messages",
                sink.messages().len()
            )
        },
        || async { holds_all(&sink, &events) },
    )
    .await;
    let shares = |runners: &[crate::publish::RunningPublisher]| {
        runners
            .iter()
            .map(|r| r.status().partitions.len())
            .collect::<Vec<_>>()
    };
    eventually(
        || {
            format!(
                "3 runners did not settle on fair shares of 8: {:?}",
                shares(&runners)
            )
        },
        || async {
            let held = shares(&runners);
            held.iter().sum::<usize>() == 8 && held.iter().all(|&n| (1..=3).contains(&n))
        },
    )
    .await;

    let leaving = runners.pop().expect("runner c");
    let left = leaving.status();
    leaving.shutdown().await;
    write(&store, "pq", 2, 8, 10).await;
    let events = every_event(&store, 320).await;
    eventually(
        || {
            format!(
                "events after a runner left were not sent: {} messages",
                sink.messages().len()
            )
        },
        || async { holds_all(&sink, &events) },
    )
    .await;
    eventually(
        || {
            format!(
                "2 runners did not take the share of the one that left: {:?}",
                shares(&runners)
            )
        },
        || async {
            let held = shares(&runners);
            held.iter().sum::<usize>() == 8 && held.iter().all(|&n| n == 4)
        },
    )
    .await;
    let statuses: Vec<_> = runners.iter().map(|r| r.status()).collect();
    for runner in runners {
        runner.shutdown().await;
    }

    let messages = sink.messages();
    let mut ids = HashSet::new();
    let twice: Vec<(&StreamId, u64, Position, Vec<&str>)> = messages
        .iter()
        .filter(|m| !ids.insert(m.id))
        .map(|m| {
            let senders = messages
                .iter()
                .filter(|o| o.id == m.id)
                .map(|o| o.event.source.as_str())
                .collect();
            (&m.stream_id, m.stream_version, m.position, senders)
        })
        .collect();
    assert_eq!(
        (ids.len(), messages.len()),
        (events.len(), events.len()),
        "every event exactly once; sent twice (by): {twice:?}; the runners: {statuses:?}; the one that left: {left:?}"
    );
    for (stream, versions) in versions_per_stream(&messages) {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, expected, "stream {stream} out of order");
    }
    checkpoints_cover(&store, &checkpoints, NAME, COUNT).await;
    let status = Publisher::new(store.clone(), checkpoints.clone(), sink, NAME, "/suite")
        .expect("a valid publisher")
        .partitions(COUNT)
        .partition_status()
        .await
        .expect("the partitions' status");
    assert_eq!(status.partitions.len(), usize::from(COUNT));
    assert_eq!(
        status.lag_events(),
        Some(0),
        "every partition caught up: {status:?}"
    );
    assert_eq!(
        status.unowned(),
        usize::from(COUNT),
        "the runners left: {status:?}"
    );
}

/// Changing a publisher's number of partitions skips nothing: with one partition of four
/// left behind by a refused message, the publisher in two partitions starts both from that
/// lowest checkpoint and sends every event after it (again, with the same message ids, where
/// it was sent before), each stream's first sendings in version order; a runner with the old
/// count holding a lease makes the change wait.
pub async fn changing_the_partition_count_resumes_from_the_lowest_checkpoint<S, C>(
    store: S,
    checkpoints: C,
) where
    S: GlobalLog,
    C: CheckpointStore + LeaseStore,
{
    const NAME: &str = "repartitioned_out";
    let sink = MemorySink::new();
    let publisher = |count: u16| {
        Publisher::new(
            store.clone(),
            checkpoints.clone(),
            sink.clone(),
            NAME,
            "/suite",
        )
        .expect("a valid publisher")
        .partitions(count)
        .batch_size(4)
        .backoff(quick())
    };
    write(&store, "rp", 2, 12, 3).await;
    let first = every_event(&store, 36).await;
    let reached = publisher(1).catch_up().await.expect("unsplit catch-up");
    assert_eq!(reached, first.last().expect("events").global_position);
    assert_eq!(sink.messages().len(), first.len());

    // Into four partitions: they start after everything sent.
    write(&store, "rq", 2, 12, 3).await;
    let second = every_event(&store, 72).await;
    publisher(4).catch_up().await.expect("catch-up in four");
    assert_eq!(
        sink.messages().len(),
        second.len(),
        "going from 1 to 4 partitions sent nothing twice"
    );

    // One partition is held back by a refusal; the others go on.
    write(&store, "rr", 2, 12, 3).await;
    let third = every_event(&store, 108).await;
    let before = sink.messages().len();
    sink.inject([Some(Fault::Refuse)]);
    let refused = publisher(4).catch_up().await;
    assert!(
        matches!(refused, Err(PublishError::Refused { .. })),
        "the injected refusal fails the catch-up: {refused:?}"
    );
    let mut lowest = Position::MAX;
    for index in 0..4 {
        let key = ProjectionKey::new(NAME, index).expect("key");
        let at = checkpoints
            .load(&key)
            .await
            .expect("load")
            .map_or(Position::START, |c| c.position);
        lowest = lowest.min(at);
    }
    assert!(
        lowest < third.last().expect("events").global_position,
        "a partition stayed behind the refusal"
    );

    // A runner of the old count holding a partition makes the change wait.
    let held = checkpoints
        .try_lease(&ProjectionKey::new(NAME, 3).expect("key"))
        .await
        .expect("lease")
        .expect("free");
    let busy = publisher(2).catch_up().await;
    assert!(
        matches!(busy, Err(PublishError::LeaseHeld { .. })),
        "a held partition of the old count blocks the change: {busy:?}"
    );
    checkpoints.release(held).await;

    publisher(2).catch_up().await.expect("catch-up in two");
    let messages = sink.messages();
    let sent: HashSet<Uuid> = messages.iter().map(|m| m.id).collect();
    assert!(
        third.iter().all(|e| sent.contains(&e.event_id)),
        "nothing is skipped across the change"
    );
    let resent: Vec<&OutgoingMessage> = messages[before..]
        .iter()
        .filter(|m| m.position <= lowest)
        .collect();
    assert!(
        resent.is_empty(),
        "nothing at or before the lowest checkpoint is sent again: {resent:?}"
    );
    // Each stream's first sendings stay in version order.
    let mut first_seen: Vec<OutgoingMessage> = Vec::new();
    let mut ids = HashSet::new();
    for m in &messages {
        if ids.insert(m.id) {
            first_seen.push(m.clone());
        }
    }
    for (stream, versions) in versions_per_stream(&first_seen) {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, expected, "stream {stream} out of order");
    }
    checkpoints_cover(&store, &checkpoints, NAME, 2).await;
    let stored_count = checkpoints
        .partition_count(NAME, 9)
        .await
        .expect("the stored count");
    assert_eq!(stored_count, 2);
}
