//! berth-agent: runs and confines the tenant containers of one host.
//!
//! Ensures so far: the host's key never leaves it; the coordinator is trusted only through the
//! CA fingerprint pinned at enrollment; the agent keeps one session open, reporting every
//! interval, and renews its certificate before it expires. Tenant enforcement (containers,
//! egress, volumes) is not built yet.

pub mod cgroup;
pub mod command;
pub mod config;
pub mod desired;
pub mod enforce;
pub mod facts;
pub mod hardening;
pub mod identity;
pub mod nft;
pub mod reconcile;
pub mod runtime;
pub mod session;
pub mod subnets;
