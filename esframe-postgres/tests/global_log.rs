//! The global log never skips an event that commits out of order, keeps each stream in version
//! order, and says who holds it back.

mod common;

use common::{connect, event, sid};

use std::time::Duration;

use esframe_core::{EventStore, ExpectedVersion, GlobalLog, Position, RecordedEvent, StoreError};
use esframe_postgres::PgEventStore;
use futures_util::StreamExt;
use serde_json::json;
use sqlx::Connection;

/// Reads the log after `after` until it holds `n` events (other tests' transactions may hold
/// the horizon for a moment), failing after 10 s.
async fn read_until(store: &PgEventStore, after: Position, n: usize) -> Vec<RecordedEvent> {
    for _ in 0..2000 {
        let events = store.read_all(after, 1000).await.unwrap();
        if events.len() >= n {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("fewer than {n} events readable after position {after} within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_late_with_an_earlier_transaction_is_never_skipped() {
    let store = common::store("late_commit").await;
    // A takes its transaction id first and holds its transaction open after inserting.
    let mut a = connect().await;
    let mut tx_a = a.begin().await.unwrap();
    let held = store
        .append_in(
            &mut tx_a,
            &sid("a"),
            ExpectedVersion::NoStream,
            vec![event(1)],
        )
        .await
        .unwrap();
    // B appends later and commits at once: its position is higher than A's.
    let committed = store
        .append(&sid("b"), ExpectedVersion::NoStream, vec![event(2)])
        .await
        .unwrap();
    assert!(committed.positions[0] > held.positions[0]);

    // While A is open a reader sees neither: delivering B now would let its checkpoint pass A.
    let mut sub = store.subscribe(Position::START);
    let early = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(
        early.is_err(),
        "nothing may be delivered while an older transaction is open"
    );
    assert!(
        store
            .read_all(Position::START, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        sub.position(),
        Position::START,
        "the checkpoint never passes the unseen event"
    );

    tx_a.commit().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.payload["n"].as_u64(), second.payload["n"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(first.global_position, held.positions[0]);
    assert_eq!(second.global_position, committed.positions[0]);
    let all = read_until(&store, Position::START, 2).await;
    assert_eq!(all.len(), 2, "each event exactly once");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err(),
        "no repeats"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_transaction_held_open_does_not_hide_earlier_commits() {
    let store = common::store("held_later").await;
    // B takes its id first, then A takes a later one and stays open; B commits.
    let mut b = connect().await;
    let mut tx_b = b.begin().await.unwrap();
    let early = store
        .append_in(
            &mut tx_b,
            &sid("b"),
            ExpectedVersion::NoStream,
            vec![event(1)],
        )
        .await
        .unwrap();
    let mut a = connect().await;
    let mut tx_a = a.begin().await.unwrap();
    let late = store
        .append_in(
            &mut tx_a,
            &sid("a"),
            ExpectedVersion::NoStream,
            vec![event(2)],
        )
        .await
        .unwrap();
    tx_b.commit().await.unwrap();
    assert!(early.positions[0] < late.positions[0]);

    let seen = read_until(&store, Position::START, 1).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].global_position, early.positions[0]);
    let checkpoint = seen[0].global_position;
    assert!(
        checkpoint < late.positions[0],
        "the checkpoint stays below the open transaction's event"
    );
    assert!(store.read_all(checkpoint, 100).await.unwrap().is_empty());

    tx_a.commit().await.unwrap();
    let rest = read_until(&store, checkpoint, 1).await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].global_position, late.positions[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_appends_leave_no_trace() {
    let store = common::store("rollback").await;
    let mut conn = connect().await;
    let mut tx = conn.begin().await.unwrap();
    store
        .append_in(
            &mut tx,
            &sid("r"),
            ExpectedVersion::NoStream,
            vec![event(1)],
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    store
        .append(&sid("r"), ExpectedVersion::NoStream, vec![event(2)])
        .await
        .unwrap();
    let all = read_until(&store, Position::START, 1).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].payload["n"], json!(2));
    assert_eq!(all[0].stream_version, 1);
}

#[tokio::test]
async fn an_append_must_be_the_first_write_of_its_transaction() {
    let store = common::store("first_write").await;
    let mut conn = connect().await;
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("CREATE TEMP TABLE scratch (x int)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO scratch VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = store
        .append_in(&mut tx, &sid("late"), ExpectedVersion::Any, vec![event(1)])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::AppendNotFirstWrite { stream } if stream.id() == "late"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("first write of its transaction"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_any_appends_to_one_stream_keep_version_order_in_the_global_log() {
    let store = common::store("any_order").await;
    let writers = 16u64;
    let per_writer = 10u64;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..per_writer {
                    store
                        .append(
                            &sid("shared"),
                            ExpectedVersion::Any,
                            vec![event(w * 100 + i), event(w * 100 + i)],
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let total = (writers * per_writer * 2) as usize;
    let all = read_until(&store, Position::START, total).await;
    assert_eq!(all.len(), total);
    let versions: Vec<u64> = all.iter().map(|e| e.stream_version).collect();
    assert_eq!(
        versions,
        (1..=total as u64).collect::<Vec<_>>(),
        "global order follows version order"
    );
    assert!(
        all.windows(2)
            .all(|w| w[0].global_position < w[1].global_position)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn horizon_status_names_the_transaction_holding_the_log() {
    let store = common::store("stall").await;
    let mut holder = connect().await;
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    let mut tx = holder.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx)
        .await
        .unwrap();
    store
        .append(&sid("s"), ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();

    let status = store.horizon_status().await.unwrap();
    assert!(status.blocked, "{status:?}");
    assert!(status.head.unwrap() >= status.horizon);
    let held_by = status.holder.expect("a holder is named");
    // Other tests may hold older transactions; the holder is the oldest running one.
    if held_by.pid == Some(holder_pid) {
        assert_eq!(held_by.state.as_deref(), Some("idle in transaction"));
        assert!(held_by.since.is_some());
    }
    tx.commit().await.unwrap();
    for _ in 0..2000 {
        if !store.horizon_status().await.unwrap().blocked {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the log stayed blocked after the holder committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_subscriptions_of_another_process_long_before_the_poll_interval() {
    // Two stores with their own pools stand for two processes: only PostgreSQL's NOTIFY can
    // carry the wake-up from the writer to the reader.
    let pool = common::pool(5).await;
    let schema = common::fresh_schema(&pool, "notify").await;
    let open = |pool| {
        let schema = schema.clone();
        async move {
            PgEventStore::builder(pool)
                .schema(schema)
                .unwrap()
                .poll_interval(Duration::from_secs(60))
                .build()
                .await
                .unwrap()
        }
    };
    let reader_store = open(pool).await;
    let writer_store = open(common::pool(5).await).await;
    let mut sub = reader_store.subscribe(Position::START);
    let reader = tokio::spawn(async move { sub.next().await.unwrap().unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer_store
        .append(&sid("n"), ExpectedVersion::Any, vec![event(7)])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("woken by NOTIFY, not the 60 s poll")
        .unwrap();
    assert_eq!(got.payload["n"], json!(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notify_polling_still_delivers_to_another_process() {
    // Separate stores (pools) stand for separate processes; with NOTIFY off only polling can
    // tell the reader about the writer's event.
    let pool = common::pool(5).await;
    let schema = common::fresh_schema(&pool, "poll").await;
    let open = |pool| {
        let schema = schema.clone();
        async move {
            PgEventStore::builder(pool)
                .schema(schema)
                .unwrap()
                .notify(false)
                .poll_interval(Duration::from_millis(50))
                .build()
                .await
                .unwrap()
        }
    };
    let reader_store = open(pool).await;
    let writer_store = open(common::pool(5).await).await;
    let mut sub = reader_store.subscribe(Position::START);
    let reader = tokio::spawn(async move { sub.next().await.unwrap().unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    writer_store
        .append(&sid("p"), ExpectedVersion::Any, vec![event(8)])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("found by polling")
        .unwrap();
    assert_eq!(got.payload["n"], json!(8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_sent_only_while_another_store_listens() {
    // A raw LISTEN that does not announce itself hears nothing: nobody esframe knows of listens,
    // so the writer sends no NOTIFY. Once another store subscribes (and so announces its LISTEN
    // connection), the writer notifies, and the raw listener hears it too.
    let pool = common::pool(5).await;
    let schema = common::fresh_schema(&pool, "notify_only").await;
    let writer = PgEventStore::builder(pool.clone())
        .schema(schema.clone())
        .unwrap()
        .build()
        .await
        .unwrap();
    let channel = format!("esframe_{}", schema.to_ascii_lowercase());
    let mut raw = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    raw.listen(&channel).await.unwrap();
    for n in 0..5 {
        writer
            .append(&sid("quiet"), ExpectedVersion::Any, vec![event(n)])
            .await
            .unwrap();
    }
    let heard = tokio::time::timeout(Duration::from_millis(600), raw.recv()).await;
    assert!(heard.is_err(), "a NOTIFY was sent with no store listening");

    let reader = PgEventStore::builder(common::pool(5).await)
        .schema(schema.clone())
        .unwrap()
        .poll_interval(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let head = writer.head_position().await.unwrap();
    let mut sub = reader.subscribe(head);
    let next = tokio::spawn(async move { sub.next().await.unwrap().unwrap() });
    // The reader announces its LISTEN connection; the writer looks again within 250 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    writer
        .append(&sid("quiet"), ExpectedVersion::Any, vec![event(9)])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), next)
        .await
        .expect("woken by NOTIFY, not the 60 s poll")
        .unwrap();
    assert_eq!(got.payload["n"], json!(9));
    tokio::time::timeout(Duration::from_secs(5), raw.recv())
        .await
        .expect("the raw listener hears the NOTIFY now")
        .unwrap();
}

/// A subscription reading ahead holds no connection while its consumer handles an event: with
/// a pool of one connection, a consumer that appends for every event it gets never waits for
/// the subscription, whose read ahead runs to its end on a task of its own. (It used to hold
/// the connection until the subscription was polled again: the consumer's append timed out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_reading_ahead_leaves_a_one_connection_pool_to_its_consumer() {
    let pool = PgEventStore::pool_options()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(&common::database_url())
        .await
        .expect("PostgreSQL at DATABASE_URL");
    let schema = common::fresh_schema(&pool, "one_conn").await;
    // No NOTIFY: the notifier keeps a connection of its own.
    let store = PgEventStore::builder(pool)
        .schema(schema)
        .unwrap()
        .notify(false)
        .build()
        .await
        .unwrap();
    let events: Vec<_> = (1..=12).map(common::event).collect();
    store
        .append(&common::sid("source"), ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    // Wait until the events are readable, so that the subscription never has to wait for them
    // (waiting opens a LISTEN connection): other tests' open transactions hold the log back.
    while store.read_all(Position::START, 100).await.unwrap().len() < 12 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut subscription = store.subscribe(Position::START).batch_size(4).until_head();
    let mut handled = 0;
    while let Some(event) = subscription.next().await {
        let event = event.expect("the subscription reads");
        store
            .append(
                &common::sid(&format!("sink-{handled}")),
                ExpectedVersion::NoStream,
                vec![common::event(event.stream_version)],
            )
            .await
            .expect("the consumer gets the connection while the subscription reads ahead");
        handled += 1;
    }
    assert_eq!(handled, 12, "every stored event handled once");
}

/// A pool whose connections carry `application_name = app`, so that the test can tell when
/// they have all gone (and with them flushed their table statistics).
async fn named_pool(app: &str, max_connections: u32) -> sqlx::PgPool {
    let options =
        <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&common::database_url())
            .expect("DATABASE_URL parses")
            .application_name(app);
    PgEventStore::pool_options()
        .max_connections(max_connections)
        .connect_with(options)
        .await
        .expect("PostgreSQL at DATABASE_URL")
}

/// A store on `schema` over a [`named_pool`] of `app`, without `NOTIFY`; the pool too.
async fn named_store(
    app: &str,
    max_connections: u32,
    schema: &str,
) -> (PgEventStore, sqlx::PgPool) {
    let pool = named_pool(app, max_connections).await;
    let store = PgEventStore::builder(pool.clone())
        .schema(schema)
        .unwrap()
        .notify(false)
        .build()
        .await
        .unwrap();
    (store, pool)
}

/// Closes `pool` and waits until the server has no backend of `app` left: a backend writes its
/// table statistics out before it leaves `pg_stat_activity`.
async fn close_and_flush(pool: sqlx::PgPool, app: &str, observer: &sqlx::PgPool) {
    pool.close().await;
    for _ in 0..500 {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
                .bind(app)
                .fetch_one(observer)
                .await
                .unwrap();
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the backends of {app} did not end within 5 s");
}

/// Rows the server has read from `schema`'s events table so far, by index or sequential scans.
async fn rows_read(observer: &sqlx::PgPool, schema: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(idx_tup_fetch, 0) + coalesce(seq_tup_read, 0) FROM pg_stat_user_tables
         WHERE schemaname = $1 AND relname = 'events'",
    )
    .bind(schema)
    .fetch_one(observer)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_a_partition_reads_each_event_once_from_a_fresh_connection() {
    // A fresh connection's first reads are planned for their parameters (custom plans). With
    // the horizon inside each bucket's scan, the planner guessed a handful of rows per bucket
    // of several hundred and chose a bitmap scan and a sort of every row after the checkpoint:
    // a catch-up read the rest of its partition on every batch (six rows per event here).
    // Reads must touch what they return, plus at most one row per bucket. Streams of 100
    // events, 625 per bucket, as in the scale-out benchmark.
    let app = format!("esframe_rows_{}", std::process::id());
    let observer = common::pool(2).await;
    let schema = common::fresh_schema(&observer, "partition_rows").await;
    let (writer, writer_pool) = named_store(&app, 8, &schema).await;
    let (streams, per_stream) = (1600u64, 100u64);
    futures_util::stream::iter(0..streams)
        .for_each_concurrent(8, |s| {
            let events = (1..=per_stream).map(event).collect();
            let writer = writer.clone();
            async move {
                writer
                    .append(&sid(&format!("s{s}")), ExpectedVersion::NoStream, events)
                    .await
                    .unwrap();
            }
        })
        .await;
    let total = (streams * per_stream) as usize;
    // Other tests' open transactions may hold the horizon back for a moment.
    let (mut readable, mut after) = (0, Position::START);
    while readable < total {
        let batch = writer.read_all_batch(after, 10_000).await.unwrap();
        if batch.events.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        readable += batch.events.len();
        after = batch.scanned_to;
    }
    drop(writer);
    close_and_flush(writer_pool, &app, &observer).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE \"{schema}\".events")))
        .execute(&observer)
        .await
        .unwrap();

    let before = rows_read(&observer, &schema).await;
    let (reader, reader_pool) = named_store(&app, 1, &schema).await;
    let partition = esframe_core::LogPartition::new(0, 16).unwrap();
    let (mut from, mut delivered, mut reads) = (Position::START, 0usize, 0usize);
    loop {
        let batch = reader
            .read_partition_batch(from, 100, partition)
            .await
            .unwrap();
        reads += 1;
        if batch.events.is_empty() {
            break;
        }
        delivered += batch.events.len();
        from = batch.scanned_to;
    }
    drop(reader);
    close_and_flush(reader_pool, &app, &observer).await;
    let read = rows_read(&observer, &schema).await - before;
    eprintln!("{reads} reads of {delivered} events read {read} rows");

    let buckets = (esframe_core::PARTITION_BUCKETS / 16) as usize;
    assert!(
        delivered > total / 32 && delivered < total / 8,
        "partition 0 of 16 holds about a sixteenth of {total} events, got {delivered}"
    );
    assert!(
        read as usize <= delivered + buckets * reads,
        "{reads} reads of {delivered} events read {read} rows: more than one per event and \
         one per bucket ({buckets}) and read"
    );
}
