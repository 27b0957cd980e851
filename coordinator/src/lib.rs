//! berth-coordinator: the fleet's control plane.
//!
//! Ensures: agents are enrolled only with a one-time token and speak only for the host in their
//! certificate; the fleet registry survives SIGKILL (every acknowledged write is flushed);
//! operators are authenticated on every call (and on the dashboard unless it is on loopback);
//! volume keys are stored only wrapped and go only to the host their tenant is placed on.

pub mod api;
pub mod capacity;
pub mod config;
pub mod coordinator;
pub mod dashboard;
pub mod drain;
pub mod etcd;
pub mod exports;
pub mod keys;
pub mod metrics;
pub mod placement;
pub mod registry;
pub mod server;
pub mod sessions;
pub mod snapshot;
pub mod standby;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
