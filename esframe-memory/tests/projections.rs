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
