//! The coordinator's shared state and the operations that span registry, CA and sessions
//! (revocation must update all three).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use berth_shared::clock::Clock;
use berth_shared::ids::{HostId, TenantId};
use berth_shared::pki::{CertificateAuthority, PeerCert, Subject, parse_peer_cert};
use berth_shared::proto;
use berth_shared::store::Store;
use berth_shared::tls::SerialDenyList;
use berth_shared::transport::PeerInfo;

use crate::config::CoordinatorConfig;
use crate::keys::{KeyError, KeyVault, Vaults};
use crate::placement::{PlaceError, Placements, host_info};
use crate::registry::{HostRecord, HostState, Registry, RegistryError, Scope};
use crate::sessions::AgentLink;

/// How long a requested restart may take, waiting for a place and the health gate included
/// (the agent's default health timeout is 5 minutes).
pub const RESTART_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// How long an operator's backup waits for the host (restic reads the whole volume the first
/// time: a minute or so per 10 GiB to a fast repository) and a listing for its answer.
pub const BACKUP_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);
/// How long an export may take, from the command to the last byte the operator read.
pub const EXPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(12 * 3600);
/// How long a restore may take, from the container's stop to its start on the restored volume.
pub const RESTORE_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);
pub const LIST_BACKUPS_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// How long a purge waits for the host to drop the tenant and then to shred its volume
/// (`luksErase` and deleting a sparse file take well under a second).
pub const PURGE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How often a wait for an agent's report also checks what no report changes (the session).
pub(crate) const RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// The command that shreds `tenant`'s volume (and whatever a copy left aside) on a host.
pub(crate) fn purge_command(tenant: &TenantId) -> proto::VolumeCommand {
    proto::VolumeCommand {
        tenant_id: tenant.to_string(),
        action: proto::VolumeAction::Purge as i32,
        ..Default::default()
    }
}

/// Everything the services share.
#[derive(Debug)]
pub struct Coordinator {
    pub config: CoordinatorConfig,
    pub registry: Registry,
    pub ca: CertificateAuthority,
    pub denied: Arc<SerialDenyList>,
    /// The link to the agents: commands to them, and whether they are connected.
    pub agents: Arc<dyn AgentLink>,
    pub placements: Placements,
    /// The bound agent port, told to enrolling agents.
    pub agent_port: u16,
    pub metrics: crate::metrics::Metrics,
    /// The tenants' volume keys, wrapped.
    pub keys: KeyVault,
    /// The tenants' backup keys (their restic repositories' passwords), wrapped alike. Apart
    /// from the volume keys: a lost host's tenants get new volume keys, and must still read
    /// their backups.
    pub backup_keys: KeyVault,
    /// Exports under way, streamed from a host to an operator.
    pub exports: crate::exports::Exports,
    /// Held while a placement makes its key and commits (see `commit_placement`).
    placing: Mutex<()>,
    /// Held while the deny-list changes (see `prune_deny_list`).
    deny_list: Mutex<()>,
}

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeTarget {
    Host(HostId),
    Serial(String),
}

fn key_error(e: KeyError) -> PlaceError {
    PlaceError::Store(berth_shared::store::StoreError::Io(format!(
        "volume keys: {e}"
    )))
}

/// Why a host has not taken a desired state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("the host is not connected")]
    NotConnected,
    #[error("the host did not acknowledge generation {generation} within {wait:?}")]
    NotAcknowledged {
        generation: u64,
        wait: std::time::Duration,
    },
}

/// Why a caller is not let in.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("request arrived without transport information")]
    NoTransport,
    #[error("{0}")]
    BadCertificate(String),
    #[error("certificate revoked")]
    Revoked,
    #[error("certificate expired")]
    Expired,
    #[error("client certificate required")]
    NoCertificate,
    #[error("an operator certificate cannot speak for a host")]
    OperatorAsHost,
    #[error("a host certificate cannot act as an operator")]
    HostAsOperator,
    #[error(
        "operator credential required: a client certificate or an `authorization: Bearer` token"
    )]
    NoCredential,
    #[error("authorization header must be `Bearer <token>`")]
    NotBearer,
    #[error("operator token is invalid, revoked or expired")]
    BadToken,
    #[error(
        "operator {0} holds a read token; this call changes the fleet and needs an admin credential"
    )]
    ReadOnly(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Why a requested restart did not end healthy.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("unknown tenant {:?}", .0.as_str())]
    UnknownTenant(TenantId),
    #[error("stored placement: {0}")]
    StoredPlacement(String),
    #[error(transparent)]
    Link(#[from] crate::sessions::LinkError),
    #[error("restart of {tenant} on {host}: {error}")]
    Failed {
        tenant: TenantId,
        host: HostId,
        error: String,
    },
}

/// Why a backup or a listing of backups was not done.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backups are off: the coordinator's config has no [backup] repository")]
    NotConfigured,
    #[error("unknown tenant {:?}", .0.as_str())]
    UnknownTenant(TenantId),
    #[error("stored placement: {0}")]
    StoredPlacement(String),
    #[error("backup keys: {0}")]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Link(#[from] crate::sessions::LinkError),
    #[error("{tenant} on {host}: {error}")]
    Failed {
        tenant: TenantId,
        host: HostId,
        error: String,
    },
    #[error("snapshot_id: {0}")]
    BadSnapshot(#[from] berth_shared::backup::BadSnapshotId),
    #[error("{} was never backed up: there is nothing to restore", .0.as_str())]
    NeverBackedUp(TenantId),
    #[error("no snapshot {snapshot} of {tenant} (`berthctl backups {tenant}` lists them)")]
    NoSnapshot { tenant: TenantId, snapshot: String },
    #[error(
        "{tenant} on {host}: not running on its restored volume within {wait:?} (it stays stopped until the restore is done: `berthctl tenants --json` shows why)"
    )]
    NotRestored {
        tenant: TenantId,
        host: HostId,
        wait: std::time::Duration,
    },
    #[error(transparent)]
    Place(#[from] PlaceError),
    #[error(
        "{} runs on {host}, which is not connected: `berthctl drain {host} --force-lost` restores a lost host's tenants elsewhere",
        tenant.as_str()
    )]
    SourceUnreachable { tenant: TenantId, host: HostId },
}

/// Why the coordinator's state could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] berth_shared::store::StoreError),
    #[error(transparent)]
    Keys(#[from] KeyError),
}

impl Coordinator {
    /// The shared state over `store`: the registry, the live deny-list of revoked serials, and
    /// the placements with the scheduler's view of every registered host.
    pub fn open(
        config: CoordinatorConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        ca: CertificateAuthority,
        vaults: Vaults,
        agents: Arc<dyn AgentLink>,
        agent_port: u16,
    ) -> Result<Self, OpenError> {
        let registry = Registry::new(store.clone(), clock);
        let denied = Arc::new(SerialDenyList::new(
            registry.revoked_unexpired(registry.now())?,
        ));
        let now = registry.now();
        let hosts: Vec<_> = registry
            .hosts()?
            .iter()
            .filter_map(|h| host_info(h, h.state(now, config.down_after) == HostState::Ready))
            .collect();
        let placements = Placements::load(store, config.placement_policy(), &hosts)?;
        // Every placed tenant is backed up from now on, if the fleet has a repository: its
        // backup key exists (and is durable) before any host is sent it.
        if config.backup_repository.is_some() {
            let mut made = 0;
            for tenant in placements.tenants(None) {
                if let Ok(id) = TenantId::new(&tenant.placement.unwrap_or_default().tenant_id)
                    && vaults.backup.ensure(&id)?
                {
                    made += 1;
                }
            }
            if made > 0 {
                vaults.backup.sync()?;
                tracing::info!(
                    made,
                    "backup keys made for tenants placed before backups were on"
                );
            }
        }
        Ok(Self {
            config,
            registry,
            ca,
            denied,
            agents,
            placements,
            agent_port,
            metrics: crate::metrics::Metrics::default(),
            keys: vaults.volume,
            backup_keys: vaults.backup,
            exports: crate::exports::Exports::default(),
            placing: Mutex::new(()),
            deny_list: Mutex::new(()),
        })
    }

    /// The whole state as one snapshot (`berth-coordinator backup`): the store at one instant,
    /// the wrapped keys, the CA with its key sealed under the master key.
    pub fn snapshot(&self) -> Result<crate::snapshot::Snapshot, crate::snapshot::SnapshotError> {
        crate::snapshot::take(
            self.registry.store(),
            || (self.keys.wrapped_keys(), self.backup_keys.wrapped_keys()),
            &self.ca,
            self.keys.master(),
            self.registry.now(),
        )
    }

    /// Revokes in the registry (durably), then in the live deny-list, then closes the open
    /// sessions of those certificates.
    pub fn revoke(&self, target: &RevokeTarget) -> Result<Vec<String>, RegistryError> {
        let serials = match target {
            RevokeTarget::Host(host) => self.registry.revoke_host(host)?,
            RevokeTarget::Serial(serial) => vec![self.registry.revoke_serial(serial)?],
        };
        self.forget_serials(&serials);
        Ok(serials)
    }

    /// Puts already-revoked serials into force: deny-list and open sessions.
    pub fn forget_serials(&self, serials: &[String]) {
        {
            let _list = self.deny_list.lock().unwrap_or_else(|p| p.into_inner());
            for serial in serials {
                self.denied.insert(serial.clone());
            }
        }
        let closed = self.agents.close_revoked(serials);
        for host in closed {
            tracing::warn!(%host, "closed the session of a revoked certificate");
        }
        // Every agent's transfer port refuses them too.
        self.agents
            .broadcast(proto::coordinator_message::Body::Revoked(
                proto::RevokedSerials {
                    serials: serials.to_vec(),
                    replace: false,
                },
            ));
    }

    /// Places a tenant; returns once the placement is on disk.
    pub async fn place(
        self: &Arc<Self>,
        spec: proto::TenantSpec,
    ) -> Result<proto::Placement, PlaceError> {
        let began = std::time::Instant::now();
        let applied = self.commit_placement(spec).inspect_err(|_| {
            self.metrics
                .placements_refused
                .fetch_add(1, Ordering::Relaxed);
        })?;
        self.durable(applied.seq).await?;
        self.metrics.placement_latency.observe(began.elapsed());
        tracing::info!(tenant = %applied.placement.tenant_id, host = %applied.placement.host_id, generation = applied.placement.generation, "tenant placed");
        Ok(applied.placement)
    }

    /// Makes an encrypted tenant's key (and its backup key, when the fleet has a backup
    /// repository) and commits its placement as one step: the key is
    /// written before the placement (so the flush that makes the placement durable covers it),
    /// and a key made for a placement that then fails is destroyed again. Under `placing`, so
    /// no other placement of the same tenant can see a key this one is about to destroy (two
    /// concurrent placements of one new tenant, one refused, would otherwise leave the placed
    /// one without its key).
    fn commit_placement(
        &self,
        spec: proto::TenantSpec,
    ) -> Result<crate::placement::Applied, PlaceError> {
        let _placing = self.placing.lock().unwrap_or_else(|p| p.into_inner());
        let encrypted = spec.volume.as_ref().is_none_or(|v| v.encrypted);
        let backed_up = self.config.backup_repository.is_some();
        let id = TenantId::new(&spec.tenant_id).ok();
        let new_key = match &id {
            Some(id) if encrypted => self.keys.ensure(id).map_err(key_error)?.then_some(id),
            _ => None,
        };
        let new_backup_key = match &id {
            Some(id) if backed_up => self
                .backup_keys
                .ensure(id)
                .map_err(key_error)?
                .then_some(id),
            _ => None,
        };
        self.placements
            .place(spec, self.registry.now())
            .or_else(|e| {
                if let Some(id) = new_key {
                    self.keys.destroy(id).map_err(key_error)?;
                }
                if let Some(id) = new_backup_key {
                    self.backup_keys.destroy(id).map_err(key_error)?;
                }
                Err(e)
            })
    }

    /// Replaces a tenant's egress allowlist; returns once the change is on disk.
    pub async fn set_egress(
        self: &Arc<Self>,
        tenant: &TenantId,
        egress: Vec<proto::EgressRule>,
    ) -> Result<proto::Placement, PlaceError> {
        let applied = self.placements.set_egress(tenant, egress)?;
        self.durable(applied.seq).await?;
        tracing::info!(%tenant, host = %applied.placement.host_id, generation = applied.placement.generation, "egress allowlist set");
        Ok(applied.placement)
    }

    /// Removes a tenant; returns once the removal is on disk. Its volume and key are kept so it
    /// can come back, unless `purge`: then (also for a tenant removed earlier) its host
    /// crypto-shreds the volume and the key is destroyed, and only when both are done is the
    /// answer `purged`.
    pub async fn remove(
        self: &Arc<Self>,
        tenant: &TenantId,
        purge: bool,
    ) -> Result<proto::RemoveTenantResponse, PlaceError> {
        let placed = self.placements.tenant(tenant);
        let host = if let Some(placed) = placed {
            let encrypted = placed
                .spec
                .and_then(|s| s.volume)
                .is_none_or(|v| v.encrypted);
            let applied = self.placements.remove(tenant)?;
            self.durable(applied.seq).await?;
            let host = HostId::new(&applied.placement.host_id).map_err(|e| {
                PlaceError::Store(berth_shared::store::StoreError::Io(format!(
                    "stored placement: {e}"
                )))
            })?;
            tracing::info!(%tenant, %host, "tenant removed");
            if !purge {
                return Ok(proto::RemoveTenantResponse {
                    tenant_id: tenant.to_string(),
                    host_id: host.to_string(),
                    key_kept: encrypted,
                    ..Default::default()
                });
            }
            self.await_delivery(&host, applied.placement.generation, PURGE_WAIT)
                .await
                .map_err(|e| PlaceError::PurgeIncomplete {
                    tenant: tenant.to_string(),
                    host: host.to_string(),
                    reason: e.to_string(),
                })?;
            host
        } else if purge && let Some(host) = self.placements.retained(tenant) {
            host
        } else {
            return Err(PlaceError::UnknownTenant(tenant.to_string()));
        };
        self.purge(tenant, &host).await
    }

    /// Waits up to `wait` until `host` acknowledged `generation` (so its agent no longer runs
    /// a tenant that generation removed).
    pub(crate) async fn await_delivery(
        &self,
        host: &HostId,
        generation: u64,
        wait: std::time::Duration,
    ) -> Result<(), DeliveryError> {
        let deadline = tokio::time::Instant::now() + wait;
        self.placements
            .wait_for_report(deadline, RECHECK, || {
                if self.placements.delivered(host, generation) {
                    Some(Ok(()))
                } else if !self.agents.is_connected(host) {
                    Some(Err(DeliveryError::NotConnected))
                } else {
                    None
                }
            })
            .await
            .unwrap_or(Err(DeliveryError::NotAcknowledged { generation, wait }))
    }

    /// Shreds a removed tenant's volume on `host`, then destroys its key and forgets the volume.
    async fn purge(
        &self,
        tenant: &TenantId,
        host: &HostId,
    ) -> Result<proto::RemoveTenantResponse, PlaceError> {
        let incomplete = |reason: String| PlaceError::PurgeIncomplete {
            tenant: tenant.to_string(),
            host: host.to_string(),
            reason,
        };
        let result = self
            .agents
            .volume(host, purge_command(tenant), PURGE_WAIT)
            .await
            .map_err(|e| incomplete(e.to_string()))?;
        if !result.ok {
            return Err(incomplete(format!("the agent: {}", result.error)));
        }
        let (backups_forgotten, backup_key_destroyed) = self
            .purge_backups(tenant, host)
            .await
            .map_err(|e| incomplete(e.to_string()))?;
        let key_destroyed = self.keys.destroy(tenant).map_err(key_error)?;
        self.placements.forget_retained(tenant)?;
        tracing::info!(%tenant, %host, erased = result.erased, deleted = result.deleted, key_destroyed, "tenant volume purged");
        Ok(proto::RemoveTenantResponse {
            tenant_id: tenant.to_string(),
            purged: true,
            host_id: host.to_string(),
            erased: result.erased,
            deleted: result.deleted,
            key_destroyed,
            key_kept: false,
            backups_forgotten,
            backup_key_destroyed,
        })
    }

    /// Has `host` run a backup `action` on `tenant`'s repository under `repository` with its
    /// backup `key`; the result if the agent did it.
    async fn ask_backups(
        &self,
        tenant: &TenantId,
        host: &HostId,
        repository: &berth_shared::backup::Repository,
        key: &[u8],
        action: proto::VolumeAction,
        wait: std::time::Duration,
    ) -> Result<proto::VolumeResult, BackupError> {
        let command = proto::VolumeCommand {
            tenant_id: tenant.to_string(),
            action: action as i32,
            backup_repository: repository.of(tenant),
            backup_key: key.to_vec(),
            ..Default::default()
        };
        let result = self.agents.volume(host, command, wait).await?;
        if !result.ok {
            return Err(BackupError::Failed {
                tenant: tenant.clone(),
                host: host.clone(),
                error: result.error,
            });
        }
        Ok(result)
    }

    /// A purge's part for backups: the tenant's snapshots forgotten and pruned by `host`, then
    /// its backup key destroyed; (snapshots forgotten, key destroyed). Nothing for a tenant
    /// never backed up.
    async fn purge_backups(
        &self,
        tenant: &TenantId,
        host: &HostId,
    ) -> Result<(u32, bool), BackupError> {
        let Some(key) = self.backup_keys.get(tenant)? else {
            return Ok((0, false));
        };
        let repository = self
            .config
            .backup_repository
            .as_ref()
            .ok_or(BackupError::NotConfigured)?;
        let result = self
            .ask_backups(
                tenant,
                host,
                repository,
                &key,
                proto::VolumeAction::ForgetBackups,
                BACKUP_WAIT,
            )
            .await?;
        let destroyed = self.backup_keys.destroy(tenant)?;
        tracing::info!(%tenant, %host, forgotten = result.forgotten, "tenant backups purged");
        Ok((result.forgotten, destroyed))
    }

    /// The keys of the encrypted tenants in `state` (one host's desired state): what that host,
    /// and only that host, is sent.
    pub fn volume_keys(&self, state: &proto::DesiredState) -> Result<proto::VolumeKeys, KeyError> {
        let mut keys = Vec::new();
        for spec in &state.tenants {
            if !spec.volume.as_ref().is_some_and(|v| v.encrypted) {
                continue;
            }
            let Ok(id) = TenantId::new(&spec.tenant_id) else {
                continue;
            };
            if let Some(key) = self.keys.get(&id)? {
                keys.push(proto::VolumeKey {
                    tenant_id: id.to_string(),
                    key: key.to_vec(),
                });
            }
        }
        Ok(proto::VolumeKeys {
            generation: state.generation,
            keys,
            backups: self.backup_access(state)?,
        })
    }

    /// Where each tenant of `state` (one host's desired state) is backed up, with its backup
    /// key: for the tenants that have one, when the fleet has a backup repository.
    fn backup_access(
        &self,
        state: &proto::DesiredState,
    ) -> Result<Vec<proto::BackupAccess>, KeyError> {
        let Some(repository) = &self.config.backup_repository else {
            return Ok(Vec::new());
        };
        let mut access = Vec::new();
        for spec in &state.tenants {
            let Ok(id) = TenantId::new(&spec.tenant_id) else {
                continue;
            };
            if let Some(key) = self.backup_keys.get(&id)? {
                access.push(proto::BackupAccess {
                    tenant_id: id.to_string(),
                    repository: repository.of(&id),
                    key: key.to_vec(),
                });
            }
        }
        Ok(access)
    }

    /// The host `tenant` is placed on (`None`: it is not placed); an error when the stored
    /// placement names no valid host.
    fn placed_host(&self, tenant: &TenantId) -> Result<Option<HostId>, String> {
        self.placements
            .tenant(tenant)
            .and_then(|t| t.placement)
            .map(|p| HostId::new(&p.host_id).map_err(|e| e.to_string()))
            .transpose()
    }

    /// Restarts a placed tenant's container now, through its host's agent (the same health
    /// gate and limit of concurrent restarts as the nightly ones); answers once it is healthy.
    pub async fn restart(
        &self,
        tenant: &TenantId,
    ) -> Result<proto::RestartTenantResponse, RestartError> {
        let host = self
            .placed_host(tenant)
            .map_err(RestartError::StoredPlacement)?
            .ok_or_else(|| RestartError::UnknownTenant(tenant.clone()))?;
        let result = self.agents.restart(&host, tenant, RESTART_WAIT).await?;
        if !result.ok {
            return Err(RestartError::Failed {
                tenant: tenant.clone(),
                host,
                error: result.error,
            });
        }
        tracing::info!(%tenant, %host, downtime_ms = result.downtime_ms, "tenant restarted");
        Ok(proto::RestartTenantResponse {
            tenant_id: tenant.to_string(),
            host_id: host.to_string(),
            downtime_ms: result.downtime_ms,
        })
    }

    /// Backs a placed tenant's volume up now, through its host's agent, into the tenant's
    /// repository under `[backup] repository` (made, with the tenant's backup key, the first
    /// time); answers with the snapshot.
    pub async fn backup(
        &self,
        tenant: &TenantId,
    ) -> Result<proto::BackupTenantResponse, BackupError> {
        let repository = self
            .config
            .backup_repository
            .as_ref()
            .ok_or(BackupError::NotConfigured)?;
        let host = self
            .placed_host(tenant)
            .map_err(BackupError::StoredPlacement)?
            .ok_or_else(|| BackupError::UnknownTenant(tenant.clone()))?;
        // Durable before it is used: a snapshot must never be made with a key that is lost.
        self.backup_keys.ensure(tenant)?;
        self.backup_keys.sync()?;
        let key = self
            .backup_keys
            .get(tenant)?
            .ok_or_else(|| BackupError::StoredPlacement(format!("{tenant} has no backup key")))?;
        let result = self
            .ask_backups(
                tenant,
                &host,
                repository,
                &key,
                proto::VolumeAction::Backup,
                BACKUP_WAIT,
            )
            .await?;
        tracing::info!(%tenant, %host, snapshot = result.backup.as_ref().map(|b| b.snapshot_id.as_str()).unwrap_or(""), "tenant backed up");
        Ok(proto::BackupTenantResponse {
            tenant_id: tenant.to_string(),
            host_id: host.to_string(),
            backup: result.backup,
        })
    }

    /// Replaces a placed tenant's volume contents with its snapshot `snapshot` (the latest when
    /// `None`), on its host or on `to_host` (checked like a placement there): the snapshot is
    /// looked up first (through the host that will restore), then that host is asked to
    /// restore before the tenant runs (on its own host, it stops first); answers once it runs on
    /// the restored volume. Moved, the tenant's old copy is deleted from its old host once that
    /// stopped it (an encrypted one gets a new key first, so the old copy can never be opened
    /// again).
    pub async fn restore(
        self: &Arc<Self>,
        tenant: &TenantId,
        snapshot: Option<&str>,
        to_host: Option<&HostId>,
    ) -> Result<proto::RestoreTenantResponse, BackupError> {
        if let Some(id) = snapshot {
            berth_shared::backup::snapshot_id(id)?;
        }
        let source = self
            .placed_host(tenant)
            .map_err(BackupError::StoredPlacement)?
            .ok_or_else(|| BackupError::UnknownTenant(tenant.clone()))?;
        let target = to_host.unwrap_or(&source).clone();
        let moving = target != source;
        if moving && !self.agents.is_connected(&source) {
            return Err(BackupError::SourceUnreachable {
                tenant: tenant.clone(),
                host: source,
            });
        }
        let snapshots = self.snapshots_through(tenant, &target).await?;
        let chosen = match snapshot {
            None => snapshots.last(),
            Some(id) => snapshots.iter().find(|s| s.id.starts_with(id)),
        }
        .ok_or_else(|| BackupError::NoSnapshot {
            tenant: tenant.clone(),
            snapshot: snapshot.unwrap_or("at all").to_string(),
        })?;
        let applied = match moving {
            false => self
                .placements
                .set_restore(tenant, Some(chosen.id.clone()))?,
            true => {
                // The new key before the target can be sent the old one with the move.
                if self.keys.has(tenant)? {
                    self.keys.replace(tenant)?;
                }
                self.placements
                    .relocate_restoring(tenant, &target, Some(chosen.id.clone()))?
            }
        };
        self.durable(applied.seq).await?;
        let id = applied.placement.generation;
        tracing::info!(%tenant, from = %source, to = %target, snapshot = %chosen.short_id, "restore asked");
        let restored = self.await_restore(tenant, &target, id).await?;
        let old_copy_deleted = match moving {
            false => false,
            true => self.delete_old_copy(tenant, &source, id).await,
        };
        Ok(proto::RestoreTenantResponse {
            tenant_id: tenant.to_string(),
            host_id: target.to_string(),
            restored,
            moved_from: if moving {
                source.to_string()
            } else {
                String::new()
            },
            old_copy_deleted,
        })
    }

    /// Waits until `tenant` runs on `host` on the volume restore `id` made; the snapshot.
    async fn await_restore(
        &self,
        tenant: &TenantId,
        host: &HostId,
        id: u64,
    ) -> Result<Option<proto::BackupSnapshot>, BackupError> {
        let deadline = tokio::time::Instant::now() + RESTORE_WAIT;
        let mut failed = String::new();
        let restored = self
            .placements
            .wait_for_report(deadline, RECHECK, || {
                let status = self.placements.tenant(tenant)?.status?;
                if status.restore_id == id && status.state == proto::TenantState::Running as i32 {
                    return Some(Ok(status.restored));
                }
                if status.generation >= id && status.message.starts_with("restore: ") {
                    failed = status.message;
                    return Some(Err(()));
                }
                None
            })
            .await;
        match restored {
            Some(Ok(restored)) => Ok(restored),
            Some(Err(())) => Err(BackupError::Failed {
                tenant: tenant.clone(),
                host: host.clone(),
                error: failed,
            }),
            None => Err(BackupError::NotRestored {
                tenant: tenant.clone(),
                host: host.clone(),
                wait: RESTORE_WAIT,
            }),
        }
    }

    /// Deletes the copy of `tenant`'s volume that `host` kept after generation `generation`
    /// moved it away; whether it is gone (a failure is logged: the copy stays on that host).
    async fn delete_old_copy(&self, tenant: &TenantId, host: &HostId, generation: u64) -> bool {
        let deleted = match self.await_delivery(host, generation, PURGE_WAIT).await {
            Err(e) => Err(e.to_string()),
            Ok(()) => match self
                .agents
                .volume(host, purge_command(tenant), PURGE_WAIT)
                .await
            {
                Ok(r) if r.ok => Ok(()),
                Ok(r) => Err(r.error),
                Err(e) => Err(e.to_string()),
            },
        };
        match deleted {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%tenant, %host, %error, "the old copy of a restored tenant was not deleted");
                false
            }
        }
    }

    /// A tenant's files as a tar, made by the host that runs it: its files now, or those of
    /// snapshot `snapshot`; the tar's bytes come out of the receiver as the host uploads them
    /// (an error, last, if it stopped).
    pub fn export(
        self: &Arc<Self>,
        tenant: &TenantId,
        snapshot: Option<&str>,
    ) -> Result<tokio::sync::mpsc::Receiver<crate::exports::ExportData>, BackupError> {
        let host = self
            .placed_host(tenant)
            .map_err(BackupError::StoredPlacement)?
            .ok_or_else(|| BackupError::UnknownTenant(tenant.clone()))?;
        let mut command = proto::VolumeCommand {
            tenant_id: tenant.to_string(),
            action: proto::VolumeAction::ExportFiles as i32,
            ..Default::default()
        };
        if let Some(id) = snapshot {
            let repository = self
                .config
                .backup_repository
                .as_ref()
                .ok_or(BackupError::NotConfigured)?;
            command.snapshot_id = berth_shared::backup::snapshot_id(id)?.to_string();
            command.backup_repository = repository.of(tenant);
            command.backup_key = self
                .backup_keys
                .get(tenant)?
                .ok_or_else(|| BackupError::NeverBackedUp(tenant.clone()))?
                .to_vec();
        }
        if !self.agents.is_connected(&host) {
            return Err(BackupError::Link(
                crate::sessions::LinkError::NotConnected {
                    host,
                    what: "export",
                },
            ));
        }
        let (id, out) = self.exports.start(&host, tenant);
        command.export_id = id;
        tracing::info!(%tenant, %host, snapshot = snapshot.unwrap_or("now"), "export asked");
        let me = self.clone();
        tokio::spawn(async move {
            let error = match me.agents.volume(&host, command, EXPORT_WAIT).await {
                Ok(result) if result.ok => None,
                Ok(result) => Some(format!("{host}: {}", result.error)),
                Err(e) => Some(e.to_string()),
            };
            me.exports.finish(id, error).await;
        });
        Ok(out)
    }

    /// The snapshots of a tenant's repository, listed by the host that runs it (or keeps its
    /// volume); none when it was never backed up.
    pub async fn list_backups(
        &self,
        tenant: &TenantId,
    ) -> Result<proto::ListBackupsResponse, BackupError> {
        let host = self
            .placed_host(tenant)
            .map_err(BackupError::StoredPlacement)?
            .or_else(|| self.placements.retained(tenant))
            .ok_or_else(|| BackupError::UnknownTenant(tenant.clone()))?;
        Ok(proto::ListBackupsResponse {
            tenant_id: tenant.to_string(),
            snapshots: self.snapshots_through(tenant, &host).await?,
        })
    }

    /// The snapshots of a tenant's repository, oldest first, as `host` lists them (any host
    /// of the fleet can: the repository is off-host); none when it has no backup key.
    pub(crate) async fn snapshots_through(
        &self,
        tenant: &TenantId,
        host: &HostId,
    ) -> Result<Vec<proto::BackupSnapshot>, BackupError> {
        let repository = self
            .config
            .backup_repository
            .as_ref()
            .ok_or(BackupError::NotConfigured)?;
        let Some(key) = self.backup_keys.get(tenant)? else {
            return Ok(Vec::new());
        };
        let result = self
            .ask_backups(
                tenant,
                host,
                repository,
                &key,
                proto::VolumeAction::ListBackups,
                LIST_BACKUPS_WAIT,
            )
            .await?;
        Ok(result.snapshots)
    }

    pub(crate) async fn durable(self: &Arc<Self>, seq: u64) -> Result<(), PlaceError> {
        let me = self.clone();
        // A key made for a placement is on disk before the placement is.
        tokio::task::spawn_blocking(move || -> Result<(), PlaceError> {
            me.keys.sync().map_err(key_error)?;
            me.backup_keys.sync().map_err(key_error)?;
            Ok(me.placements.make_durable(seq)?)
        })
        .await
        .map_err(|e| {
            PlaceError::Store(berth_shared::store::StoreError::Io(format!(
                "flush task: {e}"
            )))
        })??;
        Ok(())
    }

    /// Tells the scheduler what the registry knows of a host (facts, admin state, liveness).
    pub fn sync_host(&self, host: &HostRecord) {
        let ready = host.state(self.registry.now(), self.config.down_after) == HostState::Ready;
        match host_info(host, ready) {
            Some(info) => self.placements.upsert_host(info),
            None => self.placements.set_schedulable(&host.host_id, false),
        }
    }

    /// Marks hosts whose reports stopped as unschedulable (and returning ones as schedulable).
    /// Drops from the deny-list the serials of certificates that have expired since (the
    /// handshake refuses them anyway), so the list each agent receives at the start of a session
    /// stays as long as the revocations still in force. A revocation meanwhile is kept: it
    /// reaches the registry before the list, and the list is replaced under the same lock.
    pub fn prune_deny_list(&self) -> Result<(), RegistryError> {
        let _list = self.deny_list.lock().unwrap_or_else(|p| p.into_inner());
        let keep = self.registry.revoked_unexpired(self.registry.now())?;
        self.denied.replace(keep);
        Ok(())
    }

    pub fn sweep_liveness(&self) -> Result<(), RegistryError> {
        let now = self.registry.now();
        for host in self.registry.hosts()? {
            let ready = host.state(now, self.config.down_after) == HostState::Ready;
            self.placements.set_schedulable(&host.host_id, ready);
        }
        Ok(())
    }

    /// The operator view of a host.
    pub fn host_view(&self, host: &HostRecord) -> proto::Host {
        let now = self.registry.now();
        let state = match host.state(now, self.config.down_after) {
            HostState::Ready => proto::HostState::Ready,
            HostState::Cordoned => proto::HostState::Cordoned,
            HostState::Draining => proto::HostState::Draining,
            HostState::Down => proto::HostState::Down,
        };
        let (tenant_count, _) = self.placements.host_usage(&host.host_id);
        proto::Host {
            host_id: host.host_id.to_string(),
            state: state as i32,
            facts: host.facts.as_ref().map(proto::HostFacts::from),
            last_report_unix_ms: host.last_report_unix_ms,
            memory_used_bytes: host.memory_used_bytes(),
            tenant_count,
            tenants: self
                .placements
                .tenants(Some(&host.host_id))
                .into_iter()
                .filter_map(|t| t.status)
                .collect(),
            enrolled_unix_ms: host.enrolled_unix_ms,
        }
    }

    fn peer_cert(&self, extensions: &http::Extensions) -> Result<Option<PeerCert>, AuthError> {
        let peer = extensions.get::<PeerInfo>().ok_or(AuthError::NoTransport)?;
        let Some(der) = &peer.cert else {
            return Ok(None);
        };
        let cert = parse_peer_cert(der).map_err(|e| AuthError::BadCertificate(e.to_string()))?;
        self.check_still_valid(&cert.serial, cert.not_after_unix_ms)?;
        Ok(Some(cert))
    }

    /// A certificate verified at the handshake may be revoked or expire while its connection
    /// (and a session on it) stays open: checked on every call and every session message.
    pub fn check_still_valid(&self, serial: &str, not_after_unix_ms: i64) -> Result<(), AuthError> {
        if self.denied.contains(serial) {
            return Err(AuthError::Revoked);
        }
        if not_after_unix_ms <= self.registry.now() {
            return Err(AuthError::Expired);
        }
        Ok(())
    }

    /// The host a request speaks for: from its verified, unrevoked, unexpired client
    /// certificate, and nothing else.
    pub fn authenticate_host(
        &self,
        extensions: &http::Extensions,
    ) -> Result<AuthenticatedHost, AuthError> {
        let cert = self
            .peer_cert(extensions)?
            .ok_or(AuthError::NoCertificate)?;
        match cert.subject {
            Subject::Host(host_id) => Ok(AuthenticatedHost {
                host_id,
                serial: cert.serial,
                not_after_unix_ms: cert.not_after_unix_ms,
            }),
            Subject::Operator(_) => Err(AuthError::OperatorAsHost),
        }
    }

    /// The operator behind a request: an operator certificate (scope `admin`), or a valid
    /// bearer token (its own scope); refused unless its scope allows `access`.
    pub fn authorize_operator(
        &self,
        extensions: &http::Extensions,
        headers: &http::HeaderMap,
        access: Access,
    ) -> Result<Operator, AuthError> {
        let operator = self.authenticate_operator(extensions, headers)?;
        if access == Access::Write && operator.scope != Scope::Admin {
            return Err(AuthError::ReadOnly(operator.name));
        }
        Ok(operator)
    }

    fn authenticate_operator(
        &self,
        extensions: &http::Extensions,
        headers: &http::HeaderMap,
    ) -> Result<Operator, AuthError> {
        if let Some(cert) = self.peer_cert(extensions)? {
            return match cert.subject {
                Subject::Operator(name) => Ok(Operator {
                    name,
                    scope: Scope::Admin,
                }),
                Subject::Host(host) => {
                    tracing::warn!(%host, "a host certificate was presented on the operator port");
                    Err(AuthError::HostAsOperator)
                }
            };
        }
        let header = headers
            .get(http::header::AUTHORIZATION)
            .ok_or(AuthError::NoCredential)?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or(AuthError::NotBearer)?;
        self.check_token(token.trim())
    }

    /// The operator a bearer token belongs to, when it is known, unrevoked and unexpired.
    pub fn check_token(&self, token: &str) -> Result<Operator, AuthError> {
        match self.registry.check_operator_token(token)? {
            Some(record) => Ok(Operator {
                name: record.name,
                scope: record.scope,
            }),
            None => Err(AuthError::BadToken),
        }
    }
}

/// What a call does to the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// An authenticated operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    pub scope: Scope,
}

/// A host proven by its certificate.
#[derive(Debug, Clone)]
pub struct AuthenticatedHost {
    pub host_id: HostId,
    pub serial: String,
    pub not_after_unix_ms: i64,
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;
    use tonic::Status;

    use super::*;
    use crate::sessions::{AgentReply, SessionHub};
    use crate::testing::seed;

    /// A seeded fleet of three hosts whose agents connect through the returned hub.
    fn fleet() -> (Arc<Coordinator>, Arc<SessionHub>) {
        let hub = Arc::new(SessionHub::default());
        let keyring = crate::keys::keyring::Keyring::in_memory();
        (seed::seeded_with(keyring, hub.clone(), 3, 0).unwrap(), hub)
    }

    fn spec(id: &str, encrypted: bool, tier: &str) -> proto::TenantSpec {
        seed::tenant_spec(id, tier, encrypted)
    }

    #[tokio::test]
    async fn an_encrypted_placement_has_its_key_before_the_reply_and_a_refused_one_none() {
        let c = seed::seeded(3, 0).unwrap();
        let id = |s: &str| TenantId::new(s).unwrap();
        c.place(spec("sealed", true, "business")).await.unwrap();
        let key = c.keys.get(&id("sealed")).unwrap().expect("a key");
        // The same spec again keeps the same key.
        c.place(spec("sealed", true, "business")).await.unwrap();
        assert_eq!(c.keys.get(&id("sealed")).unwrap().unwrap(), key);
        c.place(spec("plain", false, "business")).await.unwrap();
        assert!(
            c.keys.get(&id("plain")).unwrap().is_none(),
            "asked for no encryption"
        );
        // Refused (an unknown tier): no key left behind.
        c.place(spec("refused", true, "platinum"))
            .await
            .unwrap_err();
        assert!(c.keys.get(&id("refused")).unwrap().is_none());
        // Removed without purge: the key stays, so the tenant can come back, and the answer
        // says so; an unencrypted tenant had no key to keep.
        let removed = c.remove(&id("sealed"), false).await.unwrap();
        assert!(removed.key_kept && !removed.purged);
        assert_eq!(c.keys.get(&id("sealed")).unwrap().unwrap(), key);
        let removed = c.remove(&id("plain"), false).await.unwrap();
        assert!(!removed.key_kept && !removed.purged);
    }

    /// 200 pairs at once of a valid placement and a refused one (an unknown tier) of the same
    /// new tenant: every placed encrypted tenant has its key, and each refused tenant alone none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_refused_placement_racing_a_valid_one_of_the_same_tenant_never_takes_its_key() {
        // Key writes take a millisecond, so the two placements of a pair overlap.
        let keyring =
            crate::keys::keyring::Keyring::in_memory_slow(std::time::Duration::from_millis(1));
        let c = seed::seeded_with(keyring, Arc::new(SessionHub::default()), 20, 0).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            for tier in ["individual", "platinum"] {
                let c = c.clone();
                tasks.spawn(async move {
                    c.place(spec(&format!("race-{i}"), true, tier))
                        .await
                        .is_ok()
                });
            }
        }
        let mut placed = 0;
        while let Some(ok) = tasks.join_next().await {
            placed += usize::from(ok.unwrap());
        }
        assert_eq!(placed, 200, "every valid placement placed");
        for i in 0..200 {
            let id = TenantId::new(format!("race-{i}")).unwrap();
            assert!(c.placements.tenant(&id).is_some());
            assert!(c.keys.get(&id).unwrap().is_some(), "{id} lost its key");
        }
    }

    /// Plays a host's agent in a purge: acknowledges the removal, then answers the volume
    /// command with `answer` (ok, error).
    async fn answer_purge(
        c: Arc<Coordinator>,
        hub: Arc<SessionHub>,
        host: HostId,
        mut rx: mpsc::Receiver<Result<proto::CoordinatorMessage, Status>>,
        answer: (bool, &'static str),
    ) -> proto::VolumeCommand {
        let generation = c.placements.desired_state(&host).generation;
        c.placements.record_ack(
            &host,
            proto::DesiredStateAck {
                generation,
                accepted: true,
                error: String::new(),
            },
        );
        let Some(proto::coordinator_message::Body::Volume(command)) =
            rx.recv().await.unwrap().unwrap().body
        else {
            panic!("a volume command")
        };
        hub.complete(
            &host,
            AgentReply::Volume(proto::VolumeResult {
                tenant_id: command.tenant_id.clone(),
                request_id: command.request_id,
                ok: answer.0,
                error: answer.1.into(),
                erased: answer.0,
                deleted: answer.0,
                ..Default::default()
            }),
        );
        // Shredded: its backups go next (the fleet has a repository, and a key for it).
        if answer.0 {
            let Some(proto::coordinator_message::Body::Volume(forget)) =
                rx.recv().await.unwrap().unwrap().body
            else {
                panic!("a volume command")
            };
            assert_eq!(forget.action, proto::VolumeAction::ForgetBackups as i32);
            assert_eq!(forget.backup_key.len(), 32);
            hub.complete(
                &host,
                AgentReply::Volume(proto::VolumeResult {
                    tenant_id: forget.tenant_id.clone(),
                    request_id: forget.request_id,
                    ok: true,
                    ..Default::default()
                }),
            );
        }
        command
    }

    #[tokio::test]
    async fn a_purge_is_done_only_when_the_host_shredded_the_volume_and_the_key_is_gone() {
        let (c, hub) = fleet();
        let id = TenantId::new("sealed").unwrap();
        let placed = c.place(spec("sealed", true, "business")).await.unwrap();
        let host = HostId::new(&placed.host_id).unwrap();
        // The host is not connected: removed, but not purged; the key and the volume's host stay.
        let err = c.remove(&id, true).await.unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "tenant sealed is removed, but its volume on host {host} is not purged yet: the host is not connected; its key is kept: run `berthctl remove sealed --purge` again"
            )
        );
        assert!(c.placements.tenant(&id).is_none());
        assert!(c.keys.get(&id).unwrap().is_some());
        assert_eq!(c.placements.retained(&id), Some(host.clone()));
        // Connected, the agent refuses: still nothing destroyed.
        let (tx, rx) = mpsc::channel(4);
        hub.register(&host, "s1", tx, None);
        let agent = tokio::spawn(answer_purge(
            c.clone(),
            hub.clone(),
            host.clone(),
            rx,
            (false, "volume: luksErase failed"),
        ));
        let err = c.remove(&id, true).await.unwrap_err().to_string();
        assert!(
            err.ends_with("is not purged yet: the agent: volume: luksErase failed; its key is kept: run `berthctl remove sealed --purge` again"),
            "{err}"
        );
        let command = agent.await.unwrap();
        assert_eq!(
            (command.tenant_id.as_str(), command.action),
            ("sealed", proto::VolumeAction::Purge as i32)
        );
        assert!(c.keys.get(&id).unwrap().is_some());
        // The agent shreds it: purged, the key destroyed, the volume forgotten.
        let (tx, rx) = mpsc::channel(4);
        hub.register(&host, "s2", tx, None);
        let agent = tokio::spawn(answer_purge(
            c.clone(),
            hub.clone(),
            host.clone(),
            rx,
            (true, ""),
        ));
        let removed = c.remove(&id, true).await.unwrap();
        agent.await.unwrap();
        assert_eq!(
            removed,
            proto::RemoveTenantResponse {
                tenant_id: "sealed".into(),
                purged: true,
                host_id: host.to_string(),
                erased: true,
                deleted: true,
                key_destroyed: true,
                key_kept: false,
                // Its backup key was made with the placement; no snapshot was ever made.
                backups_forgotten: 0,
                backup_key_destroyed: true,
            }
        );
        assert!(c.keys.get(&id).unwrap().is_none());
        assert_eq!(c.placements.retained(&id), None);
        // Nothing left to purge or remove.
        assert!(matches!(
            c.remove(&id, true).await,
            Err(PlaceError::UnknownTenant(_))
        ));
    }

    #[tokio::test]
    async fn a_placed_tenant_is_purged_only_after_its_host_acknowledged_the_removal() {
        let (c, hub) = fleet();
        let id = TenantId::new("open").unwrap();
        let placed = c.place(spec("open", false, "business")).await.unwrap();
        let host = HostId::new(&placed.host_id).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        hub.register(&host, "s1", tx, None);
        let removing = {
            let (c, id) = (c.clone(), id.clone());
            tokio::spawn(async move { c.remove(&id, true).await })
        };
        // No command while the removal is unacknowledged.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "nothing sent before the ack");
        answer_purge(c.clone(), hub.clone(), host.clone(), rx, (true, "")).await;
        let removed = removing.await.unwrap().unwrap();
        assert!(removed.purged && removed.deleted);
        assert!(!removed.key_destroyed, "a plain volume has no key");
    }
}
