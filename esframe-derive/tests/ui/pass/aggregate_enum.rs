//! An enum aggregate (a state machine) with the trait used through generic code.

use esframe_core::{Aggregate, Command, Decision, Event, StreamId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum DoorEvent {
    Opened,
    Closed,
}

#[derive(Command)]
struct Toggle(#[command(aggregate_id)] String);

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

#[derive(Debug, Default, PartialEq, Serialize, Deserialize, Aggregate)]
#[aggregate(command = Toggle, event = DoorEvent, error = Never)]
enum Door {
    #[default]
    Shut,
    Open,
}

impl Door {
    async fn handle(decision: &mut Decision<'_, Self>, _: &Toggle, (): &()) -> Result<(), Never> {
        let event = match **decision {
            Self::Shut => DoorEvent::Opened,
            Self::Open => DoorEvent::Closed,
        };
        decision.emit(event);
        Ok(())
    }

    fn apply(&mut self, event: &DoorEvent) {
        *self = match event {
            DoorEvent::Opened => Self::Open,
            DoorEvent::Closed => Self::Shut,
        };
    }
}

fn decide<A: Aggregate>(
    state: &mut A,
    command: &A::Command,
    services: &A::Services,
) -> Vec<A::Event> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let stream = StreamId::new(Door::TYPE, command.aggregate_id()).unwrap();
    let mut decision = Decision::new(state, &stream, 1);
    runtime
        .block_on(A::handle(&mut decision, command, services))
        .unwrap();
    decision.into_emitted()
}

fn main() {
    assert_eq!(Door::TYPE, "Door");
    let mut door = Door::default();
    assert_eq!(
        decide(&mut door, &Toggle("front".into()), &()),
        [DoorEvent::Opened]
    );
    assert_eq!(door, Door::Open);
    assert_eq!(
        decide(&mut door, &Toggle("front".into()), &()),
        [DoorEvent::Closed]
    );
    assert_eq!(door.to_snapshot().unwrap(), serde_json::json!("Shut"));
    assert_eq!(
        Door::from_snapshot(&serde_json::json!("Open")).unwrap(),
        Door::Open
    );
}
