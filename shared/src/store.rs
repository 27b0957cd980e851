//! The storage trait both daemons keep their state behind, with sled and in-memory backends.
//!
//! Ensures: a batch is applied atomically; with [`Durability::Flushed`] it is on disk when
//! `apply` returns, so callers can acknowledge afterwards; a [`Store::snapshot`] holds every
//! record as it was at one instant, between two batches (sled 0.34 is beta-quality: nothing
//! outside this module names it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (often: another process holds it).
    #[error("cannot open the store at {path}: {message}")]
    Open { path: String, message: String },
    /// A read or write failed.
    #[error("store I/O: {0}")]
    Io(String),
    /// A replicated store's members did not answer (down, no quorum, no route to them):
    /// nothing was read or written; trying again later may work.
    #[error("store unreachable: {0}")]
    Unreachable(String),
    /// A replicated store refused a write of a coordinator that no longer leads the fleet.
    #[error("this coordinator no longer leads the fleet: its write was refused")]
    Fenced,
    /// The leader has not renewed its leadership for longer than it may act without: etcd has
    /// no quorum, or this coordinator is cut off from it. It keeps serving reads and agent
    /// sessions; writes resume once a renewal gets through.
    #[error(
        "etcd has not renewed this coordinator's leadership for {seconds} s (no quorum, or no route to one): writes are refused until it does"
    )]
    LeadershipLapsed { seconds: u64 },
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

impl Write {
    /// The key it writes.
    pub fn key(&self) -> &str {
        match self {
            Write::Put(key, _) | Write::Delete(key) => key,
        }
    }

    /// The value it leaves at its key (`None`: none, deleted).
    pub fn value(&self) -> Option<&Vec<u8>> {
        match self {
            Write::Put(_, value) => Some(value),
            Write::Delete(_) => None,
        }
    }
}

/// A key-value store with string keys (`kind/id`) and atomic batches.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every record whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Applies every write or none.
    fn apply(&self, writes: Vec<Write>, durability: Durability) -> Result<(), StoreError>;
    /// Makes every write applied before this call durable. Concurrent callers share flushes
    /// (group commit): one disk flush acknowledges every write that preceded it.
    fn flush(&self) -> Result<(), StoreError>;
    /// Every record, in key order, as it was at one instant: no batch is half in it. Batches
    /// wait while it is read (a few milliseconds per thousand records).
    fn snapshot(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Drops the values deleted or replaced so far from the store's history, where it keeps
    /// one and can drop it (etcd: a compaction); returns whether it did. sled keeps them in
    /// its segment files until the database is rewritten ([`SledStore::rewrite`]): `false`.
    fn compact_history(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// For a store whose writers elect a leader (etcd): whether this process may act on the
    /// fleet now, `false` while its leadership lapsed (it is renewed again, or it ends).
    /// `None` for a store this process alone writes (sled): it may always act.
    fn acting(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

/// Group commit: callers that arrive while a flush runs wait for the next one, which covers
/// them all.
#[derive(Debug, Default)]
struct GroupFlush {
    state: Mutex<FlushState>,
    done: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct FlushState {
    requested: u64,
    completed: u64,
    running: bool,
    failed: Option<String>,
}

impl GroupFlush {
    fn flush(&self, flush_now: impl Fn() -> Result<(), StoreError>) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.requested += 1;
        let mine = state.requested;
        loop {
            if let Some(message) = &state.failed {
                return Err(StoreError::Io(message.clone()));
            }
            if state.completed >= mine {
                return Ok(());
            }
            if state.running {
                state = self.done.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            state.running = true;
            let target = state.requested;
            drop(state);
            let result = flush_now();
            state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.running = false;
            match result {
                Ok(()) => state.completed = target,
                // A failed flush leaves the store in an unknown state: every later flush fails
                // too, so nothing is ever acknowledged that might not be on disk.
                Err(e) => state.failed = Some(e.to_string()),
            }
            self.done.notify_all();
        }
    }
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

/// How long [`SledStore::reopen`] waits for a closed database's lock to be released.
pub const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The start of sled's message when another handle holds the database's file lock.
const SLED_LOCK_HELD: &str = "could not acquire lock";

/// sled-backed store.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    group: GroupFlush,
    /// Batches share it; a snapshot holds it alone, so it reads between two batches.
    batches: std::sync::RwLock<()>,
}

impl SledStore {
    /// Rewrites the (closed) database at `path` into new files, record by record, and deletes
    /// the old ones: what was deleted from it is in no segment file afterwards.
    pub fn rewrite(path: &Path) -> Result<(), StoreError> {
        let fail = |e: &dyn std::fmt::Display| StoreError::Io(format!("{}: {e}", path.display()));
        let fresh = path.with_extension("rewrite");
        let old = path.with_extension("old");
        for leftover in [&fresh, &old] {
            if leftover.exists() {
                std::fs::remove_dir_all(leftover).map_err(|e| fail(&e))?;
            }
        }
        {
            let from = Self::reopen(path)?;
            let to = Self::open(&fresh)?;
            to.db.import(from.db.export());
            to.db.flush().map_err(|e| fail(&e))?;
        }
        std::fs::rename(path, &old).map_err(|e| fail(&e))?;
        std::fs::rename(&fresh, path).map_err(|e| fail(&e))?;
        std::fs::remove_dir_all(&old).map_err(|e| fail(&e))?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| fail(&e))?;
        }
        Ok(())
    }

    /// Opens a database this process has just closed. sled's background threads can hold its
    /// file lock for a moment after the last handle is dropped, so a held lock is tried again
    /// for up to [`REOPEN_WAIT`] before it is an error.
    pub fn reopen(path: &Path) -> Result<Self, StoreError> {
        Self::reopen_within(path, REOPEN_WAIT)
    }

    fn reopen_within(path: &Path, wait: std::time::Duration) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match Self::open(path) {
                Err(StoreError::Open { message, .. })
                    if message.contains(SLED_LOCK_HELD) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                result => return result,
            }
        }
    }

    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // A database this process closed a moment ago stays locked until its flusher thread
        // notices (up to one flush interval): wait for that, not for another process.
        let waited_until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match sled::Config::new()
                .path(path)
                .flush_every_ms(Some(500))
                .open()
            {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < waited_until =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                opened => break opened,
            }
        }
        .map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self {
            db,
            group: GroupFlush::default(),
            batches: std::sync::RwLock::default(),
        })
    }

    /// Makes a new database at `path` holding `records` (a restored snapshot), durably.
    /// Refuses a path that exists: it never writes into a database.
    pub fn create_with(path: &Path, records: Vec<(String, Vec<u8>)>) -> Result<Self, StoreError> {
        if path.exists() {
            return Err(StoreError::Open {
                path: path.display().to_string(),
                message: "exists already".into(),
            });
        }
        let store = Self::open(path)?;
        for chunk in records.chunks(RESTORE_BATCH) {
            let writes = chunk
                .iter()
                .map(|(k, v)| Write::Put(k.clone(), v.clone()))
                .collect();
            store.apply(writes, Durability::Lazy)?;
        }
        store.flush()?;
        Ok(store)
    }
}

/// Records per batch when a database is made from a snapshot.
const RESTORE_BATCH: usize = 1_000;

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
        {
            let _shared = self.batches.read().unwrap_or_else(|p| p.into_inner());
            self.db
                .apply_batch(batch)
                .map_err(|e| StoreError::Io(e.to_string()))?;
        }
        if durability == Durability::Flushed {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.group.flush(|| {
            self.db
                .flush()
                .map(drop)
                .map_err(|e| StoreError::Io(e.to_string()))
        })
    }

    fn snapshot(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let _alone = self.batches.write().unwrap_or_else(|p| p.into_inner());
        self.db
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(|e| StoreError::Io(e.to_string()))?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
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
        drop(records);
        if durability == Durability::Flushed {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        *self
            .flushed_batches
            .lock()
            .unwrap_or_else(|p| p.into_inner()) += 1;
        Ok(())
    }

    fn snapshot(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        Ok(records
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
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
        let store = SledStore::reopen(&dir.path().join("db")).unwrap();
        assert_eq!(store.get("host/b").unwrap(), Some(b"2".to_vec()));
    }

    #[test]
    fn a_snapshot_restores_into_a_new_database_and_never_into_one_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let records = {
            let store = SledStore::open(&dir.path().join("db")).unwrap();
            exercise(&store);
            store.snapshot().unwrap()
        };
        assert_eq!(
            records.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["host/b", "hosts", "token/z"]
        );
        let restored = SledStore::create_with(&dir.path().join("copy"), records.clone()).unwrap();
        assert_eq!(restored.snapshot().unwrap(), records);
        let err = SledStore::create_with(&dir.path().join("copy"), records).unwrap_err();
        assert!(err.to_string().contains("exists already"), "{err}");
        let mem = MemStore::default();
        exercise(&mem);
        assert_eq!(mem.snapshot().unwrap(), restored.snapshot().unwrap());
    }

    #[test]
    fn a_snapshot_never_holds_half_a_batch() {
        // Every batch moves one unit between two records; any snapshot sums to the total.
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
        let put = |a: u32, b: u32| {
            vec![
                Write::Put("a".into(), a.to_string().into_bytes()),
                Write::Put("b".into(), b.to_string().into_bytes()),
            ]
        };
        store.apply(put(1000, 0), Durability::Lazy).unwrap();
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 1..=1000 {
                    store.apply(put(1000 - i, i), Durability::Lazy).unwrap();
                }
            })
        };
        let mut seen = 0;
        while !writer.is_finished() || seen == 0 {
            let sum: u32 = store
                .snapshot()
                .unwrap()
                .iter()
                .map(|(_, v)| std::str::from_utf8(v).unwrap().parse::<u32>().unwrap())
                .sum();
            assert_eq!(sum, 1000);
            seen += 1;
        }
        writer.join().unwrap();
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
        // Waiting for a lock another live handle holds ends in the same error.
        let err = SledStore::reopen_within(
            &dir.path().join("db"),
            std::time::Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(err.to_string().contains(SLED_LOCK_HELD), "{err}");
    }

    #[test]
    fn concurrent_flushes_share_disk_flushes_and_all_return_durable() {
        let group = std::sync::Arc::new(GroupFlush::default());
        let disk_flushes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (group, disk_flushes) = (group.clone(), disk_flushes.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        group
                            .flush(|| {
                                disk_flushes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                std::thread::sleep(std::time::Duration::from_micros(200));
                                Ok(())
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = disk_flushes.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n < 800, "800 requests shared {n} disk flushes");
        let state = group.state.lock().unwrap();
        assert_eq!(
            state.completed, state.requested,
            "every request was covered"
        );
    }

    #[test]
    fn a_failed_flush_fails_every_later_one() {
        let group = GroupFlush::default();
        assert!(
            group
                .flush(|| Err(StoreError::Io("disk gone".into())))
                .is_err()
        );
        assert!(
            group
                .flush(|| Ok(()))
                .unwrap_err()
                .to_string()
                .contains("disk gone")
        );
    }

    #[test]
    fn corrupt_records_name_their_key() {
        let err = decode::<u32>("host/a", b"{").unwrap_err();
        assert!(err.to_string().contains("\"host/a\""), "{err}");
    }
}
