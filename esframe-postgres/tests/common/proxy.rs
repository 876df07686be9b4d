//! A TCP proxy in front of PostgreSQL that can lose a commit's reply: the `COMMIT` reaches the
//! server, which commits, and the connection is then cut before the client hears back. The
//! client sees a lost connection with its outcome unknown.

use std::{
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::postgres::PgConnectOptions;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Notify,
};

/// The proxy; it runs until the test ends.
pub struct CommitCutter {
    options: PgConnectOptions,
    armed: Arc<AtomicBool>,
    /// Notified once the armed commit has reached the server (and had time to commit).
    pub committed: Arc<Notify>,
    /// Notify to cut the connection of the armed commit.
    pub cut: Arc<Notify>,
}

impl CommitCutter {
    /// Starts a proxy to the server of [`database_url`](super::database_url).
    pub async fn start() -> Self {
        let direct = PgConnectOptions::from_str(&super::database_url()).expect("a valid URL");
        let upstream = format!("{}:{}", direct.get_host(), direct.get_port());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let proxy = Self {
            options: direct.host("127.0.0.1").port(port),
            armed: Arc::default(),
            committed: Arc::default(),
            cut: Arc::default(),
        };
        let (armed, committed, cut) = (
            Arc::clone(&proxy.armed),
            Arc::clone(&proxy.committed),
            Arc::clone(&proxy.cut),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&upstream)
                    .await
                    .unwrap_or_else(|err| panic!("cannot reach PostgreSQL at {upstream}: {err}"));
                tokio::spawn(pump(
                    client,
                    server,
                    Arc::clone(&armed),
                    Arc::clone(&committed),
                    Arc::clone(&cut),
                ));
            }
        });
        proxy
    }

    /// Connection options that go through the proxy.
    pub fn options(&self) -> PgConnectOptions {
        self.options.clone()
    }

    /// The next `COMMIT` sent through the proxy loses its reply.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }
}

async fn pump(
    mut client: TcpStream,
    mut server: TcpStream,
    armed: Arc<AtomicBool>,
    committed: Arc<Notify>,
    cut: Arc<Notify>,
) {
    let (mut to_client, mut to_server) = ([0u8; 16 * 1024], [0u8; 16 * 1024]);
    loop {
        tokio::select! {
            read = client.read(&mut to_server) => {
                let Ok(n @ 1..) = read else { return };
                let chunk = &to_server[..n];
                if server.write_all(chunk).await.is_err() {
                    return;
                }
                if contains(chunk, b"COMMIT") && armed.swap(false, Ordering::SeqCst) {
                    // Give the server time to commit, let the test act, then cut both ends.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    committed.notify_one();
                    cut.notified().await;
                    return;
                }
            }
            read = server.read(&mut to_client) => {
                let Ok(n @ 1..) = read else { return };
                if client.write_all(&to_client[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
