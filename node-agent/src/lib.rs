//! berth-agent: runs and confines the tenant containers of one host.
//!
//! Ensures: the host's key never leaves it; the coordinator is trusted only through the CA
//! fingerprint pinned at enrollment; the last accepted desired state is enforced with or
//! without the coordinator: hardened containers under their memory caps, each behind its
//! default-deny egress allowlist (nftables), restarted once a night inside its maintenance
//! window behind a health gate, with its data on a LUKS2 volume opened by a key held in memory
//! only (a tenant without its key waits, stopped).

pub mod agent;
pub mod backup;
pub mod command;
pub mod config;
pub mod desired;
pub mod egress;
pub mod enforce;
pub mod host;
pub mod metrics;
pub mod reconcile;
pub mod restarts;
pub mod runtime;
pub mod session;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod transfer;
pub mod volume;
