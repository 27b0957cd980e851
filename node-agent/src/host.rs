//! What the agent knows and tells of its host: its facts (memory, disk, capabilities), each
//! container's memory figures from the cgroup filesystem, and its Prometheus metrics.

pub mod cgroup;
pub mod facts;
pub mod metrics;
