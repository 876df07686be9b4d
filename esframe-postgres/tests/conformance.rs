//! The PostgreSQL store runs the conformance suite unchanged, each check in its own schema.

mod common;

esframe_core::conformance_suite!(common::store("conformance"));
