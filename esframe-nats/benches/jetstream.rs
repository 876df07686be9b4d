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
//! of a few seconds; `ESFRAME_BENCH_ONLY=throughput` or `latency` runs one part.

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
    let only = std::env::var("ESFRAME_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "throughput" {
        throughput(&settings, &js, &store).await;
    }
    if only.is_empty() || only == "latency" {
        latency(&settings, &js, &store).await;
    }
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
    // Three sides per round, in an order that turns with the round.
    let sides = [
        "Publisher",
        "bare, headers prebuilt",
        "bare, headers in loop",
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    let mut cpu = [CpuTicks::default(); 3];
    for round in 0..settings.rounds {
        let mut seconds = [0.0; 3];
        for turn in 0..sides.len() {
            let side = (round + turn) % sides.len();
            let (took, used) = match side {
                0 => through_publisher(js, store, round).await,
                1 => bare(js, &recorded, window, Headers::Prebuilt).await,
                _ => bare(js, &recorded, window, Headers::InLoop).await,
            };
            seconds[side] = took;
            cpu[side].add(used);
        }
        let rate = seconds.map(|s| recorded.len() as f64 / s);
        println!(
            "  round {}: publisher {:>8.0} events/s, bare prebuilt {:>8.0}, bare in loop {:>8.0}",
            round + 1,
            rate[0],
            rate[1],
            rate[2]
        );
        for (side, rate) in rate.into_iter().enumerate() {
            rates[side].push(rate);
        }
    }
    for (side, name) in sides.iter().enumerate() {
        let mut sorted = rates[side].clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "  {name:<24} median {:>8.0} events/s  (range {:.0} to {:.0})",
            median(&sorted),
            sorted[0],
            sorted[sorted.len() - 1]
        );
    }
    for (side, name) in sides.iter().enumerate().skip(1) {
        let mut ratios: Vec<f64> = rates[0]
            .iter()
            .zip(&rates[side])
            .map(|(p, b)| p / b)
            .collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "  ratio publisher / {name}: median {:.2} (range {:.2} to {:.2})",
            median(&ratios),
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
    // CPU per event while the clock ran, by process (10 ms ticks, summed over the rounds).
    let events = (recorded.len() * settings.rounds) as f64;
    let us = |ticks: u64| ticks as f64 * 10_000.0 / events;
    for (side, name) in sides.iter().enumerate() {
        println!(
            "  CPU per event, {name:<24} this process {:>5.1} µs, nats-server {:>5.1} µs, PostgreSQL {:>4.1} µs",
            us(cpu[side].this),
            us(cpu[side].nats),
            us(cpu[side].postgres)
        );
    }
}

/// Seconds (and CPU) for a publisher of a new name (so from the start of the log) to catch up.
async fn through_publisher(
    js: &jetstream::Context,
    store: &PgEventStore,
    round: usize,
) -> (f64, CpuTicks) {
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
    let (cpu, started) = (CpuTicks::now(), Instant::now());
    publisher.catch_up().await.expect("publish");
    let elapsed = (started.elapsed().as_secs_f64(), CpuTicks::now().since(cpu));
    stream.delete().await;
    elapsed
}

/// How the bare loop gets each message's headers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Headers {
    /// Every message's `HeaderMap` built before the clock starts: async-nats's sending and
    /// acknowledging alone.
    Prebuilt,
    /// Each `HeaderMap` built as its message is sent, as any loop publishing these messages
    /// must (the headers are async-nats's type); esframe's mapping of events to CloudEvents
    /// stays out of the clock.
    InLoop,
}

/// Seconds (and CPU) for a bare loop to publish the same messages, `window` acknowledgements in
/// flight.
async fn bare(
    js: &jetstream::Context,
    events: &[esframe_core::RecordedEvent],
    window: usize,
    mode: Headers,
) -> (f64, CpuTicks) {
    let stream = TestStream::create(js, None).await;
    let messages: Vec<OutgoingMessage> = events
        .iter()
        .map(|e| OutgoingMessage {
            id: e.event_id,
            subject: esframe_core::publish::subject_for(&stream.prefix, e),
            stream_id: e.stream_id.clone(),
            stream_version: e.stream_version,
            position: e.global_position,
            event: CloudEvent::from_event(e, e.event_id, "/bench"),
        })
        .collect();
    let mut prebuilt: Vec<Option<async_nats::HeaderMap>> = match mode {
        Headers::Prebuilt => messages
            .iter()
            .map(|m| Some(headers::outgoing(m).expect("headers")))
            .collect(),
        Headers::InLoop => vec![None; messages.len()],
    };
    let (cpu, started) = (CpuTicks::now(), Instant::now());
    let mut in_flight: FuturesUnordered<<PublishAckFuture as IntoFuture>::IntoFuture> =
        FuturesUnordered::new();
    for (message, headers) in messages.into_iter().zip(prebuilt.iter_mut()) {
        if in_flight.len() >= window {
            in_flight
                .next()
                .await
                .expect("an ack")
                .expect("acknowledged");
        }
        let headers = match headers.take() {
            Some(built) => built,
            None => headers::outgoing(&message).expect("headers"),
        };
        let ack = js
            .send_publish(
                message.subject,
                PublishMessage::build()
                    .headers(headers)
                    .payload(message.event.data.into()),
            )
            .await
            .expect("publish");
        in_flight.push(ack.into_future());
    }
    while let Some(ack) = in_flight.next().await {
        ack.expect("acknowledged");
    }
    let elapsed = (started.elapsed().as_secs_f64(), CpuTicks::now().since(cpu));
    stream.delete().await;
    elapsed
}

/// CPU time (user + system, in clock ticks of 10 ms) spent so far by this process, by
/// `nats-server` and by every `postgres` process, read from `/proc`: where a side of the
/// throughput comparison spends its CPU. Zero where `/proc` cannot be read.
#[derive(Debug, Default, Clone, Copy)]
struct CpuTicks {
    this: u64,
    nats: u64,
    postgres: u64,
}

impl CpuTicks {
    fn now() -> Self {
        let mut ticks = Self {
            this: ticks_of("self"),
            ..Self::default()
        };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return ticks;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            match std::fs::read_to_string(format!("/proc/{pid}/comm")).as_deref() {
                Ok("nats-server\n") => ticks.nats += ticks_of(pid),
                Ok("postgres\n") => ticks.postgres += ticks_of(pid),
                _ => {}
            }
        }
        ticks
    }

    fn since(self, start: Self) -> Self {
        Self {
            this: self.this.saturating_sub(start.this),
            nats: self.nats.saturating_sub(start.nats),
            postgres: self.postgres.saturating_sub(start.postgres),
        }
    }

    fn add(&mut self, other: Self) {
        // (A tick is 10 ms: one phase of a few hundred milliseconds reads coarsely, the sum
        // over the rounds does not.)
        self.this += other.this;
        self.nats += other.nats;
        self.postgres += other.postgres;
    }
}

/// `utime + stime` of `/proc/<pid>/stat`.
fn ticks_of(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    field(11) + field(12)
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
