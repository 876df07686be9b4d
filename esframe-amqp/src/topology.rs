//! [`Topology`]: the exchange, queue and binding a publisher and a consumer meet at, declared in
//! one call (for tests, examples, and services that own their broker objects).

use std::time::Duration;

use lapin::{
    Channel, ExchangeKind,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};

use crate::connection::AmqpError;

/// A topic exchange, a queue bound to it, and optionally a dead-letter exchange with a queue of
/// its own.
///
/// By default everything is durable and nothing deletes itself: what production wants. Tests
/// set [`Topology::transient`] and [`Topology::expires`] so that what they leave behind goes
/// away by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The topic exchange the publisher sends to.
    pub exchange: String,
    /// The queue the consumer reads.
    pub queue: String,
    /// The binding key of the queue on the exchange (default `#`: every routing key;
    /// `esframe.account.*` takes one aggregate type's events).
    pub binding_key: String,
    /// Durable exchanges and queues (default `true`), which survive a broker restart.
    pub durable: bool,
    /// Queues and exchanges unused for this long are deleted by the broker (queues by
    /// `x-expires`; the exchanges are then auto-delete, gone with their last binding).
    pub expires: Option<Duration>,
    /// A fan-out exchange and the queue bound to it, for
    /// [`DeadLetters::Exchange`](crate::DeadLetters::Exchange).
    pub dead_letters: Option<(String, String)>,
}

impl Topology {
    /// `exchange` (topic) and `queue`, bound with `#`, durable.
    pub fn new(exchange: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            exchange: exchange.into(),
            queue: queue.into(),
            binding_key: "#".to_owned(),
            durable: true,
            expires: None,
            dead_letters: None,
        }
    }

    /// The binding key (default `#`).
    #[must_use]
    pub fn binding_key(mut self, key: impl Into<String>) -> Self {
        self.binding_key = key.into();
        self
    }

    /// Transient exchanges and queues: gone when the broker restarts.
    #[must_use]
    pub fn transient(mut self) -> Self {
        self.durable = false;
        self
    }

    /// Deletes the queues once unused for `after`, and the exchanges with their last binding.
    #[must_use]
    pub fn expires(mut self, after: Duration) -> Self {
        self.expires = Some(after);
        self
    }

    /// Also declares the fan-out exchange `exchange` with the queue `queue` bound to it.
    #[must_use]
    pub fn dead_letters(mut self, exchange: impl Into<String>, queue: impl Into<String>) -> Self {
        self.dead_letters = Some((exchange.into(), queue.into()));
        self
    }

    /// Declares the exchanges and queues and binds them (idempotent, when they exist with the
    /// same settings).
    pub async fn declare(&self, channel: &Channel) -> Result<(), AmqpError> {
        self.declare_pair(
            channel,
            &self.exchange,
            ExchangeKind::Topic,
            &self.queue,
            &self.binding_key,
        )
        .await?;
        if let Some((exchange, queue)) = &self.dead_letters {
            self.declare_pair(channel, exchange, ExchangeKind::Fanout, queue, "")
                .await?;
        }
        Ok(())
    }

    /// Declares another queue bound to the exchange with the same settings: a second consumer
    /// group, or a tap that sees every message.
    pub async fn declare_queue(
        &self,
        channel: &Channel,
        queue: &str,
        binding_key: &str,
    ) -> Result<(), AmqpError> {
        self.declare_pair(
            channel,
            &self.exchange,
            ExchangeKind::Topic,
            queue,
            binding_key,
        )
        .await
    }

    async fn declare_pair(
        &self,
        channel: &Channel,
        exchange: &str,
        kind: ExchangeKind,
        queue: &str,
        binding_key: &str,
    ) -> Result<(), AmqpError> {
        channel
            .exchange_declare(
                exchange.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: self.durable,
                    auto_delete: self.expires.is_some(),
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut arguments = FieldTable::default();
        if let Some(expires) = self.expires {
            let millis = i64::try_from(expires.as_millis())
                .unwrap_or(i64::MAX)
                .max(1);
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(millis));
        }
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: self.durable,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await?;
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Deletes the queues and the exchanges, with whatever messages the queues hold.
    pub async fn delete(&self, channel: &Channel) -> Result<(), AmqpError> {
        let mut pairs = vec![(&self.exchange, &self.queue)];
        if let Some((exchange, queue)) = &self.dead_letters {
            pairs.push((exchange, queue));
        }
        for (exchange, queue) in pairs {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}
