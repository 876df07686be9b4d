//! The projection runner on the memory store and memory checkpoints: the shared projection
//! suite, at least once.

use esframe_core::testing::projections::MemoryRecorder;
use esframe_memory::{MemoryCheckpoints, MemoryStore};

esframe_core::projection_suite!(async {
    (
        MemoryStore::new(),
        MemoryCheckpoints::new(),
        MemoryRecorder::default(),
    )
});

mod at_least_once {
    //! The same suite through `AtLeastOnce`, the adapter for read models kept outside the
    //! checkpoint store.
    use esframe_core::{projection::AtLeastOnce, testing::projections::MemoryRecorder};
    use esframe_memory::{MemoryCheckpoints, MemoryStore};

    esframe_core::projection_suite!(async {
        (
            MemoryStore::new(),
            AtLeastOnce(MemoryCheckpoints::new()),
            MemoryRecorder::default(),
        )
    });
}

mod dropped {
    //! A partitioned runner whose `RunningProjection` is dropped stops and frees its
    //! partitions, instead of looping on a closed stop channel.
    use std::time::{Duration, Instant};

    use esframe_core::{
        RecordedEvent,
        projection::{HandlerError, Projection, ProjectionContext, ProjectionRunner},
    };
    use esframe_memory::{MemoryCheckpoints, MemoryStore};

    struct Nothing;

    impl Projection<()> for Nothing {
        fn name(&self) -> &str {
            "nothing"
        }

        async fn handle(
            &self,
            _event: &RecordedEvent,
            _ctx: &mut ProjectionContext<'_, ()>,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_partitioned_runner_stops_and_frees_its_partitions() {
        let runner = ProjectionRunner::new(MemoryStore::new(), MemoryCheckpoints::new(), Nothing)
            .partitions(4)
            .rebalance_interval(Duration::from_millis(10));
        let running = runner.clone().spawn();
        let deadline = Instant::now() + Duration::from_secs(10);
        while runner.status().await.unwrap().unowned() > 0 {
            assert!(
                Instant::now() < deadline,
                "the runner never took its partitions"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(running);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = runner.status().await.unwrap();
            if status.unowned() == 4 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a dropped runner kept its partitions: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
