//! The agent's durable records (its desired state, its last restore and backup per tenant) as
//! one JSON file that every write replaces whole.
//!
//! Ensures: a batch is in the file entirely or not at all (written beside it, synced, renamed
//! over it, the directory synced), and on disk when `apply` returns; the file is its owner's
//! alone (mode 0600: tenant specs carry their environment); a file that is not what
//! this module writes is refused by name, never replaced; a file larger than
//! [`MAX_FILE_BYTES`] is refused before it is read; while one agent holds the records of a
//! state directory (an exclusive lock on [`LOCK_NAME`]), a second one is refused at start
//! instead of enforcing the same host beside it. The records are a few kilobytes per
//! tenant, so rewriting them whole costs less than keeping an embedded database's threads and
//! caches in every agent (it ran eight threads of its own).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};

use berth_shared::store::{Durability, SledStore, Store, StoreError, Write};
use serde_json::value::RawValue;

/// The largest record file read: far above what a host's records take (about 2 KB per
/// tenant).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// The records file, relative to the agent's state directory.
pub const FILE_NAME: &str = "records.json";
/// Locked while an agent holds the records.
pub const LOCK_NAME: &str = "records.lock";
/// Where agents before the records file kept them (a sled database): read once, then renamed
/// to [`MIGRATED_DIR`].
pub const SLED_DIR: &str = "db";
pub const MIGRATED_DIR: &str = "db.migrated";

#[derive(Debug)]
pub struct RecordFile {
    path: PathBuf,
    records: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Released when the agent ends (or dies: the kernel drops it with the process).
    _lock: Flock<std::fs::File>,
}

fn io_error(path: &Path, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

impl RecordFile {
    /// Opens the records in `state_dir`; an agent's older sled database there is moved into
    /// the file first (and kept, renamed, for a downgrade).
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let lock = Self::lock(state_dir)?;
        let path = state_dir.join(FILE_NAME);
        let mut file = Self {
            path,
            records: Mutex::new(BTreeMap::new()),
            _lock: lock,
        };
        let sled_dir = state_dir.join(SLED_DIR);
        if !file.path.exists() && sled_dir.exists() {
            let records = SledStore::open(&sled_dir)?.snapshot()?;
            file.write_whole(&records.into_iter().collect())?;
            std::fs::rename(&sled_dir, state_dir.join(MIGRATED_DIR))
                .map_err(|e| io_error(&sled_dir, "cannot rename", e))?;
        }
        let records = match std::fs::File::open(&file.path) {
            Ok(opened) => Self::read(&file.path, opened)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io_error(&file.path, "cannot open", e)),
        };
        file.records = Mutex::new(records);
        Ok(file)
    }

    fn lock(state_dir: &Path) -> Result<Flock<std::fs::File>, StoreError> {
        let path = state_dir.join(LOCK_NAME);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error(&path, "cannot open", e))?;
        Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| StoreError::Open {
            path: path.display().to_string(),
            message: match errno {
                nix::errno::Errno::EWOULDBLOCK => {
                    "another berth-agent holds this state directory".into()
                }
                other => format!("cannot lock: {other}"),
            },
        })
    }

    fn read(path: &Path, file: std::fs::File) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        let len = file
            .metadata()
            .map_err(|e| io_error(path, "cannot read", e))?
            .len();
        if len > MAX_FILE_BYTES {
            return Err(open_error(format!(
                "{len} bytes is more than the {MAX_FILE_BYTES} a records file may hold"
            )));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, MAX_FILE_BYTES + 1),
            &mut bytes,
        )
        .map_err(|e| io_error(path, "cannot read", e))?;
        let raw: BTreeMap<String, Box<RawValue>> = serde_json::from_slice(&bytes)
            .map_err(|e| open_error(format!("not a records file: {e}")))?;
        Ok(raw
            .into_iter()
            .map(|(key, value)| (key, value.get().as_bytes().to_vec()))
            .collect())
    }

    /// Replaces the file with `records`: a temporary file beside it, synced, renamed over
    /// it, then the directory synced so the rename itself survives a crash.
    fn write_whole(&self, records: &BTreeMap<String, Vec<u8>>) -> Result<(), StoreError> {
        let mut raw = BTreeMap::new();
        for (key, value) in records {
            let value = std::str::from_utf8(value)
                .ok()
                .and_then(|text| RawValue::from_string(text.to_string()).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: key.clone(),
                    message: "a record of the agent must be JSON".into(),
                })?;
            raw.insert(key.as_str(), value);
        }
        let bytes =
            serde_json::to_vec(&raw).map_err(|e| io_error(&self.path, "cannot encode", e))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let temporary = self.path.with_extension("json.new");
        // Owner only, whatever the umask: tenant specs carry their environment.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|e| io_error(&temporary, "cannot create", e))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error(&temporary, "cannot write", e))?;
        std::fs::rename(&temporary, &self.path)
            .map_err(|e| io_error(&self.path, "cannot replace", e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(dir, "cannot sync", e))
    }
}

impl Store for RecordFile {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.records.lock().unwrap().get(key).cloned())
    }

    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .records
            .lock()
            .unwrap()
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect())
    }

    /// Every write is flushed: the file is replaced whole either way.
    fn apply(&self, writes: Vec<Write>, _durability: Durability) -> Result<(), StoreError> {
        let mut records = self.records.lock().unwrap();
        let mut next = records.clone();
        for write in writes {
            match write {
                Write::Put(key, value) => next.insert(key, value),
                Write::Delete(key) => next.remove(&key),
            };
        }
        self.write_whole(&next)?;
        *records = next;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn snapshot(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .records
            .lock()
            .unwrap()
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_shared::store::encode;

    fn put(key: &str, value: &serde_json::Value) -> Write {
        Write::Put(key.into(), encode(value))
    }

    #[test]
    fn records_survive_a_reopen_and_a_batch_lands_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = RecordFile::open(dir.path()).unwrap();
        assert_eq!(file.get("desired").unwrap(), None);
        file.apply(
            vec![
                put("desired", &serde_json::json!({"generation": 3})),
                put("backup/a", &serde_json::json!({"ok": true})),
                put("backup/b", &serde_json::json!({"ok": false})),
            ],
            Durability::Flushed,
        )
        .unwrap();
        file.apply(vec![Write::Delete("backup/b".into())], Durability::Lazy)
            .unwrap();
        drop(file);
        let file = RecordFile::open(dir.path()).unwrap();
        assert_eq!(
            file.get("desired").unwrap(),
            Some(encode(&serde_json::json!({"generation": 3})))
        );
        let backups = file.scan_prefix("backup/").unwrap();
        assert_eq!(backups.len(), 1);
        assert_eq!(backups[0].0, "backup/a");
        assert!(!dir.path().join("records.json.new").exists());
        let mode = std::fs::metadata(dir.path().join(FILE_NAME))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn a_second_agent_on_the_same_state_directory_is_refused_until_the_first_ends() {
        let dir = tempfile::tempdir().unwrap();
        let first = RecordFile::open(dir.path()).unwrap();
        let err = RecordFile::open(dir.path()).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "cannot open the store at {}: another berth-agent holds this state directory",
                dir.path().join(LOCK_NAME).display()
            )
        );
        drop(first);
        RecordFile::open(dir.path()).expect("free again once the first is gone");
    }

    #[test]
    fn a_write_that_cannot_land_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = RecordFile::open(dir.path()).unwrap();
        file.apply(
            vec![put("desired", &serde_json::json!(1))],
            Durability::Flushed,
        )
        .unwrap();
        let err = file
            .apply(
                vec![
                    put("desired", &serde_json::json!(2)),
                    Write::Put("restored/a".into(), b"not json".to_vec()),
                ],
                Durability::Flushed,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "corrupt record \"restored/a\": a record of the agent must be JSON"
        );
        assert_eq!(file.get("desired").unwrap(), Some(b"1".to_vec()));
        drop(file);
        let reopened = RecordFile::open(dir.path()).unwrap();
        assert_eq!(reopened.get("desired").unwrap(), Some(b"1".to_vec()));
        assert_eq!(reopened.get("restored/a").unwrap(), None);
    }

    #[test]
    fn a_file_that_is_not_a_records_file_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, "[1, 2").unwrap();
        let err = RecordFile::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "cannot open the store at {}: not a records file:",
                path.display()
            )),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "[1, 2");
    }

    #[test]
    fn an_older_agents_sled_database_moves_into_the_file() {
        let dir = tempfile::tempdir().unwrap();
        {
            let sled = SledStore::open(&dir.path().join(SLED_DIR)).unwrap();
            sled.apply(
                vec![
                    put("desired", &serde_json::json!({"generation": 7})),
                    put("restored/a", &serde_json::json!({"snapshot": "abc"})),
                ],
                Durability::Flushed,
            )
            .unwrap();
        }
        let file = RecordFile::open(dir.path()).unwrap();
        assert_eq!(
            file.get("desired").unwrap(),
            Some(encode(&serde_json::json!({"generation": 7})))
        );
        assert_eq!(file.scan_prefix("restored/").unwrap().len(), 1);
        assert!(!dir.path().join(SLED_DIR).exists());
        assert!(dir.path().join(MIGRATED_DIR).exists());
        drop(file);
        // Opened again: the file is read, the kept database is left alone.
        let file = RecordFile::open(dir.path()).unwrap();
        assert_eq!(file.snapshot().unwrap().len(), 2);
    }
}
