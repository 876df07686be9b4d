//! The memory store runs the conformance suite unchanged.

esframe_core::conformance_suite!(async { esframe_memory::MemoryStore::new() });
