//! JetStream publishing, measured against the servers at `NATS_URL` and `DATABASE_URL`:
//!
//! 1. Throughput: events per second from the PostgreSQL log to JetStream, acknowledged, through
//!    the `Publisher` (read the log, one message per stream in flight, checkpoint), against a
//!    bare async-nats loop publishing the same messages (same subjects, headers and bodies)
//!    with the same number of acknowledgements in flight. Median of paired rounds, range, ratio.
//! 2. End-to-end latency at a steady rate (~1,000 events/s): from the start of the append to
//!    the commit of the consumer's inbox transaction (`JetStreamInbox::on_applied`), p50/p99.
//!
//! `cargo bench -p esframe-nats` runs in about a minute; `ESFRAME_BENCH_QUICK=1` is a smoke run
//! of a few seconds.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use common::{TestStream, event, sid};
use esframe_core::{
    EventStore, ExpectedVersion, GlobalLog, Position,
    projection::HandlerError,
    publish::{CloudEvent, DEFAULT_STREAMS_IN_FLIGHT, IncomingEvent, OutgoingMessage, Publisher},
};
use esframe_nats::{JetStreamInbox, JetStreamSink, headers};
use esframe_postgres::{InboxHandler, PgEventStore, PgInbox, PgTransaction};
use futures_util::{StreamExt, stream::FuturesUnordered};
use uuid::Uuid;

struct Settings {
    events: usize,
    streams: usize,
    rounds: usize,
    rate: u64,
    latency_for: Duration,
}

fn settings() -> Settings {
    if std::env::var("ESFRAME_BENCH_QUICK").is_ok_and(|v| v == "1") {
        Settings {
            events: 500,
            streams: 100,
            rounds: 5,
            rate: 500,
            latency_for: Duration::from_secs(2),
        }
    } else {
        Settings {
            events: 10_000,
            streams: 100,
            rounds: 7,
            rate: 1_000,
            latency_for: Duration::from_secs(15),
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    let settings = settings();
    let js = jetstream::new(common::nats().await);
    let (store, schema) = common::store("bench_nats").await;
    let started = Instant::now();
    throughput(&settings, &js, &store).await;
    latency(&settings, &js, &store).await;
    common::drop_schema(store.pool(), &schema).await;
    println!("\n(total {:.1} s)", started.elapsed().as_secs_f64());
}

async fn throughput(settings: &Settings, js: &jetstream::Context, store: &PgEventStore) {
    let per_stream = settings.events / settings.streams;
    for round in 0..per_stream.div_ceil(10) {
        for s in 0..settings.streams {
            let events = (0..10.min(per_stream - round * 10))
                .map(|i| event((round * 10 + i) as u64))
                .collect();
            store
                .append(&sid(&format!("t{s}")), ExpectedVersion::Any, events)
                .await
                .expect("append");
        }
    }
    // The never-skip log holds events back while an older transaction anywhere in the cluster
    // is open: wait until all are readable.
    let expected = per_stream * settings.streams;
    let recorded = loop {
        let recorded = store
            .read_all(Position::START, usize::MAX)
            .await
            .expect("read the log");
        if recorded.len() >= expected {
            break recorded;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let window = DEFAULT_STREAMS_IN_FLIGHT;
    println!(
        "throughput: {} events over {} streams, PostgreSQL log -> JetStream (file storage), acknowledged; \
         {window} in flight; {} paired rounds",
        recorded.len(),
        settings.streams,
        settings.rounds
    );
    let mut publisher_rates = Vec::new();
    let mut bare_rates = Vec::new();
    let mut ratios = Vec::new();
    for round in 0..settings.rounds {
        let (p, b) = if round % 2 == 0 {
            let p = through_publisher(js, store, round).await;
            (p, bare(js, &recorded, window).await)
        } else {
            let b = bare(js, &recorded, window).await;
            (through_publisher(js, store, round).await, b)
        };
        let (p, b) = (recorded.len() as f64 / p, recorded.len() as f64 / b);
        println!(
            "  round {}: publisher {p:>8.0} events/s, bare async-nats {b:>8.0} events/s",
            round + 1
        );
        publisher_rates.push(p);
        bare_rates.push(b);
        ratios.push(p / b);
    }
    let show = |name: &str, rates: &mut Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        println!(
            "  {name:<16} median {:>8.0} events/s  (range {:.0} to {:.0})",
            median(rates),
            rates[0],
            rates[rates.len() - 1]
        );
    };
    show("Publisher", &mut publisher_rates);
    show("bare async-nats", &mut bare_rates);
    ratios.sort_by(f64::total_cmp);
    println!(
        "  ratio publisher/bare: median {:.2} (range {:.2} to {:.2})",
        median(&ratios),
        ratios[0],
        ratios[ratios.len() - 1]
    );
}

/// Seconds for a publisher of a new name (so from the start of the log) to catch up.
async fn through_publisher(js: &jetstream::Context, store: &PgEventStore, round: usize) -> f64 {
    let stream = TestStream::create(js, None).await;
    let publisher = Publisher::new(
        store.clone(),
        store.checkpoints(),
        JetStreamSink::new(js.clone()),
        &format!("bench_{round}_{}", Uuid::now_v7().simple()),
        "/bench",
    )
    .expect("a publisher")
    .subject_prefix(stream.prefix.clone());
    let started = Instant::now();
    publisher.catch_up().await.expect("publish");
    let elapsed = started.elapsed().as_secs_f64();
    stream.delete().await;
    elapsed
}

/// Seconds for a bare loop to publish the same messages, `window` acknowledgements in flight.
async fn bare(
    js: &jetstream::Context,
    events: &[esframe_core::RecordedEvent],
    window: usize,
) -> f64 {
    let stream = TestStream::create(js, None).await;
    let messages: Vec<(String, async_nats::HeaderMap, String)> = events
        .iter()
        .map(|e| {
            let message = OutgoingMessage {
                id: e.event_id,
                subject: esframe_core::publish::subject_for(&stream.prefix, e),
                stream_id: e.stream_id.clone(),
                stream_version: e.stream_version,
                position: e.global_position,
                event: CloudEvent::from_event(e, e.event_id, "/bench"),
            };
            let headers = headers::outgoing(&message).expect("headers");
            (message.subject, headers, message.event.data)
        })
        .collect();
    let started = Instant::now();
    let mut in_flight: FuturesUnordered<<PublishAckFuture as IntoFuture>::IntoFuture> =
        FuturesUnordered::new();
    for (subject, headers, body) in messages {
        if in_flight.len() >= window {
            in_flight
                .next()
                .await
                .expect("an ack")
                .expect("acknowledged");
        }
        let ack = js
            .send_publish(
                subject,
                PublishMessage::build()
                    .headers(headers)
                    .payload(body.into()),
            )
            .await
            .expect("publish");
        in_flight.push(ack.into_future());
    }
    while let Some(ack) = in_flight.next().await {
        ack.expect("acknowledged");
    }
    let elapsed = started.elapsed().as_secs_f64();
    stream.delete().await;
    elapsed
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The consumer's effect: one row per event, in the inbox's transaction.
struct Ledger {
    schema: String,
}

impl InboxHandler for Ledger {
    async fn handle(
        &self,
        tx: &mut PgTransaction,
        event: &IncomingEvent,
    ) -> Result<(), HandlerError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO \"{}\".ledger (event_id) VALUES ($1)",
            self.schema
        )))
        .bind(event.message_id)
        .execute(tx.as_mut())
        .await?;
        Ok(())
    }
}

async fn latency(settings: &Settings, js: &jetstream::Context, store: &PgEventStore) {
    let stream = TestStream::create(js, None).await;
    let consumer_pool = common::pool(10).await;
    let consumer_schema = common::fresh_schema(&consumer_pool, "bench_nats_c").await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA \"{consumer_schema}\"; CREATE TABLE \"{consumer_schema}\".ledger (event_id UUID PRIMARY KEY)"
    )))
    .execute(&consumer_pool)
    .await
    .expect("the consumer's table");
    let inbox = PgInbox::open(consumer_pool.clone(), &consumer_schema, "bench")
        .await
        .expect("the inbox");

    let sent: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let consumer = {
        let (sent, latencies) = (Arc::clone(&sent), Arc::clone(&latencies));
        JetStreamInbox::new(
            js.clone(),
            &stream.name,
            "bench",
            inbox,
            Ledger {
                schema: consumer_schema.clone(),
            },
        )
        .on_applied(move |event| {
            let at = sent.lock().unwrap().remove(&event.message_id);
            if let Some(at) = at {
                latencies.lock().unwrap().push(at.elapsed());
            }
        })
        .spawn()
    };
    // Publishes from the head on: the throughput part's events are not sent again.
    let publisher = Publisher::new(
        store.clone(),
        store.checkpoints(),
        JetStreamSink::new(js.clone()),
        "bench_latency",
        "/bench",
    )
    .expect("a publisher")
    .subject_prefix(stream.prefix.clone());
    skip_to_head(store, publisher.key()).await;
    let publisher = publisher.spawn();

    // Four writers, each at a quarter of the rate, one event per append.
    const WRITERS: u64 = 4;
    let total = settings.rate * settings.latency_for.as_secs();
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (store, sent) = (store.clone(), Arc::clone(&sent));
            let every = Duration::from_micros(1_000_000 * WRITERS / settings.rate);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                for n in 0..total / WRITERS {
                    tick.tick().await;
                    let event = event(n);
                    sent.lock().unwrap().insert(event.event_id, Instant::now());
                    store
                        .append(
                            &sid(&format!("l{}", fastrand::u8(..50))),
                            ExpectedVersion::Any,
                            vec![event],
                        )
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("a writer");
    }
    let produced_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.lock().unwrap().len() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = consumer.status();
    consumer.shutdown().await;
    publisher.shutdown().await;
    let mut all = latencies.lock().unwrap().clone();
    all.sort();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    println!(
        "\nend-to-end latency, append start -> consumer inbox commit: {} events at {:.0} events/s \
         (aimed at {}), over {} streams",
        all.len(),
        total as f64 / produced_in.as_secs_f64(),
        settings.rate,
        50
    );
    println!(
        "  p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        ms(at(0.50)),
        ms(at(0.99)),
        ms(all[all.len() - 1])
    );
    if all.len() < total as usize {
        println!(
            "  (only {} of {total} arrived within 30 s: {status:?})",
            all.len()
        );
    }
    stream.delete().await;
    common::drop_schema(&consumer_pool, &consumer_schema).await;
}

/// Moves a publisher's checkpoint to the log's head without sending anything.
async fn skip_to_head(store: &PgEventStore, key: &esframe_core::projection::ProjectionKey) {
    use esframe_core::projection::{Checkpoint, CheckpointCommit, CheckpointStore};
    let head = store.head_position().await.expect("the head");
    let checkpoints = store.checkpoints();
    let tx = checkpoints.begin().await.expect("begin");
    checkpoints
        .commit(
            tx,
            CheckpointCommit::advance(
                key,
                None,
                Checkpoint {
                    position: head,
                    version: 1,
                    replay_until: None,
                },
            ),
        )
        .await
        .expect("move the checkpoint");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}
