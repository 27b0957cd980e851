//! What tests build on, never in a packaged build: a name server for tests (`dns`, also for the
//! cross-process tests through the `test-support` feature) and the recording container runtime
//! and health probe the unit tests share (`runtime`), and a recording backup engine (`backup`).

#[cfg(test)]
pub mod backup;
pub mod dns;
#[cfg(test)]
pub mod runtime;
