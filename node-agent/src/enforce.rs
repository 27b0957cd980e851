//! The enforcement loop: owns the desired state and keeps the host converged to it, on every
//! change and every few seconds, independently of the coordinator session (an agent that loses
//! its coordinator keeps enforcing the last desired state it applied).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_shared::ids::{HostId, TenantId};
use berth_shared::proto;
use tokio::sync::watch;

use crate::cgroup::CgroupReader;
use crate::config::AgentConfig;
use crate::cryptsetup::{CryptsetupCommand, VolumeKey};
use crate::desired::{AcceptError, Desired, DesiredStore};
use crate::dns::UdpResolver;
use crate::egress::NftEgress;
use crate::facts::{ProbeRoots, probe_cgroup, probe_dm_crypt};
use crate::nft::NftCommand;
use crate::reconcile::{Reconciler, port_free_on_loopback};
use crate::restarts::{Driver, RestartSettings, Restarts, TcpProbe};
use crate::runtime::DockerRuntime;
use crate::volume::{HostVolumes, KeySource, SystemMounter};

/// How often the host is re-checked without a change.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);

/// Shared between the session (which accepts desired states and reports statuses) and the
/// enforcement loop.
#[derive(Debug)]
pub struct Enforcement {
    desired: Mutex<DesiredStore>,
    statuses: Mutex<Vec<proto::TenantStatus>>,
    changed: watch::Sender<u64>,
    pub restarts: Arc<Restarts>,
    /// The volume keys of this host's encrypted tenants: in memory only, never written.
    volume_keys: Mutex<HashMap<TenantId, VolumeKey>>,
}

impl Enforcement {
    pub fn new(store: DesiredStore, restarts: RestartSettings) -> Self {
        let generation = store.current().generation;
        Self {
            desired: Mutex::new(store),
            statuses: Mutex::new(Vec::new()),
            changed: watch::Sender::new(generation),
            restarts: Arc::new(Restarts::new(restarts)),
            volume_keys: Mutex::new(HashMap::new()),
        }
    }

    /// Takes the volume keys the coordinator sent: only for tenants of the desired state, only
    /// well-formed ones (the others are named in the error, and the good ones still kept).
    /// Returns how many are held.
    pub fn set_volume_keys(&self, keys: proto::VolumeKeys) -> Result<usize, String> {
        let desired = self.current();
        let mut held = HashMap::new();
        let mut refused = Vec::new();
        for (i, k) in keys.keys.into_iter().enumerate() {
            let tenant = match TenantId::new(&k.tenant_id) {
                Ok(t) if desired.tenants.iter().any(|s| s.tenant_id == t) => t,
                Ok(t) => {
                    refused.push(format!("keys[{i}]: {t} is not placed on this host"));
                    continue;
                }
                Err(e) => {
                    refused.push(format!("keys[{i}].tenant_id: {e}"));
                    continue;
                }
            };
            match VolumeKey::from_bytes(&k.key) {
                Ok(key) => {
                    held.insert(tenant, key);
                }
                Err(e) => refused.push(format!("keys[{i}].key: {e}")),
            }
        }
        let count = held.len();
        *self.volume_keys.lock().unwrap_or_else(|p| p.into_inner()) = held;
        if refused.is_empty() {
            Ok(count)
        } else {
            Err(refused.join("; "))
        }
    }

    /// Whether the coordinator delivered `tenant`'s volume key.
    #[cfg(test)]
    fn has_volume_key(&self, tenant: &TenantId) -> bool {
        self.volume_key(tenant).is_some()
    }

    /// The reconciler's last statuses, as they are (for the restart driver).
    fn reconciled(&self) -> Vec<proto::TenantStatus> {
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn store(&self) -> std::sync::MutexGuard<'_, DesiredStore> {
        self.desired.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates, stores and enforces a desired state from the coordinator.
    pub fn accept(&self, state: proto::DesiredState) -> Result<usize, AcceptError> {
        let mut store = self.store();
        store.accept(state)?;
        let current = store.current();
        self.changed.send_replace(current.generation);
        Ok(current.tenants.len())
    }

    pub fn current(&self) -> Desired {
        self.store().current().clone()
    }

    /// What the agent reports: the last reconciled status of every desired tenant (pending
    /// for one not reconciled yet).
    pub fn statuses(&self) -> (u64, Vec<proto::TenantStatus>) {
        let desired = self.current();
        let known = self.reconciled();
        let statuses = desired
            .tenants
            .iter()
            .map(|t| {
                let mut status = known
                    .iter()
                    .find(|s| s.tenant_id == t.tenant_id.as_str())
                    .cloned()
                    .unwrap_or_else(|| proto::TenantStatus {
                        tenant_id: t.tenant_id.to_string(),
                        state: proto::TenantState::Pending as i32,
                        generation: desired.generation,
                        memory_cap_bytes: t.resources.memory_bytes,
                        message: "not reconciled yet".into(),
                        ..Default::default()
                    });
                self.restarts.annotate(&mut status);
                status
            })
            .collect();
        (desired.generation, statuses)
    }
}

impl KeySource for Enforcement {
    fn volume_key(&self, tenant: &TenantId) -> Option<VolumeKey> {
        self.volume_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
    }
}

/// Runs forever: connects to Docker (retrying), watches OOM events, reconciles.
pub async fn run(enforcement: Arc<Enforcement>, config: AgentConfig, host: HostId) {
    let mut changed = enforcement.changed.subscribe();
    let roots = ProbeRoots::system(&config.cgroup_root);
    let volumes = Arc::new(HostVolumes {
        root: config.volume_root.clone(),
        crypt: Arc::new(CryptsetupCommand::default()),
        mounter: Arc::new(SystemMounter::default()),
        keys: enforcement.clone(),
        dm_crypt: probe_dm_crypt(&roots),
    });
    let cgroups = probe_cgroup(&roots).map(|v| CgroupReader::new(&config.cgroup_root, v));
    let oom_events: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let (name_servers, settings) = config.egress.resolved(&resolv_conf);
    let egress = Arc::new(NftEgress::new(
        Arc::new(NftCommand::default()),
        Arc::new(UdpResolver {
            servers: name_servers,
            timeout: Duration::from_secs(2),
        }),
        Arc::new(berth_shared::clock::SystemClock),
        settings,
    ));
    let mut reconciler: Option<Reconciler> = None;
    loop {
        if reconciler.is_none() {
            match DockerRuntime::connect(&config.docker_socket).await {
                Ok(docker) => {
                    let watcher = docker.clone();
                    let (watch_host, counts) = (host.clone(), oom_events.clone());
                    tokio::spawn(async move {
                        loop {
                            let result = watcher
                                .watch_oom(&watch_host, |tenant| {
                                    tracing::warn!(%tenant, "tenant OOM-killed");
                                    *counts
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .entry(tenant.to_string())
                                        .or_insert(0) += 1;
                                })
                                .await;
                            if let Err(e) = result {
                                tracing::warn!(error = %e, "docker event stream; reconnecting");
                            }
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    });
                    let runtime: Arc<DockerRuntime> = Arc::new(docker);
                    let driver = Driver {
                        restarts: enforcement.restarts.clone(),
                        runtime: runtime.clone(),
                        probe: Arc::new(TcpProbe {
                            timeout: Duration::from_secs(1),
                        }),
                        clock: Arc::new(berth_shared::clock::SystemClock),
                        host: host.clone(),
                    };
                    let source = enforcement.clone();
                    tokio::spawn(driver.run(move || (source.current(), source.reconciled())));
                    reconciler = Some(Reconciler {
                        host: host.clone(),
                        restarting: enforcement.restarts.busy(),
                        runtime,
                        volumes: volumes.clone(),
                        egress: egress.clone(),
                        cgroups: cgroups.clone(),
                        oom_events: oom_events.clone(),
                        port_free: port_free_on_loopback,
                        subnets: config.tenant_subnets,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no Docker engine; tenants cannot run");
                    let desired = enforcement.current();
                    let failed = desired
                        .tenants
                        .iter()
                        .map(|t| proto::TenantStatus {
                            tenant_id: t.tenant_id.to_string(),
                            state: proto::TenantState::Failed as i32,
                            generation: desired.generation,
                            message: e.to_string(),
                            ..Default::default()
                        })
                        .collect();
                    *enforcement
                        .statuses
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = failed;
                }
            }
        }
        if let Some(r) = &reconciler {
            let desired = enforcement.current();
            let statuses = r.reconcile(&desired).await;
            *enforcement
                .statuses
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = statuses;
        }
        tokio::select! {
            _ = changed.changed() => {}
            () = tokio::time::sleep(RECONCILE_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use berth_shared::store::MemStore;

    use super::*;

    #[test]
    fn volume_keys_are_held_only_for_this_hosts_tenants_and_bad_ones_are_named() {
        let mut store = DesiredStore::with_store(Box::new(MemStore::default())).unwrap();
        store
            .accept(proto::DesiredState {
                generation: 1,
                tenants: vec![proto::TenantSpec {
                    tenant_id: "acme".into(),
                    image: "ghcr.io/openclaw/gateway:1".into(),
                    resources: Some(proto::Resources {
                        memory_bytes: 256 << 20,
                        cpu_millicores: 500,
                        volume_bytes: 1 << 30,
                    }),
                    ..Default::default()
                }],
            })
            .unwrap();
        let e = Enforcement::new(store, RestartSettings::default());
        let key = |tenant: &str, len: usize| proto::VolumeKey {
            tenant_id: tenant.into(),
            key: vec![9; len],
        };
        let err = e
            .set_volume_keys(proto::VolumeKeys {
                generation: 1,
                keys: vec![
                    key("acme", 32),
                    key("other", 32),
                    key("Bad/Id", 32),
                    key("acme", 16),
                ],
            })
            .unwrap_err();
        assert_eq!(
            err,
            "keys[1]: other is not placed on this host; keys[2].tenant_id: invalid tenant id \"Bad/Id\": must start with a lowercase letter a-z; keys[3].key: a volume key must be 32 bytes, not 16"
        );
        assert!(
            e.has_volume_key(&TenantId::new("acme").unwrap()),
            "the good one is kept"
        );
        assert!(!e.has_volume_key(&TenantId::new("other").unwrap()));
        // The next delivery replaces the set: a tenant moved away loses its key here.
        assert_eq!(
            e.set_volume_keys(proto::VolumeKeys {
                generation: 2,
                keys: vec![]
            }),
            Ok(0)
        );
        assert!(!e.has_volume_key(&TenantId::new("acme").unwrap()));
    }
}
