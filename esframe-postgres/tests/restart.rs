//! A database restart is ridden out: appends in flight wait (a jittered, growing backoff) and
//! go on when the server is back, each stored exactly once. The restarts are of a private
//! PostgreSQL server this test starts on a port of its own, never the shared one.
//!
//! Needs PostgreSQL's server binaries (`initdb`, `pg_ctl`; found under
//! `/usr/lib/postgresql/*/bin` or in `ESFRAME_PG_BIN`), run as the `postgres` user when the
//! test runs as root.

mod common;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use esframe_core::{EventStore, ExpectedVersion, GlobalLog, Position, StoreErrorKind, StreamId};
use esframe_postgres::PgEventStore;

use common::event;

/// A PostgreSQL server of the test's own, in a temporary directory, stopped and removed on drop.
struct PrivateServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

fn server_binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("ESFRAME_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "this test starts a private PostgreSQL server and needs its binaries (initdb, pg_ctl): \
             install Debian's postgresql package or set ESFRAME_PG_BIN to their directory"
        )
    })
}

impl PrivateServer {
    fn start() -> Self {
        let bin = server_binaries();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("esframe-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the data directory");
        // PostgreSQL refuses to run as root.
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
        let server = Self {
            bin,
            dir,
            port,
            as_postgres,
        };
        if as_postgres {
            server.run("chown", &["-R", "postgres:postgres", server.path()]);
        }
        let initdb = server.bin.join("initdb");
        server.run(
            initdb.to_str().expect("utf-8 path"),
            &["-D", &server.data(), "-U", "postgres", "--auth=trust", "-N"],
        );
        server.pg_ctl("start");
        server
    }

    fn path(&self) -> &str {
        self.dir.to_str().expect("utf-8 path")
    }

    fn data(&self) -> String {
        format!("{}/data", self.path())
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn run(&self, program: &str, args: &[&str]) {
        let mut command = if self.as_postgres && program != "chown" {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        let out = command
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `start` (waiting until it accepts connections), `stop` (fast: sessions are terminated)
    /// or `kill` (immediate).
    fn pg_ctl(&self, action: &str) {
        let pg_ctl = self.bin.join("pg_ctl");
        let mut args = vec![
            "-D".to_owned(),
            self.data(),
            "-w".into(),
            "-t".into(),
            "30".into(),
        ];
        match action {
            "start" => args.extend([
                "-o".to_owned(),
                format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                    self.port,
                    self.path()
                ),
                "-l".to_owned(),
                format!("{}/server.log", self.path()),
                "start".to_owned(),
            ]),
            "stop" => args.extend(["-m".to_owned(), "fast".into(), "stop".into()]),
            _ => args.extend(["-m".to_owned(), "immediate".into(), "stop".into()]),
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(pg_ctl.to_str().expect("utf-8 path"), &args);
    }

    /// Stops the server, waits `down`, starts it again.
    fn restart(&self, down: Duration) {
        self.pg_ctl("stop");
        std::thread::sleep(down);
        self.pg_ctl("start");
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            c
        } else {
            Command::new(&pg_ctl)
        };
        let _ = command
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(Path::new(&self.dir));
    }
}

async fn store_on(server: &PrivateServer, reconnect_within: Duration) -> PgEventStore {
    let pool = PgEventStore::pool_options()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(20))
        .connect(&server.url())
        .await
        .expect("connect to the private server");
    PgEventStore::builder(pool)
        .reconnect_within(reconnect_within)
        .build()
        .await
        .expect("open the store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_ride_out_a_database_restart_and_are_stored_once() {
    let server = Arc::new(PrivateServer::start());
    let store = store_on(&server, Duration::from_secs(10)).await;
    let writers = 4u64;
    let per_writer = 150u64;
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let stream = StreamId::new("writer", format!("writer-{w}")).unwrap();
                let mut ids = Vec::new();
                for i in 0..per_writer {
                    let e = event(w * 1000 + i);
                    ids.push(e.event_id);
                    // With the default budget every append succeeds: a connection lost around
                    // a commit is resolved by running the append again (idempotent by id).
                    store
                        .append(&stream, ExpectedVersion::Exact(i), vec![e])
                        .await
                        .unwrap_or_else(|err| panic!("append {i} of writer {w} failed: {err}"));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                ids
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stopped = Instant::now();
    let restarting = Arc::clone(&server);
    tokio::task::spawn_blocking(move || restarting.restart(Duration::from_millis(1500)))
        .await
        .unwrap();
    let down = stopped.elapsed();
    let mut expected = HashSet::new();
    for task in tasks {
        expected.extend(task.await.expect("writer"));
    }
    assert!(
        started.elapsed() > down,
        "the writers were still appending when the server went down"
    );
    let stored = store
        .read_all(Position::START, usize::MAX)
        .await
        .expect("read the log");
    assert_eq!(
        stored.len() as u64,
        writers * per_writer,
        "no append lost or repeated"
    );
    let ids: HashSet<_> = stored.iter().map(|e| e.event_id).collect();
    assert_eq!(ids, expected);
    for w in 0..writers {
        let stream = StreamId::new("writer", format!("writer-{w}")).unwrap();
        let versions: Vec<u64> = store
            .read_stream(&stream, 1)
            .await
            .unwrap()
            .iter()
            .map(|e| e.stream_version)
            .collect();
        assert_eq!(versions, (1..=per_writer).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_reconnect_budget_an_append_fails_with_a_transient_error() {
    let server = PrivateServer::start();
    let pool = PgEventStore::pool_options()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(500))
        .connect(&server.url())
        .await
        .expect("connect to the private server");
    let store = PgEventStore::builder(pool)
        .reconnect_within(Duration::from_millis(300))
        .build()
        .await
        .expect("open the store");
    let stream = StreamId::new("writer", "budget").unwrap();
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();
    server.pg_ctl("stop");
    let started = Instant::now();
    let err = store
        .append(&stream, ExpectedVersion::Exact(1), vec![event(2)])
        .await
        .expect_err("the server is down");
    assert!(
        matches!(
            err.kind(),
            StoreErrorKind::Unavailable | StoreErrorKind::OutcomeUnknown
        ),
        "{err:?}"
    );
    assert!(err.is_transient(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it gave up within its budget, not never"
    );
    server.pg_ctl("start");
    // Back up: the same append goes through (or is recognised as stored).
    let again = store
        .append(&stream, ExpectedVersion::Exact(1), vec![event(2)])
        .await
        .expect("the server is back");
    assert_eq!(again.stream_version, 2);
}
