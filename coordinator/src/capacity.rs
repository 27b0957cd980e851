//! The fleet's capacity report (`berthctl capacity`): the memory and CPU its hosts offer, what
//! its tenants hold and use, and per tier how its CPU request compares with what its tenants
//! use.
//!
//! Ensures: every figure comes from the registry and the placements as they are at the call;
//! a tier gets advice only with at least [`MIN_MEASURED`] running tenants measured, and only
//! when the 95th percentile of their use is under half its request or over one and a half.

use std::collections::HashMap;

use berth_shared::proto;
use berth_shared::spec::Tier;

use crate::coordinator::Coordinator;
use crate::placement::host_info;
use crate::registry::RegistryError;

/// The fewest running tenants of a tier whose use says anything about its request.
pub const MIN_MEASURED: usize = 5;

/// The report for the fleet now.
pub fn report(c: &Coordinator) -> Result<proto::CapacityReport, RegistryError> {
    let loads = c.placements.host_loads();
    let mut report = proto::CapacityReport::default();
    for record in c.registry.hosts()? {
        let Some(host) = host_info(&record, true) else {
            continue;
        };
        report.hosts += 1;
        report.memory_capacity_bytes += host.allocatable.mem;
        report.cpu_capacity_millicores += host.allocatable.cpu;
        if let Some(load) = loads.get(&record.host_id) {
            report.tenants += load.tenants;
            report.memory_committed_bytes += load.memory_committed;
            report.memory_used_bytes += load.memory_used;
            report.cpu_requested_millicores += load.cpu_committed_millicores;
            report.cpu_used_millicores += load.cpu_used_millicores;
        }
    }
    let tiers: Vec<Tier> = c.config.tiers.iter().map(|t| t.tier.clone()).collect();
    report.tiers = tier_cpu(&tiers, c.placements.cpu_use_by_tier());
    Ok(report)
}

/// Each tier's CPU request against the use of its running tenants (`used`: per tier, what
/// each of them used lately, as [`crate::placement::Placements::cpu_use_by_tier`] gives it).
pub fn tier_cpu(tiers: &[Tier], mut used: HashMap<String, Vec<u32>>) -> Vec<proto::TierCpu> {
    tiers
        .iter()
        .map(|tier| {
            let mut used = used.remove(&tier.name).unwrap_or_default();
            used.sort_unstable();
            let p95 = match used.len() {
                0 => 0,
                n => used[(n * 95).div_ceil(100) - 1],
            };
            let request = tier.resources.cpu_millicores;
            let advice = if used.len() < MIN_MEASURED {
                String::new()
            } else if u64::from(p95) * 2 < u64::from(request) {
                format!(
                    "{}: its tenants' p95 is {p95} mCPU, under half its request of {request}: lower cpu_millicores toward {} to place more per host",
                    tier.name,
                    p95.max(10)
                )
            } else if u64::from(p95) * 2 > u64::from(request) * 3 {
                format!(
                    "{}: its tenants' p95 is {p95} mCPU, over one and a half times its request of {request}: raise cpu_millicores toward {p95}, or hosts run short of CPU when they are busy",
                    tier.name
                )
            } else {
                String::new()
            };
            proto::TierCpu {
                tier: tier.name.clone(),
                cpu_request_millicores: request,
                cpu_limit_millicores: tier.resources.cpu_limit_millicores,
                tenants_measured: used.len() as u32,
                cpu_used_p95_millicores: p95,
                advice,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_shared::spec::Resources;

    fn tier(name: &str, request: u32) -> Tier {
        Tier {
            name: name.into(),
            resources: Resources {
                memory_bytes: 1 << 30,
                cpu_millicores: request,
                volume_bytes: 1 << 30,
                cpu_limit_millicores: 2000,
            },
        }
    }

    #[test]
    fn a_tier_is_advised_only_when_its_tenants_use_far_from_its_request() {
        let tiers = [
            tier("idle", 500),
            tier("busy", 250),
            tier("right", 250),
            tier("few", 1000),
        ];
        let mut used: HashMap<String, Vec<u32>> = HashMap::new();
        // 20 idle gateways: 19 at 20 mCPU, one at 300 (p95 is the 19th of 20: 20).
        used.insert("idle".into(), [vec![20; 19], vec![300]].concat());
        // Busy ones use 400 to 490: p95 490, past 1.5 x 250.
        used.insert("busy".into(), (0..10).map(|i| 400 + i * 10).collect());
        used.insert("right".into(), (0..10).map(|i| 200 + i * 10).collect());
        // Too few to say anything.
        used.insert("few".into(), vec![5; 4]);
        let report = tier_cpu(&tiers, used);
        let by = |name: &str| report.iter().find(|t| t.tier == name).unwrap().clone();
        let idle = by("idle");
        assert_eq!(
            (idle.tenants_measured, idle.cpu_used_p95_millicores),
            (20, 20)
        );
        assert!(
            idle.advice.contains("lower cpu_millicores toward 20"),
            "{}",
            idle.advice
        );
        let busy = by("busy");
        assert_eq!(busy.cpu_used_p95_millicores, 490);
        assert!(
            busy.advice.contains("raise cpu_millicores toward 490"),
            "{}",
            busy.advice
        );
        let right = by("right");
        assert_eq!(
            (right.cpu_used_p95_millicores, right.advice.as_str()),
            (290, "")
        );
        let few = by("few");
        assert_eq!((few.tenants_measured, few.advice.as_str()), (4, ""));
        assert_eq!(few.cpu_limit_millicores, 2000);
    }
}
