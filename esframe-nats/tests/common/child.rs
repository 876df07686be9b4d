//! A publisher in a child OS process, for the tests that kill it with SIGKILL (`kill -9`).
//!
//! No extra binary: the test re-executes its own test binary (`std::env::current_exe()`) with
//! `<test> --exact --nocapture` and [`CHILD_ENV`] set, and the test function, finding the
//! variable, runs a publisher ([`serve`]) instead of the test. The child reports its
//! publisher's status on stdout, a line per change, and stops when its stdin closes: when the
//! parent closes it ([`ChildPublisher::stop`]), or when the parent dies, so that no publisher
//! outlives its test. A [`ChildPublisher`] dropped while its child runs kills the child.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::ExitStatusExt,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use esframe_core::publish::{PublisherStatus, RunningPublisher};

/// Set in the child's environment: the test function runs the publisher instead of the test.
pub const CHILD_ENV: &str = "ESFRAME_PUBLISHER_CHILD";

/// The prefix of the child's status lines on its stdout (libtest writes there too).
const STATUS_LINE: &str = "esframe-child-status";

/// Whether this process is a child a test started.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// In the child: a setting the parent passed in the environment.
pub fn setting(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("the parent passes {name}"))
}

/// What the child's publisher last reported, counted since the child started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Messages the broker acknowledged.
    pub published: u64,
    /// Of those, the broker's duplicates (JetStream's `duplicate`).
    pub duplicates: u64,
    /// Failed sends.
    pub failures: u64,
    /// Events read and not yet acknowledged.
    pub pending: u64,
    /// The checkpoint's position.
    pub position: u64,
    /// Whether the publisher holds its lease.
    pub active: bool,
    /// Commits refused by a lease's fencing token (another runner took the partition).
    pub fenced: u64,
    /// How many partitions it holds.
    pub held: u64,
}

impl Report {
    fn of(status: &PublisherStatus) -> Self {
        Self {
            published: status.published,
            duplicates: status.duplicates,
            failures: status.failures,
            pending: status.pending as u64,
            position: status.position.get(),
            active: status.active,
            fenced: status.fenced,
            held: status.partitions.len() as u64,
        }
    }

    fn line(&self) -> String {
        format!(
            "{STATUS_LINE} {} {} {} {} {} {} {} {}",
            self.published,
            self.duplicates,
            self.failures,
            self.pending,
            self.position,
            u8::from(self.active),
            self.fenced,
            self.held
        )
    }

    fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix(STATUS_LINE)?;
        let numbers: Vec<u64> = rest
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let [
            published,
            duplicates,
            failures,
            pending,
            position,
            active,
            fenced,
            held,
        ] = numbers[..]
        else {
            return None;
        };
        Some(Self {
            published,
            duplicates,
            failures,
            pending,
            position,
            active: active == 1,
            fenced,
            held,
        })
    }
}

/// In the child: reports `running`'s status on stdout every few milliseconds (when it
/// changed) until stdin closes, then shuts the publisher down and exits the process.
pub async fn serve(running: RunningPublisher) -> ! {
    let (closed, mut stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(1..) = stdin.read(&mut buffer) {}
        let _ = closed.send(());
    });
    let mut last = None;
    loop {
        let report = Report::of(&running.status());
        if last != Some(report) {
            // The parent is gone if its end of the pipe is.
            if writeln!(std::io::stdout(), "{}", report.line()).is_err() {
                break;
            }
            last = Some(report);
        }
        tokio::select! {
            _ = &mut stdin_closed => break,
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), running.shutdown()).await;
    std::process::exit(0)
}

/// A child process running a publisher, seen from the test.
#[derive(Debug)]
pub struct ChildPublisher {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    report: Arc<Mutex<Report>>,
    reader: Option<JoinHandle<()>>,
    /// When it was started.
    pub started: Instant,
}

impl ChildPublisher {
    /// Starts the test binary again as a child that runs `test` (the calling test function's
    /// name) with [`CHILD_ENV`] and `settings` in its environment.
    pub fn spawn(test: &str, settings: &[(&str, &str)]) -> Self {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut command = Command::new(exe);
        command
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, value) in settings {
            command.env(name, value);
        }
        let started = Instant::now();
        let mut child = command.spawn().expect("start the child publisher");
        let stdout = child.stdout.take().expect("the child's stdout");
        let report = Arc::<Mutex<Report>>::default();
        let reader = {
            let report = Arc::clone(&report);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(latest) = Report::parse(&line) {
                        *report.lock().unwrap() = latest;
                    }
                }
            })
        };
        Self {
            stdin: child.stdin.take(),
            child: Some(child),
            report,
            reader: Some(reader),
            started,
        }
    }

    /// What the child last reported.
    pub fn report(&self) -> Report {
        *self.report.lock().unwrap()
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` (`STOP`, `CONT`) to the child with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {}", self.id());
    }

    /// `kill -9`: SIGKILL, then waits for the process to be gone. Returns the last status it
    /// reported; fails if the child had exited by itself before.
    pub async fn kill(mut self) -> Report {
        let mut child = self.child.take().expect("a running child");
        let reader = self.reader.take();
        let status = tokio::task::spawn_blocking(move || {
            let early = child.try_wait().expect("the child's state");
            let _ = child.kill();
            let status = child.wait().expect("reap the child");
            if let Some(reader) = reader {
                let _ = reader.join();
            }
            early.map_or(Ok(status), Err)
        })
        .await
        .expect("the reaper");
        match status {
            Ok(status) => assert_eq!(
                status.signal(),
                Some(SIGKILL),
                "the child died of SIGKILL: {status:?}"
            ),
            Err(status) => panic!("the child publisher exited before it was killed: {status:?}"),
        }
        self.report()
    }

    /// Closes the child's stdin, which asks it to shut its publisher down and exit, and waits
    /// up to `within` for it to do so successfully. Returns the last status it reported.
    pub async fn stop(mut self, within: Duration) -> Report {
        drop(self.stdin.take());
        let mut child = self.child.take().expect("a running child");
        let reader = self.reader.take();
        let status: Result<ExitStatus, ()> = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + within;
            loop {
                if let Some(status) = child.try_wait().expect("the child's state") {
                    if let Some(reader) = reader {
                        let _ = reader.join();
                    }
                    return Ok(status);
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .await
        .expect("the reaper");
        match status {
            Ok(status) => assert!(status.success(), "the child publisher failed: {status:?}"),
            Err(()) => panic!("the child publisher did not stop within {within:?}"),
        }
        self.report()
    }
}

impl Drop for ChildPublisher {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGKILL's number (9 on every Unix), without a `libc` dependency.
const SIGKILL: i32 = 9;
