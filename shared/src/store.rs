//! The storage trait both daemons keep their state behind, with sled and in-memory backends.
//!
//! Ensures: a batch is applied atomically; with [`Durability::Flushed`] it is on disk when
//! `apply` returns, so callers can acknowledge afterwards (sled 0.34 is beta-quality: nothing
//! outside this module names it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (often: another process holds it).
    #[error("cannot open the store at {path}: {message}")]
    Open { path: String, message: String },
    /// A read or write failed.
    #[error("store I/O: {0}")]
    Io(String),
    /// A stored record did not decode: the database was written by something else.
    #[error("corrupt record {key:?}: {message}")]
    Corrupt { key: String, message: String },
}

/// When a write must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Flushed to disk before `apply` returns.
    Flushed,
    /// Written; the backend flushes within its interval (sled: 500 ms). For figures that the
    /// next report replaces anyway.
    Lazy,
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

/// A key-value store with string keys (`kind/id`) and atomic batches.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every record whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Applies every write or none.
    fn apply(&self, writes: Vec<Write>, durability: Durability) -> Result<(), StoreError>;
}

/// Decodes a JSON record, naming the key when it is corrupt.
pub fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// Encodes a record as JSON (readable with any sled dump tool).
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Records are plain structs of strings and numbers: serialization cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// sled-backed store.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(Self { db })
    }
}

impl Store for SledStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get(key.as_bytes())
            .map_err(|e| StoreError::Io(e.to_string()))?
            .map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.db
            .scan_prefix(prefix.as_bytes())
            .map(|item| {
                let (k, v) = item.map_err(|e| StoreError::Io(e.to_string()))?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }

    fn apply(&self, writes: Vec<Write>, durability: Durability) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for write in writes {
            match write {
                Write::Put(k, v) => batch.insert(k.as_bytes(), v),
                Write::Delete(k) => batch.remove(k.as_bytes()),
            }
        }
        self.db
            .apply_batch(batch)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        if durability == Durability::Flushed {
            self.db.flush().map_err(|e| StoreError::Io(e.to_string()))?;
        }
        Ok(())
    }
}

/// In-memory store for unit tests; counts flushed batches so tests can check durability.
#[derive(Debug, Default)]
pub struct MemStore {
    records: Mutex<BTreeMap<String, Vec<u8>>>,
    flushed_batches: Mutex<u64>,
}

impl MemStore {
    pub fn flushed_batches(&self) -> u64 {
        *self
            .flushed_batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned())
    }

    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        Ok(records
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&self, writes: Vec<Write>, durability: Durability) -> Result<(), StoreError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        for write in writes {
            match write {
                Write::Put(k, v) => records.insert(k, v),
                Write::Delete(k) => records.remove(&k),
            };
        }
        if durability == Durability::Flushed {
            *self
                .flushed_batches
                .lock()
                .unwrap_or_else(|p| p.into_inner()) += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(store: &dyn Store) {
        store
            .apply(
                vec![
                    Write::Put("host/a".into(), b"1".to_vec()),
                    Write::Put("host/b".into(), b"2".to_vec()),
                    Write::Put("hosts".into(), b"x".to_vec()),
                    Write::Put("token/z".into(), b"3".to_vec()),
                ],
                Durability::Flushed,
            )
            .unwrap();
        let hosts = store.scan_prefix("host/").unwrap();
        assert_eq!(
            hosts,
            vec![
                ("host/a".into(), b"1".to_vec()),
                ("host/b".into(), b"2".to_vec())
            ]
        );
        store
            .apply(vec![Write::Delete("host/a".into())], Durability::Lazy)
            .unwrap();
        assert_eq!(store.get("host/a").unwrap(), None);
        assert_eq!(store.get("token/z").unwrap(), Some(b"3".to_vec()));
    }

    #[test]
    fn mem_store_semantics() {
        let store = MemStore::default();
        exercise(&store);
        assert_eq!(store.flushed_batches(), 1);
    }

    #[test]
    fn sled_store_semantics_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(&dir.path().join("db")).unwrap();
            exercise(&store);
        }
        // sled's flusher thread drops its handle (and the file lock) shortly after the Db.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let store = loop {
            match SledStore::open(&dir.path().join("db")) {
                Ok(store) => break store,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("lock"), "{e}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(store.get("host/b").unwrap(), Some(b"2".to_vec()));
    }

    #[test]
    fn second_open_of_a_held_database_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _held = SledStore::open(&dir.path().join("db")).unwrap();
        let err = SledStore::open(&dir.path().join("db")).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot open the store at"),
            "{err}"
        );
    }

    #[test]
    fn corrupt_records_name_their_key() {
        let err = decode::<u32>("host/a", b"{").unwrap_err();
        assert!(err.to_string().contains("\"host/a\""), "{err}");
    }
}
