//! Volume-key custody: one random 256-bit key per tenant with an encrypted volume, kept only
//! wrapped (AES-256-GCM) under a master key that comes from a file of mode 0600 or a systemd
//! credential — never from the state it protects — in the keyring file
//! ([`keyring::Keyring`]), not in the fleet store.
//!
//! Ensures: a wrapped key is bound to its tenant (the tenant id is the AEAD's associated data,
//! so a blob moved to another tenant does not open); a missing master key with keys wrapped
//! under it is an error, never a silently new master key; destroying a key deletes its only
//! copy, and no file under the state directory holds it afterwards (the keyring is rewritten
//! whole; the log-structured store never held it, and keys it held before this keyring
//! existed are moved out, the store rewritten behind them, see [`KeyVault::move_out_of`]).

pub mod keyring;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use berth_shared::ids::TenantId;
use berth_shared::store::{Durability, Store, StoreError, Write};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Bytes in a master key and in a volume key.
pub const KEY_BYTES: usize = 32;
const PREFIX: &str = "volkey/";
/// The first byte of a wrapped key: the format.
const FORMAT_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key {path}: {message}")]
    Master { path: PathBuf, message: String },
    #[error("the wrapped volume key of {0} does not open with this master key")]
    Unwrap(String),
    #[error("no randomness from the system")]
    Random,
    /// A master key is 32 bytes that AES-256 takes.
    #[error("not an AES-256 key")]
    NotAes,
    #[error(transparent)]
    Secret(#[from] berth_shared::secret::SecretError),
    #[error("keyring {path}: {message}")]
    Keyring { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn master_error(path: &Path, message: impl Into<String>) -> KeyError {
    KeyError::Master {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Where the master key is: the systemd credential `master-key` when the unit passes one
/// (`LoadCredential=`), else `fallback` (a file of mode 0600).
pub fn master_key_path(fallback: &Path) -> PathBuf {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|dir| PathBuf::from(dir).join("master-key"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| fallback.to_path_buf())
}

/// The key that wraps every volume key, in locked memory out of swap and core dumps.
pub struct MasterKey(berth_shared::secret::Locked<LessSafeKey>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Reads the key file: exactly 32 bytes, readable by its owner only.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let meta = std::fs::metadata(path).map_err(|e| master_error(path, e.to_string()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(master_error(
                path,
                format!("mode {mode:o} lets others read it: chmod 600"),
            ));
        }
        let bytes =
            Zeroizing::new(std::fs::read(path).map_err(|e| master_error(path, e.to_string()))?);
        if bytes.len() != KEY_BYTES {
            return Err(master_error(
                path,
                format!("holds {} bytes, not {KEY_BYTES}", bytes.len()),
            ));
        }
        Self::from_bytes(&bytes).map_err(|e| master_error(path, e.to_string()))
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| KeyError::NotAes)?;
        let key = berth_shared::secret::Locked::new(LessSafeKey::new(key))?;
        if !key.is_locked() {
            tracing::warn!(
                "master key: the memlock limit refuses locking it in memory; it may reach swap (raise LimitMEMLOCK)"
            );
        }
        Ok(Self(key))
    }

    /// A new master key in memory only (seeded fleets and tests).
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
        SystemRandom::new()
            .fill(&mut bytes[..])
            .map_err(|_| KeyError::Random)?;
        Self::from_bytes(&bytes[..])
    }

    /// Seals `plain` under this key (AES-256-GCM, a random nonce), bound to `context`: the
    /// associated data, so the blob opens for that context only.
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KeyError::Random)?;
        let mut sealed = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut sealed,
            )
            .map_err(|_| KeyError::Random)?;
        let mut blob = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        blob.push(FORMAT_V1);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Ok(blob)
    }

    /// Opens what [`MasterKey::seal`] sealed for `context`; `None` when `blob` was sealed
    /// under another key or for another context, or is damaged.
    pub fn open(&self, context: &[u8], blob: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (format, rest) = blob.split_first()?;
        if *format != FORMAT_V1 || rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = Zeroizing::new(sealed.to_vec());
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(context), &mut buffer)
            .ok()?;
        Some(Zeroizing::new(plain.to_vec()))
    }

    /// The master key in `path` if there is one (a rotation cut short left it), else a new
    /// one written there (mode 0600).
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        if path.exists() {
            Self::load(path)
        } else {
            Self::create(path)
        }
    }

    /// Makes a new master key file (mode 0600); refuses to replace one.
    pub fn create(path: &Path) -> Result<Self, KeyError> {
        if path.exists() {
            return Err(master_error(path, "exists already"));
        }
        let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
        SystemRandom::new()
            .fill(&mut bytes[..])
            .map_err(|_| KeyError::Random)?;
        berth_shared::pki::write_file_atomic(path, &bytes[..], 0o600)
            .map_err(|e| master_error(path, e.to_string()))?;
        Self::load(path)
    }
}

fn aad(tenant: &TenantId) -> Vec<u8> {
    format!("berth volume key\0{tenant}").into_bytes()
}

/// `tenant`'s key unwrapped from `blob` with `master`.
pub(crate) fn unwrap_with(
    master: &MasterKey,
    tenant: &TenantId,
    blob: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    master
        .open(&aad(tenant), blob)
        .filter(|plain| plain.len() == KEY_BYTES)
        .ok_or_else(|| KeyError::Unwrap(tenant.to_string()))
}

/// Wraps every key of `keyring` under `new` instead of `old`, durably; returns how many keys
/// were wrapped anew. A key that `new` opens already (a rotation cut short and run again) is
/// kept as it is; one that neither opens is an error, and then nothing is changed.
pub fn rewrap(
    keyring: &keyring::Keyring,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<usize, KeyError> {
    let mut rewrapped = 0;
    let mut blobs = Vec::new();
    for (tenant, blob) in keyring.entries() {
        let id = TenantId::new(&tenant).map_err(|_| KeyError::Unwrap(tenant.clone()))?;
        if unwrap_with(new, &id, &blob).is_ok() {
            blobs.push((tenant, blob));
            continue;
        }
        let key = unwrap_with(old, &id, &blob)?;
        blobs.push((tenant, new.seal(&aad(&id), &key)?));
        rewrapped += 1;
    }
    if rewrapped > 0 {
        keyring.replace_all(blobs)?;
    }
    Ok(rewrapped)
}

/// The coordinator's wrapped keys: the tenants' volume keys and their backup keys, each in
/// a keyring of its own under the same master key.
#[derive(Debug)]
pub struct Vaults {
    pub volume: KeyVault,
    pub backup: KeyVault,
}

/// The wrapped volume keys.
#[derive(Debug)]
pub struct KeyVault {
    master: MasterKey,
    keyring: keyring::Keyring,
}

impl KeyVault {
    pub fn new(master: MasterKey, keyring: keyring::Keyring) -> Self {
        Self { master, keyring }
    }

    /// The master key at `path` for the keys in `keyring` (and any `store` still holds from
    /// before the keyring): a missing one is made only while no key is wrapped yet.
    pub fn open_master(
        path: &Path,
        keyring: &keyring::Keyring,
        store: &dyn Store,
    ) -> Result<MasterKey, KeyError> {
        if path.exists() {
            return MasterKey::load(path);
        }
        let wrapped = keyring.len() + store.scan_prefix(PREFIX)?.len();
        if wrapped > 0 {
            return Err(master_error(
                path,
                format!("is missing but {wrapped} volume keys are wrapped with it: restore it"),
            ));
        }
        MasterKey::create(path)
    }

    /// The vault of `keyring`, with the master key at `path` ([`KeyVault::open_master`]).
    pub fn open(
        path: &Path,
        keyring: keyring::Keyring,
        store: &dyn Store,
    ) -> Result<Self, KeyError> {
        let master = Self::open_master(path, &keyring, store)?;
        Ok(Self::new(master, keyring))
    }

    /// Moves the wrapped keys `store` holds (written before the keyring existed) into the
    /// keyring, durably, then deletes them from the store; returns how many. The store's
    /// segment files may still hold them: the caller rewrites the store afterwards.
    pub fn move_out_of(&self, store: &dyn Store) -> Result<usize, KeyError> {
        let legacy = store.scan_prefix(PREFIX)?;
        if legacy.is_empty() {
            return Ok(0);
        }
        let moved = legacy
            .iter()
            .map(|(k, v)| (k[PREFIX.len()..].to_string(), v.clone()))
            .collect();
        self.keyring.add_all(moved)?;
        let deletes = legacy
            .iter()
            .map(|(k, _)| Write::Delete(k.clone()))
            .collect();
        store.apply(deletes, Durability::Flushed)?;
        Ok(legacy.len())
    }

    /// Makes every key made so far durable (before the placement that needs it is answered).
    pub fn sync(&self) -> Result<(), KeyError> {
        self.keyring.sync()
    }

    fn wrap(&self, tenant: &TenantId, key: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.master.seal(&aad(tenant), key)
    }

    fn unwrap_blob(&self, tenant: &TenantId, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        unwrap_with(&self.master, tenant, blob)
    }

    /// Every tenant's wrapped key (a snapshot of the coordinator's state).
    pub fn wrapped_keys(&self) -> Vec<(String, Vec<u8>)> {
        self.keyring.entries()
    }

    /// The master key the keys are wrapped under.
    pub fn master(&self) -> &MasterKey {
        &self.master
    }

    /// Makes `tenant`'s key unless it has one: on disk at the next [`KeyVault::sync`] (a
    /// placement syncs before its answer). Returns whether it made one.
    pub fn ensure(&self, tenant: &TenantId) -> Result<bool, KeyError> {
        if self.has(tenant)? {
            return Ok(false);
        }
        let blob = self.wrap(tenant, &Self::fresh()?[..])?;
        self.keyring.add(tenant.as_str(), blob)
    }

    /// Gives `tenant` a new key, durably; the old one, if any, is in no file afterwards: a
    /// tenant restarted with an empty volume after its host was lost.
    pub fn replace(&self, tenant: &TenantId) -> Result<(), KeyError> {
        let blob = self.wrap(tenant, &Self::fresh()?[..])?;
        self.keyring.replace(tenant.as_str(), blob)
    }

    fn fresh() -> Result<Zeroizing<[u8; KEY_BYTES]>, KeyError> {
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        SystemRandom::new()
            .fill(&mut key[..])
            .map_err(|_| KeyError::Random)?;
        Ok(key)
    }

    /// Whether `tenant` has a key (none is unwrapped).
    pub fn has(&self, tenant: &TenantId) -> Result<bool, KeyError> {
        Ok(self.keyring.get(tenant.as_str()).is_some())
    }

    /// `tenant`'s key, unwrapped; `None` when it has none.
    pub fn get(&self, tenant: &TenantId) -> Result<Option<Zeroizing<Vec<u8>>>, KeyError> {
        self.keyring
            .get(tenant.as_str())
            .map(|blob| self.unwrap_blob(tenant, &blob))
            .transpose()
    }

    /// Destroys `tenant`'s key (crypto-shredding): when this returns, no file under the state
    /// directory holds it. `false` when it had none.
    pub fn destroy(&self, tenant: &TenantId) -> Result<bool, KeyError> {
        self.keyring.remove(tenant.as_str())
    }
}

#[cfg(test)]
mod tests;
