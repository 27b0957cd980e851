//! Agents played in process: an [`AgentLink`] whose hosts answer like real agents (they run
//! what their desired state says, acknowledge it, report their tenants, keep volumes, export,
//! import, purge and restart), with failures injected per host and step. The coordinator
//! under test is the real one; only the agents and the network between them are played.
//!
//! What a played host holds is a model, not bytes: each volume is its tenant's *content
//! version* (raised by [`FakeAgents::write`], as the tenant writing would) and its size; a
//! copy hands that version over, so a test sees whether the data that arrived is the data that
//! left. Every start of a tenant is checked against every other connected host: a tenant
//! running on two connected hosts at once is recorded in [`FakeAgents::overlaps`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use berth_shared::ids::{HostId, TenantId};
use berth_shared::proto;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::coordinator::Coordinator;
use crate::drain::Drainer;
use crate::sessions::{AgentCommand, AgentLink, AgentReply, Answer, LinkError};

/// A step of an agent that a test can make fail or hang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Acknowledging a desired state (a host that does not stop what it was told to).
    Ack,
    /// Exporting a volume; `precopy` says which of the two copies of a move.
    Export {
        precopy: bool,
    },
    /// Importing a volume.
    Import {
        precopy: bool,
    },
    Purge,
    /// Passing the health check after a start.
    Health,
}

/// What an injected fault does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The step answers with this error.
    Fail(String),
    /// The step never answers (nor acknowledges; a start never turns healthy).
    Hang,
}

#[derive(Debug, Clone)]
struct Fault {
    host: HostId,
    step: Step,
    effect: Effect,
}

/// A tenant's volume as a played host holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Volume {
    /// Raised by every write of its tenant.
    pub content: u64,
    pub bytes: u64,
}

impl Volume {
    fn sha256(&self, tenant: &TenantId) -> String {
        format!("{tenant}@{}", self.content)
    }
}

#[derive(Debug, Default)]
struct Host {
    connected: bool,
    /// The task that delivers this host's desired states (while connected).
    delivery: Option<AbortHandle>,
    /// Tenant → the generation it started at, and whether it is healthy.
    running: BTreeMap<TenantId, (u64, bool)>,
    staged: BTreeSet<TenantId>,
    volumes: BTreeMap<TenantId, Volume>,
    /// Pre-copies kept aside, by transfer id.
    aside: BTreeMap<u64, (TenantId, Volume)>,
    /// Per tenant, the last restore done here: its id and the snapshot restored.
    restored: BTreeMap<TenantId, (u64, proto::BackupSnapshot)>,
}

/// A transfer between two played hosts.
#[derive(Debug, Default)]
struct Transfer {
    sent: Option<Volume>,
    cancelled: bool,
}

#[derive(Debug, Default)]
struct Fleet {
    hosts: BTreeMap<HostId, Host>,
    faults: Vec<Fault>,
    transfers: BTreeMap<u64, Transfer>,
    overlaps: Vec<String>,
    /// Every volume command answered or cancelled, as "host action tenant".
    log: Vec<String>,
    /// The backup repository: per tenant, its snapshots (oldest first) and what each holds.
    backups: BTreeMap<TenantId, Vec<(proto::BackupSnapshot, Volume)>>,
    /// Per tenant, the next nightly restart its host reports: when its window opens and when
    /// the restart is (Unix ms).
    restart_slots: BTreeMap<TenantId, (i64, i64)>,
}

/// The played agents (see the module doc).
#[derive(Debug, Default)]
pub struct FakeAgents {
    fleet: Mutex<Fleet>,
    /// Woken whenever a transfer gets its data or is cancelled.
    transfers: Notify,
}

/// What an export or import moved: its data bytes and the volume's checksum.
struct Moved {
    bytes: u64,
    sha256: String,
}

/// A played agent's refusal, in its own words (as a real agent's `VolumeResult.error`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refusal(String);

impl From<&str> for Refusal {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// A volume's size unless a test says otherwise.
pub const VOLUME_BYTES: u64 = 64 << 20;
/// What a copy on top of a pre-copy sends: the changes only.
pub const CHANGES_BYTES: u64 = 1 << 20;

fn effect(fleet: &Fleet, host: &HostId, step: Step) -> Option<Effect> {
    fleet
        .faults
        .iter()
        .find(|f| f.host == *host && f.step == step)
        .map(|f| f.effect.clone())
}

impl FakeAgents {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn fleet(&self) -> MutexGuard<'_, Fleet> {
        self.fleet.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whichever host runs `tenant` reports its next nightly restart at `at`, in a window
    /// that opens at `opens` (Unix ms).
    pub fn plan_restart(&self, tenant: &TenantId, opens: i64, at: i64) {
        self.fleet()
            .restart_slots
            .insert(tenant.clone(), (opens, at));
    }

    /// Makes `step` on `host` do `effect` from now on (until [`Self::heal`]).
    pub fn inject(&self, host: &HostId, step: Step, effect: Effect) {
        self.fleet().faults.push(Fault {
            host: host.clone(),
            step,
            effect,
        });
    }

    /// Removes every fault injected on `host`.
    pub fn heal(&self, host: &HostId) {
        self.fleet().faults.retain(|f| f.host != *host);
    }

    /// Connects `host`'s agent to the coordinator `drainer` drives, as a session does: it
    /// hears its desired state now and at every change, and what it still holds of tenants
    /// moved away is deleted.
    pub fn connect(self: &Arc<Self>, drainer: &Arc<Drainer>, host: &HostId) {
        let c = &drainer.coordinator;
        let agents = self.clone();
        let (c2, h) = (c.clone(), host.clone());
        let mut desired = c.placements.subscribe(host);
        let task = tokio::spawn(async move {
            desired.mark_changed();
            loop {
                tokio::select! {
                    changed = desired.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        desired.borrow_and_update();
                    }
                    // Reports go on between desired states (a fault healed shows).
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                agents.deliver(&c2, &h);
            }
        });
        let mut fleet = self.fleet();
        let entry = fleet.hosts.entry(host.clone()).or_default();
        if let Some(old) = entry.delivery.replace(task.abort_handle()) {
            old.abort();
        }
        entry.connected = true;
        drop(fleet);
        tokio::spawn(drainer.clone().delete_stale_copies(host.clone()));
    }

    /// Cuts `host` off: no session, no delivery. With `dies`, its tenants stop too (the machine
    /// is gone); without, they go on running where nobody can reach them (a partition).
    pub fn disconnect(&self, host: &HostId, dies: bool) {
        let mut fleet = self.fleet();
        let Some(entry) = fleet.hosts.get_mut(host) else {
            return;
        };
        entry.connected = false;
        if let Some(task) = entry.delivery.take() {
            task.abort();
        }
        if dies {
            entry.running.clear();
        }
    }

    /// Applies `host`'s durable desired state, acknowledges it and reports its tenants.
    fn deliver(&self, c: &Coordinator, host: &HostId) {
        let state = c.placements.desired_state(host);
        let (ack, statuses) = {
            let mut fleet = self.fleet();
            if !fleet.hosts.get(host).is_some_and(|h| h.connected) {
                return;
            }
            let hangs = effect(&fleet, host, Step::Ack) == Some(Effect::Hang);
            let healthy = effect(&fleet, host, Step::Health).is_none();
            let wanted: BTreeMap<TenantId, u64> = state
                .tenants
                .iter()
                .filter_map(|s| TenantId::new(&s.tenant_id).ok())
                .map(|t| (t, state.generation))
                .collect();
            let restores: BTreeMap<TenantId, proto::RestoreRequest> = state
                .tenants
                .iter()
                .filter_map(|s| Some((TenantId::new(&s.tenant_id).ok()?, s.restore.clone()?)))
                .collect();
            let backups = fleet.backups.clone();
            let others: Vec<(HostId, BTreeSet<TenantId>)> = fleet
                .hosts
                .iter()
                .filter(|(h, e)| *h != host && e.connected)
                .map(|(h, e)| (h.clone(), e.running.keys().cloned().collect()))
                .collect();
            let mut overlaps = Vec::new();
            let slots = fleet.restart_slots.clone();
            let entry = fleet.hosts.entry(host.clone()).or_default();
            if !hangs {
                // What it no longer runs stops (its volume stays until a purge).
                entry.running.retain(|t, _| wanted.contains_key(t));
                entry.staged = state
                    .staged
                    .iter()
                    .filter_map(|s| TenantId::new(&s.tenant_id).ok())
                    .collect();
                for (tenant, generation) in &wanted {
                    if entry.running.contains_key(tenant) {
                        continue;
                    }
                    for (other, running) in &others {
                        if running.contains(tenant) {
                            overlaps.push(format!(
                                "{tenant} started on {host} while running on {other}"
                            ));
                        }
                    }
                    entry.volumes.entry(tenant.clone()).or_insert(Volume {
                        content: 0,
                        bytes: VOLUME_BYTES,
                    });
                    // A restore not done here yet: from the snapshot asked for (or the latest).
                    if let Some(r) = restores.get(tenant)
                        && entry
                            .restored
                            .get(tenant)
                            .is_none_or(|(id, _)| *id != r.restore_id)
                    {
                        let snapshots = backups.get(tenant).cloned().unwrap_or_default();
                        let chosen = match r.snapshot_id.as_str() {
                            "" => snapshots.last(),
                            id => snapshots.iter().find(|(s, _)| s.id.starts_with(id)),
                        };
                        // Not started on an unrestored volume.
                        let Some((snapshot, volume)) = chosen.cloned() else {
                            continue;
                        };
                        entry.volumes.insert(tenant.clone(), volume);
                        entry
                            .restored
                            .insert(tenant.clone(), (r.restore_id, snapshot));
                    }
                    entry.running.insert(tenant.clone(), (*generation, false));
                }
            }
            for (_, health) in entry.running.values_mut() {
                *health = healthy;
            }
            let statuses: Vec<proto::TenantStatus> = entry
                .running
                .iter()
                .map(|(tenant, (generation, healthy))| {
                    let restored = entry.restored.get(tenant);
                    let (opens, at) = slots.get(tenant).copied().unwrap_or_default();
                    proto::TenantStatus {
                        restart_window_opens_unix_ms: opens,
                        next_restart_unix_ms: at,
                        tenant_id: tenant.to_string(),
                        state: proto::TenantState::Running as i32,
                        generation: *generation,
                        healthy: *healthy,
                        restore_id: restored.map_or(0, |(id, _)| *id),
                        restored: restored.map(|(_, s)| s.clone()),
                        ..Default::default()
                    }
                })
                .collect();
            fleet.overlaps.extend(overlaps);
            let ack = (!hangs).then_some(proto::DesiredStateAck {
                generation: state.generation,
                accepted: true,
                error: String::new(),
            });
            (ack, statuses)
        };
        if let Some(ack) = ack {
            c.placements.record_ack(host, ack);
        }
        c.placements.record_statuses(host, statuses);
    }

    /// The tenant writes to its volume where it runs.
    pub fn write(&self, host: &HostId, tenant: &TenantId) {
        let mut fleet = self.fleet();
        let entry = fleet.hosts.entry(host.clone()).or_default();
        assert!(
            entry.running.contains_key(tenant),
            "{tenant} does not run on {host}"
        );
        if let Some(v) = entry.volumes.get_mut(tenant) {
            v.content += 1;
        }
    }

    /// The hosts running `tenant`.
    pub fn running(&self, tenant: &TenantId) -> Vec<HostId> {
        self.fleet()
            .hosts
            .iter()
            .filter(|(_, e)| e.running.contains_key(tenant))
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// `tenant`'s volume on `host`, if it holds one.
    pub fn volume(&self, host: &HostId, tenant: &TenantId) -> Option<Volume> {
        self.fleet().hosts.get(host)?.volumes.get(tenant).copied()
    }

    /// Whether `host` keeps a pre-copy of `tenant` aside.
    pub fn holds_precopy(&self, host: &HostId, tenant: &TenantId) -> bool {
        self.fleet()
            .hosts
            .get(host)
            .is_some_and(|e| e.aside.values().any(|(t, _)| t == tenant))
    }

    /// Every tenant started on a connected host while another connected host ran it.
    pub fn overlaps(&self) -> Vec<String> {
        self.fleet().overlaps.clone()
    }

    /// The volume commands answered or cancelled so far, as "host action tenant".
    pub fn log(&self) -> Vec<String> {
        self.fleet().log.clone()
    }

    /// Runs a volume command on `host` as its agent would.
    async fn volume_command(
        &self,
        host: &HostId,
        command: proto::VolumeCommand,
    ) -> proto::VolumeResult {
        let action = proto::VolumeAction::try_from(command.action)
            .unwrap_or(proto::VolumeAction::Unspecified);
        let result = |outcome: Result<Moved, Refusal>| {
            let (data_bytes, sha256, ok, error) = match outcome {
                Ok(moved) => (moved.bytes, moved.sha256, true, String::new()),
                Err(e) => (0, String::new(), false, e.0),
            };
            proto::VolumeResult {
                tenant_id: command.tenant_id.clone(),
                request_id: command.request_id,
                ok,
                error,
                data_bytes,
                sha256,
                ..Default::default()
            }
        };
        let Ok(tenant) = TenantId::new(&command.tenant_id) else {
            return result(Err("volume: tenant_id: not an id".into()));
        };
        let step = match action {
            proto::VolumeAction::Export => Step::Export {
                precopy: command.precopy,
            },
            proto::VolumeAction::Import => Step::Import {
                precopy: command.precopy,
            },
            _ => Step::Purge,
        };
        let fault = effect(&self.fleet(), host, step);
        match fault {
            Some(Effect::Hang) => std::future::pending().await,
            Some(Effect::Fail(e)) => {
                self.note(host, action, &tenant, "failed");
                return result(Err(Refusal(e)));
            }
            None => {}
        }
        match action {
            proto::VolumeAction::Purge => {
                let mut fleet = self.fleet();
                let entry = fleet.hosts.entry(host.clone()).or_default();
                if entry.running.contains_key(&tenant) {
                    return result(Err(Refusal(format!("volume: {tenant} still runs here"))));
                }
                let deleted = entry.volumes.remove(&tenant).is_some();
                entry.aside.retain(|_, (t, _)| *t != tenant);
                drop(fleet);
                self.note(host, action, &tenant, "");
                proto::VolumeResult {
                    erased: deleted,
                    deleted,
                    ..result(Ok(Moved {
                        bytes: 0,
                        sha256: String::new(),
                    }))
                }
            }
            proto::VolumeAction::Backup => {
                let mut fleet = self.fleet();
                let entry = fleet.hosts.entry(host.clone()).or_default();
                let Some(volume) = entry
                    .volumes
                    .get(&tenant)
                    .copied()
                    .filter(|_| entry.running.contains_key(&tenant))
                else {
                    return result(Err(Refusal(format!(
                        "volume: {tenant} is not open on this host"
                    ))));
                };
                let snapshots = fleet.backups.entry(tenant.clone()).or_default();
                let n = snapshots.len() + 1;
                let snapshot = proto::BackupSnapshot {
                    id: format!("{n:08x}{}", "0".repeat(56)),
                    short_id: format!("{n:08x}"),
                    time: format!("2026-12-{n:02}T03:00:00Z"),
                };
                snapshots.push((snapshot.clone(), volume));
                drop(fleet);
                self.note(host, action, &tenant, "");
                proto::VolumeResult {
                    backup: Some(proto::BackupSummary {
                        snapshot_id: snapshot.id,
                        ..Default::default()
                    }),
                    ..result(Ok(Moved {
                        bytes: 0,
                        sha256: String::new(),
                    }))
                }
            }
            proto::VolumeAction::ListBackups => {
                let snapshots = self
                    .fleet()
                    .backups
                    .get(&tenant)
                    .map(|s| s.iter().map(|(s, _)| s.clone()).collect())
                    .unwrap_or_default();
                proto::VolumeResult {
                    snapshots,
                    ..result(Ok(Moved {
                        bytes: 0,
                        sha256: String::new(),
                    }))
                }
            }
            proto::VolumeAction::ForgetBackups => {
                let forgotten = self.fleet().backups.remove(&tenant).map_or(0, |s| s.len());
                self.note(host, action, &tenant, "");
                proto::VolumeResult {
                    forgotten: forgotten as u32,
                    ..result(Ok(Moved {
                        bytes: 0,
                        sha256: String::new(),
                    }))
                }
            }
            proto::VolumeAction::Export => result(self.export(host, &tenant, &command)),
            proto::VolumeAction::Import => result(self.import(host, &tenant, &command).await),
            _ => result(Err(Refusal(format!(
                "volume: unexpected action {action:?}"
            )))),
        }
    }

    fn note(&self, host: &HostId, action: proto::VolumeAction, tenant: &TenantId, what: &str) {
        let line = format!("{host} {} {tenant} {what}", action.as_str_name());
        self.fleet().log.push(line.trim_end().to_string());
    }

    fn export(
        &self,
        host: &HostId,
        tenant: &TenantId,
        command: &proto::VolumeCommand,
    ) -> Result<Moved, Refusal> {
        let mut fleet = self.fleet();
        let entry = fleet.hosts.entry(host.clone()).or_default();
        if !command.precopy && entry.running.contains_key(tenant) {
            return Err(Refusal(format!("export: {tenant} still runs here")));
        }
        let volume = *entry
            .volumes
            .get(tenant)
            .ok_or_else(|| Refusal(format!("export: no volume of {tenant} here")))?;
        let transfer = fleet.transfers.entry(command.transfer_id).or_default();
        if transfer.cancelled {
            return Err("export: cancelled".into());
        }
        transfer.sent = Some(volume);
        drop(fleet);
        self.transfers.notify_waiters();
        self.note(host, proto::VolumeAction::Export, tenant, "");
        let bytes = match command.base_transfer_id {
            0 => volume.bytes,
            _ => CHANGES_BYTES,
        };
        Ok(Moved {
            bytes,
            sha256: volume.sha256(tenant),
        })
    }

    async fn import(
        &self,
        host: &HostId,
        tenant: &TenantId,
        command: &proto::VolumeCommand,
    ) -> Result<Moved, Refusal> {
        let volume = loop {
            let arrived = self.transfers.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut fleet = self.fleet();
                let transfer = fleet.transfers.entry(command.transfer_id).or_default();
                if transfer.cancelled {
                    return Err("import: cancelled".into());
                }
                if let Some(volume) = transfer.sent {
                    break volume;
                }
            }
            arrived.await;
        };
        let mut fleet = self.fleet();
        let based = command.base_transfer_id != 0;
        let entry = fleet.hosts.entry(host.clone()).or_default();
        if command.precopy {
            entry
                .aside
                .insert(command.transfer_id, (tenant.clone(), volume));
        } else {
            if based && !entry.aside.contains_key(&command.base_transfer_id) {
                return Err(Refusal(format!(
                    "import: no pre-copy {} here to build on",
                    command.base_transfer_id
                )));
            }
            entry.aside.retain(|_, (t, _)| t != tenant);
            entry.volumes.insert(tenant.clone(), volume);
        }
        drop(fleet);
        self.note(host, proto::VolumeAction::Import, tenant, "");
        let bytes = if based { CHANGES_BYTES } else { volume.bytes };
        Ok(Moved {
            bytes,
            sha256: volume.sha256(tenant),
        })
    }
}

impl AgentLink for FakeAgents {
    fn is_connected(&self, host: &HostId) -> bool {
        self.fleet().hosts.get(host).is_some_and(|h| h.connected)
    }

    fn transfer_address(&self, host: &HostId) -> Option<SocketAddr> {
        // Never dialled: played hosts hand volumes over in memory.
        self.is_connected(host)
            .then(|| SocketAddr::from(([192, 0, 2, 1], 7445)))
    }

    fn ask<'a>(&'a self, host: &'a HostId, command: AgentCommand, wait: Duration) -> Answer<'a> {
        Box::pin(async move {
            let what = command.what();
            if !self.is_connected(host) {
                return Err(LinkError::NotConnected {
                    host: host.clone(),
                    what,
                });
            }
            let answer = async {
                match command {
                    AgentCommand::Restart(tenant) => AgentReply::Restart(proto::RestartResult {
                        tenant_id: tenant.to_string(),
                        ok: true,
                        downtime_ms: 500,
                        ..Default::default()
                    }),
                    AgentCommand::Volume(command) => {
                        AgentReply::Volume(self.volume_command(host, command).await)
                    }
                }
            };
            tokio::time::timeout(wait, answer)
                .await
                .map_err(|_| LinkError::NoAnswer {
                    host: host.clone(),
                    what,
                    wait,
                })
        })
    }

    fn cancel_transfer(&self, host: &HostId, transfer_id: u64) {
        let mut fleet = self.fleet();
        if fleet.hosts.get(host).is_some_and(|h| h.connected) {
            fleet.transfers.entry(transfer_id).or_default().cancelled = true;
            fleet.log.push(format!("{host} CANCEL {transfer_id}"));
        }
        drop(fleet);
        self.transfers.notify_waiters();
    }

    fn broadcast(&self, _body: proto::coordinator_message::Body) {}

    fn close_revoked(&self, _serials: &[String]) -> Vec<HostId> {
        Vec::new()
    }
}
