//! What the agent knows of its host: its facts (memory, disk, capabilities) and each
//! container's memory figures from the cgroup filesystem.

pub mod cgroup;
pub mod facts;
