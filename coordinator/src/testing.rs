//! What tests and benchmarks build on, kept out of production builds (`cfg(test)` or the
//! `test-support` feature): a seeded fleet over the real registry and placement code
//! (`seed`), a synthetic scheduler fleet for decision benchmarks (`synthetic`), and agents
//! played in process behind the coordinator's link (`agents`).

pub mod agents;
pub mod seed;
pub mod synthetic;
