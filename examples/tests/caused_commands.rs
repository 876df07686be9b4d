//! A consumer that reacts to another service's event with a command of its own: through
//! `IncomingEvent::command_context`, the command keeps the producer's correlation, names the
//! message as its cause, and is stored once however often the message is delivered.

use esframe_core::{
    CommandContext, CommandHandler, EventStore, StreamId,
    publish::{CloudEvent, IncomingEvent},
};
use esframe_examples::bank_account::{Account, AccountCommand};
use esframe_memory::MemoryStore;
use uuid::Uuid;

#[tokio::test]
async fn a_caused_command_keeps_the_correlation_and_is_stored_once_per_message() {
    // The producer: a deposit made under a correlation id.
    let producer = CommandHandler::<Account, _>::new(MemoryStore::new());
    let request = Uuid::now_v7();
    producer
        .execute(AccountCommand::Open {
            account_id: "ada".into(),
            owner: "Ada".into(),
        })
        .await
        .unwrap();
    let deposit = producer
        .execute_with(
            AccountCommand::Deposit {
                account_id: "ada".into(),
                amount: 100,
            },
            CommandContext::new().correlation_id(request),
        )
        .await
        .unwrap();
    let stored = producer
        .store()
        .read_stream(&StreamId::new("account", "ada").unwrap(), deposit.version)
        .await
        .unwrap()
        .remove(0);
    // As the consumer receives it: the CloudEvent's binary-mode headers and body.
    let cloud = CloudEvent::from_event(&stored, stored.event_id, "/bank");
    let received = IncomingEvent::from_cloud_event(
        CloudEvent::from_binary(cloud.binary_headers("ce-"), "ce-", cloud.data.clone()).unwrap(),
    )
    .unwrap();
    assert_eq!(received.correlation_id(), Some(request));

    // The consumer credits a mirror account, once per message, however often it comes.
    let consumer = CommandHandler::<Account, _>::new(MemoryStore::new());
    consumer
        .execute(AccountCommand::Open {
            account_id: "mirror".into(),
            owner: "bank".into(),
        })
        .await
        .unwrap();
    let credit = || AccountCommand::Deposit {
        account_id: "mirror".into(),
        amount: 100,
    };
    let first = consumer
        .execute_with(credit(), received.command_context("credit"))
        .await
        .unwrap();
    let again = consumer
        .execute_with(credit(), received.clone().command_context("credit"))
        .await
        .unwrap();
    assert!(!first.deduplicated);
    assert!(again.deduplicated, "the redelivery is recognised");
    assert_eq!(consumer.load("mirror").await.unwrap().state.balance, 100);

    let credited = &first.events[0];
    assert_eq!(credited.metadata.correlation_id, Some(request));
    assert_eq!(credited.metadata.causation_id, Some(received.message_id));
    assert_eq!(
        credited
            .metadata
            .extra
            .get("traceparent")
            .and_then(|v| v.as_str()),
        received.traceparent(),
    );
    assert!(received.traceparent().is_some());

    // Another command caused by the same message is another command.
    let other = consumer
        .execute_with(credit(), received.command_context("bonus"))
        .await
        .unwrap();
    assert!(!other.deduplicated);
    assert_eq!(consumer.load("mirror").await.unwrap().state.balance, 200);
}
