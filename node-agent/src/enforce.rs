//! The enforcement loop: owns the desired state and keeps the host converged to it, on every
//! change and every few seconds, independently of the coordinator session (an agent that loses
//! its coordinator keeps enforcing the last desired state it applied).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_shared::ids::{HostId, TenantId};
use berth_shared::proto;
use tokio::sync::{Notify, watch};

use crate::backup::export::{ExportError, ExportJob, Exporter};
use crate::backup::restic::Restic;
use crate::backup::restore::Restorer;
use crate::backup::schedule::{Backups, OpenVolumes};
use crate::backup::{BackupAccess, BackupRecord, BackupSource, RepositoryLocks, Restored};
use crate::backup::{BackupEngine, BackupError, BackupKey};
use crate::config::AgentConfig;
use crate::desired::{AcceptError, Desired, DesiredStore};
use crate::egress::NftEgress;
use crate::egress::dns::NameServers;
use crate::egress::nft::NftCommand;
use crate::host::cgroup::CgroupReader;
use crate::host::facts::{ProbeRoots, probe_cgroup, probe_dm_crypt};
use crate::reconcile::{Passes, Reconciler, TornDown, port_free_on_loopback};
use crate::restarts::health::HealthWatch;
use crate::restarts::{Driver, HealthGate, NetnsProbe, RestartSettings, Restarts};
use crate::runtime::DockerRuntime;
use crate::transfer::peer::{Incoming, PeerTls};
use crate::transfer::{Base, VolumeLocation, receive_volume, send_volume};
use crate::volume::VolumeStep;
use crate::volume::cryptsetup::{CryptsetupCommand, VolumeKey};
use crate::volume::{HostVolumes, KeySource, SystemMounter};
use std::path::{Path, PathBuf};

/// How often the host is re-checked without a change.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);

/// How long a starting agent waits for the coordinator's desired state before it enforces
/// the one on disk.
pub const STARTUP_WAIT: Duration = Duration::from_secs(15);

/// Why the agent refused a volume command.
#[derive(Debug, thiserror::Error)]
pub enum VolumeCommandError {
    #[error("tenant_id: {0}")]
    TenantId(berth_shared::ids::IdError),
    #[error("action: unknown volume action {0}")]
    UnknownAction(i32),
    #[error("{tenant} is still placed on this host (generation {generation}): remove it first")]
    StillPlaced { tenant: TenantId, generation: u64 },
    #[error("volume: {0}")]
    Volume(crate::volume::VolumeError),
}

/// The volume keys of a delivery that were refused, each with why (the others are held).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct KeysRefused(pub Vec<String>);

/// Shared between the session (which accepts desired states and reports statuses) and the
/// enforcement loop.
#[derive(Debug)]
pub struct Enforcement {
    desired: Mutex<DesiredStore>,
    statuses: Mutex<Vec<proto::TenantStatus>>,
    changed: watch::Sender<u64>,
    /// A coordinator sent a desired state since the agent started.
    heard: watch::Sender<bool>,
    pub restarts: Arc<Restarts>,
    /// The volume keys of this host's encrypted tenants: in memory only, never written.
    volume_keys: Mutex<HashMap<TenantId, VolumeKey>>,
    /// Where this host's tenants are backed up, with their repositories' keys: in memory
    /// only, never written.
    backup_access: Mutex<HashMap<TenantId, BackupAccess>>,
    /// One restic at a time per tenant's repository, whatever runs it.
    repository_locks: RepositoryLocks,
    /// Makes exports (set once the enforcement loop knows the host's volumes).
    exporter: std::sync::OnceLock<Exporter>,
    /// Volume commands from the coordinator, run between two reconcile passes (so never
    /// while a pass creates or tears down the same tenant), and their results.
    /// Each with the desired-state generation whose teardown it waits for (0: none, an import).
    volume_commands: Mutex<Vec<(u64, proto::VolumeCommand)>>,
    volume_commands_queued: Notify,
    /// Tenants whose volume is being sent or received: a purge of theirs waits for the end
    /// (an import finishing after the purge would leave a copy behind).
    transferring: Mutex<std::collections::BTreeSet<String>>,
    /// The reconciler's passes, which volume commands wait for.
    pub passes: Arc<Passes>,
    volume_results: Mutex<VecDeque<proto::VolumeResult>>,
    /// The latest progress of each import under way, by transfer id, not sent yet.
    volume_progress: Mutex<HashMap<u64, proto::VolumeProgress>>,
    volume_messages_ready: Notify,
    /// This host's identity while a coordinator session is up: volume transfers are made
    /// with it, and only then.
    peer_tls: Mutex<Option<Arc<PeerTls>>>,
    /// The coordinator's revoked serials (sent at each session's start and at each
    /// revocation): the transfer port refuses them either way.
    pub denied: Arc<berth_shared::tls::SerialDenyList>,
    /// The transfers other hosts may push to this one (served on the transfer port).
    pub incoming: Arc<Incoming>,
    /// What stops each transfer under way, by transfer id.
    cancels: Mutex<HashMap<u64, watch::Sender<bool>>>,
    /// A tenant's state changed in the last pass: report now, not at the next interval
    /// (a drain waits for a moved tenant to run).
    states_changed: Notify,
    /// Per tenant, the last pre-copy this host sent or received (what a later copy may send
    /// only the changes to); in memory only, so after a restart copies are whole again.
    bases: Mutex<HashMap<String, Base>>,
}

/// Results kept for a coordinator that is not listening (the oldest are dropped).
const MAX_PENDING_VOLUME_RESULTS: usize = 64;

impl Enforcement {
    pub fn new(store: DesiredStore, restarts: RestartSettings) -> Self {
        let generation = store.current().generation;
        Self {
            desired: Mutex::new(store),
            statuses: Mutex::new(Vec::new()),
            changed: watch::Sender::new(generation),
            heard: watch::Sender::new(false),
            restarts: Arc::new(Restarts::new(restarts)),
            volume_keys: Mutex::new(HashMap::new()),
            backup_access: Mutex::new(HashMap::new()),
            repository_locks: RepositoryLocks::default(),
            exporter: std::sync::OnceLock::new(),
            volume_commands: Mutex::new(Vec::new()),
            volume_commands_queued: Notify::new(),
            transferring: Mutex::default(),
            passes: Arc::default(),
            volume_results: Mutex::new(VecDeque::new()),
            volume_progress: Mutex::default(),
            volume_messages_ready: Notify::new(),
            peer_tls: Mutex::new(None),
            denied: Arc::default(),
            incoming: Arc::default(),
            cancels: Mutex::default(),
            states_changed: Notify::new(),
            bases: Mutex::default(),
        }
    }

    /// Resolves when a reconcile pass changed a tenant's state.
    pub async fn states_changed(&self) {
        self.states_changed.notified().await
    }

    /// Keeps a pass's statuses; wakes the reporter when a tenant's state changed.
    fn set_statuses(&self, statuses: Vec<proto::TenantStatus>) {
        let states = |s: &[proto::TenantStatus]| -> Vec<(String, i32, u64, bool)> {
            s.iter()
                .map(|t| (t.tenant_id.clone(), t.state, t.generation, t.healthy))
                .collect()
        };
        let mut current = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        let changed = states(&current) != states(&statuses);
        *current = statuses;
        drop(current);
        if changed {
            self.states_changed.notify_one();
        }
    }

    /// This host's identity for volume transfers, while a coordinator session is up.
    pub fn set_peer_tls(&self, tls: Option<Arc<PeerTls>>) {
        *self.peer_tls.lock().unwrap_or_else(|p| p.into_inner()) = tls;
    }

    /// Stops the transfers under way (the session that ordered them is lost, so nobody
    /// could hear how they ended): each ends as failed, and imports leave nothing behind.
    pub fn cancel_transfers(&self) {
        for cancel in self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            cancel.send_replace(true);
        }
    }

    /// Queues the progress of import `transfer_id` for the coordinator (only the latest of
    /// each transfer is kept).
    fn push_volume_progress(&self, progress: proto::VolumeProgress) {
        self.volume_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(progress.transfer_id, progress);
        self.volume_messages_ready.notify_one();
    }

    pub fn push_volume_result(&self, result: proto::VolumeResult) {
        let mut results = self
            .volume_results
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if results.len() >= MAX_PENDING_VOLUME_RESULTS {
            results.pop_front();
        }
        results.push_back(result);
        drop(results);
        self.volume_messages_ready.notify_one();
    }

    /// Queues a volume command; its result comes out of [`Self::take_volume_results`]. A
    /// purge or an export waits until a pass that read the last accepted desired state (the
    /// coordinator asks only once that state dropped the tenant) has finished its teardown, so
    /// the tenant's container is gone and its volume closed; an import, of a tenant that runs
    /// nowhere here, and a pre-copy export, which reads a running tenant's volume as it is,
    /// go at once.
    pub fn request_volume(&self, command: proto::VolumeCommand) {
        if command.action == proto::VolumeAction::Cancel as i32 {
            // Not queued behind anything: the transfer is stopped now, or had ended.
            if let Some(cancel) = self
                .cancels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&command.transfer_id)
            {
                cancel.send_replace(true);
            }
            return;
        }
        let after = match proto::VolumeAction::try_from(command.action) {
            Ok(proto::VolumeAction::Import) => 0,
            // A pre-copy reads the volume of a tenant that runs on.
            Ok(proto::VolumeAction::Export) if command.precopy => 0,
            // A backup reads a running tenant's volume; a listing touches none.
            Ok(
                proto::VolumeAction::Backup
                | proto::VolumeAction::ListBackups
                | proto::VolumeAction::ForgetBackups,
            ) => 0,
            _ => self.store().current().generation,
        };
        self.volume_commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((after, command));
        self.volume_commands_queued.notify_one();
        self.changed.send_modify(|_| ());
    }

    /// Runs volume commands as they become due, for ever.
    async fn serve_volume_commands(
        self: Arc<Self>,
        volumes: Arc<dyn VolumeStep>,
        backups: Arc<dyn BackupEngine>,
        root: PathBuf,
    ) {
        let mut torn_down = self.passes.torn_down();
        loop {
            let done = *torn_down.borrow_and_update();
            self.run_volume_commands(volumes.as_ref(), &backups, &root, done)
                .await;
            tokio::select! {
                changed = torn_down.changed() => if changed.is_err() { return },
                () = self.volume_commands_queued.notified() => {}
            }
        }
    }

    /// Resolves when volume results or progress are waiting.
    pub async fn volume_messages_ready(&self) {
        self.volume_messages_ready.notified().await
    }

    /// The volume messages for the coordinator: progress of imports, then results.
    pub fn take_volume_messages(&self) -> Vec<proto::agent_message::Body> {
        use proto::agent_message::Body;
        let progress = std::mem::take(
            &mut *self
                .volume_progress
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let results = self
            .volume_results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect::<Vec<_>>();
        progress
            .into_values()
            .map(Body::VolumeProgress)
            .chain(results.into_iter().map(Body::VolumeResult))
            .collect()
    }

    /// Runs the queued volume commands against `volumes` (under `root`) and queues their
    /// results. Every command is refused for a tenant the desired state places here: an
    /// export only once its container has stopped and released the volume, a purge only once
    /// its container is gone (this runs right after a reconcile pass), an import only before
    /// it may start. A transfer runs on its own task, so reconciling the other tenants goes on
    /// meanwhile. `torn_down`: how far the teardown of the desired state has come.
    async fn run_volume_commands(
        self: &Arc<Self>,
        volumes: &dyn VolumeStep,
        backups: &Arc<dyn BackupEngine>,
        root: &Path,
        torn_down: TornDown,
    ) {
        let commands: Vec<proto::VolumeCommand> = {
            let mut queued = self
                .volume_commands
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let transferring = self.transferring.lock().unwrap_or_else(|p| p.into_inner());
            let (due, waiting) =
                std::mem::take(&mut *queued)
                    .into_iter()
                    .partition(|(after, c)| {
                        let purge = c.action == proto::VolumeAction::Purge as i32;
                        let done = match purge {
                            true => torn_down.removed,
                            false => torn_down.released,
                        };
                        *after <= done && !(purge && transferring.contains(&c.tenant_id))
                    });
            *queued = waiting;
            due.into_iter().map(|(_, c)| c).collect()
        };
        if commands.is_empty() {
            return;
        }
        let desired = self.current();
        for command in commands {
            let mut result = proto::VolumeResult {
                tenant_id: command.tenant_id.clone(),
                request_id: command.request_id,
                ..Default::default()
            };
            let outcome = match (
                TenantId::new(&command.tenant_id),
                proto::VolumeAction::try_from(command.action),
            ) {
                (Err(e), _) => Err(VolumeCommandError::TenantId(e)),
                // An export is uploaded by the session (see `export_job`), never queued.
                (
                    _,
                    Ok(
                        proto::VolumeAction::Unspecified
                        | proto::VolumeAction::Cancel
                        | proto::VolumeAction::ExportFiles,
                    )
                    | Err(_),
                ) => Err(VolumeCommandError::UnknownAction(command.action)),
                (
                    Ok(t),
                    Ok(
                        action @ (proto::VolumeAction::Backup
                        | proto::VolumeAction::ListBackups
                        | proto::VolumeAction::ForgetBackups),
                    ),
                ) => {
                    let at = VolumeLocation {
                        root: root.to_path_buf(),
                        tenant: t,
                    };
                    let (backups, me) = (backups.clone(), self.clone());
                    let ledger = self.clone();
                    // restic runs for as long as the volume takes; the rest goes on meanwhile.
                    tokio::spawn(async move {
                        let done = tokio::task::spawn_blocking(move || {
                            let repository = me.repository_locks.of(&at.tenant);
                            let _held = repository.lock().unwrap_or_else(|p| p.into_inner());
                            backup_command(backups.as_ref(), action, &at, &command, result, &*me)
                        })
                        .await;
                        if let Ok(result) = done {
                            ledger.push_volume_result(result);
                        }
                    });
                    continue;
                }
                (Ok(t), action)
                    if desired.tenants.iter().any(|s| s.tenant_id == t)
                        && !(command.precopy && action == Ok(proto::VolumeAction::Export)) =>
                {
                    Err(VolumeCommandError::StillPlaced {
                        tenant: t,
                        generation: desired.generation,
                    })
                }
                (Ok(t), Ok(proto::VolumeAction::Purge)) => {
                    volumes.purge(&t).await.map_err(VolumeCommandError::Volume)
                }
                (
                    Ok(t),
                    Ok(action @ (proto::VolumeAction::Export | proto::VolumeAction::Import)),
                ) => {
                    self.transferring
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(t.to_string());
                    let at = VolumeLocation {
                        root: root.to_path_buf(),
                        tenant: t,
                    };
                    tokio::spawn(self.clone().transfer(action, at, command, result));
                    continue;
                }
            };
            match outcome {
                Ok(purged) => {
                    self.bases
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&result.tenant_id);
                    tracing::info!(tenant = %result.tenant_id, erased = purged.erased, deleted = purged.deleted, "volume purged");
                    result.ok = true;
                    result.erased = purged.erased;
                    result.deleted = purged.deleted;
                }
                Err(e) => {
                    tracing::warn!(tenant = %result.tenant_id.chars().take(64).collect::<String>(), error = %e, "volume command failed");
                    result.error = e.to_string();
                }
            }
            self.push_volume_result(result);
        }
    }

    /// Pushes a tenant's volume to the target's transfer port, or takes one pushed to this
    /// host's, then queues the result.
    async fn transfer(
        self: Arc<Self>,
        action: proto::VolumeAction,
        at: VolumeLocation,
        command: proto::VolumeCommand,
        mut result: proto::VolumeResult,
    ) {
        let (transfer_id, precopy) = (command.transfer_id, command.precopy);
        let base = self
            .bases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(at.tenant.as_str())
            .filter(|b| b.transfer_id == command.base_transfer_id && b.transfer_id != 0)
            .cloned();
        let (cancel, cancelled) = watch::channel(false);
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(transfer_id, cancel);
        let began = std::time::Instant::now();
        let outcome = match action {
            proto::VolumeAction::Export => {
                let tls = self
                    .peer_tls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                match crate::transfer::peer::push_target(
                    &command,
                    tls.as_deref(),
                    self.denied.clone(),
                ) {
                    Err(e) => Err(e.into()),
                    Ok(client) => {
                        let token = command.transfer_token.clone();
                        send_volume(client, at, transfer_id, token, precopy, base, cancelled).await
                    }
                }
            }
            _ => match crate::transfer::peer::source_of(&command) {
                Err(e) => Err(e.into()),
                Ok(source) => {
                    let (_expecting, chunks) = self.incoming.expect(
                        transfer_id,
                        &at.tenant,
                        source,
                        command.transfer_token.clone(),
                    );
                    let reporter = self.clone();
                    let report = move |data_bytes, received_bytes| {
                        reporter.push_volume_progress(proto::VolumeProgress {
                            transfer_id,
                            data_bytes,
                            received_bytes,
                        })
                    };
                    receive_volume(chunks, at, transfer_id, precopy, base, report, cancelled).await
                }
            },
        };
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&transfer_id);
        match outcome {
            Ok(copied) => {
                tracing::info!(tenant = %result.tenant_id, ?action, precopy, base = command.base_transfer_id, bytes = copied.data_bytes, ms = began.elapsed().as_millis() as u64, "volume transferred");
                result.ok = true;
                result.data_bytes = copied.data_bytes;
                result.sha256 = copied.volume_sha256;
                let mut bases = self.bases.lock().unwrap_or_else(|p| p.into_inner());
                match precopy {
                    true => bases.insert(result.tenant_id.clone(), copied.base),
                    // The volume went (or came) whole: no base is left to build on.
                    false => bases.remove(&result.tenant_id),
                };
            }
            Err(e) => {
                tracing::warn!(tenant = %result.tenant_id, ?action, error = %e, "volume transfer failed");
                result.error = e.to_string();
                if action == proto::VolumeAction::Import {
                    // A failed import leaves no staging area, so no base either.
                    self.bases
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&result.tenant_id);
                }
            }
        }
        self.transferring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&result.tenant_id);
        // A purge may have waited for this transfer.
        self.volume_commands_queued.notify_one();
        self.push_volume_result(result);
    }

    /// The export `command` asks for, of a tenant placed on this host; run by the session as
    /// it uploads.
    pub fn export_job(&self, command: &proto::VolumeCommand) -> Result<ExportJob, ExportError> {
        let tenant = TenantId::new(&command.tenant_id).map_err(ExportError::TenantId)?;
        if !self.current().tenants.iter().any(|s| s.tenant_id == tenant) {
            return Err(ExportError::NotPlaced(tenant));
        }
        self.exporter
            .get()
            .ok_or(ExportError::NotReady)?
            .job(&tenant, command)
    }

    /// Takes the volume keys the coordinator sent: only for tenants of the desired state, only
    /// well-formed ones (the others are named in the error, and the good ones still kept).
    /// Returns how many are held.
    pub fn set_volume_keys(&self, keys: proto::VolumeKeys) -> Result<usize, KeysRefused> {
        let desired = self.current();
        let mut held = HashMap::new();
        let mut refused = Vec::new();
        for (i, k) in keys.keys.into_iter().enumerate() {
            // The message's copy is wiped however this entry ends.
            let bytes = zeroize::Zeroizing::new(k.key);
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
            match VolumeKey::from_bytes(&bytes) {
                Ok(key) => {
                    held.insert(tenant, key);
                }
                Err(e) => refused.push(format!("keys[{i}].key: {e}")),
            }
        }
        let count = held.len();
        *self.volume_keys.lock().unwrap_or_else(|p| p.into_inner()) = held;
        let mut access = HashMap::new();
        for (i, b) in keys.backups.into_iter().enumerate() {
            let key = BackupKey::new(b.key);
            let tenant = match TenantId::new(&b.tenant_id) {
                Ok(t) if desired.tenants.iter().any(|s| s.tenant_id == t) => t,
                Ok(t) => {
                    refused.push(format!("backups[{i}]: {t} is not placed on this host"));
                    continue;
                }
                Err(e) => {
                    refused.push(format!("backups[{i}].tenant_id: {e}"));
                    continue;
                }
            };
            if let Err(e) = berth_shared::backup::Repository::new(&b.repository) {
                refused.push(format!("backups[{i}].repository: {e}"));
            } else if key.len() != 32 {
                refused.push(format!(
                    "backups[{i}].key: a backup key must be 32 bytes, not {}",
                    key.len()
                ));
            } else {
                access.insert(
                    tenant,
                    BackupAccess {
                        repository: b.repository,
                        key,
                    },
                );
            }
        }
        *self.backup_access.lock().unwrap_or_else(|p| p.into_inner()) = access;
        if refused.is_empty() {
            Ok(count)
        } else {
            Err(KeysRefused(refused))
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
        self.heard.send_replace(true);
        Ok(current.tenants.len())
    }

    /// Whether a coordinator sends a desired state within `wait` (or did already).
    pub async fn heard_from_coordinator(&self, wait: Duration) -> bool {
        let mut heard = self.heard.subscribe();
        tokio::time::timeout(wait, heard.wait_for(|h| *h))
            .await
            .is_ok_and(|h| h.is_ok())
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
                status.last_backup = self.last_backup(&t.tenant_id).map(|r| r.to_proto());
                status
            })
            .collect();
        (desired.generation, statuses)
    }
}

/// Runs a backup, a listing or a forgetting of `at`'s tenant's backups with `engine` and
/// fills in `result`; a backup's outcome is recorded in `ledger` too, like a scheduled one's.
fn backup_command(
    engine: &dyn BackupEngine,
    action: proto::VolumeAction,
    at: &VolumeLocation,
    command: &proto::VolumeCommand,
    mut result: proto::VolumeResult,
    ledger: &dyn BackupSource,
) -> proto::VolumeResult {
    let outcome = (|| -> Result<(), BackupError> {
        let access = crate::backup::command_access(command)?;
        let (repository, key) = (access.repository.as_str(), &access.key);
        if action == proto::VolumeAction::ForgetBackups {
            let forgotten = engine.forget_all(repository, key)?;
            tracing::info!(tenant = %at.tenant, forgotten, "backups forgotten");
            result.forgotten = u32::try_from(forgotten).unwrap_or(u32::MAX);
            return Ok(());
        }
        if action == proto::VolumeAction::ListBackups {
            let snapshots = engine.snapshots(repository, key)?;
            result.snapshots = snapshots
                .into_iter()
                .map(|s| proto::BackupSnapshot {
                    id: s.id,
                    short_id: s.short_id,
                    time: s.time,
                })
                .collect();
            return Ok(());
        }
        let contents = at
            .open_contents()
            .map_err(BackupError::Volume)?
            .ok_or(BackupError::NotOpen)?;
        let made = engine
            .ensure_repository(repository, key)
            .and_then(|_| engine.backup(repository, key, &contents));
        let now = berth_shared::clock::Clock::now_unix_ms(&berth_shared::clock::SystemClock);
        let record = ledger
            .last_backup(&at.tenant)
            .unwrap_or_default()
            .after(now, false, &made);
        if let Err(e) = ledger.record_backup(&at.tenant, &record) {
            tracing::warn!(tenant = %at.tenant, error = %e, "backup record not written");
        }
        let summary = made?;
        tracing::info!(tenant = %at.tenant, snapshot = %summary.snapshot_id, bytes_added = summary.bytes_added, duration_ms = summary.duration_ms, "volume backed up");
        result.backup = Some(proto::BackupSummary {
            snapshot_id: summary.snapshot_id,
            files_new: summary.files_new,
            files_changed: summary.files_changed,
            bytes_added: summary.bytes_added,
            bytes_processed: summary.bytes_processed,
            duration_ms: summary.duration_ms,
        });
        Ok(())
    })();
    match outcome {
        Ok(()) => result.ok = true,
        Err(e) => {
            tracing::warn!(tenant = %at.tenant, error = %e, "backup command failed");
            result.error = e.to_string();
        }
    }
    result
}

/// The tenants' volumes as this host mounts them under its volume root.
#[derive(Debug)]
struct MountedVolumes(PathBuf);

impl OpenVolumes for MountedVolumes {
    fn contents(&self, tenant: &TenantId) -> std::io::Result<Option<PathBuf>> {
        VolumeLocation {
            root: self.0.clone(),
            tenant: tenant.clone(),
        }
        .open_contents()
    }
}

/// A tenant's record from the agent's store; one that cannot be read is logged and taken as
/// none (a restore is then done again, a backup is due).
fn readable<T>(
    tenant: &TenantId,
    what: &str,
    read: Result<Option<T>, berth_shared::store::StoreError>,
) -> Option<T> {
    read.unwrap_or_else(|e| {
        tracing::warn!(%tenant, error = %e, "{what} unreadable");
        None
    })
}

impl BackupSource for Enforcement {
    fn backup_access(&self, tenant: &TenantId) -> Option<BackupAccess> {
        self.backup_access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
    }

    fn restored(&self, tenant: &TenantId) -> Option<Restored> {
        readable(tenant, "restore mark", self.store().restored(tenant))
    }

    fn record_restored(
        &self,
        tenant: &TenantId,
        restored: &Restored,
    ) -> Result<(), berth_shared::store::StoreError> {
        self.store().record_restored(tenant, restored)
    }

    fn last_backup(&self, tenant: &TenantId) -> Option<BackupRecord> {
        readable(tenant, "backup record", self.store().last_backup(tenant))
    }

    fn record_backup(
        &self,
        tenant: &TenantId,
        record: &BackupRecord,
    ) -> Result<(), berth_shared::store::StoreError> {
        self.store().record_backup(tenant, record)
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
        mounter: Arc::new(SystemMounter::for_engine(&config.docker_socket)),
        keys: enforcement.clone(),
        dm_crypt: probe_dm_crypt(&roots),
    });
    let backups: Arc<dyn BackupEngine> = Arc::new(Restic {
        s3_credentials_file: config.backup_s3_credentials_file.clone(),
        ..Restic::new(
            &config.state_dir.join("backup-cache"),
            config.backup_sftp_command.clone(),
        )
    });
    let restores = Restorer {
        engine: backups.clone(),
        source: enforcement.clone(),
        locks: enforcement.repository_locks.clone(),
    };
    let mounted: Arc<dyn OpenVolumes> = Arc::new(MountedVolumes(config.volume_root.clone()));
    let _ = enforcement.exporter.set(Exporter {
        engine: backups.clone(),
        volumes: mounted.clone(),
        locks: enforcement.repository_locks.clone(),
    });
    let scheduled = Backups::new(
        backups.clone(),
        enforcement.clone(),
        mounted,
        Arc::new(berth_shared::clock::SystemClock),
        enforcement.repository_locks.clone(),
    );
    tokio::spawn(enforcement.clone().serve_volume_commands(
        volumes.clone(),
        backups,
        config.volume_root.clone(),
    ));
    let cgroups = probe_cgroup(&roots).map(|v| CgroupReader::new(&config.cgroup_root, v));
    let oom_events: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let (name_servers, settings) = config.egress.resolved(&resolv_conf);
    let resolver = NameServers::new(&name_servers, Duration::from_secs(2));
    let egress = Arc::new(NftEgress::new(
        Arc::new(NftCommand::default()),
        Arc::new(crate::egress::guard::DockerUserGuard),
        Arc::new(resolver),
        Arc::new(berth_shared::clock::SystemClock),
        settings,
    ));
    // A host back from an outage must not start what the coordinator moved away meanwhile
    // (fencing; its tenants may run elsewhere now): the first pass waits for the coordinator's
    // current desired state, and enforces the one on disk only if none comes. Containers that
    // run are left running either way.
    if !enforcement.heard_from_coordinator(STARTUP_WAIT).await {
        tracing::warn!(waited = ?STARTUP_WAIT, "no desired state from the coordinator: enforcing the last one applied");
    }
    let mut reconciler: Option<Arc<Reconciler>> = None;
    // A tenant passed its health check, or a container's creation ended: a pass reports it.
    let wake = Arc::new(tokio::sync::Notify::new());
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
                    let probe = Arc::new(NetnsProbe {
                        timeout: Duration::from_secs(1),
                    });
                    let driver = Driver {
                        restarts: enforcement.restarts.clone(),
                        runtime: runtime.clone(),
                        probe: probe.clone(),
                        clock: Arc::new(berth_shared::clock::SystemClock),
                        host: host.clone(),
                        backups: Some(scheduled.clone()),
                    };
                    let source = enforcement.clone();
                    tokio::spawn(driver.run(move || (source.current(), source.reconciled())));
                    reconciler = Some(Arc::new(Reconciler {
                        host: host.clone(),
                        restarting: enforcement.restarts.busy(),
                        passes: enforcement.passes.clone(),
                        runtime: runtime.clone(),
                        volumes: volumes.clone(),
                        restores: restores.clone(),
                        egress: egress.clone(),
                        cgroups: cgroups.clone(),
                        oom_events: oom_events.clone(),
                        port_free: port_free_on_loopback,
                        subnets: config.tenant_subnets,
                        health: HealthWatch::new(
                            runtime.clone(),
                            probe,
                            HealthGate::new(config.restarts.health_timeout),
                            wake.clone(),
                        ),
                        creations: Mutex::default(),
                        removals: Mutex::default(),
                        wake: wake.clone(),
                    }));
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
            enforcement.set_statuses(r.reconcile_current(|| enforcement.current()).await);
        }
        trim_heap();
        tokio::select! {
            _ = changed.changed() => {}
            () = wake.notified() => {}
            () = tokio::time::sleep(RECONCILE_INTERVAL) => {}
        }
    }
}

/// Gives the heap's free pages back to the kernel. glibc keeps freed memory in its arenas, so
/// the transient allocations of a pass (Docker's JSON, nft's listing, the tenants' statuses)
/// would stay resident at their peak; after each pass they go (a few hundred microseconds).
fn trim_heap() {
    // SAFETY: malloc_trim takes an integer, touches only glibc's own heap state and is
    // thread-safe (each arena under its own lock).
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use berth_shared::store::MemStore;

    use super::*;

    /// The volume results waiting (progress reports aside).
    fn take_results(e: &Enforcement) -> Vec<proto::VolumeResult> {
        e.take_volume_messages()
            .into_iter()
            .filter_map(|body| match body {
                proto::agent_message::Body::VolumeResult(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// A transfer command's other end as the coordinator fills it in (transfer 9).
    fn to_peer() -> proto::VolumeCommand {
        proto::VolumeCommand {
            transfer_id: 9,
            peer_host_id: "other-host".into(),
            peer_address: "127.0.0.1:9".into(),
            transfer_token: vec![1; 32],
            ..Default::default()
        }
    }

    /// The first volume results to come (a transfer answers from a task of its own).
    async fn first_results(e: &Enforcement) -> Vec<proto::VolumeResult> {
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                let results = take_results(e);
                if !results.is_empty() {
                    return results;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("a volume command answered")
    }

    /// An enforcement whose desired state (generation 1) places only `acme`.
    fn placing_acme() -> Enforcement {
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
                        cpu_limit_millicores: 0,
                        volume_bytes: 1 << 30,
                    }),
                    ..Default::default()
                }],
                staged: vec![],
            })
            .unwrap();
        Enforcement::new(store, RestartSettings::default())
    }

    #[tokio::test(start_paused = true)]
    async fn a_starting_agent_hears_whether_the_coordinator_sent_a_desired_state() {
        let e = Arc::new(placing_acme());
        // The state on disk is not the coordinator's word.
        assert!(!e.heard_from_coordinator(STARTUP_WAIT).await);
        let waiting = tokio::spawn({
            let e = e.clone();
            async move { e.heard_from_coordinator(STARTUP_WAIT).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        e.accept(proto::DesiredState {
            generation: 2,
            tenants: vec![],
            staged: vec![],
        })
        .unwrap();
        assert!(waiting.await.unwrap());
        assert!(e.heard_from_coordinator(Duration::ZERO).await);
    }

    fn no_backups() -> Arc<dyn BackupEngine> {
        Arc::new(crate::testing::backup::FakeEngine::default())
    }

    /// Runs the queued volume commands as a pass that tore down all the desired state of
    /// `generation` no longer wants lets them.
    async fn run_torn_down(e: &Arc<Enforcement>, volumes: &RecordingVolumes, generation: u64) {
        e.passes.finish_teardown(generation);
        e.run_volume_commands(
            volumes,
            &no_backups(),
            Path::new("/nonexistent"),
            TornDown::complete(generation),
        )
        .await;
    }

    /// Records the purges it is asked for.
    #[derive(Debug, Default)]
    struct RecordingVolumes(Mutex<Vec<String>>);

    #[tonic::async_trait]
    impl VolumeStep for RecordingVolumes {
        async fn prepare(
            &self,
            _: &berth_shared::spec::TenantSpec,
        ) -> Result<std::path::PathBuf, crate::volume::PrepareError> {
            unreachable!("volume commands never prepare")
        }
        async fn release(&self, _: &str) -> Result<(), crate::volume::VolumeError> {
            unreachable!("volume commands never release")
        }
        async fn purge(
            &self,
            tenant: &TenantId,
        ) -> Result<crate::volume::Purged, crate::volume::VolumeError> {
            self.0.lock().unwrap().push(tenant.to_string());
            Ok(crate::volume::Purged {
                erased: true,
                deleted: true,
            })
        }
    }

    #[tokio::test]
    async fn a_purge_runs_only_for_a_tenant_no_longer_placed_here_and_every_command_is_answered() {
        let e = placing_acme();
        let volumes = RecordingVolumes::default();
        let command = |tenant: &str, request_id: u64, action: i32| proto::VolumeCommand {
            tenant_id: tenant.into(),
            request_id,
            action,
            ..to_peer()
        };
        let purge = proto::VolumeAction::Purge as i32;
        e.request_volume(command("acme", 1, purge));
        e.request_volume(command("gone", 2, purge));
        e.request_volume(command("../etc", 3, purge));
        e.request_volume(command("gone", 4, 99));
        // A transfer needs the session: without one it fails, and says so.
        e.request_volume(command("gone", 5, proto::VolumeAction::Export as i32));
        e.request_volume(command("acme", 6, proto::VolumeAction::Import as i32));
        let e = Arc::new(e);
        // Nothing but the import is due before a pass tore down what it no longer wants.
        e.run_volume_commands(
            &volumes,
            &no_backups(),
            Path::new("/nonexistent"),
            TornDown::complete(0),
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(e.volume_results.lock().unwrap().len(), 1, "only the import");
        assert!(volumes.0.lock().unwrap().is_empty());
        let generation = e.current().generation;
        // Containers stopped and volumes released, not yet removed: all but the purges.
        let released = TornDown {
            released: generation,
            removed: 0,
        };
        e.run_volume_commands(&volumes, &no_backups(), Path::new("/nonexistent"), released)
            .await;
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while e.volume_results.lock().unwrap().len() < 3 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the import, the export and the unknown action answered");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(e.volume_results.lock().unwrap().len(), 3, "no purge yet");
        assert!(volumes.0.lock().unwrap().is_empty());
        run_torn_down(&e, &volumes, generation).await;
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while e.volume_results.lock().unwrap().len() < 6 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("every command answered");
        assert_eq!(
            *volumes.0.lock().unwrap(),
            ["gone"],
            "only the removed tenant"
        );
        let results = take_results(&e);
        let answers: Vec<(u64, bool, &str)> = results
            .iter()
            .map(|r| (r.request_id, r.ok, r.error.as_str()))
            .collect();
        assert_eq!(
            answers,
            [
                (
                    6,
                    false,
                    "acme is still placed on this host (generation 1): remove it first"
                ),
                (4, false, "action: unknown volume action 99"),
                (5, false, "not connected to the coordinator"),
                (
                    1,
                    false,
                    "acme is still placed on this host (generation 1): remove it first"
                ),
                (2, true, ""),
                (
                    3,
                    false,
                    "tenant_id: invalid tenant id \"../etc\": must start with a lowercase letter a-z"
                ),
            ]
        );
        assert!(results[4].erased && results[4].deleted);
        assert!(take_results(&e).is_empty(), "each result once");
    }

    #[tokio::test]
    async fn a_precopy_export_of_a_running_tenant_goes_at_once_and_a_plain_export_waits() {
        let e = Arc::new(placing_acme());
        let volumes = RecordingVolumes::default();
        let export = |request_id, precopy| proto::VolumeCommand {
            tenant_id: "acme".into(),
            request_id,
            action: proto::VolumeAction::Export as i32,
            precopy,
            ..to_peer()
        };
        e.request_volume(export(1, true));
        e.request_volume(export(2, false));
        e.run_volume_commands(
            &volumes,
            &no_backups(),
            Path::new("/nonexistent"),
            TornDown::complete(0),
        )
        .await;
        let first = first_results(&e).await;
        // It got as far as the transfer (refused only for want of a session).
        let answers: Vec<(u64, &str)> = first
            .iter()
            .map(|r| (r.request_id, r.error.as_str()))
            .collect();
        assert_eq!(answers, [(1, "not connected to the coordinator")]);
        // The plain export waits for the teardown, and acme is still placed here.
        let generation = e.current().generation;
        run_torn_down(&e, &volumes, generation).await;
        let second = take_results(&e);
        assert_eq!(second.len(), 1);
        assert_eq!(
            second[0].error,
            "acme is still placed on this host (generation 1): remove it first"
        );
    }

    #[tokio::test]
    async fn an_export_is_due_once_a_pass_that_read_the_state_dropping_its_tenant_tore_down() {
        let e = Arc::new(placing_acme());
        let volumes = RecordingVolumes::default();
        // A pass starts; the state that drops acme arrives before it reads the desired state,
        // and the coordinator's export after that.
        e.passes.start();
        e.accept(proto::DesiredState {
            generation: 2,
            tenants: vec![],
            staged: vec![],
        })
        .unwrap();
        e.request_volume(proto::VolumeCommand {
            tenant_id: "acme".into(),
            request_id: 1,
            action: proto::VolumeAction::Export as i32,
            ..to_peer()
        });
        let read = e.current();
        e.run_volume_commands(
            &volumes,
            &no_backups(),
            Path::new("/nonexistent"),
            TornDown::complete(1),
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            take_results(&e).is_empty(),
            "not while acme's container may still run"
        );
        // That very pass finished its teardown: no later pass is waited for.
        run_torn_down(&e, &volumes, read.generation).await;
        let results = first_results(&e).await;
        assert_eq!(results[0].error, "not connected to the coordinator");
    }

    #[tokio::test]
    async fn a_purge_waits_for_the_end_of_a_transfer_of_the_same_tenant() {
        let e = Arc::new(placing_acme());
        let volumes = RecordingVolumes::default();
        e.transferring.lock().unwrap().insert("gone".into());
        e.request_volume(proto::VolumeCommand {
            tenant_id: "gone".into(),
            request_id: 1,
            action: proto::VolumeAction::Purge as i32,
            ..Default::default()
        });
        let generation = e.current().generation;
        run_torn_down(&e, &volumes, generation).await;
        assert!(
            volumes.0.lock().unwrap().is_empty(),
            "not while its import may still land"
        );
        e.transferring.lock().unwrap().clear();
        e.run_volume_commands(
            &volumes,
            &no_backups(),
            Path::new("/nonexistent"),
            TornDown::complete(generation),
        )
        .await;
        assert_eq!(*volumes.0.lock().unwrap(), ["gone"]);
    }

    #[test]
    fn volume_keys_are_held_only_for_this_hosts_tenants_and_bad_ones_are_named() {
        let e = placing_acme();
        let key = |tenant: &str, len: usize| proto::VolumeKey {
            tenant_id: tenant.into(),
            key: vec![9; len],
        };
        let access = |tenant: &str, repository: &str, len: usize| proto::BackupAccess {
            tenant_id: tenant.into(),
            repository: repository.into(),
            key: vec![7; len],
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
                backups: vec![
                    access("acme", "/srv/backups/acme", 32),
                    access("other", "/srv/backups/other", 32),
                    access("acme", "relative/acme", 32),
                    access("acme", "/srv/backups/acme", 8),
                ],
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "keys[1]: other is not placed on this host; keys[2].tenant_id: invalid tenant id \"Bad/Id\": must start with a lowercase letter a-z; keys[3].key: a volume key must be 32 bytes, not 16; backups[1]: other is not placed on this host; backups[2].repository: invalid backup repository \"relative/acme\": an absolute path, or sftp:, s3:, rest: followed by its address; backups[3].key: a backup key must be 32 bytes, not 8"
        );
        let acme = TenantId::new("acme").unwrap();
        assert_eq!(
            e.backup_access(&acme).map(|a| a.repository).as_deref(),
            Some("/srv/backups/acme"),
            "the good access is kept"
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
                keys: vec![],
                backups: vec![],
            }),
            Ok(0)
        );
        assert!(!e.has_volume_key(&acme));
        assert!(e.backup_access(&acme).is_none());
    }
}
