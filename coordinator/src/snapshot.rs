//! Disaster recovery for the embedded store: the coordinator's whole state in one file, and a
//! state directory made from one.
//!
//! Ensures: a snapshot holds the store as it was at one instant (no batch half in it), the
//! wrapped volume and backup keys the keyrings held just after, and the fleet CA with its key
//! sealed under the master key; it never holds the master key nor any key unwrapped, so the
//! file alone opens nothing. A restore writes only into a state directory that holds no state,
//! and only once it has checked that the master key it is given opens the snapshot's CA key and
//! every wrapped key in it; a restore that fails leaves the directory as it found it.
//!
//! The keyrings are read just after the store: a tenant purged in between is in the snapshot
//! without its key, as after a crash in the middle of its purge; a tenant placed in between
//! has a key and no placement, which nothing uses.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use berth_shared::ids::TenantId;
use berth_shared::pki::{CertificateAuthority, PkiError};
use berth_shared::store::{SledStore, Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::config::{CoordinatorConfig, StoreKind};
use crate::etcd::EtcdStore;
use crate::keys::keyring::{BACKUP_KEYS_PREFIX, Keyring, VOLUME_KEYS_PREFIX};
use crate::keys::{KeyError, MasterKey};

/// What the file says it is.
pub const FORMAT: &str = "berth-coordinator-snapshot";
/// The layout this build writes and reads.
pub const VERSION: u32 = 1;
/// The largest snapshot read (a fleet of 10,000 tenants makes about 20 MB).
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;
/// The associated data the CA key is sealed with.
const CA_KEY_CONTEXT: &[u8] = b"berth CA key";

/// The coordinator's state at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub format: String,
    pub version: u32,
    pub created_unix_ms: i64,
    /// The version of the coordinator that made it.
    pub made_by: String,
    pub ca_cert_pem: String,
    /// The CA's private key (PEM), sealed under the master key (base64).
    pub ca_key_sealed: String,
    /// Tenant → wrapped volume key (base64).
    pub volume_keys: BTreeMap<String, String>,
    /// Tenant → wrapped backup key (base64).
    pub backup_keys: BTreeMap<String, String>,
    /// Every record of the store, in key order.
    pub records: Vec<Record>,
}

/// One record of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub key: String,
    /// The value, base64.
    pub value: String,
}

/// What a snapshot holds, counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub created_unix_ms: i64,
    pub records: usize,
    pub hosts: usize,
    pub tenants: usize,
    pub volume_keys: usize,
    pub backup_keys: usize,
    pub ca_fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a snapshot this coordinator reads.
    #[error("{path}: not a coordinator snapshot: {message}")]
    Unreadable { path: PathBuf, message: String },
    #[error("{path}: larger than {MAX_SNAPSHOT_BYTES} bytes: not a coordinator snapshot")]
    TooLarge { path: PathBuf },
    /// A field of the snapshot is damaged.
    #[error("the snapshot's {field} is damaged: {message}")]
    Damaged { field: String, message: String },
    /// The master key given is not the one the snapshot's keys are sealed under.
    #[error(
        "the master key does not open this snapshot's {what}: it is not the master key of the coordinator that made it"
    )]
    WrongMasterKey { what: String },
    /// The state directory holds state already.
    #[error(
        "{0} exists: a restore only writes into a state directory without state (move it away first)"
    )]
    StateExists(PathBuf),
    #[error(
        "no master key at {0}: put the master key the snapshot was made under there (mode 0600), or pass it as the systemd credential master-key"
    )]
    NoMasterKey(PathBuf),
    #[error("a coordinator is running on {0}: stop it before restoring")]
    CoordinatorRunning(PathBuf),
    #[error("{path} exists: a snapshot never replaces a file")]
    OutputExists { path: PathBuf },
}

fn b64() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::STANDARD
}

fn damaged(field: impl Into<String>, message: impl ToString) -> SnapshotError {
    SnapshotError::Damaged {
        field: field.into(),
        message: message.to_string(),
    }
}

/// Takes a snapshot: the store first (at one instant), then the keyrings (`keyrings` returns
/// the volume and backup keys, wrapped); the CA key sealed under the master key.
pub fn take(
    store: &dyn Store,
    keyrings: impl FnOnce() -> (Vec<(String, Vec<u8>)>, Vec<(String, Vec<u8>)>),
    ca: &CertificateAuthority,
    master: &MasterKey,
    now_unix_ms: i64,
) -> Result<Snapshot, SnapshotError> {
    // Keys kept in the store (etcd) are in the snapshot once: with the keyrings.
    let records = store
        .snapshot()?
        .into_iter()
        .filter(|(key, _)| !is_key_record(key))
        .map(|(key, value)| Record {
            key,
            value: b64().encode(value),
        })
        .collect();
    let (volume, backup) = keyrings();
    let encode = |keys: Vec<(String, Vec<u8>)>| {
        keys.into_iter()
            .map(|(tenant, blob)| (tenant, b64().encode(blob)))
            .collect()
    };
    Ok(Snapshot {
        format: FORMAT.into(),
        version: VERSION,
        created_unix_ms: now_unix_ms,
        made_by: env!("CARGO_PKG_VERSION").into(),
        ca_cert_pem: ca.cert_pem().to_string(),
        ca_key_sealed: b64().encode(master.seal(CA_KEY_CONTEXT, ca.key_pem().as_bytes())?),
        volume_keys: encode(volume),
        backup_keys: encode(backup),
        records,
    })
}

fn is_key_record(key: &str) -> bool {
    key.starts_with(VOLUME_KEYS_PREFIX) || key.starts_with(BACKUP_KEYS_PREFIX)
}

/// Takes a snapshot of a coordinator that is not running: its `store`, opened by the caller,
/// and its other files.
pub fn take_offline(
    config: &CoordinatorConfig,
    store: Arc<dyn Store>,
    now_unix_ms: i64,
) -> Result<Snapshot, SnapshotError> {
    let ca = CertificateAuthority::load(&config.ca_dir())?;
    let master = MasterKey::load(&crate::keys::master_key_path(&config.master_key_file()))?;
    let (volume, backup) = match config.store {
        StoreKind::Sled => (
            Keyring::open(&config.keyring_file())?,
            Keyring::open(&config.backup_keyring_file())?,
        ),
        StoreKind::Etcd => (
            Keyring::in_store(store.clone(), VOLUME_KEYS_PREFIX)?,
            Keyring::in_store(store.clone(), BACKUP_KEYS_PREFIX)?,
        ),
    };
    let store = store.as_ref();
    take(
        store,
        || (volume.entries(), backup.entries()),
        &ca,
        &master,
        now_unix_ms,
    )
}

impl Snapshot {
    /// Counts what it holds.
    pub fn summary(&self) -> Summary {
        let count = |prefix: &str| {
            self.records
                .iter()
                .filter(|r| r.key.starts_with(prefix))
                .count()
        };
        Summary {
            created_unix_ms: self.created_unix_ms,
            records: self.records.len(),
            hosts: count("host/"),
            tenants: count("tenant/"),
            volume_keys: self.volume_keys.len(),
            backup_keys: self.backup_keys.len(),
            ca_fingerprint: berth_shared::pki::cert_der_from_pem(&self.ca_cert_pem)
                .map(|der| berth_shared::pki::Fingerprint::of(&der).to_string())
                .unwrap_or_default(),
        }
    }

    /// Reads a snapshot file (at most [`MAX_SNAPSHOT_BYTES`]).
    pub fn read(path: &Path) -> Result<Self, SnapshotError> {
        let io = |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_SNAPSHOT_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_SNAPSHOT_BYTES {
            return Err(SnapshotError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let unreadable = |message: String| SnapshotError::Unreadable {
            path: path.to_path_buf(),
            message,
        };
        let snapshot: Self =
            serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))?;
        if snapshot.format != FORMAT {
            return Err(unreadable(format!("format {:?}", snapshot.format)));
        }
        if snapshot.version != VERSION {
            return Err(unreadable(format!(
                "version {} (this coordinator reads version {VERSION})",
                snapshot.version
            )));
        }
        Ok(snapshot)
    }

    /// Writes the snapshot to `path` (mode 0600): through `path.partial`, renamed once synced,
    /// so `path` is whole or absent. Refuses a path that exists.
    pub fn write(&self, path: &Path) -> Result<(), SnapshotError> {
        if path.exists() {
            return Err(SnapshotError::OutputExists {
                path: path.to_path_buf(),
            });
        }
        let bytes = serde_json::to_vec(self).map_err(|e| damaged("records", e))?;
        berth_shared::pki::write_file_atomic(path, &bytes, 0o600)?;
        Ok(())
    }
}

/// The name a snapshot taken at `unix_ms` gets in a snapshot directory; names sort by time.
pub fn file_name(unix_ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.max(0) as u64);
    let stamp = humantime::format_rfc3339_millis(at)
        .to_string()
        .replace([':', '-', '.'], "");
    format!("{FILE_PREFIX}{stamp}{FILE_SUFFIX}")
}

const FILE_PREFIX: &str = "berth-coordinator-";
const FILE_SUFFIX: &str = ".snapshot";

impl Snapshot {
    /// Writes the snapshot into `dir` under [`file_name`] (a new file, mode 0600), then
    /// deletes the oldest snapshots there beyond the newest `keep` (at least this one is
    /// kept). Returns the new file and the ones deleted. Other files in `dir` are left alone.
    pub fn write_into(
        &self,
        dir: &Path,
        keep: usize,
    ) -> Result<(PathBuf, Vec<PathBuf>), SnapshotError> {
        let io = |source| SnapshotError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let path = dir.join(file_name(self.created_unix_ms));
        self.write(&path)?;
        let mut snapshots: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                (name.starts_with(FILE_PREFIX) && name.ends_with(FILE_SUFFIX))
                    .then(|| dir.join(name))
            })
            .collect();
        snapshots.sort();
        let excess = snapshots.len().saturating_sub(keep.max(1));
        let deleted: Vec<PathBuf> = snapshots.into_iter().take(excess).collect();
        for old in &deleted {
            std::fs::remove_file(old).map_err(io)?;
        }
        Ok((path, deleted))
    }
}

/// What a checked snapshot restores.
struct Checked {
    ca: CertificateAuthority,
    volume_keys: Vec<(String, Vec<u8>)>,
    backup_keys: Vec<(String, Vec<u8>)>,
    records: Vec<(String, Vec<u8>)>,
}

/// Checks that `master` opens everything the snapshot sealed, and decodes it.
fn check(snapshot: &Snapshot, master: &MasterKey) -> Result<Checked, SnapshotError> {
    let sealed = b64()
        .decode(&snapshot.ca_key_sealed)
        .map_err(|e| damaged("ca_key_sealed", e))?;
    let key_pem =
        master
            .open(CA_KEY_CONTEXT, &sealed)
            .ok_or_else(|| SnapshotError::WrongMasterKey {
                what: "CA key".into(),
            })?;
    let key_pem = std::str::from_utf8(&key_pem).map_err(|e| damaged("ca_key_sealed", e))?;
    let ca = CertificateAuthority::from_pem(&snapshot.ca_cert_pem, key_pem)?;
    let keys = |field: &str, keys: &BTreeMap<String, String>| {
        keys.iter()
            .map(|(tenant, blob)| {
                let id =
                    TenantId::new(tenant).map_err(|e| damaged(format!("{field}.{tenant}"), e))?;
                let blob = b64()
                    .decode(blob)
                    .map_err(|e| damaged(format!("{field}.{tenant}"), e))?;
                crate::keys::unwrap_with(master, &id, &blob).map_err(|_| {
                    SnapshotError::WrongMasterKey {
                        what: format!("{field} of {tenant}"),
                    }
                })?;
                Ok((tenant.clone(), blob))
            })
            .collect::<Result<Vec<_>, SnapshotError>>()
    };
    let volume_keys = keys("volume_keys", &snapshot.volume_keys)?;
    let backup_keys = keys("backup_keys", &snapshot.backup_keys)?;
    let mut records = Vec::with_capacity(snapshot.records.len());
    for (n, record) in snapshot.records.iter().enumerate() {
        let value = b64()
            .decode(&record.value)
            .map_err(|e| damaged(format!("records[{n}] ({})", record.key), e))?;
        if records
            .last()
            .is_some_and(|(last, _): &(String, Vec<u8>)| *last >= record.key)
        {
            return Err(damaged(
                format!("records[{n}] ({})", record.key),
                "out of key order",
            ));
        }
        records.push((record.key.clone(), value));
    }
    Ok(Checked {
        ca,
        volume_keys,
        backup_keys,
        records,
    })
}

/// Makes `config`'s state directory from `snapshot`, with the master key where the coordinator
/// will look for it (the operator puts it back first). Refuses a directory that holds a store,
/// a keyring or a CA, and a coordinator that is running.
pub fn restore(snapshot: &Snapshot, config: &CoordinatorConfig) -> Result<Summary, SnapshotError> {
    if std::os::unix::net::UnixStream::connect(config.admin_socket()).is_ok() {
        return Err(SnapshotError::CoordinatorRunning(config.state_dir.clone()));
    }
    // With etcd, the store's prefix must be empty instead (checked as it is filled).
    let written = [
        config.db_dir(),
        config.keyring_file(),
        config.backup_keyring_file(),
        config.ca_dir(),
    ];
    if let Some(existing) = written.iter().find(|p| p.exists()) {
        return Err(SnapshotError::StateExists(existing.clone()));
    }
    let master_path = crate::keys::master_key_path(&config.master_key_file());
    if !master_path.exists() {
        return Err(SnapshotError::NoMasterKey(master_path));
    }
    let checked = check(snapshot, &MasterKey::load(&master_path)?)?;
    let write = || -> Result<(), SnapshotError> {
        checked.ca.save(&config.ca_dir())?;
        match (config.store, &config.etcd) {
            (StoreKind::Etcd, Some(etcd)) => {
                // Keys are records in etcd, beside the fleet's.
                let keyed = |prefix: &str, keys: &[(String, Vec<u8>)]| {
                    keys.iter()
                        .map(|(t, b)| (format!("{prefix}{t}"), b.clone()))
                        .collect::<Vec<_>>()
                };
                let mut records = checked.records.clone();
                records.extend(keyed(VOLUME_KEYS_PREFIX, &checked.volume_keys));
                records.extend(keyed(BACKUP_KEYS_PREFIX, &checked.backup_keys));
                records.sort();
                EtcdStore::connect(etcd)?.fill(records)?;
            }
            _ => {
                Keyring::create_with(&config.keyring_file(), checked.volume_keys.clone())?;
                Keyring::create_with(&config.backup_keyring_file(), checked.backup_keys.clone())?;
                SledStore::create_with(&config.db_dir(), checked.records.clone())?;
            }
        }
        Ok(())
    };
    if let Err(e) = write() {
        for path in &written {
            let _ = std::fs::remove_dir_all(path).or_else(|_| std::fs::remove_file(path));
        }
        return Err(e);
    }
    Ok(snapshot.summary())
}

#[cfg(test)]
mod tests;
