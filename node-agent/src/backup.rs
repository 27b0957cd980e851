//! Tenant backups through restic: one repository per tenant, its password the tenant's
//! backup key, snapshots of the tenant's mounted volume.
//!
//! Ensures: the key reaches restic only on its stdin (never argv, environment or disk), and
//! restic runs with an environment of its own, so no `RESTIC_*` variable of the agent's can
//! stand in for it; a repository is made only where none exists, never over one; every run is
//! bounded in time and a failure carries restic's own words; a snapshot holds the volume's
//! contents at its root (restic runs inside the volume on `.`), so a restore puts them back
//! at the volume's root; a restore goes first into a directory beside them on the same
//! volume, and the current contents are replaced only once restic finished: a failed or
//! interrupted restore leaves the volume as it was.

pub mod export;
pub mod restic;
pub mod restore;
pub mod schedule;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use berth_shared::ids::TenantId;
use berth_shared::store::StoreError;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::command::CommandError;

/// The restore's directory inside the volume while restic writes it.
pub const RESTORE_STAGING: &str = ".berth-restore";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// restic failed.
    #[error("restic {action} in {repository}: {source}")]
    Restic {
        action: &'static str,
        repository: String,
        source: CommandError,
    },
    /// restic answered with something that is not the JSON it documents.
    #[error("restic {action} in {repository} answered what is not its JSON: {message}")]
    Output {
        action: &'static str,
        repository: String,
        message: String,
    },
    /// A repository location berth does not take.
    #[error(transparent)]
    BadRepository(#[from] berth_shared::backup::BadRepository),
    /// A snapshot id that is not restic's hex.
    #[error(transparent)]
    BadSnapshot(#[from] berth_shared::backup::BadSnapshotId),
    /// The coordinator has not delivered the tenant's backup access to this host.
    #[error(
        "no backup access for it on this host (the coordinator delivers it with the volume keys)"
    )]
    NoAccess,
    /// Its volume is not mounted here.
    #[error("the volume is not open on this host (its tenant does not run here)")]
    NotOpen,
    /// The coordinator's command names a repository berth does not take.
    #[error("backup_repository: {0}")]
    CommandRepository(berth_shared::backup::BadRepository),
    /// The coordinator's command carries a key that is not 32 bytes.
    #[error("backup_key: {0} bytes, expected 32")]
    CommandKey(usize),
    /// Whether the volume is open could not be found out.
    #[error("volume: {0}")]
    Volume(std::io::Error),
    /// A file operation on the volume failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path, source: std::io::Error) -> BackupError {
    BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A tenant's backup key: the password of its repository.
#[derive(Clone)]
pub struct BackupKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupKey(..)")
    }
}

impl BackupKey {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What restic reads on its stdin: the key in hex, one line.
    fn password_line(&self) -> Zeroizing<Vec<u8>> {
        let mut line = Zeroizing::new(hex::encode(self.0.as_slice()).into_bytes());
        line.push(b'\n');
        line
    }
}

/// How many snapshots a repository keeps (restic's `forget` policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub keep_daily: u32,
    pub keep_weekly: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep_daily: 7,
            keep_weekly: 4,
        }
    }
}

/// What one backup did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackupSummary {
    pub snapshot_id: String,
    pub files_new: u64,
    pub files_changed: u64,
    /// Bytes the repository grew by (after deduplication, before compression).
    pub bytes_added: u64,
    /// Bytes of files read.
    pub bytes_processed: u64,
    pub duration_ms: u64,
}

/// One snapshot of a tenant's repository.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub short_id: String,
    /// RFC 3339, as restic gives it.
    pub time: String,
}

/// Where a tenant is backed up, as its host holds it (in memory only).
#[derive(Debug, Clone)]
pub struct BackupAccess {
    pub repository: String,
    pub key: BackupKey,
}

/// A restore this host did: the request's id and the snapshot it restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    pub id: u64,
    pub snapshot: Snapshot,
}

/// What backups and restores need from the agent: the tenant's backup access (in memory), and
/// the records of what was done (in the agent's store).
pub trait BackupSource: Send + Sync + std::fmt::Debug {
    fn backup_access(&self, tenant: &TenantId) -> Option<BackupAccess>;
    /// The last restore done of `tenant`'s volume on this host.
    fn restored(&self, tenant: &TenantId) -> Option<Restored>;
    /// Marks a restore done, durably.
    fn record_restored(&self, tenant: &TenantId, restored: &Restored) -> Result<(), StoreError>;
    /// The last backup of `tenant`'s volume made on this host.
    fn last_backup(&self, tenant: &TenantId) -> Option<BackupRecord>;
    fn record_backup(&self, tenant: &TenantId, record: &BackupRecord) -> Result<(), StoreError>;
}

/// How the last backup of a tenant went on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    /// When the last attempt ended.
    pub unix_ms: i64,
    pub ok: bool,
    pub snapshot_id: String,
    pub error: String,
    pub bytes_added: u64,
    pub bytes_processed: u64,
    pub duration_ms: u64,
    /// Made while the container was stopped.
    pub stopped: bool,
    /// When the last good one ended; 0: never.
    pub last_good_unix_ms: i64,
    /// When old snapshots were last forgotten and pruned; 0: never.
    #[serde(default)]
    pub last_prune_unix_ms: i64,
}

impl BackupRecord {
    pub fn to_proto(&self) -> berth_shared::proto::BackupReport {
        berth_shared::proto::BackupReport {
            unix_ms: self.unix_ms,
            ok: self.ok,
            snapshot_id: self.snapshot_id.clone(),
            error: self.error.clone(),
            bytes_added: self.bytes_added,
            bytes_processed: self.bytes_processed,
            duration_ms: self.duration_ms,
            last_good_unix_ms: self.last_good_unix_ms,
            stopped: self.stopped,
        }
    }

    /// The record after an attempt that ended at `now` with `outcome`.
    pub fn after(
        &self,
        now: i64,
        stopped: bool,
        outcome: &Result<BackupSummary, BackupError>,
    ) -> Self {
        match outcome {
            Ok(s) => Self {
                unix_ms: now,
                ok: true,
                snapshot_id: s.snapshot_id.clone(),
                error: String::new(),
                bytes_added: s.bytes_added,
                bytes_processed: s.bytes_processed,
                duration_ms: s.duration_ms,
                stopped,
                last_good_unix_ms: now,
                last_prune_unix_ms: self.last_prune_unix_ms,
            },
            Err(e) => Self {
                unix_ms: now,
                ok: false,
                snapshot_id: String::new(),
                error: e.to_string(),
                stopped,
                ..self.clone()
            },
        }
    }
}

/// The repository and key a coordinator's command names (a backup, a listing, a purge's
/// forgetting, a snapshot's export), checked.
pub fn command_access(
    command: &berth_shared::proto::VolumeCommand,
) -> Result<BackupAccess, BackupError> {
    berth_shared::backup::Repository::new(&command.backup_repository)
        .map_err(BackupError::CommandRepository)?;
    if command.backup_key.len() != 32 {
        return Err(BackupError::CommandKey(command.backup_key.len()));
    }
    Ok(BackupAccess {
        repository: command.backup_repository.clone(),
        key: BackupKey::new(command.backup_key.clone()),
    })
}

/// One restic at a time per tenant's repository on this host: two at once could race in
/// making the repository (each its own config and key, leaving snapshots the other cannot
/// read), or meet each other's exclusive lock.
#[derive(Debug, Default, Clone)]
pub struct RepositoryLocks(Arc<Mutex<HashMap<TenantId, Arc<Mutex<()>>>>>);

impl RepositoryLocks {
    /// The lock of `tenant`'s repository: `lock()` it for as long as restic runs.
    pub fn of(&self, tenant: &TenantId) -> Arc<Mutex<()>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.clone())
            .or_default()
            .clone()
    }

    /// Whether a restic runs on `tenant`'s repository now (an export's dump, a listing).
    pub fn busy(&self, tenant: &TenantId) -> bool {
        matches!(
            self.of(tenant).try_lock(),
            Err(std::sync::TryLockError::WouldBlock)
        )
    }
}

/// The backup engine, at the host boundary: restic in production, a recording fake in tests.
pub trait BackupEngine: Send + Sync + std::fmt::Debug {
    /// Makes the repository unless one is there; true when it made it.
    fn ensure_repository(&self, repository: &str, key: &BackupKey) -> Result<bool, BackupError>;
    /// A snapshot of the contents of the directory `volume`.
    fn backup(
        &self,
        repository: &str,
        key: &BackupKey,
        volume: &Path,
    ) -> Result<BackupSummary, BackupError>;
    /// Every snapshot, oldest first.
    fn snapshots(&self, repository: &str, key: &BackupKey) -> Result<Vec<Snapshot>, BackupError>;
    /// Writes snapshot `id`'s contents into the empty directory `into`.
    fn restore(
        &self,
        repository: &str,
        key: &BackupKey,
        id: &str,
        into: &Path,
    ) -> Result<(), BackupError>;
    /// Forgets the snapshots `retention` does not keep and prunes their data.
    fn forget(
        &self,
        repository: &str,
        key: &BackupKey,
        retention: Retention,
    ) -> Result<(), BackupError>;
    /// Forgets every snapshot and prunes all their data; returns how many there were.
    fn forget_all(&self, repository: &str, key: &BackupKey) -> Result<usize, BackupError>;
    /// Writes snapshot `id`'s files to `out` as a tar; returns the bytes written.
    fn dump(
        &self,
        repository: &str,
        key: &BackupKey,
        id: &str,
        out: &mut dyn std::io::Write,
    ) -> Result<u64, BackupError>;
}

/// Replaces the contents of the mounted volume `volume` with snapshot `id`: restored beside
/// them first ([`RESTORE_STAGING`]), then swapped in. The tenant must be stopped. A leftover
/// staging directory from an interrupted restore is removed first.
pub fn restore_volume(
    engine: &dyn BackupEngine,
    repository: &str,
    key: &BackupKey,
    id: &str,
    volume: &Path,
) -> Result<(), BackupError> {
    let id = berth_shared::backup::snapshot_id(id)?;
    let staging = volume.join(RESTORE_STAGING);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| io(&staging, e))?;
    }
    std::fs::create_dir(&staging).map_err(|e| io(&staging, e))?;
    if let Err(e) = engine.restore(repository, key, id, &staging) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    // The old contents go (ext4's lost+found stays), then the restored ones move up.
    for entry in std::fs::read_dir(volume).map_err(|e| io(volume, e))? {
        let entry = entry.map_err(|e| io(volume, e))?;
        let name = entry.file_name();
        if name == RESTORE_STAGING || name == "lost+found" {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type().map_err(|e| io(&path, e))?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| io(&path, e))?;
    }
    for entry in std::fs::read_dir(&staging).map_err(|e| io(&staging, e))? {
        let entry = entry.map_err(|e| io(&staging, e))?;
        if entry.file_name() == "lost+found" {
            continue;
        }
        let to = volume.join(entry.file_name());
        std::fs::rename(entry.path(), &to).map_err(|e| io(&to, e))?;
    }
    std::fs::remove_dir_all(&staging).map_err(|e| io(&staging, e))?;
    Ok(())
}

#[cfg(test)]
mod tests;
