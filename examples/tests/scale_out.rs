//! A projection split into 16 partitions and run by several worker processes (this test binary
//! run again as `scale_out_worker`) on the PostgreSQL at `DATABASE_URL`, while writers append:
//! the strict ledger (`esframe_examples::scale_out`) must end exact (every event applied once,
//! each account's events in order, nothing parked) after workers are killed with SIGKILL,
//! paused with SIGSTOP past their lease, added and removed, and run through PgBouncer.

#[path = "../../esframe-postgres/tests/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use esframe_examples::scale_out::{self, Ledger, WorkerConfig, append_deposit};
use esframe_postgres::PgEventStore;
use tokio::task::JoinHandle;

/// The tests of this file run one at a time: each starts several worker processes with pools
/// of their own, and together they would pass PostgreSQL's connection limit when `cargo test`
/// runs them in parallel threads.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Not a test of its own: the entry point of a worker process (this binary run again with
/// `scale_out_worker --exact`). Without `ESFRAME_WORKER_SCHEMA` it does nothing. The worker
/// runs until its stdin closes, then leaves its group cleanly; it never outlives its test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_worker() {
    let Some(config) = WorkerConfig::from_env() else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .try_init();
    let stdin_closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            use std::io::Read;
            let mut byte = [0u8; 1];
            while std::io::stdin().read(&mut byte).is_ok_and(|n| n > 0) {}
        })
        .await;
    };
    scale_out::run_worker(&config, stdin_closed).await;
}

/// A worker process, with its stderr in a file.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(config: &WorkerConfig, name: &str) -> Self {
        let log = std::env::temp_dir().join(format!("{}-{name}.log", config.schema));
        let stderr = std::fs::File::create(&log).expect("a log file");
        let child = Command::new(std::env::current_exe().expect("the test binary"))
            .args(["scale_out_worker", "--exact", "--nocapture"])
            .envs(config.to_env())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start a worker process");
        Self { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {}", self.pid());
    }

    /// SIGKILL, reaped.
    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL the worker");
        let status = self.child.wait().expect("reap it");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the worker ended by itself: {status:?}; its log: {}",
            self.log_text()
        );
        let _ = std::fs::remove_file(&self.log);
    }

    /// Closes its stdin and waits for a clean exit.
    fn stop(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().expect("wait for the worker");
        assert!(
            status.success(),
            "worker failed: {status:?}: {}",
            self.log_text()
        );
        let _ = std::fs::remove_file(&self.log);
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh store with the ledger's tables, and a worker configuration for it.
async fn setup(label: &str) -> (PgEventStore, WorkerConfig) {
    let store = common::store(label).await;
    let schema = store.schema().to_string();
    Ledger::new(&schema, Duration::ZERO)
        .create_tables(store.pool())
        .await
        .expect("ledger tables");
    let config = WorkerConfig {
        url: common::database_url(),
        schema,
        partitions: 16,
        lease_time: Duration::from_millis(1000),
        rebalance: Duration::from_millis(100),
        batch_size: 50,
        delay: Duration::ZERO,
        listen: true,
        poll: Duration::from_millis(100),
        connections: 8,
        tally: None,
        concurrency: None,
    };
    (store, config)
}

/// 8 writers appending `per_writer` deposits each to 200 accounts, `pause` between appends.
fn writers(store: &PgEventStore, per_writer: u32, pause: Duration) -> Vec<JoinHandle<()>> {
    (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..per_writer {
                    let account = format!("acc-{}", fastrand::u32(0..200));
                    append_deposit(&store, &account, i64::from(w * 1000 + i % 7 + 1)).await;
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            })
        })
        .collect()
}

async fn finish(writers: Vec<JoinHandle<()>>) {
    for writer in writers {
        writer.await.expect("a writer");
    }
}

/// Waits until the ledger has applied every stored event, then checks it is exact.
async fn assert_exact(store: &PgEventStore, schema: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let check = scale_out::check(store.pool(), schema).await.expect("check");
        if check.applied >= check.events || check.dead_letters > 0 {
            assert!(check.exact(), "the ledger is not exact: {check:?}");
            assert!(check.events > 0);
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ledger did not catch up: {check:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Partitions held per holder (one holder is one worker process).
async fn holders(store: &PgEventStore, config: &WorkerConfig) -> BTreeMap<String, usize> {
    let status = config.runner(store).status().await.expect("status");
    let mut held = BTreeMap::new();
    for partition in status.partitions {
        *held
            .entry(partition.holder.unwrap_or_else(|| "nobody".to_owned()))
            .or_default() += 1;
    }
    held
}

/// Waits until the 16 partitions are held by `workers` workers with a fair share each.
async fn wait_balanced(store: &PgEventStore, config: &WorkerConfig, workers: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let share = 16usize.div_ceil(workers);
    loop {
        let held = holders(store, config).await;
        let balanced = !held.contains_key("nobody")
            && held.len() == workers
            && held.values().all(|&n| n <= share);
        if balanced {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the partitions did not settle on {workers} workers: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_worker_processes_on_sixteen_partitions_apply_every_event_once() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let (store, config) = setup("scale_four").await;
    let workers: Vec<_> = (0..4)
        .map(|n| Worker::start(&config, &format!("w{n}")))
        .collect();
    let writing = writers(&store, 250, Duration::from_millis(1));
    // Balanced: 4 holders of the 16, none above its share of 4, so 4 each.
    wait_balanced(&store, &config, 4).await;
    finish(writing).await;
    assert_exact(&store, &config.schema, Duration::from_secs(60)).await;
    let status = config.runner(&store).status().await.expect("status");
    assert_eq!(status.lag_events(), Some(0), "{status:?}");
    for worker in workers {
        worker.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_killed_with_sigkill_30_times_are_replaced_and_the_ledger_stays_exact() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let (store, config) = setup("scale_kill").await;
    let mut workers: Vec<Worker> = (0..3)
        .map(|n| Worker::start(&config, &format!("w{n}")))
        .collect();
    let writing = writers(&store, 400, Duration::from_millis(5));
    for kill in 0..30 {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..500))).await;
        let victim = workers.remove(fastrand::usize(..workers.len()));
        victim.kill9();
        workers.push(Worker::start(&config, &format!("r{kill}")));
    }
    let check = scale_out::check(store.pool(), &config.schema)
        .await
        .expect("check");
    assert!(check.applied > 0, "the workers applied events while killed");
    finish(writing).await;
    assert_exact(&store, &config.schema, Duration::from_secs(60)).await;
    wait_balanced(&store, &config, 3).await;
    for worker in workers {
        worker.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_paused_past_its_lease_is_fenced_off_when_it_resumes() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let (store, mut config) = setup("scale_pause").await;
    // Batches take a while, so that the paused worker is caught inside one.
    config.delay = Duration::from_millis(40);
    let paused = Worker::start(&config, "paused");
    let other = Worker::start(&config, "other");
    let writing = writers(&store, 600, Duration::from_millis(2));
    wait_balanced(&store, &config, 2).await;
    let mut fenced = false;
    for _ in 0..5 {
        paused.signal("-STOP");
        // Past the lease time: the other worker takes every partition over.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while holders(&store, &config).await.len() != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the other worker did not take over"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        paused.signal("-CONT");
        tokio::time::sleep(Duration::from_secs(1)).await;
        if paused.log_text().contains("refused by the lease's fence") {
            fenced = true;
            break;
        }
    }
    assert!(
        fenced,
        "the paused worker's commit was refused by the fence: {}",
        paused.log_text()
    );
    finish(writing).await;
    assert_exact(&store, &config.schema, Duration::from_secs(60)).await;
    // It rejoins and takes its share again.
    wait_balanced(&store, &config, 2).await;
    paused.stop();
    other.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_joining_and_leaving_rebalance_the_partitions_and_the_ledger_stays_exact() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let (store, config) = setup("scale_join").await;
    let writing = writers(&store, 500, Duration::from_millis(3));
    let mut workers = vec![Worker::start(&config, "first")];
    wait_balanced(&store, &config, 1).await;
    for n in 1..4 {
        workers.push(Worker::start(&config, &format!("joined{n}")));
    }
    wait_balanced(&store, &config, 4).await;
    // Two leave cleanly: their partitions go to the two left, at a batch boundary.
    workers.pop().expect("a worker").stop();
    workers.pop().expect("a worker").stop();
    wait_balanced(&store, &config, 2).await;
    workers.push(Worker::start(&config, "late"));
    wait_balanced(&store, &config, 3).await;
    finish(writing).await;
    assert_exact(&store, &config.schema, Duration::from_secs(60)).await;
    for worker in workers {
        worker.stop();
    }
}

// --- Through PgBouncer --------------------------------------------------------------------------

/// A PgBouncer of this test's own, on a free port, in `mode`, in front of the test database.
struct PgBouncer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl PgBouncer {
    fn start(mode: &str) -> Self {
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!(
                    "PgBouncer is not installed: `apt-get install pgbouncer` (`.ci/run` does it)"
                )
            });
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("esframe-pgbouncer-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory");
        let server = Server::of(&common::database_url());
        let ini = format!(
            "[databases]\n{db} = host={host} port={pgport} user={user}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\n\
             auth_file = {dir}/users.txt\npool_mode = {mode}\nmax_client_conn = 500\n\
             default_pool_size = 40\nunix_socket_dir =\nlogfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\nignore_startup_parameters = extra_float_digits,options\n",
            db = server.database,
            host = server.host,
            pgport = server.port,
            user = server.user,
            dir = dir.display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("write the configuration");
        std::fs::write(dir.join("users.txt"), format!("\"{}\" \"\"\n", server.user))
            .expect("write users");
        let mut command = Command::new(binary);
        command.arg(dir.join("pgbouncer.ini"));
        // PgBouncer refuses to run as root.
        if running_as_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres", &dir.display().to_string()])
                .status();
            command.args(["-u", "postgres"]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let bouncer = Self { child, port, dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "pgbouncer did not start: {}",
                std::fs::read_to_string(bouncer.dir.join("pgbouncer.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        bouncer
    }

    fn url(&self) -> String {
        let server = Server::of(&common::database_url());
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            server.user, self.port, server.database
        )
    }
}

/// The parts of a `postgres://user@host:port/database` URL PgBouncer needs (trust auth: no
/// password).
struct Server {
    user: String,
    host: String,
    port: u16,
    database: String,
}

impl Server {
    fn of(url: &str) -> Self {
        let rest = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest)
            .split('?')
            .next()
            .unwrap_or_default();
        let (user, rest) = rest.split_once('@').unwrap_or(("postgres", rest));
        let user = user.split(':').next().unwrap_or("postgres");
        let (address, database) = rest.split_once('/').unwrap_or((rest, "postgres"));
        let (host, port) = address.split_once(':').unwrap_or((address, "5432"));
        Self {
            user: if user.is_empty() { "postgres" } else { user }.to_owned(),
            host: if host.is_empty() { "127.0.0.1" } else { host }.to_owned(),
            port: port.parse().unwrap_or(5432),
            database: database.to_owned(),
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn through_pgbouncer_in_session_mode_three_workers_keep_the_ledger_exact() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let bouncer = PgBouncer::start("session");
    let (store, mut config) = setup("scale_bouncer").await;
    config.url = bouncer.url();
    let mut workers: Vec<_> = (0..3)
        .map(|n| Worker::start(&config, &format!("b{n}")))
        .collect();
    let writing = writers(&store, 300, Duration::from_millis(3));
    wait_balanced(&store, &config, 3).await;
    // A kill through the pooler too: its server connections stay with PgBouncer.
    workers.remove(0).kill9();
    workers.push(Worker::start(&config, "b3"));
    finish(writing).await;
    assert_exact(&store, &config.schema, Duration::from_secs(60)).await;
    for worker in workers {
        worker.stop();
    }
}

/// PgBouncer 1.18 in transaction mode hands each transaction to any server connection, and
/// sqlx prepares its statements under names on one connection: esframe cannot run there (say
/// so, and check it stays so; when a PgBouncer that tracks prepared statements, 1.21 or later,
/// is installed, this test fails and the book's "Connection poolers" should change).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn through_pgbouncer_in_transaction_mode_sqlx_statements_are_lost() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let bouncer = PgBouncer::start("transaction");
    let store = common::store("scale_txmode").await;
    let schema = store.schema().to_string();
    let pool = PgEventStore::pool_options()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&bouncer.url())
        .await
        .expect("connect through pgbouncer");
    let through = PgEventStore::builder(pool)
        .schema(&schema)
        .expect("schema")
        .listen(false)
        .build()
        .await;
    let mut failure = None;
    match through {
        Err(err) => failure = Some(err.to_string()),
        Ok(through) => {
            let appends: Vec<_> = (0..16)
                .map(|n| {
                    let through = through.clone();
                    tokio::spawn(async move {
                        let stream =
                            esframe_core::StreamId::new("account", format!("tx-{n}")).unwrap();
                        let mut errors = Vec::new();
                        for _ in 0..20 {
                            if let Err(err) = esframe_core::EventStore::append(
                                &through,
                                &stream,
                                esframe_core::ExpectedVersion::Any,
                                vec![scale_out::deposit(1)],
                            )
                            .await
                            {
                                errors.push(format!("{err:?}"));
                            }
                        }
                        errors
                    })
                })
                .collect();
            for append in appends {
                if let Some(err) = append.await.expect("appender").into_iter().next() {
                    failure = Some(err);
                }
            }
        }
    }
    let failure = failure.expect("esframe ran through PgBouncer in transaction mode");
    assert!(
        failure.contains("prepared statement"),
        "another failure than lost prepared statements: {failure}"
    );
}
