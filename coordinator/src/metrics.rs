//! What the coordinator counts as it works: the placement latency histogram and refused
//! placements (the HTTP port's `/metrics` page renders them with the fleet's state).

use std::sync::atomic::AtomicU64;

use berth_shared::metrics::Histogram;

/// What the coordinator counts as it works.
#[derive(Debug, Default)]
pub struct Metrics {
    /// From the request to the durable write, for placements that succeeded.
    pub placement_latency: Histogram,
    pub placements_refused: AtomicU64,
}
