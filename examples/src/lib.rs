//! Example domains for esframe, shared by the runnable examples, their tests and the benchmarks.

pub mod bank_account;
pub mod http_service;
pub mod orders;
pub mod publishing;
pub mod scale_out;

/// The README's code, compiled and run as doctests so the quick start stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
