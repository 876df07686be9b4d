//! A RabbitMQ node of the test's own, for the tests that stop the broker itself: never the
//! shared one on 5672, which other tests use.
//!
//! The node is started from the server's scripts (`rabbitmq-server`, `rabbitmqctl`; Debian's
//! are in `/usr/lib/rabbitmq/bin`, or set `ESFRAME_RABBITMQ_BIN`) with everything of its own:
//! the node name `esframe_test_<pid>_<n>@localhost`, free ports for AMQP and Erlang
//! distribution, a temporary directory for its data (`RABBITMQ_MNESIA_BASE`), logs, config
//! file, env file (so `/etc/rabbitmq/rabbitmq-env.conf`, which names the shared node, is not
//! read), an empty plugin list (no management plugin on 15672), and an Erlang cookie in its own
//! `HOME`. It runs as the test's user, root included. It registers with the `epmd` that is
//! already running for the shared broker (Erlang starts one if none is).
//!
//! [`PrivateBroker::stop`] is a real stop of the server (`rabbitmqctl shutdown`, which waits
//! for the Erlang VM to exit); [`PrivateBroker::start_again`] starts it on the same ports and
//! the same data directory, so durable queues and persistent messages survive. Dropping the
//! guard stops the node (killing it if it does not stop) and deletes its directory, also when
//! the test fails.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// How long a start may take before the test fails (a start takes 5 to 10 s).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `rabbitmqctl shutdown` may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A running (or stopped) private RabbitMQ node; see the [module](self).
pub struct PrivateBroker {
    /// `esframe_test_<pid>_<n>@localhost`.
    pub node: String,
    /// The AMQP port, on 127.0.0.1.
    pub port: u16,
    /// The Erlang distribution port, on 127.0.0.1.
    pub dist_port: u16,
    /// Data, logs, config and `HOME`.
    pub dir: PathBuf,
    bin: PathBuf,
    /// The `rabbitmq-server` script, while the node runs (it waits for the Erlang VM).
    server: Option<Child>,
    /// The Erlang VM's OS process id, from the node's pid file.
    vm_pid: Option<u32>,
}

impl std::fmt::Debug for PrivateBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateBroker")
            .field("node", &self.node)
            .field("port", &self.port)
            .field("dist_port", &self.dist_port)
            .field("dir", &self.dir)
            .field("running", &self.server.is_some())
            .finish_non_exhaustive()
    }
}

fn binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("ESFRAME_RABBITMQ_BIN") {
        return PathBuf::from(dir);
    }
    let debian = PathBuf::from("/usr/lib/rabbitmq/bin");
    if debian.join("rabbitmq-server").exists() {
        return debian;
    }
    panic!(
        "this test starts a private RabbitMQ node and needs the server's scripts \
         (rabbitmq-server, rabbitmqctl): install Debian's rabbitmq-server package, or set \
         ESFRAME_RABBITMQ_BIN to the directory holding them (the scripts themselves, not the \
         /usr/sbin wrappers that switch to the rabbitmq user)"
    )
}

fn free_port() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")
}

impl PrivateBroker {
    /// Starts a fresh node and waits until it accepts AMQP connections (failing the test with
    /// its logs if it does not within a minute).
    pub async fn start() -> Self {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let bin = binaries();
        // Both listeners are held at once, so that the two ports differ.
        let (amqp, dist) = (free_port(), free_port());
        let port = amqp.local_addr().expect("its address").port();
        let dist_port = dist.local_addr().expect("its address").port();
        drop((amqp, dist));
        let pid = std::process::id();
        let node = format!("esframe_test_{pid}_{n}@localhost");
        let dir = std::env::temp_dir().join(format!("esframe-amqp-broker-{pid}-{n}-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create the node's directory");
        }
        write(
            &dir.join("rabbitmq.conf"),
            &format!(
                "listeners.tcp.1 = 127.0.0.1:{port}\n\
                 loopback_users.guest = true\n\
                 log.file.level = info\n"
            ),
        );
        write(&dir.join("enabled_plugins"), "[].\n");
        write(&dir.join("rabbitmq-env.conf"), "");
        // The CLI tools authenticate to the node with the cookie in $HOME; the file must be
        // readable by its owner only.
        let cookie = dir.join("home/.erlang.cookie");
        write(
            &cookie,
            &format!("ESFRAMETEST{}", uuid::Uuid::now_v7().simple()).to_uppercase(),
        );
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .expect("make the cookie private");
        let mut broker = Self {
            node,
            port,
            dist_port,
            dir,
            bin,
            server: None,
            vm_pid: None,
        };
        broker.launch().await;
        broker
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (guest may log in over loopback).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Whether the node is running (started, and not stopped since).
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// The environment every script of this node runs with.
    fn command(&self, script: &str) -> Command {
        let mut command = Command::new(self.bin.join(script));
        let path = |p: &str| self.dir.join(p);
        command
            .current_dir(&self.dir)
            .env("HOME", path("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_PID_FILE", path("rabbitmq.pid"))
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
            // Under systemd or with input allowed the script would exec the VM differently.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RABBITMQ_ALLOW_INPUT")
            .env_remove("RABBITMQ_MNESIA_DIR")
            .stdin(Stdio::null());
        command
    }

    /// Runs `rabbitmq-server` in the foreground (its output in `server.log`) and waits until
    /// the node accepts an AMQP connection.
    async fn launch(&mut self) {
        assert!(
            self.server.is_none(),
            "the private broker is already running"
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("the server's log");
        let _ = std::fs::remove_file(self.dir.join("rabbitmq.pid"));
        let server = self
            .command("rabbitmq-server")
            .stdout(log.try_clone().expect("the log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run rabbitmq-server: {err}"));
        self.server = Some(server);
        let started = Instant::now();
        loop {
            if let Some(server) = self.server.as_mut()
                && let Ok(Some(exit)) = server.try_wait()
            {
                self.server = None;
                panic!(
                    "the private RabbitMQ node {} exited while starting ({exit}):\n{}",
                    self.node,
                    self.logs()
                );
            }
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                esframe_amqp::connect(&self.url(), "esframe-test readiness"),
            )
            .await;
            if let Ok(Ok(connection)) = attempt {
                let _ = connection.close(200, "ready".into()).await;
                break;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "the private RabbitMQ node {} did not accept AMQP connections on port {} within \
                 {START_TIMEOUT:?}:\n{}",
                self.node,
                self.port,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.vm_pid = std::fs::read_to_string(self.dir.join("rabbitmq.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse().ok());
    }

    /// Stops the server for real: `rabbitmqctl shutdown` (the node closes its connections,
    /// writes its queues, and the Erlang VM exits), then checks that the port is closed.
    pub async fn stop(&mut self) {
        assert!(self.server.is_some(), "the private broker is not running");
        let mut shutdown = tokio::process::Command::from(self.command("rabbitmqctl"));
        shutdown
            .args(["-n", &self.node, "shutdown"])
            .kill_on_drop(true);
        let out = tokio::time::timeout(STOP_TIMEOUT, shutdown.output())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "rabbitmqctl shutdown of {} took over {STOP_TIMEOUT:?}",
                    self.node
                )
            })
            .expect("run rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl shutdown of {} failed: {}{}\n{}",
            self.node,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        // The script exits with the VM.
        let mut server = self.server.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if server
                .try_wait()
                .expect("wait for rabbitmq-server")
                .is_some()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "rabbitmq-server did not exit after the node's shutdown"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.vm_pid = None;
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_err(),
            "port {} still accepts connections after the shutdown",
            self.port
        );
    }

    /// Starts the node again on the same ports and data directory, and waits until it accepts
    /// AMQP connections.
    pub async fn start_again(&mut self) {
        self.launch().await;
    }

    /// The Erlang VM's process id: from the pid file, or else the script's children.
    fn vm_pids(&self) -> Vec<u32> {
        let from_file = self.vm_pid.or_else(|| {
            std::fs::read_to_string(self.dir.join("rabbitmq.pid"))
                .ok()
                .and_then(|pid| pid.trim().parse().ok())
        });
        if let Some(pid) = from_file {
            return vec![pid];
        }
        let Some(script) = self.server.as_ref().map(Child::id) else {
            return Vec::new();
        };
        std::fs::read_to_string(format!("/proc/{script}/task/{script}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect()
    }

    /// The end of the script's output and of the node's log, for failure messages.
    pub fn logs(&self) -> String {
        let tail = |path: &Path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        let node_log = self.dir.join("log").join(format!("{}.log", self.node));
        format!(
            "--- {}:\n{}\n--- {}:\n{}",
            self.dir.join("server.log").display(),
            tail(&self.dir.join("server.log")),
            node_log.display(),
            tail(&node_log)
        )
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if self.server.is_some() {
            // A graceful stop first, bounded; then the VM is killed if it is still there.
            if let Ok(mut shutdown) = self
                .command("rabbitmqctl")
                .args(["-n", &self.node, "shutdown"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                let deadline = Instant::now() + Duration::from_secs(30);
                while matches!(shutdown.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = shutdown.kill();
                let _ = shutdown.wait();
            }
            for pid in self.vm_pids() {
                if Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
            if let Some(mut server) = self.server.take() {
                let _ = server.kill();
                let _ = server.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
}
