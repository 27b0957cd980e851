//! Egress allowlists: keeps berth's nftables table equal to the desired tenants' allowlists.
//!
//! Ensures: a tenant's rules are in place before its container starts (the reconciler applies
//! them first and does not start a container whose rules failed); every change is one nft
//! transaction, so a refused change leaves the previous rules in force; an update only adds
//! set elements (withdrawn ones go to the deny set; see `nft`), so per-entry counters survive
//! and established connections pass (`ct state established` comes first); what the table
//! holds is re-read every few seconds, so rules removed or damaged by hand are rebuilt and
//! chains of tenants no longer here are removed.
//! DNS names are resolved by the agent, refreshed at their TTL clamped to
//! [floor, ceiling], and an address a name stops returning stays allowed for a grace period.

pub mod dns;
pub mod guard;
pub mod nft;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use berth_shared::clock::Clock;
use berth_shared::ids::TenantId;
use berth_shared::proto;
use berth_shared::reach::{Net, never_reachable};
use berth_shared::spec::{Destination, EgressRule, TenantSpec};

use crate::command::CommandError;
use crate::egress::dns::Resolve;
use crate::egress::guard::ForwardGuard;
use crate::egress::nft::{
    Element, Installed, InstalledTenant, ListingError, Nft, Prefix, TenantRules, base_script,
    chain, collect_garbage, gc_script, normalize, parse_listing, remove_script, tenant_script,
};

/// What the egress step says about one tenant after applying its rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressReport {
    pub entries: Vec<proto::EgressEntryStatus>,
    pub denied_packets: u64,
    /// Entries that allow nothing right now, with the reason (shown in the tenant's status).
    pub problems: Vec<String>,
}

/// Why a tenant's egress rules are not as they should be.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error(transparent)]
    List(CommandError),
    #[error(transparent)]
    Listing(#[from] ListingError),
    #[error("cannot install berth's nftables table: {0}")]
    Install(#[source] CommandError),
    #[error("the nftables table could not be read this pass")]
    Unread,
    #[error("tenant network subnet {0:?} is not an IPv4 prefix")]
    Subnet(String),
    #[error("nft refused the allowlist update (the previous rules stay): {0}")]
    Refused(#[source] CommandError),
    #[error("nft could not remove the rules of {chain}: {source}")]
    Remove { chain: String, source: CommandError },
    #[error("nft could not delete withdrawn elements: {0}")]
    Collect(#[source] CommandError),
    #[error("nft task: {0}")]
    Task(String),
}

/// The tenant's egress allowlist (a trait so the reconciler is tested with a recording fake).
#[tonic::async_trait]
pub trait EgressStep: Send + Sync + std::fmt::Debug {
    /// Reads what is installed (at most every `relist_interval`); called at the start of
    /// every pass.
    async fn refresh(&self) -> Result<(), EgressError>;
    /// Makes the tenant's rules match `spec`, for its network `subnet`.
    async fn apply(&self, spec: &TenantSpec, subnet: &str) -> Result<EgressReport, EgressError>;
    /// Removes the tenant's rules (after its container is gone).
    async fn release(&self, tenant: &TenantId) -> Result<(), EgressError>;
    /// Removes the rules of every tenant not in `keep`, and deletes withdrawn elements (the
    /// slow part of an update, which changes no verdict, so it is kept off the update path).
    async fn sweep(&self, keep: &BTreeSet<TenantId>) -> Result<(), EgressError>;
}

/// Settings from the agent's `[egress]` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSettings {
    pub table: String,
    /// DNS servers tenants may query (UDP and TCP port 53).
    pub tenant_resolvers: BTreeSet<Ipv4Addr>,
    pub ttl_floor: Duration,
    pub ttl_ceiling: Duration,
    pub stale_grace: Duration,
    /// How long a listing of the table is trusted (the model follows every change berth
    /// makes); listing 200 tenants' sets takes ~150 ms, so passes triggered by a desired-state
    /// change within this time apply from the model without re-reading.
    pub relist_interval: Duration,
}

impl Default for EgressSettings {
    fn default() -> Self {
        Self {
            table: crate::egress::nft::DEFAULT_TABLE.into(),
            tenant_resolvers: BTreeSet::new(),
            ttl_floor: Duration::from_secs(30),
            ttl_ceiling: Duration::from_secs(3600),
            stale_grace: Duration::from_secs(600),
            relist_interval: Duration::from_secs(4),
        }
    }
}

#[derive(Debug, Default)]
struct NameState {
    /// Address → until when it stays allowed (Unix ms).
    addresses: BTreeMap<Ipv4Addr, i64>,
    refresh_at_ms: i64,
    error: Option<String>,
    last_used_ms: i64,
}

#[derive(Debug, Default)]
struct State {
    /// `None` until a listing succeeded, or after one failed.
    installed: Option<Installed>,
    listed_at_ms: i64,
    names: HashMap<String, NameState>,
    /// The forward guard could not be installed (said once until it can).
    guard_missing: bool,
}

/// The allowlists, enforced with nftables.
#[derive(Debug)]
pub struct NftEgress {
    nft: Arc<dyn Nft>,
    guard: Arc<dyn ForwardGuard>,
    resolver: Arc<dyn Resolve>,
    clock: Arc<dyn Clock>,
    settings: EgressSettings,
    state: tokio::sync::Mutex<State>,
}

/// Runs a blocking nft call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CommandError> + Send + 'static,
) -> Result<Result<T, CommandError>, EgressError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EgressError::Task(e.to_string()))
}

impl NftEgress {
    pub fn new(
        nft: Arc<dyn Nft>,
        guard: Arc<dyn ForwardGuard>,
        resolver: Arc<dyn Resolve>,
        clock: Arc<dyn Clock>,
        settings: EgressSettings,
    ) -> Self {
        Self {
            nft,
            guard,
            resolver,
            clock,
            settings,
            state: tokio::sync::Mutex::default(),
        }
    }

    /// Loads `script` as one transaction; the outer error is the task's, the inner nft's.
    async fn run(&self, script: String) -> Result<Result<(), CommandError>, EgressError> {
        let nft = self.nft.clone();
        blocking(move || nft.apply(&script)).await
    }

    async fn listing(&self) -> Result<Option<Installed>, EgressError> {
        let (nft, table) = (self.nft.clone(), self.settings.table.clone());
        let json = blocking(move || nft.list(&table))
            .await?
            .map_err(EgressError::List)?;
        Ok(json.map(|j| parse_listing(&j)).transpose()?)
    }

    /// Removes everything of tenant chain `c` that the table holds (nothing when it holds none).
    async fn remove(&self, installed: &mut Installed, c: &str) -> Result<(), EgressError> {
        if let Some(t) = installed.tenants.get(c) {
            self.run(remove_script(&self.settings.table, c, t))
                .await?
                .map_err(|source| EgressError::Remove {
                    chain: c.to_string(),
                    source,
                })?;
            installed.tenants.remove(c);
            tracing::info!(chain = %c, "egress rules removed");
        }
        Ok(())
    }

    /// The addresses `name` allows now, resolving it when its TTL ran out.
    async fn addresses(&self, names: &mut HashMap<String, NameState>, name: &str) -> NameView {
        let now = self.clock.now_unix_ms();
        let entry = names.entry(name.to_string()).or_default();
        entry.last_used_ms = now;
        if now >= entry.refresh_at_ms {
            let floor = self.settings.ttl_floor.as_millis() as i64;
            match self.resolver.resolve(name).await {
                Ok(answer) => {
                    let ttl = Duration::from_secs(u64::from(answer.ttl_secs))
                        .clamp(self.settings.ttl_floor, self.settings.ttl_ceiling);
                    entry.refresh_at_ms = now + ttl.as_millis() as i64;
                    let keep_until =
                        entry.refresh_at_ms + self.settings.stale_grace.as_millis() as i64;
                    for a in answer.addresses {
                        entry.addresses.insert(a, keep_until);
                    }
                    entry.error = None;
                }
                Err(e) => {
                    tracing::warn!(%name, error = %e, "allowlist name did not resolve");
                    entry.refresh_at_ms = now + floor;
                    entry.error = Some(e.to_string());
                }
            }
        }
        entry.addresses.retain(|_, until| *until > now);
        NameView {
            addresses: entry.addresses.keys().copied().collect(),
            error: entry.error.clone(),
        }
    }

    /// The elements of each rule, and the reason a rule allows nothing.
    async fn resolve_rules(
        &self,
        names: &mut HashMap<String, NameState>,
        rules: &[EgressRule],
    ) -> Vec<(Vec<Element>, Option<String>)> {
        let mut out = Vec::with_capacity(rules.len());
        for rule in rules {
            let element = |net: Prefix| Element {
                net,
                protocol: rule.protocol,
                port: rule.port,
            };
            out.push(match &rule.destination {
                // A range berth never lets a tenant reach (the coordinator refuses such entries;
                // one stored before it did is not enforced). `/0` is the fleet's explicit word.
                Destination::Cidr { addr, prefix }
                    if *prefix > 0
                        && let Some(why) = never_reachable(Net {
                            addr: *addr,
                            prefix: *prefix,
                        }) =>
                {
                    (
                        Vec::new(),
                        Some(format!("includes {why} addresses: never allowed")),
                    )
                }
                Destination::Cidr {
                    addr: IpAddr::V4(a),
                    prefix,
                } => (vec![element(Prefix::new(*a, *prefix))], None),
                Destination::Cidr { .. } => (
                    Vec::new(),
                    Some("IPv6 destinations are unreachable: tenant networks are IPv4-only".into()),
                ),
                Destination::Name(name) => {
                    let view = self.addresses(names, name).await;
                    let mut error = match (view.error, view.addresses.is_empty()) {
                        (Some(e), false) => {
                            Some(format!("{e}; the last addresses stay for the grace period"))
                        }
                        (e, _) => e,
                    };
                    let mut els = Vec::with_capacity(view.addresses.len());
                    for a in view.addresses {
                        let net = Net {
                            addr: IpAddr::V4(a),
                            prefix: 32,
                        };
                        match never_reachable(net) {
                            // A name that points at the metadata service (or loopback, ...)
                            // opens nothing: say so instead.
                            Some(why) => {
                                error.get_or_insert_with(|| {
                                    format!("{name} resolves to {a}, which is {why}: never allowed")
                                });
                            }
                            None => els.push(element(Prefix::new(a, 32))),
                        }
                    }
                    (els, error)
                }
            });
        }
        out
    }
}

struct NameView {
    addresses: Vec<Ipv4Addr>,
    error: Option<String>,
}

#[tonic::async_trait]
impl EgressStep for NftEgress {
    async fn refresh(&self) -> Result<(), EgressError> {
        let mut state = self.state.lock().await;
        let now = self.clock.now_unix_ms();
        if state.installed.is_some()
            && now - state.listed_at_ms < self.settings.relist_interval.as_millis() as i64
        {
            return Ok(());
        }
        state.installed = None;
        let mut installed = self.listing().await?.unwrap_or_default();
        if !installed.base_complete || installed.resolvers != self.settings.tenant_resolvers {
            self.run(base_script(
                &self.settings.table,
                &self.settings.tenant_resolvers,
            ))
            .await?
            .map_err(EgressError::Install)?;
            installed = self.listing().await?.unwrap_or_default();
        }
        state.installed = Some(installed);
        state.listed_at_ms = now;
        // The floor under the table, checked as often as the table is re-read.
        let guard = self.guard.clone();
        match blocking(move || guard.ensure()).await? {
            Ok(added) => {
                if added {
                    tracing::info!(
                        "forward guard installed: unmarked traffic from tenant bridges is dropped in DOCKER-USER"
                    );
                }
                state.guard_missing = false;
            }
            Err(error) if !state.guard_missing => {
                tracing::warn!(%error, "no forward guard (Docker's DOCKER-USER chain): tenants are fenced by berth's table alone");
                state.guard_missing = true;
            }
            Err(_) => {}
        }
        // Names no tenant asked for in a while are forgotten.
        let idle = (self.settings.ttl_ceiling + self.settings.stale_grace).as_millis() as i64;
        state.names.retain(|_, n| now - n.last_used_ms < idle);
        Ok(())
    }

    async fn apply(&self, spec: &TenantSpec, subnet: &str) -> Result<EgressReport, EgressError> {
        let subnet = Prefix::parse(subnet)
            .filter(|p| p.len < 32)
            .ok_or_else(|| EgressError::Subnet(subnet.to_string()))?;
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let installed = state.installed.as_mut().ok_or(EgressError::Unread)?;
        let per_rule = self.resolve_rules(&mut state.names, &spec.egress).await;
        let want = TenantRules {
            chain: chain(&spec.tenant_id),
            subnet,
            elements: normalize(per_rule.iter().flat_map(|(els, _)| els.iter().copied())),
        };
        let current = installed.tenants.get(&want.chain);
        if let Some(script) = tenant_script(&self.settings.table, &want, current) {
            self.run(script).await?.map_err(EgressError::Refused)?;
            let updated = InstalledTenant::after(&want, current);
            debug_assert!(updated.complete());
            installed.tenants.insert(want.chain.clone(), updated);
        }
        let now = &installed.tenants[&want.chain];
        let mut report = EgressReport {
            denied_packets: now.denied_packets,
            ..Default::default()
        };
        for (rule, (els, error)) in spec.egress.iter().zip(per_rule) {
            let text = rule.to_string();
            if let Some(e) = &error {
                report.problems.push(format!("egress {text}: {e}"));
            }
            report.entries.push(proto::EgressEntryStatus {
                rule: Some(rule.to_proto()),
                addresses: els.iter().map(|e| e.net.to_string()).collect(),
                packets: els.iter().map(|e| now.hits(e)).sum(),
                error: error.unwrap_or_default(),
            });
        }
        Ok(report)
    }

    async fn release(&self, tenant: &TenantId) -> Result<(), EgressError> {
        let mut state = self.state.lock().await;
        let Some(installed) = state.installed.as_mut() else {
            return Err(EgressError::Unread);
        };
        self.remove(installed, &chain(tenant)).await
    }

    async fn sweep(&self, keep: &BTreeSet<TenantId>) -> Result<(), EgressError> {
        let mut state = self.state.lock().await;
        let Some(installed) = state.installed.as_mut() else {
            return Ok(());
        };
        let keep: BTreeSet<String> = keep.iter().map(chain).collect();
        let stale: Vec<String> = installed
            .tenants
            .keys()
            .filter(|c| !keep.contains(*c))
            .cloned()
            .collect();
        for c in stale {
            self.remove(installed, &c).await?;
        }
        if let Some(script) = gc_script(&self.settings.table, installed) {
            self.run(script).await?.map_err(EgressError::Collect)?;
            collect_garbage(installed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
