//! Compaction planning: which hosts to empty so they can be returned, and where each of
//! their tenants goes. Pure logic over a [`Scheduler`], no I/O.
//!
//! Ensures: every planned move satisfies the tenant's constraints (providers, regions, labels,
//! encryption, anti-affinity) on a host that keeps `headroom_percent` of its memory and CPU
//! free after all moves; a host is either emptied completely or not touched; no tenant moves
//! twice (a host that receives tenants is never emptied in the same plan); the plan never
//! exceeds `max_moves`; hosts whose removal saves the most money per move are emptied first,
//! and hosts of unknown cost are never emptied (nothing to save).

use std::collections::{BTreeMap, BTreeSet};

use berth_shared::host::Provider;
use berth_shared::ids::{HostId, TenantId};
use berth_shared::spec::Constraints;

use super::PlannedMove;
use super::scheduler::{Request, Scheduler, Strategy, Vec3};

/// Default share of each target's memory and CPU left free by a compaction.
pub const DEFAULT_HEADROOM_PERCENT: u32 = 10;
/// Default bound on the moves one compaction makes.
pub const DEFAULT_MAX_MOVES: u32 = 100;

/// What the operator allows a compaction to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactOptions {
    pub max_moves: u32,
    /// Only hosts of these providers are emptied (targets may be any); empty: every provider.
    pub providers: BTreeSet<Provider>,
    /// Share of each target host's memory and CPU that stays free.
    pub headroom_percent: u32,
}

impl Default for CompactOptions {
    fn default() -> Self {
        Self {
            max_moves: DEFAULT_MAX_MOVES,
            providers: BTreeSet::new(),
            headroom_percent: DEFAULT_HEADROOM_PERCENT,
        }
    }
}

/// A tenant as compaction moves it.
#[derive(Debug, Clone)]
pub struct Movable {
    pub tenant: TenantId,
    pub need: Vec3,
    pub encrypted: bool,
    pub constraints: Constraints,
    pub strategy: Strategy,
    pub volume_bytes: u64,
}

/// One host the plan empties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmptiedHost {
    pub host: HostId,
    pub provider: Provider,
    pub monthly_cost_cents: u64,
    pub moves: Vec<PlannedMove>,
}

/// A host the plan could not empty, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptHost {
    pub host: HostId,
    pub reason: String,
}

/// The outcome of planning a compaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionPlan {
    pub emptied: Vec<EmptiedHost>,
    /// Candidates (ready hosts of the allowed providers, with a known cost) left as they are.
    pub kept: Vec<KeptHost>,
}

impl CompactionPlan {
    pub fn saving_cents(&self) -> u64 {
        self.emptied.iter().map(|h| h.monthly_cost_cents).sum()
    }

    pub fn moves(&self) -> usize {
        self.emptied.iter().map(|h| h.moves.len()).sum()
    }
}

/// Plans a compaction of the fleet `scheduler` sees, whose hosts hold `tenants`; `busy` hosts
/// (a move to or from them under way) are not emptied.
pub fn plan(
    scheduler: &Scheduler,
    tenants: &BTreeMap<HostId, Vec<Movable>>,
    busy: &BTreeSet<HostId>,
    options: &CompactOptions,
) -> CompactionPlan {
    let none = Vec::new();
    let tenants_of = |host: &HostId| tenants.get(host).unwrap_or(&none);
    let mut out = CompactionPlan::default();
    // Candidates: ready hosts of an allowed provider; the most money saved per move first
    // (an empty host saves its cost for no move at all), then the fewest bytes to carry.
    let mut candidates: Vec<(HostId, Provider, u64, usize, u64)> = scheduler
        .hosts()
        .filter(|(info, _)| info.schedulable)
        .filter(|(info, _)| {
            options.providers.is_empty() || options.providers.contains(&info.provider)
        })
        .map(|(info, used)| {
            (
                info.id.clone(),
                info.provider,
                info.monthly_cost_cents,
                tenants_of(&info.id).len(),
                used.mem,
            )
        })
        .collect();
    candidates.sort_by(|a, b| {
        let per_move = |c: &(HostId, Provider, u64, usize, u64)| match c.3 {
            0 => f64::INFINITY,
            moves => c.2 as f64 / moves as f64,
        };
        per_move(b)
            .total_cmp(&per_move(a))
            .then(a.4.cmp(&b.4))
            .then(a.0.cmp(&b.0))
    });
    let mut fleet = scheduler.with_headroom(options.headroom_percent);
    let mut received: BTreeSet<HostId> = BTreeSet::new();
    let mut moves_left = options.max_moves as usize;
    for (host, provider, cost, count, _) in candidates {
        let keep = |reason: String| KeptHost {
            host: host.clone(),
            reason,
        };
        if cost == 0 {
            out.kept
                .push(keep("its monthly cost is unknown: nothing to save".into()));
            continue;
        }
        if busy.contains(&host) {
            out.kept
                .push(keep("a move to or from it is under way".into()));
            continue;
        }
        if received.contains(&host) {
            out.kept
                .push(keep("it receives tenants of an emptied host".into()));
            continue;
        }
        if count > moves_left {
            out.kept.push(keep(format!(
                "emptying it takes {count} moves, more than the {moves_left} left of max_moves"
            )));
            continue;
        }
        // Tried in place: the host leaves scheduling and its tenants are committed where
        // they go; a tenant that fits nowhere undoes both.
        fleet.set_schedulable(&host, false);
        let mut leaving: Vec<&Movable> = tenants_of(&host).iter().collect();
        leaving.sort_by(|a, b| {
            (b.need.mem, b.need.cpu, &a.tenant).cmp(&(a.need.mem, a.need.cpu, &b.tenant))
        });
        let mut moves = Vec::with_capacity(leaving.len());
        let mut refused = None;
        for t in &leaving {
            let request = Request {
                need: t.need,
                encrypted: t.encrypted,
                constraints: &t.constraints,
                strategy: t.strategy,
            };
            match fleet.choose(&request) {
                Ok(target) => {
                    fleet.commit(
                        &target,
                        t.need,
                        t.constraints.anti_affinity_group.as_deref(),
                    );
                    moves.push(PlannedMove {
                        tenant: t.tenant.clone(),
                        target,
                        memory_bytes: t.need.mem,
                        volume_bytes: t.volume_bytes,
                        not_before_unix_ms: 0,
                    });
                }
                Err(refusal) => {
                    refused = Some(format!("{} fits on no other host: {refusal}", t.tenant));
                    break;
                }
            }
        }
        if let Some(reason) = refused {
            for (m, t) in moves.iter().zip(&leaving) {
                fleet.release(
                    &m.target,
                    t.need,
                    t.constraints.anti_affinity_group.as_deref(),
                );
            }
            fleet.set_schedulable(&host, true);
            out.kept.push(keep(reason));
            continue;
        }
        moves_left -= moves.len();
        received.extend(moves.iter().map(|m| m.target.clone()));
        out.emptied.push(EmptiedHost {
            host,
            provider,
            monthly_cost_cents: cost,
            moves,
        });
    }
    out
}

#[cfg(test)]
mod tests;
