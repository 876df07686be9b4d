//! Example domains for esframe, shared by the runnable examples, their tests and the benchmarks.

pub mod bank_account;
