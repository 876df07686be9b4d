//! Keys: invalid names and independent partitions.

use std::time::Duration;

use uuid::Uuid;

use crate::{
    GlobalLog, Position, RecordedEvent, StreamId,
    projection::{
        Checkpoint, CheckpointCommit, CheckpointError, HandlerError, NewDeadLetter, Projection,
        ProjectionContext, ProjectionError, ProjectionKey, ProjectionRunner, ProjectionStore,
    },
};

use super::recorder::Recorder;

/// A projection whose name no store can keep fails every entry point at once with a typed
/// error; a spawned runner ends instead of retrying for ever.
pub async fn an_invalid_projection_name_fails_at_once<S, C, R>(
    store: S,
    checkpoints: C,
    _recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    struct Named(&'static str);
    impl<Tx: Send> Projection<Tx> for Named {
        fn name(&self) -> &str {
            self.0
        }
        async fn handle(
            &self,
            _: &RecordedEvent,
            _: &mut ProjectionContext<'_, Tx>,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    for name in ["", "nul\0name", "new\nline"] {
        let runner = ProjectionRunner::new(store.clone(), checkpoints.clone(), Named(name));
        let err = runner.catch_up().await.unwrap_err();
        assert!(
            matches!(err, ProjectionError::InvalidKey(_)),
            "{name:?}: {err}"
        );
        assert!(matches!(
            runner.dead_letters().await,
            Err(ProjectionError::InvalidKey(_))
        ));
        let spawned = runner.spawn();
        let ended = tokio::time::timeout(Duration::from_secs(5), spawned.shutdown())
            .await
            .expect("a runner that can never run ends at once");
        assert!(
            matches!(ended, Err(ProjectionError::InvalidKey(_))),
            "{name:?}"
        );
    }
}

/// Checkpoints, leases and dead letters are kept per partition: the partitions of one
/// projection move, lease and park independently.
pub async fn partitions_keep_their_own_checkpoints_leases_and_dead_letters<S, C, R>(
    _store: S,
    checkpoints: C,
    _recorder: R,
) where
    S: GlobalLog,
    C: ProjectionStore,
    R: Recorder<C::Tx>,
{
    let p0 = ProjectionKey::new("split", 0).expect("key");
    let p1 = ProjectionKey::new("split", 1).expect("key");
    let at = |position| Checkpoint {
        position: Position::new(position),
        version: 1,
        replay_until: None,
    };
    let tx = checkpoints.begin().await.expect("begin");
    checkpoints
        .commit(tx, CheckpointCommit::advance(&p0, None, at(10)))
        .await
        .expect("commit partition 0");
    assert_eq!(checkpoints.load(&p0).await.unwrap(), Some(at(10)));
    assert_eq!(
        checkpoints.load(&p1).await.unwrap(),
        None,
        "partition 1 is untouched"
    );
    let tx = checkpoints.begin().await.expect("begin");
    let mut commit = CheckpointCommit::advance(&p1, None, at(3));
    commit.park = Some(NewDeadLetter {
        global_position: Position::new(3),
        event_id: Uuid::now_v7(),
        stream_id: StreamId::new("account", "s").expect("valid"),
        stream_version: 1,
        event_type: "Deposited".into(),
        error: "failed".into(),
        attempts: 1,
    });
    checkpoints
        .commit(tx, commit)
        .await
        .expect("commit partition 1");
    assert_eq!(checkpoints.load(&p0).await.unwrap(), Some(at(10)));
    assert_eq!(checkpoints.load(&p1).await.unwrap(), Some(at(3)));
    assert!(checkpoints.dead_letters(&p0).await.unwrap().is_empty());
    let parked = checkpoints.dead_letters(&p1).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].key, p1);
    // A stale compare-and-set on one partition fails; the other is unaffected.
    let tx = checkpoints.begin().await.expect("begin");
    let err = checkpoints
        .commit(tx, CheckpointCommit::advance(&p0, Some(at(9)), at(11)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CheckpointError::Moved { key, .. } if *key == p0),
        "{err}"
    );
    // Leases are per partition.
    let lease0 = checkpoints
        .try_lease(&p0)
        .await
        .unwrap()
        .expect("lease partition 0");
    assert!(
        checkpoints.try_lease(&p0).await.unwrap().is_none(),
        "one holder per partition"
    );
    let lease1 = checkpoints
        .try_lease(&p1)
        .await
        .unwrap()
        .expect("lease partition 1");
    checkpoints.release(lease0).await;
    checkpoints.release(lease1).await;
    // The lease is free again once released.
    let again = tokio::time::timeout(
        Duration::from_secs(5),
        checkpoints.wait_lease(&p0, Duration::from_secs(5)),
    )
    .await
    .expect("in time")
    .unwrap();
    assert!(again.is_some(), "a released lease can be taken again");
}
