//! Tenant placements: which tenant runs where, durably, and the desired state each host must
//! converge to.
//!
//! Ensures: a placement is on disk before it is acknowledged (the caller waits for
//! [`Placements::make_durable`]); concurrent placements never double-book capacity (decision and
//! reservation happen under one lock); a host is told only desired states that are on disk;
//! generations only grow, also across a SIGKILL (they are allocated below a durable ceiling), so
//! an agent can refuse anything older than what it applied.

pub mod compaction;
pub mod scheduler;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use berth_shared::field::FieldError;
use berth_shared::ids::{HostId, TenantId};
use berth_shared::proto;
use berth_shared::spec::{Restore, SpecPolicy, TenantSpec};
use berth_shared::store::{Durability, Store, StoreError, Write, decode, encode};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::placement::scheduler::{
    CatalogEntry, HostInfo, Refusal, Request, Scheduler, Strategy, Vec3, explain,
};
use crate::registry::HostRecord;

const TENANT_PREFIX: &str = "tenant/";
const HOSTGEN_PREFIX: &str = "hostgen/";
/// Where the volume of a removed (not purged) tenant stays: `retained/<tenant>` → host.
const RETAINED_PREFIX: &str = "retained/";
const CEILING_KEY: &str = "meta/generation-ceiling";
/// Generations allocated per durable ceiling write.
const GENERATION_BLOCK: u64 = 1 << 20;
/// The reserve a recommended host type is assumed to keep for itself.
const RECOMMENDATION_RESERVE: u64 = 1 << 30;

/// What placement decisions follow, from the coordinator's configuration.
#[derive(Debug, Clone)]
pub struct PlacementPolicy {
    pub spec: SpecPolicy,
    pub strategy: Strategy,
    pub tier_strategy: HashMap<String, Strategy>,
    pub catalog: Vec<CatalogEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub spec: TenantSpec,
    pub host_id: HostId,
    pub generation: u64,
    pub placed_unix_ms: i64,
    /// Assigned to `host_id` but not delivered to it yet: its volume is on the way there
    /// (a drain), so no host runs it meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(
        "tenant {tenant} already exists with a different {field}; remove it first or send the same spec"
    )]
    Conflict { tenant: String, field: &'static str },
    #[error("{0}")]
    NoFit(Box<Refusal>),
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("host {host} cannot take tenant {tenant}: {reason}")]
    HostRefuses {
        tenant: String,
        host: String,
        reason: &'static str,
    },
    #[error(
        "tenant {tenant} was removed with its volume kept on host {host}, which cannot take it back: {reason}; free that host or purge the volume (berthctl remove {tenant} --purge)"
    )]
    RetainedVolume {
        tenant: String,
        host: String,
        reason: &'static str,
    },
    #[error(
        "tenant {tenant} is removed, but its volume on host {host} is not purged yet: {reason}; its key is kept: run `berthctl remove {tenant} --purge` again"
    )]
    PurgeIncomplete {
        tenant: String,
        host: String,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A change waiting for the flush that makes it durable.
#[derive(Debug)]
struct Change {
    seq: u64,
    host: HostId,
    tenant: TenantId,
    generation: u64,
    spec: Option<Arc<proto::TenantSpec>>,
    /// With `spec`: staged on the host (made ready, not run).
    held: bool,
}

#[derive(Debug, Default)]
struct HostDesired {
    generation: u64,
    tenants: BTreeMap<TenantId, Arc<proto::TenantSpec>>,
    staged: BTreeMap<TenantId, Arc<proto::TenantSpec>>,
}

#[derive(Debug, Default)]
struct State {
    scheduler: Scheduler,
    tenants: BTreeMap<TenantId, TenantRecord>,
    generation: u64,
    ceiling: u64,
    /// Sequence number of the last applied (not necessarily durable) change.
    seq: u64,
    pending: VecDeque<Change>,
    durable: HashMap<HostId, HostDesired>,
    /// Per host, the generation of its durable desired state; sessions build the state itself
    /// only when they send it, so a burst of placements costs one snapshot, not one each.
    watchers: HashMap<HostId, watch::Sender<u64>>,
    observed: HashMap<TenantId, proto::TenantStatus>,
    acks: HashMap<HostId, proto::DesiredStateAck>,
    tenants_per_host: HashMap<HostId, u32>,
    /// Removed tenants whose volume is kept, and the host that keeps it.
    retained: HashMap<TenantId, HostId>,
    /// Capacity reserved on a target host for a drain's planned move, per tenant.
    reserved: HashMap<TenantId, HostId>,
    /// Tenants staged on their move's target while they still run where they are placed.
    prestaged: HashMap<TenantId, HostId>,
}

/// What one host holds: its tenants' caps (committed) and what they reported using.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostLoad {
    pub tenants: u32,
    pub running: u32,
    pub memory_committed: u64,
    pub cpu_committed_millicores: u64,
    /// The sum of its tenants' volume sizes.
    pub disk_committed: u64,
    pub memory_used: u64,
    /// The CPU its tenants used lately, as reported.
    pub cpu_used_millicores: u64,
    pub oom_kills: u64,
}

/// The result of a placement or removal: wait for durability with its `seq`.
#[derive(Debug, Clone)]
pub struct Applied {
    pub seq: u64,
    pub placement: proto::Placement,
}

#[derive(Debug)]
pub struct Placements {
    store: Arc<dyn Store>,
    policy: PlacementPolicy,
    state: Mutex<State>,
    /// Woken by every acknowledgement and report from an agent.
    reports: tokio::sync::Notify,
    /// The last [`Placements::compaction_outlook`] and when it was planned.
    outlook: Mutex<Option<(std::time::Instant, compaction::CompactionPlan)>>,
}

/// How long the dashboard's compaction outlook is kept before it is planned again.
const OUTLOOK_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(10);

/// The scheduler's view of a host record; `None` until the host sent its facts.
pub fn host_info(record: &HostRecord, schedulable: bool) -> Option<HostInfo> {
    let facts = record.facts.as_ref()?;
    Some(HostInfo {
        id: record.host_id.clone(),
        provider: facts.provider,
        region: facts.region.clone(),
        labels: facts.labels.clone(),
        dm_crypt: facts.capabilities.dm_crypt,
        monthly_cost_cents: facts.monthly_cost_cents,
        allocatable: Vec3 {
            mem: facts
                .memory_total_bytes
                .saturating_sub(facts.memory_reserved_bytes),
            cpu: facts.cpu_allocatable_millicores(),
            disk: disk_capacity(facts.disk_total_bytes),
        },
        schedulable,
    })
}

/// The disk tenants' volumes may take on a host of `total` bytes: a tenth is kept for the
/// host, its images and logs.
pub fn disk_capacity(total: u64) -> u64 {
    total / 10 * 9
}

fn need(spec: &TenantSpec) -> Vec3 {
    Vec3 {
        mem: spec.resources.memory_bytes,
        cpu: u64::from(spec.resources.cpu_millicores),
        disk: spec.resources.volume_bytes,
    }
}

/// The first top-level field in which two specs differ, for a precise conflict message.
fn differing_field(a: &TenantSpec, b: &TenantSpec) -> &'static str {
    if a.image != b.image {
        "image"
    } else if a.tier != b.tier {
        "tier"
    } else if a.resources != b.resources {
        "resources"
    } else if a.egress != b.egress {
        "egress"
    } else if a.volume != b.volume {
        "volume"
    } else if a.restart != b.restart {
        "restart"
    } else if a.constraints != b.constraints {
        "constraints"
    } else if a.gateway_port != b.gateway_port {
        "gateway_port"
    } else if a.backup != b.backup {
        "backup"
    } else {
        "env"
    }
}

/// One tenant's move in a drain plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedMove {
    pub tenant: TenantId,
    pub target: HostId,
    pub memory_bytes: u64,
    pub volume_bytes: u64,
    /// Not started before this (Unix ms; 0: at once).
    pub not_before_unix_ms: i64,
}

impl State {
    /// Commits a tenant's need on `target` as a drain's reservation.
    fn reserve(&mut self, tenant: &TenantId, target: &HostId) {
        if self.reserved.contains_key(tenant) {
            return;
        }
        if let Some(record) = self.tenants.get(tenant).cloned() {
            self.scheduler.commit(
                target,
                need(&record.spec),
                record.spec.constraints.anti_affinity_group.as_deref(),
            );
            self.reserved.insert(tenant.clone(), target.clone());
        }
    }

    /// Queues a new desired state for `host` that stages `tenant` there (with its `spec`) or no
    /// longer does (`None`); returns the change's sequence number.
    fn stage_change(
        &mut self,
        store: &dyn Store,
        tenant: &TenantId,
        host: &HostId,
        spec: Option<Arc<proto::TenantSpec>>,
    ) -> Result<u64, StoreError> {
        let mut writes = Vec::with_capacity(2);
        let generation = self.next_generation(&mut writes);
        writes.push(Write::Put(
            format!("{HOSTGEN_PREFIX}{host}"),
            encode(&generation),
        ));
        store.apply(writes, Durability::Lazy)?;
        self.seq += 1;
        self.pending.push_back(Change {
            seq: self.seq,
            host: host.clone(),
            tenant: tenant.clone(),
            generation,
            held: spec.is_some(),
            spec,
        });
        Ok(self.seq)
    }

    /// Allocates a generation; extends the durable ceiling (in the same batch) when needed.
    fn next_generation(&mut self, writes: &mut Vec<Write>) -> u64 {
        self.generation += 1;
        if self.generation >= self.ceiling {
            self.ceiling = self.generation + GENERATION_BLOCK;
            writes.push(Write::Put(CEILING_KEY.into(), encode(&self.ceiling)));
        }
        self.generation
    }

    fn desired_state(&self, host: &HostId) -> proto::DesiredState {
        let desired = self.durable.get(host);
        proto::DesiredState {
            generation: desired.map_or(0, |d| d.generation),
            tenants: desired
                .map(|d| d.tenants.values().map(|s| (**s).clone()).collect())
                .unwrap_or_default(),
            staged: desired
                .map(|d| d.staged.values().map(|s| (**s).clone()).collect())
                .unwrap_or_default(),
        }
    }

    fn placement(&self, record: &TenantRecord) -> proto::Placement {
        proto::Placement {
            tenant_id: record.spec.tenant_id.to_string(),
            host_id: record.host_id.to_string(),
            generation: record.generation,
            state: self.tenant_state(record).0 as i32,
            delivered: self
                .acks
                .get(&record.host_id)
                .is_some_and(|a| a.accepted && a.generation >= record.generation),
        }
    }

    /// A tenant's state and the reason, from what its host acknowledged and reported.
    fn tenant_state(&self, record: &TenantRecord) -> (proto::TenantState, &str) {
        if let Some(ack) = self.acks.get(&record.host_id)
            && ack.generation >= record.generation
            && !ack.accepted
        {
            return (proto::TenantState::Failed, &ack.error);
        }
        match self.observed.get(&record.spec.tenant_id) {
            Some(status) if status.generation >= record.generation => (
                proto::TenantState::try_from(status.state).unwrap_or(proto::TenantState::Pending),
                &status.message,
            ),
            _ => (proto::TenantState::Pending, ""),
        }
    }
}

impl Placements {
    /// Loads every placement from the store and rebuilds the scheduler's view of `hosts`.
    pub fn load(
        store: Arc<dyn Store>,
        policy: PlacementPolicy,
        hosts: &[HostInfo],
    ) -> Result<Self, StoreError> {
        let mut state = State::default();
        for host in hosts {
            state.scheduler.upsert_host(host.clone());
        }
        for (key, bytes) in store.scan_prefix(TENANT_PREFIX)? {
            let record: TenantRecord = decode(&key, &bytes)?;
            state.scheduler.commit(
                &record.host_id,
                need(&record.spec),
                record.spec.constraints.anti_affinity_group.as_deref(),
            );
            let desired = state.durable.entry(record.host_id.clone()).or_default();
            let spec = Arc::new(record.spec.to_proto());
            match record.held {
                true => desired.staged.insert(record.spec.tenant_id.clone(), spec),
                false => desired.tenants.insert(record.spec.tenant_id.clone(), spec),
            };
            *state
                .tenants_per_host
                .entry(record.host_id.clone())
                .or_default() += 1;
            state.tenants.insert(record.spec.tenant_id.clone(), record);
        }
        for (key, bytes) in store.scan_prefix(RETAINED_PREFIX)? {
            let host: HostId = decode(&key, &bytes)?;
            if let Ok(tenant) = TenantId::new(&key[RETAINED_PREFIX.len()..]) {
                state.retained.insert(tenant, host);
            }
        }
        for (key, bytes) in store.scan_prefix(HOSTGEN_PREFIX)? {
            let generation: u64 = decode(&key, &bytes)?;
            if let Ok(host) = HostId::new(&key[HOSTGEN_PREFIX.len()..]) {
                state.durable.entry(host).or_default().generation = generation;
            }
        }
        // Every generation handed out before a crash, durable or not, is below the old
        // ceiling: start there, and move the ceiling up durably before anything else.
        let ceiling: u64 = match store.get(CEILING_KEY)? {
            Some(bytes) => decode(CEILING_KEY, &bytes)?,
            None => 0,
        };
        state.generation = ceiling;
        state.ceiling = ceiling + GENERATION_BLOCK;
        store.apply(
            vec![Write::Put(CEILING_KEY.into(), encode(&state.ceiling))],
            Durability::Flushed,
        )?;
        Ok(Self {
            store,
            policy,
            state: Mutex::new(state),
            reports: tokio::sync::Notify::new(),
            outlook: Mutex::new(None),
        })
    }

    /// Waits until `check` gives an answer, checking again after every acknowledgement and
    /// report from an agent (and at least every `recheck`, for conditions they do not
    /// change); `None` once `deadline` passes without one.
    pub async fn wait_for_report<T>(
        &self,
        deadline: tokio::time::Instant,
        recheck: std::time::Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        loop {
            // Registered before the check, so a report between the two is not missed.
            let reported = self.reports.notified();
            tokio::pin!(reported);
            reported.as_mut().enable();
            if let Some(answer) = check() {
                return Some(answer);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return None;
            }
            let _ = tokio::time::timeout_at(deadline.min(now + recheck), reported).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates a spec without placing it.
    fn validate(&self, spec: proto::TenantSpec) -> Result<TenantSpec, FieldError> {
        TenantSpec::from_proto(spec, &self.policy.spec)
    }

    /// Places a tenant (or returns its existing placement for the same spec). Durable only
    /// after [`Placements::make_durable`] with the returned `seq`.
    pub fn place(&self, spec: proto::TenantSpec, now_unix_ms: i64) -> Result<Applied, PlaceError> {
        if spec.restore.is_some() {
            return Err(FieldError::new(
                "restore",
                "set by `berthctl restore` and by drains, never in a spec",
            )
            .into());
        }
        let spec = self.validate(spec)?;
        let mut state = self.lock();
        if let Some(existing) = state.tenants.get(&spec.tenant_id) {
            // The same spec again: a restore the coordinator asked of it is no difference.
            let asked = TenantSpec {
                restore: existing.spec.restore.clone(),
                ..spec.clone()
            };
            if existing.spec == asked {
                return Ok(Applied {
                    seq: state.seq,
                    placement: state.placement(existing),
                });
            }
            return Err(PlaceError::Conflict {
                tenant: spec.tenant_id.to_string(),
                field: differing_field(&existing.spec, &spec),
            });
        }
        self.check_regions(&state, &spec)?;
        let need = need(&spec);
        let largest = state
            .scheduler
            .hosts()
            .map(|(h, _)| h.allocatable.mem)
            .max();
        if let Some(largest) = largest
            && need.mem > largest
        {
            return Err(FieldError::new(
                "resources.memory_bytes",
                format!(
                    "{} MiB is larger than the largest host ({} MiB allocatable)",
                    need.mem >> 20,
                    largest >> 20
                ),
            )
            .into());
        }
        let request = Request {
            need,
            encrypted: spec.volume.encrypted,
            constraints: &spec.constraints,
            strategy: self.strategy_for(&spec),
        };
        // A tenant removed with its volume kept comes back to the host that keeps it.
        let retained = state.retained.get(&spec.tenant_id).cloned();
        let host = match &retained {
            Some(host) => state
                .scheduler
                .check(host, &request)
                .map(|()| host.clone())
                .map_err(|filter| PlaceError::RetainedVolume {
                    tenant: spec.tenant_id.to_string(),
                    host: host.to_string(),
                    reason: filter.reason(),
                })?,
            None => state.scheduler.choose(&request).map_err(|mut refusal| {
                // The catalog knows host types by memory and CPU; their disks are whatever is
                // attached. A volume larger than any host's disk here has no host type to name.
                let largest_disk = state
                    .scheduler
                    .hosts()
                    .map(|(info, _)| info.allocatable.disk)
                    .max()
                    .unwrap_or(0);
                refusal.recommendation = (need.disk <= largest_disk)
                    .then(|| {
                        explain::recommend(
                            &self.policy.catalog,
                            need,
                            RECOMMENDATION_RESERVE,
                            &spec.constraints,
                        )
                    })
                    .flatten();
                PlaceError::NoFit(refusal)
            })?,
        };
        let mut writes = Vec::with_capacity(4);
        if retained.is_some() {
            writes.push(Write::Delete(format!(
                "{RETAINED_PREFIX}{}",
                spec.tenant_id
            )));
        }
        let generation = state.next_generation(&mut writes);
        let record = TenantRecord {
            spec,
            host_id: host.clone(),
            generation,
            placed_unix_ms: now_unix_ms,
            held: false,
        };
        let group = record.spec.constraints.anti_affinity_group.clone();
        let tenant = record.spec.tenant_id.clone();
        let applied = self.record(&mut state, record, writes)?;
        state.retained.remove(&tenant);
        state.scheduler.commit(&host, need, group.as_deref());
        *state.tenants_per_host.entry(host).or_default() += 1;
        Ok(applied)
    }

    /// Persists `record` (lazily: see [`Placements::make_durable`]) with its host's
    /// generation, queues it for the host, and makes it the tenant's record.
    fn record(
        &self,
        state: &mut State,
        record: TenantRecord,
        mut writes: Vec<Write>,
    ) -> Result<Applied, PlaceError> {
        writes.push(Write::Put(
            format!("{TENANT_PREFIX}{}", record.spec.tenant_id),
            encode(&record),
        ));
        writes.push(Write::Put(
            format!("{HOSTGEN_PREFIX}{}", record.host_id),
            encode(&record.generation),
        ));
        self.store.apply(writes, Durability::Lazy)?;
        state.seq += 1;
        let seq = state.seq;
        let tenant = record.spec.tenant_id.clone();
        state.pending.push_back(Change {
            seq,
            host: record.host_id.clone(),
            tenant: tenant.clone(),
            generation: record.generation,
            spec: Some(Arc::new(record.spec.to_proto())),
            held: record.held,
        });
        let placement = state.placement(&record);
        state.tenants.insert(tenant, record);
        Ok(Applied { seq, placement })
    }

    /// Replaces a placed tenant's egress allowlist (validated like a placement's); its host
    /// gets a new generation and updates the rules without restarting the container.
    pub fn set_egress(
        &self,
        tenant_id: &TenantId,
        egress: Vec<proto::EgressRule>,
    ) -> Result<Applied, PlaceError> {
        let mut state = self.lock();
        let existing = state
            .tenants
            .get(tenant_id)
            .cloned()
            .ok_or_else(|| PlaceError::UnknownTenant(tenant_id.to_string()))?;
        let spec = self.validate(proto::TenantSpec {
            egress,
            ..existing.spec.to_proto()
        })?;
        if spec == existing.spec {
            return Ok(Applied {
                seq: state.seq,
                placement: state.placement(&existing),
            });
        }
        let mut writes = Vec::with_capacity(3);
        let generation = state.next_generation(&mut writes);
        let record = TenantRecord {
            spec,
            generation,
            ..existing
        };
        self.record(&mut state, record, writes)
    }

    /// Asks the host of a placed tenant to restore its volume from `snapshot` (the latest when
    /// `None`) before its container runs again: a new generation, whose number is the
    /// restore's id.
    pub fn set_restore(
        &self,
        tenant_id: &TenantId,
        snapshot: Option<String>,
    ) -> Result<Applied, PlaceError> {
        let mut state = self.lock();
        let mut record = state
            .tenants
            .get(tenant_id)
            .cloned()
            .ok_or_else(|| PlaceError::UnknownTenant(tenant_id.to_string()))?;
        let mut writes = Vec::with_capacity(3);
        record.generation = state.next_generation(&mut writes);
        record.spec.restore = Some(Restore {
            id: record.generation,
            snapshot,
        });
        self.record(&mut state, record, writes)
    }

    fn strategy_for(&self, spec: &TenantSpec) -> Strategy {
        spec.tier
            .as_ref()
            .and_then(|t| self.policy.tier_strategy.get(t))
            .copied()
            .unwrap_or(self.policy.strategy)
    }

    /// Every region constraint must name (or, with `*`, match) a region that a host or the
    /// catalog has: a typo is an error, not a silent "nothing fits".
    fn check_regions(&self, state: &State, spec: &TenantSpec) -> Result<(), FieldError> {
        let known: std::collections::BTreeSet<&str> = state
            .scheduler
            .hosts()
            .map(|(h, _)| h.region.as_str())
            .chain(
                self.policy
                    .catalog
                    .iter()
                    .flat_map(|e| e.regions.iter().map(String::as_str)),
            )
            .collect();
        for pattern in &spec.constraints.regions {
            let matches = |r: &&str| match pattern.strip_suffix('*') {
                Some(prefix) => r.starts_with(prefix),
                None => *r == pattern,
            };
            if !known.iter().any(matches) {
                let list: Vec<&str> = known.iter().copied().collect();
                return Err(FieldError::new(
                    "constraints.regions",
                    format!("unknown region {pattern:?} (known: {})", list.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// Removes a tenant: its host is told to stop it, its capacity is freed; its volume stays
    /// on that host (recorded, so a purge or a new placement finds it).
    pub fn remove(&self, tenant_id: &TenantId) -> Result<Applied, PlaceError> {
        let mut state = self.lock();
        let record = state
            .tenants
            .get(tenant_id)
            .cloned()
            .ok_or_else(|| PlaceError::UnknownTenant(tenant_id.to_string()))?;
        let mut writes = Vec::with_capacity(3);
        let generation = state.next_generation(&mut writes);
        writes.push(Write::Delete(format!("{TENANT_PREFIX}{tenant_id}")));
        writes.push(Write::Put(
            format!("{HOSTGEN_PREFIX}{}", record.host_id),
            encode(&generation),
        ));
        writes.push(Write::Put(
            format!("{RETAINED_PREFIX}{tenant_id}"),
            encode(&record.host_id),
        ));
        self.store.apply(writes, Durability::Lazy)?;
        state
            .retained
            .insert(tenant_id.clone(), record.host_id.clone());
        state.scheduler.release(
            &record.host_id,
            need(&record.spec),
            record.spec.constraints.anti_affinity_group.as_deref(),
        );
        state.tenants.remove(tenant_id);
        state.observed.remove(tenant_id);
        if let Some(n) = state.tenants_per_host.get_mut(&record.host_id) {
            *n = n.saturating_sub(1);
        }
        state.seq += 1;
        let seq = state.seq;
        state.pending.push_back(Change {
            seq,
            host: record.host_id.clone(),
            tenant: tenant_id.clone(),
            generation,
            spec: None,
            held: false,
        });
        let placement = proto::Placement {
            tenant_id: tenant_id.to_string(),
            host_id: record.host_id.to_string(),
            generation,
            state: proto::TenantState::Stopped as i32,
            delivered: false,
        };
        Ok(Applied { seq, placement })
    }

    // --- drains ---

    /// Plans moving every tenant off `source` under all its constraints and the fleet's
    /// capacity now, biggest first; with `reserve`, atomically reserves the targets' capacity
    /// and takes `source` out of scheduling. Returns the moves, or one refusal per tenant that
    /// cannot move (then nothing changed).
    pub fn plan_drain(
        &self,
        source: &HostId,
        reserve: bool,
    ) -> Result<Vec<PlannedMove>, Vec<String>> {
        let mut state = self.lock();
        let mut scratch = state.scheduler.without(source);
        let mut tenants: Vec<&TenantRecord> = state
            .tenants
            .values()
            .filter(|r| r.host_id == *source)
            .collect();
        tenants.sort_by(|a, b| {
            let (na, nb) = (need(&a.spec), need(&b.spec));
            (nb.mem, nb.cpu, &a.spec.tenant_id).cmp(&(na.mem, na.cpu, &b.spec.tenant_id))
        });
        let mut moves = Vec::new();
        let mut refusals = Vec::new();
        for record in tenants {
            let spec = &record.spec;
            let request = Request {
                need: need(spec),
                encrypted: spec.volume.encrypted,
                constraints: &spec.constraints,
                strategy: self.strategy_for(spec),
            };
            match scratch.choose(&request) {
                Ok(target) => {
                    scratch.commit(
                        &target,
                        request.need,
                        spec.constraints.anti_affinity_group.as_deref(),
                    );
                    moves.push(PlannedMove {
                        tenant: spec.tenant_id.clone(),
                        target,
                        memory_bytes: spec.resources.memory_bytes,
                        volume_bytes: spec.resources.volume_bytes,
                        not_before_unix_ms: 0,
                    });
                }
                Err(_) if scratch.hosts().next().is_none() => refusals.push(format!(
                    "{}: no other host in the fleet to move to",
                    spec.tenant_id
                )),
                Err(refusal) => refusals.push(format!("{}: {refusal}", spec.tenant_id)),
            }
        }
        if !refusals.is_empty() {
            return Err(refusals);
        }
        if reserve {
            state.scheduler.set_schedulable(source, false);
            for m in &moves {
                state.reserve(&m.tenant, &m.target);
            }
        }
        Ok(moves)
    }

    /// Plans a compaction (see [`compaction`]) of the fleet as it is now; with `reserve`,
    /// atomically reserves every move's target and takes the hosts to empty out of scheduling,
    /// so the drains that carry the plan out find the room it counted on.
    pub fn plan_compaction(
        &self,
        options: &compaction::CompactOptions,
        reserve: bool,
    ) -> compaction::CompactionPlan {
        let mut state = self.lock();
        let mut tenants: BTreeMap<HostId, Vec<compaction::Movable>> = BTreeMap::new();
        let mut busy: BTreeSet<HostId> = state
            .reserved
            .values()
            .chain(state.prestaged.values())
            .cloned()
            .collect();
        for record in state.tenants.values() {
            if record.held || state.reserved.contains_key(&record.spec.tenant_id) {
                busy.insert(record.host_id.clone());
            }
            let spec = &record.spec;
            tenants
                .entry(record.host_id.clone())
                .or_default()
                .push(compaction::Movable {
                    tenant: spec.tenant_id.clone(),
                    need: need(spec),
                    encrypted: spec.volume.encrypted,
                    constraints: spec.constraints.clone(),
                    strategy: self.strategy_for(spec),
                    volume_bytes: spec.resources.volume_bytes,
                });
        }
        if !reserve {
            // Only a look (the dashboard's): planned on a copy, placements go on meanwhile.
            let scheduler = state.scheduler.clone();
            drop(state);
            return compaction::plan(&scheduler, &tenants, &busy, options);
        }
        let plan = compaction::plan(&state.scheduler, &tenants, &busy, options);
        for host in &plan.emptied {
            state.scheduler.set_schedulable(&host.host, false);
            for m in &host.moves {
                state.reserve(&m.tenant, &m.target);
            }
        }
        plan
    }

    /// What a compaction with the default options would do, planned at most
    /// `OUTLOOK_MAX_AGE` ago: the dashboard's figure, which planning at every render of a page
    /// that refreshes itself would make slow on a large fleet.
    pub fn compaction_outlook(&self) -> compaction::CompactionPlan {
        let mut outlook = self.outlook.lock().unwrap_or_else(|p| p.into_inner());
        match &*outlook {
            Some((at, plan)) if at.elapsed() < OUTLOOK_MAX_AGE => plan.clone(),
            _ => {
                let plan = self.plan_compaction(&compaction::CompactOptions::default(), false);
                *outlook = Some((std::time::Instant::now(), plan.clone()));
                plan
            }
        }
    }

    /// Reserves a planned move's target again (a coordinator restart resumes a drain).
    pub fn reserve(&self, tenant: &TenantId, target: &HostId) {
        self.lock().reserve(tenant, target);
    }

    /// Gives back the capacity reserved for a move that will not happen, and unstages the
    /// tenant on its target; returns the change to wait for when there is one.
    pub fn release_reservation(&self, tenant: &TenantId) -> Result<Option<u64>, StoreError> {
        let mut state = self.lock();
        let Some(record) = state.tenants.get(tenant).cloned() else {
            return Ok(None);
        };
        if let Some(target) = state.reserved.remove(tenant) {
            state.scheduler.release(
                &target,
                need(&record.spec),
                record.spec.constraints.anti_affinity_group.as_deref(),
            );
        }
        match state.prestaged.remove(tenant) {
            Some(target) if target != record.host_id => state
                .stage_change(self.store.as_ref(), tenant, &target, None)
                .map(Some),
            _ => Ok(None),
        }
    }

    /// Stages a tenant on the target of its reserved move while it still runs where it is
    /// placed: the target readies its image, network and egress rules while the volume is
    /// pre-copied, so that the tenant starts there as soon as its volume arrives. Undone by
    /// [`Self::release_reservation`]; superseded by the move's [`Self::relocate`]. Returns the
    /// change to wait for, if this staged anything new.
    pub fn prestage(&self, tenant: &TenantId) -> Result<Option<u64>, PlaceError> {
        let mut state = self.lock();
        let record = state
            .tenants
            .get(tenant)
            .cloned()
            .ok_or_else(|| PlaceError::UnknownTenant(tenant.to_string()))?;
        let Some(target) = state.reserved.get(tenant).cloned() else {
            return Ok(None);
        };
        if target == record.host_id || state.prestaged.get(tenant) == Some(&target) {
            return Ok(None);
        }
        let spec = Arc::new(record.spec.to_proto());
        let seq = state.stage_change(self.store.as_ref(), tenant, &target, Some(spec))?;
        state.prestaged.insert(tenant.clone(), target);
        Ok(Some(seq))
    }

    /// Assigns a tenant to `host`, to run there or, `held`, only staged there (made ready, not
    /// run), with a new generation (so the host it leaves stops it and can never start the old
    /// copy again). The capacity reserved for it on `host` becomes its placement.
    /// The tenant's volume travels with it (its contents are already restored if a restore
    /// was asked before), so the target is asked for no restore.
    pub fn relocate(
        &self,
        tenant_id: &TenantId,
        host: &HostId,
        held: bool,
    ) -> Result<Applied, PlaceError> {
        self.relocate_with(tenant_id, host, held, None)
    }

    /// [`Self::relocate`] without the volume: the tenant starts on `host` with its volume
    /// restored from `snapshot` (the latest when `None`); the restore's id is the generation.
    /// Without capacity reserved there (a drain's), `host` must take it as a placement would.
    pub fn relocate_restoring(
        &self,
        tenant_id: &TenantId,
        host: &HostId,
        snapshot: Option<String>,
    ) -> Result<Applied, PlaceError> {
        self.relocate_with(tenant_id, host, false, Some(snapshot))
    }

    fn relocate_with(
        &self,
        tenant_id: &TenantId,
        host: &HostId,
        held: bool,
        restore_from: Option<Option<String>>,
    ) -> Result<Applied, PlaceError> {
        let mut state = self.lock();
        let old = state
            .tenants
            .get(tenant_id)
            .cloned()
            .ok_or_else(|| PlaceError::UnknownTenant(tenant_id.to_string()))?;
        if restore_from.is_some()
            && old.host_id != *host
            && state.reserved.get(tenant_id) != Some(host)
        {
            let request = Request {
                need: need(&old.spec),
                encrypted: old.spec.volume.encrypted,
                constraints: &old.spec.constraints,
                strategy: self.strategy_for(&old.spec),
            };
            if let Err(filter) = state.scheduler.check(host, &request) {
                return Err(PlaceError::HostRefuses {
                    tenant: tenant_id.to_string(),
                    host: host.to_string(),
                    reason: filter.reason(),
                });
            }
        }
        let mut writes = Vec::with_capacity(4);
        let generation = state.next_generation(&mut writes);
        let record = TenantRecord {
            spec: TenantSpec {
                restore: restore_from.map(|snapshot| Restore {
                    id: generation,
                    snapshot,
                }),
                ..old.spec.clone()
            },
            host_id: host.clone(),
            generation,
            held,
            ..old.clone()
        };
        writes.push(Write::Put(
            format!("{TENANT_PREFIX}{tenant_id}"),
            encode(&record),
        ));
        for h in [&old.host_id, host] {
            writes.push(Write::Put(
                format!("{HOSTGEN_PREFIX}{h}"),
                encode(&generation),
            ));
        }
        self.store.apply(writes, Durability::Lazy)?;
        let group = old.spec.constraints.anti_affinity_group.as_deref();
        // Staged on `host` ahead of this, it is now simply assigned there (staged elsewhere, the
        // reservation's release unstages it).
        if state.prestaged.get(tenant_id) == Some(host) {
            state.prestaged.remove(tenant_id);
        }
        if old.host_id != *host {
            state
                .scheduler
                .release(&old.host_id, need(&old.spec), group);
            if state.reserved.get(tenant_id) == Some(host) {
                state.reserved.remove(tenant_id);
            } else {
                state.scheduler.commit(host, need(&old.spec), group);
            }
            if let Some(n) = state.tenants_per_host.get_mut(&old.host_id) {
                *n = n.saturating_sub(1);
            }
            *state.tenants_per_host.entry(host.clone()).or_default() += 1;
            state.observed.remove(tenant_id);
        }
        state.seq += 1;
        let seq = state.seq;
        if old.host_id != *host {
            state.pending.push_back(Change {
                seq,
                host: old.host_id.clone(),
                tenant: tenant_id.clone(),
                generation,
                spec: None,
                held: false,
            });
        }
        state.pending.push_back(Change {
            seq,
            host: host.clone(),
            tenant: tenant_id.clone(),
            generation,
            spec: Some(Arc::new(record.spec.to_proto())),
            held,
        });
        let placement = state.placement(&record);
        state.tenants.insert(tenant_id.clone(), record);
        Ok(Applied { seq, placement })
    }

    /// A placed tenant's record.
    pub fn tenant_record(&self, tenant_id: &TenantId) -> Option<TenantRecord> {
        self.lock().tenants.get(tenant_id).cloned()
    }

    /// The host that keeps a removed tenant's volume.
    pub fn retained(&self, tenant_id: &TenantId) -> Option<HostId> {
        self.lock().retained.get(tenant_id).cloned()
    }

    /// Forgets a removed tenant's volume (it was purged), durably.
    pub fn forget_retained(&self, tenant_id: &TenantId) -> Result<(), StoreError> {
        let mut state = self.lock();
        self.store.apply(
            vec![Write::Delete(format!("{RETAINED_PREFIX}{tenant_id}"))],
            Durability::Flushed,
        )?;
        state.retained.remove(tenant_id);
        Ok(())
    }

    /// Whether `host` acknowledged a desired state of at least `generation`.
    pub fn delivered(&self, host: &HostId, generation: u64) -> bool {
        self.lock()
            .acks
            .get(host)
            .is_some_and(|a| a.accepted && a.generation >= generation)
    }

    /// Blocks until change `seq` (and every change before it) is on disk, then tells the
    /// affected hosts. Call from a blocking context.
    pub fn make_durable(&self, seq: u64) -> Result<(), StoreError> {
        // Every change up to `upto` was applied to the store before this flush request.
        let upto = self.lock().seq.max(seq);
        self.store.flush()?;
        let mut state = self.lock();
        let mut touched = Vec::new();
        while state.pending.front().is_some_and(|c| c.seq <= upto) {
            let Some(change) = state.pending.pop_front() else {
                break;
            };
            let desired = state.durable.entry(change.host.clone()).or_default();
            desired.generation = desired.generation.max(change.generation);
            desired.tenants.remove(&change.tenant);
            desired.staged.remove(&change.tenant);
            match (change.spec, change.held) {
                (Some(spec), false) => desired.tenants.insert(change.tenant, spec),
                (Some(spec), true) => desired.staged.insert(change.tenant, spec),
                (None, _) => None,
            };
            touched.push(change.host);
        }
        touched.dedup();
        for host in touched {
            let generation = state.durable.get(&host).map_or(0, |d| d.generation);
            if let Some(watcher) = state.watchers.get(&host) {
                watcher.send_replace(generation);
            }
        }
        Ok(())
    }

    /// Notifies when the durable desired state of `host` changes (the value is its generation;
    /// read the state with [`Placements::desired_state`]).
    pub fn subscribe(&self, host: &HostId) -> watch::Receiver<u64> {
        let mut state = self.lock();
        let current = state.durable.get(host).map_or(0, |d| d.generation);
        state
            .watchers
            .entry(host.clone())
            .or_insert_with(|| watch::Sender::new(current))
            .subscribe()
    }

    /// The durable desired state of `host`: every tenant placed there whose placement is on disk.
    pub fn desired_state(&self, host: &HostId) -> proto::DesiredState {
        self.lock().desired_state(host)
    }

    // --- host updates ---

    pub fn upsert_host(&self, info: HostInfo) {
        self.lock().scheduler.upsert_host(info);
    }

    pub fn set_schedulable(&self, host: &HostId, schedulable: bool) {
        self.lock().scheduler.set_schedulable(host, schedulable);
    }

    /// An agent's answer to a desired state.
    pub fn record_ack(&self, host: &HostId, ack: proto::DesiredStateAck) {
        self.lock().acks.insert(host.clone(), ack);
        self.reports.notify_waiters();
    }

    /// What an agent reports of its tenants. Statuses of tenants not placed on `host` are
    /// ignored: an agent speaks only for its own host.
    pub fn record_statuses(&self, host: &HostId, statuses: Vec<proto::TenantStatus>) {
        let mut state = self.lock();
        for status in statuses {
            let Ok(id) = TenantId::new(&status.tenant_id) else {
                continue;
            };
            if state.tenants.get(&id).is_some_and(|r| r.host_id == *host) {
                state.observed.insert(id, status);
            }
        }
        drop(state);
        self.reports.notify_waiters();
    }

    // --- views ---

    fn tenant_view(state: &State, record: &TenantRecord) -> proto::Tenant {
        let (tenant_state, message) = state.tenant_state(record);
        let mut status = state
            .observed
            .get(&record.spec.tenant_id)
            .cloned()
            .unwrap_or_default();
        status.tenant_id = record.spec.tenant_id.to_string();
        status.state = tenant_state as i32;
        status.message = message.to_string();
        proto::Tenant {
            spec: Some(record.spec.to_proto()),
            placement: Some(state.placement(record)),
            status: Some(status),
        }
    }

    pub fn tenant(&self, id: &TenantId) -> Option<proto::Tenant> {
        let state = self.lock();
        state.tenants.get(id).map(|r| Self::tenant_view(&state, r))
    }

    pub fn tenants(&self, host: Option<&HostId>) -> Vec<proto::Tenant> {
        let state = self.lock();
        state
            .tenants
            .values()
            .filter(|r| host.is_none_or(|h| r.host_id == *h))
            .map(|r| Self::tenant_view(&state, r))
            .collect()
    }

    /// Per tier, the CPU each of its running tenants used lately, as their hosts reported.
    pub fn cpu_use_by_tier(&self) -> HashMap<String, Vec<u32>> {
        let state = self.lock();
        let mut out: HashMap<String, Vec<u32>> = HashMap::new();
        for record in state.tenants.values() {
            let Some(tier) = &record.spec.tier else {
                continue;
            };
            if state.tenant_state(record).0 != proto::TenantState::Running {
                continue;
            }
            let used = state
                .observed
                .get(&record.spec.tenant_id)
                .map_or(0, |s| s.cpu_used_millicores);
            match out.get_mut(tier) {
                Some(uses) => uses.push(used),
                None => {
                    out.insert(tier.clone(), vec![used]);
                }
            }
        }
        out
    }

    /// What every host holds, in one pass over the tenants.
    pub fn host_loads(&self) -> HashMap<HostId, HostLoad> {
        self.loads(None)
    }

    /// What one host holds.
    pub fn host_load(&self, host: &HostId) -> HostLoad {
        self.loads(Some(host)).remove(host).unwrap_or_default()
    }

    fn loads(&self, only: Option<&HostId>) -> HashMap<HostId, HostLoad> {
        let state = self.lock();
        let mut loads: HashMap<HostId, HostLoad> = HashMap::new();
        for record in state
            .tenants
            .values()
            .filter(|r| only.is_none_or(|h| r.host_id == *h))
        {
            let load = loads.entry(record.host_id.clone()).or_default();
            load.tenants += 1;
            load.memory_committed += record.spec.resources.memory_bytes;
            load.cpu_committed_millicores += u64::from(record.spec.resources.cpu_millicores);
            load.disk_committed += record.spec.resources.volume_bytes;
            if let Some(status) = state.observed.get(&record.spec.tenant_id) {
                load.memory_used += status.memory_used_bytes;
                load.cpu_used_millicores += u64::from(status.cpu_used_millicores);
                load.oom_kills += status.oom_kills;
            }
            if state.tenant_state(record).0 == proto::TenantState::Running {
                load.running += 1;
            }
        }
        loads
    }

    /// Tenants placed on a host and the resources they hold.
    pub fn host_usage(&self, host: &HostId) -> (u32, Vec3) {
        let state = self.lock();
        let used = state
            .scheduler
            .host(host)
            .map(|(_, used)| used)
            .unwrap_or_default();
        (state.tenants_per_host.get(host).copied().unwrap_or(0), used)
    }
}

#[cfg(test)]
mod tests;
