//! The memory store applies upcasters on every read path.

esframe_core::upcasting_suite!(|upcasters| async move {
    esframe_memory::MemoryStore::with_upcasters(upcasters)
});
