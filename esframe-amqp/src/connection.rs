//! Connecting to the broker, and telling a broker's refusal from a broken connection.

use std::time::Duration;

use lapin::{
    Connection, ConnectionProperties, ErrorKind,
    protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError},
};

/// The URI of a local RabbitMQ with its default account, `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub const LOCAL_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long connecting (TCP, the AMQP handshake and opening a channel) may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the client could not talk to the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// The client failed, or the broker closed the channel or the connection.
    #[error(transparent)]
    Client(#[from] lapin::Error),
    /// The broker cancelled the consumer of this queue (the queue was deleted).
    #[error("the broker cancelled the consumer of queue `{0}`")]
    Cancelled(String),
    /// The broker did not answer in time.
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
}

impl AmqpError {
    /// Whether the broker refused the operation itself (no such exchange or queue, access
    /// refused, a precondition failed, a message too large; a vhost that does not exist or
    /// may not be used): trying again will fail again until
    /// the broker's configuration changes. Anything else (no route to the broker, a closed
    /// connection, a timeout) may pass.
    pub fn is_refusal(&self) -> bool {
        let Self::Client(err) = self else {
            return false;
        };
        let ErrorKind::ProtocolError(amqp) = err.kind() else {
            return false;
        };
        match amqp.kind() {
            AMQPErrorKind::Soft(soft) => matches!(
                soft,
                AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::NOTFOUND
                    | AMQPSoftError::PRECONDITIONFAILED
                    | AMQPSoftError::CONTENTTOOLARGE
                    | AMQPSoftError::NOROUTE
            ),
            AMQPErrorKind::Hard(hard) => {
                matches!(hard, AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH)
            }
        }
    }
}

/// Runs `operation` with a time limit.
pub(crate) async fn within<T>(
    limit: Duration,
    operation: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, AmqpError> {
    match tokio::time::timeout(limit, operation).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(AmqpError::Timeout(limit)),
    }
}

/// Opens a connection to `uri` (`amqp://user:password@host:port/vhost`, the vhost
/// percent-encoded: `%2f` for `/`), named `name` in the broker's connection list (RabbitMQ's
/// `connection_name` client property), within [`DEFAULT_CONNECT_TIMEOUT`].
pub async fn connect(uri: &str, name: &str) -> Result<Connection, AmqpError> {
    connect_within(uri, name, DEFAULT_CONNECT_TIMEOUT).await
}

pub(crate) async fn connect_within(
    uri: &str,
    name: &str,
    limit: Duration,
) -> Result<Connection, AmqpError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    within(limit, Connection::connect(uri, properties)).await
}

/// Closes `connection` in the background (a normal close, 200), giving up after a few seconds.
pub(crate) fn close_in_background(connection: Connection, reason: &'static str) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), connection.close(200, reason.into()))
                    .await;
        });
    }
}
