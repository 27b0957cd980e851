//! The wrapped volume keys, in a file of their own rather than in the embedded store, or in the
//! etcd store when the fleet runs on one.
//!
//! Ensures: a key made is appended (one line: tenant, wrapped key) and on disk once [`Keyring::sync`]
//! returns; a key destroyed or replaced leaves no file under the state directory that holds its
//! old wrapped form, because the file is then rewritten whole (a new file, synced, renamed over
//! the old one). A log-structured store keeps deleted records in its segment files, so a purged
//! tenant's key would outlive its purge there; here it does not. In a store
//! ([`Keyring::in_store`], etcd) every change is committed before it returns, and a key
//! destroyed or replaced is then compacted out of the store's history.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use std::sync::Arc;

use base64::Engine;
use berth_shared::ids::TenantId;
use berth_shared::store::{Durability, Store, Write};

use super::KeyError;

fn io_error(path: &Path, e: std::io::Error) -> KeyError {
    KeyError::Keyring {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

#[derive(Debug, Default)]
struct State {
    /// Tenant → wrapped key.
    entries: BTreeMap<String, Vec<u8>>,
    /// The file, open for appending; `None` in memory.
    file: Option<File>,
    /// Appended since the last sync.
    dirty: bool,
}

/// Where a keyring keeps its keys besides memory.
#[derive(Debug)]
enum Backing {
    Memory,
    /// A file (mode 0600) rewritten whole when a key goes.
    File(PathBuf),
    /// Records `<prefix><tenant>` in a replicated store.
    Store {
        store: Arc<dyn Store>,
        prefix: &'static str,
    },
}

/// Where the volume keys are in a store.
pub const VOLUME_KEYS_PREFIX: &str = "keys/volume/";
/// Where the backup keys are in a store.
pub const BACKUP_KEYS_PREFIX: &str = "keys/backup/";

/// Wrapped volume keys by tenant, in a file, in a store or in memory.
#[derive(Debug)]
pub struct Keyring {
    backing: Backing,
    state: Mutex<State>,
    /// Tests: how long each write takes (to widen races).
    #[cfg(test)]
    pub(crate) write_delay: std::time::Duration,
}

/// Keys per store transaction when many are added at once (within etcd's 128 operations).
const ADD_ALL_BATCH: usize = 100;

fn line(tenant: &str, blob: &[u8]) -> String {
    format!(
        "{tenant} {}\n",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

impl Keyring {
    /// Keys held in memory only (seeded fleets, tests).
    pub fn in_memory() -> Self {
        Self::holding(Backing::Memory, BTreeMap::new())
    }

    /// In memory, each write taking `delay` (tests that need two writes to overlap).
    #[cfg(test)]
    pub(crate) fn in_memory_slow(delay: std::time::Duration) -> Self {
        Self {
            write_delay: delay,
            ..Self::in_memory()
        }
    }

    /// The keyring at `path`, made empty when missing. A last line cut short (a crash while
    /// it was appended, before any sync acknowledged it) is dropped; any other damage is an
    /// error.
    pub fn open(path: &Path) -> Result<Self, KeyError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_error(path, e)),
        };
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        let mut entries = BTreeMap::new();
        for (n, l) in complete.lines().enumerate() {
            let bad = || KeyError::Keyring {
                path: path.to_path_buf(),
                message: format!("line {}: not `tenant base64`", n + 1),
            };
            let (tenant, blob) = l.split_once(' ').ok_or_else(bad)?;
            TenantId::new(tenant).map_err(|_| bad())?;
            let blob = base64::engine::general_purpose::STANDARD
                .decode(blob)
                .map_err(|_| bad())?;
            entries.insert(tenant.to_string(), blob);
        }
        // Written afresh: a line cut short goes, and the append handle is opened.
        Self::written(path, entries)
    }

    /// A keyring of `entries` in `path`, the file written whole and synced.
    fn written(path: &Path, entries: BTreeMap<String, Vec<u8>>) -> Result<Self, KeyError> {
        let keyring = Self::holding(Backing::File(path.to_path_buf()), entries);
        let mut state = keyring.lock();
        keyring.rewrite(&mut state)?;
        drop(state);
        Ok(keyring)
    }

    /// A new keyring file at `path` holding `entries` (keys restored from a snapshot), on disk
    /// when this returns. Refuses a path that exists.
    pub fn create_with(path: &Path, entries: Vec<(String, Vec<u8>)>) -> Result<Self, KeyError> {
        if path.exists() {
            return Err(KeyError::Keyring {
                path: path.to_path_buf(),
                message: "exists already".into(),
            });
        }
        Self::written(path, entries.into_iter().collect())
    }

    /// The keys under `prefix` in `store` (a replicated store: etcd).
    pub fn in_store(store: Arc<dyn Store>, prefix: &'static str) -> Result<Self, KeyError> {
        let entries = store
            .scan_prefix(prefix)?
            .into_iter()
            .map(|(k, v)| (k[prefix.len()..].to_string(), v))
            .collect();
        Ok(Self::holding(Backing::Store { store, prefix }, entries))
    }

    /// A keyring of `entries` kept in `backing` (nothing written yet).
    fn holding(backing: Backing, entries: BTreeMap<String, Vec<u8>>) -> Self {
        Self {
            backing,
            state: Mutex::new(State {
                entries,
                file: None,
                dirty: false,
            }),
            #[cfg(test)]
            write_delay: std::time::Duration::ZERO,
        }
    }

    /// Commits `writes` to the store, then, when `forgets` (a key destroyed or replaced),
    /// compacts the store's history, which keeps old values until then; nothing to do for a
    /// file or memory.
    fn commit(&self, writes: Vec<Write>, forgets: bool) -> Result<(), KeyError> {
        let Backing::Store { store, .. } = &self.backing else {
            return Ok(());
        };
        store.apply(writes, Durability::Flushed)?;
        if forgets {
            store.compact_history()?;
        }
        Ok(())
    }

    fn key_of(&self, tenant: &str) -> String {
        match &self.backing {
            Backing::Store { prefix, .. } => format!("{prefix}{tenant}"),
            _ => tenant.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn delay(&self) {
        #[cfg(test)]
        if !self.write_delay.is_zero() {
            std::thread::sleep(self.write_delay);
        }
    }

    pub fn get(&self, tenant: &str) -> Option<Vec<u8>> {
        self.lock().entries.get(tenant).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a key for a tenant that has none: appended, on disk at the next [`Keyring::sync`].
    /// `false` when the tenant has one already (it is kept).
    pub fn add(&self, tenant: &str, blob: Vec<u8>) -> Result<bool, KeyError> {
        self.delay();
        let mut state = self.lock();
        if state.entries.contains_key(tenant) {
            return Ok(false);
        }
        if let (Backing::File(path), Some(file)) = (&self.backing, state.file.as_mut()) {
            file.write_all(line(tenant, &blob).as_bytes())
                .map_err(|e| io_error(path, e))?;
            state.dirty = true;
        }
        self.commit(vec![Write::Put(self.key_of(tenant), blob.clone())], false)?;
        state.entries.insert(tenant.to_string(), blob);
        Ok(true)
    }

    /// Makes every key added so far durable.
    pub fn sync(&self) -> Result<(), KeyError> {
        let mut state = self.lock();
        if let (true, Backing::File(path), Some(file)) =
            (state.dirty, &self.backing, state.file.as_ref())
        {
            file.sync_data().map_err(|e| io_error(path, e))?;
            state.dirty = false;
        }
        Ok(())
    }

    /// Puts `blob` in place of whatever `tenant` had, and rewrites the file: the old key is in
    /// no file any more when this returns.
    pub fn replace(&self, tenant: &str, blob: Vec<u8>) -> Result<(), KeyError> {
        self.delay();
        let mut state = self.lock();
        // The old value goes from the store's history too.
        self.commit(vec![Write::Put(self.key_of(tenant), blob.clone())], true)?;
        state.entries.insert(tenant.to_string(), blob);
        self.rewrite(&mut state)
    }

    /// Removes `tenant`'s key and rewrites the file; `false` when it had none.
    pub fn remove(&self, tenant: &str) -> Result<bool, KeyError> {
        self.delay();
        let mut state = self.lock();
        if !state.entries.contains_key(tenant) {
            return Ok(false);
        }
        self.commit(vec![Write::Delete(self.key_of(tenant))], true)?;
        state.entries.remove(tenant);
        self.rewrite(&mut state)?;
        Ok(true)
    }

    /// Every tenant with a key, and its wrapped key.
    pub fn entries(&self) -> Vec<(String, Vec<u8>)> {
        self.lock()
            .entries
            .iter()
            .map(|(t, b)| (t.clone(), b.clone()))
            .collect()
    }

    /// Adds many at once (a migration), rewritten and durable when this returns.
    pub fn add_all(&self, blobs: Vec<(String, Vec<u8>)>) -> Result<(), KeyError> {
        let mut state = self.lock();
        let new: Vec<(String, Vec<u8>)> = blobs
            .into_iter()
            .filter(|(tenant, _)| !state.entries.contains_key(tenant))
            .collect();
        self.put_all(&new)?;
        state.entries.extend(new);
        self.rewrite(&mut state)
    }

    /// Commits `blobs` to the store, a transaction per [`ADD_ALL_BATCH`] (nothing to do for
    /// a file or memory).
    fn put_all(&self, blobs: &[(String, Vec<u8>)]) -> Result<(), KeyError> {
        for chunk in blobs.chunks(ADD_ALL_BATCH) {
            let writes = chunk
                .iter()
                .map(|(t, b)| Write::Put(self.key_of(t), b.clone()))
                .collect();
            self.commit(writes, false)?;
        }
        Ok(())
    }

    /// Puts `blobs` in place of every key the keyring holds (the same tenants' keys wrapped
    /// anew), durably; the old forms are in no file (nor, in a store, its history) when this
    /// returns.
    pub fn replace_all(&self, blobs: Vec<(String, Vec<u8>)>) -> Result<(), KeyError> {
        let mut state = self.lock();
        self.put_all(&blobs)?;
        self.commit(Vec::new(), true)?;
        state.entries = blobs.into_iter().collect();
        self.rewrite(&mut state)
    }

    /// Writes the whole keyring to a new file, syncs it, renames it over the old one, syncs
    /// the directory, and appends to the new file from then on.
    fn rewrite(&self, state: &mut State) -> Result<(), KeyError> {
        let Backing::File(path) = &self.backing else {
            return Ok(());
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        // Named after its keyring: the volume and backup keyrings share a directory.
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!(".{name}.new"));
        let text: String = state.entries.iter().map(|(t, b)| line(t, b)).collect();
        let write = || -> std::io::Result<File> {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            File::open(dir)?.sync_all()?;
            OpenOptions::new().append(true).open(path)
        };
        state.file = Some(write().map_err(|e| io_error(path, e))?);
        state.dirty = false;
        Ok(())
    }
}
