//! The fleet store in an etcd v3 cluster (`store = "etcd"`), behind the same [`Store`] trait as
//! the embedded sled store.
//!
//! Ensures: a batch is committed whole or not at all, by a quorum of members (on their disks):
//! a `Flushed` batch when `apply` returns, a `Lazy` one at the next `flush` (or within
//! [`LAZY_FLUSH_EVERY`]); batches commit in the order they were applied, and concurrent
//! flushes share transactions (group commit: one transaction carries every batch waiting, up
//! to [`MAX_TXN_OPS`] keys, a batch never split across two). Reads see every batch applied,
//! committed or not yet. A batch larger than one transaction may hold is refused. A snapshot
//! reads every record at one etcd revision. Every key lives under the configured prefix, so
//! several fleets can share a cluster. When the cluster has no quorum, calls fail within the request timeout with etcd's
//! reason; nothing is acknowledged that etcd did not commit. A leader that cannot renew its
//! lease stops writing before any other coordinator can be elected, and reads what the
//! member it reaches holds until it renews again.
//!
//! The trait is synchronous (sled's is); the etcd client runs on a runtime of its own, and a
//! caller waits for its answer as it would for a disk.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use berth_shared::store::{Durability, Store, StoreError, Write};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};

/// etcd's default limit of operations in one transaction (`--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;
/// Records read per request when scanning.
const PAGE: i64 = 1_000;
/// How long one request may take before it fails (a cluster without quorum never answers).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a `Lazy` batch may wait for a flush before the store commits it itself (sled
/// flushes as often).
pub const LAZY_FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Where the fleet's etcd cluster is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://host:2379`, or `https://` with `tls`).
    pub endpoints: Vec<String>,
    /// Every key of this fleet starts with it.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// Where the other coordinators send clients while this one leads (an IP address or a
    /// DNS name, with the ports this one listens on); by default its listening address, or
    /// its host name when it listens on every address.
    pub advertise: Option<String>,
}

/// Mutual TLS to the members: they prove themselves with a certificate of `ca_file`, this
/// coordinator with its own (`etcd --client-cert-auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca_file: std::path::PathBuf,
    pub cert_file: std::path::PathBuf,
    /// The systemd credential `etcd-client-key` replaces it when the unit passes one.
    pub key_file: std::path::PathBuf,
}

/// The largest certificate or key file read for TLS to etcd.
const TLS_FILE_BYTES: u64 = 64 << 10;

/// A TLS file for etcd that cannot be used; the message names its key in `[etcd]`.
#[derive(Debug, thiserror::Error)]
pub enum EtcdTlsError {
    #[error("etcd.{key}: {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("etcd.{key}: {}: larger than {TLS_FILE_BYTES} bytes", path.display())]
    TooLarge {
        key: &'static str,
        path: std::path::PathBuf,
    },
    #[error(
        "etcd.key_file: {}: readable by others (mode {mode:o}); chmod 600 it, or pass it as the systemd credential etcd-client-key",
        path.display()
    )]
    KeyReadableByOthers { path: std::path::PathBuf, mode: u32 },
}

impl EtcdTls {
    /// The client's TLS options, from the files (the key readable by its owner only).
    fn options(&self) -> Result<etcd_client::TlsOptions, EtcdTlsError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |key: &'static str, path: &std::path::Path| -> Result<Vec<u8>, EtcdTlsError> {
            let failed = |source| EtcdTlsError::Read {
                key,
                path: path.to_path_buf(),
                source,
            };
            let file = std::fs::File::open(path).map_err(failed)?;
            let meta = file.metadata().map_err(failed)?;
            if meta.len() > TLS_FILE_BYTES {
                return Err(EtcdTlsError::TooLarge {
                    key,
                    path: path.to_path_buf(),
                });
            }
            if key == "key_file" && meta.permissions().mode() & 0o077 != 0 {
                return Err(EtcdTlsError::KeyReadableByOthers {
                    path: path.to_path_buf(),
                    mode: meta.permissions().mode() & 0o777,
                });
            }
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(file, TLS_FILE_BYTES), &mut bytes)
                .map_err(failed)?;
            Ok(bytes)
        };
        let key_path = std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|dir| std::path::PathBuf::from(dir).join("etcd-client-key"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| self.key_file.clone());
        let ca = read("ca_file", &self.ca_file)?;
        let cert = read("cert_file", &self.cert_file)?;
        let key = read("key_file", &key_path)?;
        Ok(etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(ca))
            .identity(etcd_client::Identity::from_pem(cert, key)))
    }
}

/// How long a leader's lease lives without a keep-alive, in seconds: a leader that dies or is
/// cut off is followed by another about this long after its last keep-alive.
pub const LEADER_LEASE_SECONDS: i64 = 5;
/// How often the leader renews its lease.
const KEEP_ALIVE_EVERY: Duration = Duration::from_millis(1_500);
/// How long a leader waits after a failed keep-alive before it opens a new stream.
const KEEP_ALIVE_RETRY: Duration = Duration::from_millis(250);
/// How often a candidate looks whether an older candidacy is gone.
const CANDIDATE_POLL: Duration = Duration::from_millis(250);
/// How long after it asked for its last successful renewal a leader still acts. etcd keeps
/// the lease at least [`LEADER_LEASE_SECONDS`] after it received that request, so the leader
/// stops a second before any other coordinator can be elected.
const ACT_FOR: Duration = Duration::from_secs(LEADER_LEASE_SECONDS.unsigned_abs() - 1);
/// How often the leader's lapse is looked at (for sessions; writes read the clock).
const LAPSE_POLL: Duration = Duration::from_millis(100);

/// When the leader last renewed its lease, and whether it may act now.
#[derive(Debug)]
struct Lapse {
    /// When the request of the last successful renewal was sent.
    renewed: Mutex<Instant>,
    acting: tokio::sync::watch::Sender<bool>,
}

impl Lapse {
    fn new() -> Self {
        Self {
            renewed: Mutex::new(Instant::now()),
            acting: tokio::sync::watch::Sender::new(true),
        }
    }

    fn renewed(&self, asked: Instant) {
        let mut renewed = self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        *renewed = (*renewed).max(asked);
    }

    /// How long the leadership has gone unrenewed, once that is longer than it may act for.
    fn lapsed_for(&self) -> Option<Duration> {
        let unrenewed = self
            .renewed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        (unrenewed >= ACT_FOR).then_some(unrenewed)
    }
}

/// This coordinator's leadership of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// Its key in the election.
    pub key: Vec<u8>,
    /// Its term: the revision that created its key, greater than every earlier leader's.
    pub term: i64,
    pub lease: i64,
}

/// The store in etcd.
pub struct EtcdStore {
    shared: Arc<Shared>,
    /// Taken only when the store is dropped (shut down in the background: a runtime may not be
    /// dropped inside another one).
    runtime: Option<tokio::runtime::Runtime>,
}

/// What the store and its lazy flusher share.
struct Shared {
    client: Client,
    /// The client's runtime (it stops with the store).
    handle: tokio::runtime::Handle,
    prefix: String,
    /// Once this coordinator leads: every batch commits only while its election key still
    /// exists with its term (a deposed leader's late write is refused).
    fence: Mutex<Option<Leadership>>,
    /// While it leads: whether its leadership is renewed recently enough to act.
    lapse: Arc<Lapse>,
    /// The batches applied and not yet committed.
    buffer: Mutex<Buffer>,
    /// Held while batches are committed: one commit at a time, in order.
    committing: Mutex<()>,
}

impl Drop for EtcdStore {
    /// `Lazy` batches not committed yet are lost, as sled's are within its flush interval.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Batches applied and not yet committed, and what reads see of them.
#[derive(Debug, Default)]
struct Buffer {
    /// Oldest first, each with its number.
    batches: VecDeque<(u64, Vec<Write>)>,
    /// Per key, its value as the batches not yet committed leave it (`None`: deleted), and the
    /// number of the last batch that wrote it.
    overlay: BTreeMap<String, (u64, Option<Vec<u8>>)>,
    next: u64,
    /// Every batch up to this one is committed.
    committed_upto: u64,
    /// etcd refused a transaction of this coordinator's term: it was deposed, and nothing
    /// it applies is committed again (until it leads again).
    fenced: bool,
    /// When the last commit failed, and why (cleared by one that succeeds).
    failed: Option<(Instant, StoreError)>,
}

impl Buffer {
    /// Adds a batch; returns its number.
    fn push(&mut self, writes: Vec<Write>) -> u64 {
        self.next += 1;
        for w in &writes {
            self.overlay
                .insert(w.key().to_string(), (self.next, w.value().cloned()));
        }
        self.batches.push_back((self.next, writes));
        self.next
    }

    /// Batches up to `upto` are in etcd: reads go there for what only they wrote.
    fn committed(&mut self, upto: u64) {
        self.overlay.retain(|_, (batch, _)| *batch > upto);
        self.committed_upto = upto;
    }

    /// `batches` (taken out to commit, oldest first) go back in front of any applied since.
    fn put_back(&mut self, batches: impl DoubleEndedIterator<Item = (u64, Vec<Write>)>) {
        for batch in batches.rev() {
            self.batches.push_front(batch);
        }
    }

    /// `dropped` (no longer among `batches`) will never be committed: the overlay is what
    /// the batches left make of it.
    fn drop_batches(&mut self, dropped: &[(u64, Vec<Write>)]) {
        let gone: std::collections::BTreeSet<u64> = dropped.iter().map(|(n, _)| *n).collect();
        self.overlay.retain(|_, (batch, _)| !gone.contains(batch));
        for (n, writes) in &self.batches {
            for w in writes {
                if self.overlay.get(w.key()).is_none_or(|(batch, _)| batch < n) {
                    self.overlay
                        .insert(w.key().to_string(), (*n, w.value().cloned()));
                }
            }
        }
    }

    /// The overlay's entries under `prefix`.
    fn under(&self, prefix: &str) -> Vec<(String, Option<Vec<u8>>)> {
        self.overlay
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect()
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.shared.prefix)
            .finish_non_exhaustive()
    }
}

/// How often an idle connection to a member is pinged, and how long an answer may take.
const CONNECTION_PING: Duration = Duration::from_secs(2);

/// How long a call is tried again while members are unavailable.
pub const RETRY_FOR: Duration = Duration::from_secs(10);

/// Whether `e` says a member could not serve the call now (down, no leader, leader changed),
/// as opposed to a refusal.
fn unavailable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            tonic::Code::Unavailable => true,
            // A call cut by its connection (a member killed mid-call: reset, closed) comes
            // back as Unknown with the transport's error as its source; etcd's answers have
            // none.
            tonic::Code::Unknown => std::error::Error::source(status).is_some(),
            _ => false,
        },
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

fn etcd_error(e: etcd_client::Error) -> StoreError {
    match e {
        // tonic cancels a call that outlives its timeout: a cluster without a quorum.
        etcd_client::Error::GRpcStatus(status) if status.code() == tonic::Code::Cancelled => {
            StoreError::Unreachable(format!(
                "etcd: no answer within {} s: is a quorum of its members up?",
                REQUEST_TIMEOUT.as_secs()
            ))
        }
        e if unavailable(&e) => StoreError::Unreachable(format!("etcd: {e}")),
        e => StoreError::Io(format!("etcd: {e}")),
    }
}

/// The first key after every key that starts with `prefix`.
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): to the end of the keyspace.
    vec![0]
}

impl EtcdStore {
    /// Connects to the cluster (the first call checks that a member answers).
    pub fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(format!("etcd client runtime: {e}")))?;
        // HTTP/2 pings find a connection that went dead without a word (a member's machine
        // lost, a link down) within seconds, so calls move to another member.
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(CONNECTION_PING, CONNECTION_PING)
            .with_keep_alive_while_idle(true);
        let options = match &config.tls {
            Some(tls) => options.with_tls(tls.options().map_err(|e| StoreError::Open {
                path: config.endpoints.join(","),
                message: e.to_string(),
            })?),
            None => options,
        };
        let endpoints = config.endpoints.clone();
        let client = std::thread::scope(|s| {
            s.spawn(|| runtime.block_on(Client::connect(endpoints, Some(options))))
                .join()
                .unwrap_or_else(|_| Err(etcd_client::Error::InvalidArgs("panicked".into())))
        })
        .map_err(|e| StoreError::Open {
            path: config.endpoints.join(","),
            message: e.to_string(),
        })?;
        let shared = Arc::new(Shared {
            client,
            handle: runtime.handle().clone(),
            prefix: config.prefix.clone(),
            fence: Mutex::default(),
            lapse: Arc::new(Lapse::new()),
            buffer: Mutex::default(),
            committing: Mutex::default(),
        });
        let store = Self {
            shared,
            runtime: Some(runtime),
        };
        store.get("").map_err(|e| StoreError::Open {
            path: config.endpoints.join(","),
            message: e.to_string(),
        })?;
        let lazy = Arc::downgrade(&store.shared);
        std::thread::Builder::new()
            .name("etcd-lazy-flush".into())
            .spawn(move || flush_lazy_batches(lazy))
            .map_err(|e| StoreError::Io(format!("etcd: the lazy flusher: {e}")))?;
        Ok(store)
    }
}

/// Commits the `Lazy` batches nobody flushed, every [`LAZY_FLUSH_EVERY`], until the store is
/// gone.
fn flush_lazy_batches(shared: Weak<Shared>) {
    loop {
        std::thread::sleep(LAZY_FLUSH_EVERY);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Err(e) = shared.commit() {
            tracing::debug!(error = %e, "etcd: lazy batches not committed; trying again");
        }
    }
}

impl Shared {
    /// Runs `call` on the client's runtime and waits for it (from any thread, in a runtime or
    /// not). A member that is unavailable (down, or its leader just changed) is tried again,
    /// through the other members, for up to [`RETRY_FOR`]: losing a minority of members is
    /// invisible to callers. Every call here is safe to repeat (reads, and batches of puts and
    /// deletes that callers make under their own locks).
    fn run<T, F>(&self, call: impl Fn(Client) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        // This thread waits for etcd (through an outage, for up to RETRY_FOR): on a worker of
        // a multi-threaded runtime, its other tasks move to another worker first, so a wait
        // here never starves the coordinator's sessions (their pings, their reports).
        on_blocking_thread(|| self.retry(call))
    }

    fn retry<T, F>(&self, call: impl Fn(Client) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let deadline = std::time::Instant::now() + RETRY_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let future = call(self.client.clone());
            // Once the store is dropped its runtime is gone: the task is dropped, unsent.
            self.handle.spawn(async move {
                let _ = tx.send(future.await);
            });
            match rx
                .recv()
                .map_err(|_| StoreError::Io("etcd: the client stopped".into()))?
            {
                Ok(value) => return Ok(value),
                Err(e) if unavailable(&e) && std::time::Instant::now() + pause < deadline => {
                    tracing::debug!(error = %e, "etcd unavailable; trying again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(etcd_error(e)),
            }
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// Runs `wait`, which blocks its thread, as a multi-threaded tokio runtime's worker must
/// (`block_in_place`: its queued tasks go to other workers meanwhile); elsewhere (a plain
/// thread, a blocking-pool thread, a single-threaded runtime's tests) it just runs.
fn on_blocking_thread<R>(wait: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

impl Shared {
    /// For a leader whose leadership lapsed: how long it has gone unrenewed.
    fn lapsed(&self) -> Option<Duration> {
        let leads = self
            .fence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        leads.then(|| self.lapse.lapsed_for()).flatten()
    }

    /// How to read: linearizably (through a quorum) as a rule; a leader whose leadership
    /// lapsed reads what the member it reaches holds (etcd's serializable reads), so it keeps
    /// answering reads without a quorum. Nothing is written meanwhile, by it or another.
    fn read_options(&self) -> GetOptions {
        let options = GetOptions::new();
        match self.lapsed() {
            Some(_) => options.with_serializable(),
            None => options,
        }
    }

    /// Every record whose key starts with `prefix`, read page by page at one revision.
    fn range(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let full = self.key(prefix);
        let end = range_end(full.as_bytes());
        let mut from = full.into_bytes();
        let mut revision = 0;
        let mut records = Vec::new();
        loop {
            let (start, end_key) = (from.clone(), end.clone());
            let mut options = self.read_options().with_range(end_key).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let response = self.run(|mut client| {
                let (start, options) = (start.clone(), options.clone());
                async move { client.get(start, Some(options)).await }
            })?;
            if revision == 0 {
                revision = response.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in response.kvs() {
                let key = String::from_utf8_lossy(kv.key());
                let Some(key) = key.strip_prefix(&self.prefix) else {
                    continue;
                };
                records.push((key.to_string(), kv.value().to_vec()));
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(records),
            }
        }
    }
}

impl Shared {
    /// Every record whose key starts with `prefix`, as the batches applied leave them:
    /// etcd's, read at one revision, with the batches not yet committed over them.
    fn records_under(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        // Taken before etcd is read: a batch committed meanwhile is in one or the other.
        let pending = self.buffer().under(prefix);
        let committed = self.range(prefix)?;
        if pending.is_empty() {
            return Ok(committed);
        }
        let mut records: BTreeMap<String, Vec<u8>> = committed.into_iter().collect();
        for (key, value) in pending {
            match value {
                Some(value) => records.insert(key, value),
                None => records.remove(&key),
            };
        }
        Ok(records.into_iter().collect())
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits every batch applied so far, oldest first, as few transactions as hold them.
    /// One commit runs at a time; a caller that waited for another finds its batches taken
    /// and committed by it, or commits them itself, or, when that commit failed meanwhile,
    /// gets its error at once (so a write fails within one request's timeout when etcd is
    /// out of reach, not after as many as are queued). A transaction that fails puts its batches
    /// and every later one back, to be tried again, except when fenced: a deposed leader's
    /// batches are dropped (they never will be), and so is every batch it applies later.
    fn commit(&self) -> Result<(), StoreError> {
        let asked = Instant::now();
        let _one = self.committing.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken: Vec<(u64, Vec<Write>)> = {
            let mut buffer = self.buffer();
            if let Some((at, e)) = &buffer.failed
                && *at > asked
            {
                return Err(e.clone());
            }
            let taken: Vec<_> = buffer.batches.drain(..).collect();
            if buffer.fenced {
                buffer.drop_batches(&taken);
                return Err(StoreError::Fenced);
            }
            taken
        };
        let mut start = 0;
        while start < taken.len() {
            // Whole batches up to MAX_TXN_OPS keys; a key written twice goes once, as the
            // later batch left it.
            let mut ops: BTreeMap<&str, Option<&Vec<u8>>> = BTreeMap::new();
            let mut end = start;
            while let Some((_, writes)) = taken.get(end) {
                let new: std::collections::BTreeSet<&str> = writes
                    .iter()
                    .map(Write::key)
                    .filter(|k| !ops.contains_key(k))
                    .collect();
                if end > start && ops.len() + new.len() > MAX_TXN_OPS {
                    break;
                }
                for w in writes {
                    ops.insert(w.key(), w.value());
                }
                end += 1;
            }
            let upto = taken[end - 1].0;
            let outcome = self.commit_transaction(&ops);
            let mut buffer = self.buffer();
            match outcome {
                Ok(()) => {
                    buffer.committed(upto);
                    buffer.failed = None;
                    start = end;
                }
                Err(e) => {
                    buffer.failed = Some((Instant::now(), e.clone()));
                    if matches!(e, StoreError::Fenced) {
                        buffer.fenced = true;
                        buffer.drop_batches(&taken[start..]);
                    } else {
                        buffer.put_back(taken.drain(start..));
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// One transaction of `ops` (`None`: delete), fenced by this coordinator's term once it
    /// leads.
    fn commit_transaction(&self, ops: &BTreeMap<&str, Option<&Vec<u8>>>) -> Result<(), StoreError> {
        if let Some(unrenewed) = self.lapsed() {
            return Err(StoreError::LeadershipLapsed {
                seconds: unrenewed.as_secs(),
            });
        }
        let ops: Vec<TxnOp> = ops
            .iter()
            .map(|(k, v)| match v {
                Some(v) => TxnOp::put(self.key(k), v.to_vec(), None),
                None => TxnOp::delete(self.key(k), None),
            })
            .collect();
        let fence = self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let committed = self.run(|mut client| {
            let mut txn = Txn::new();
            if let Some(leader) = &fence {
                txn = txn.when([Compare::create_revision(
                    leader.key.clone(),
                    CompareOp::Equal,
                    leader.term,
                )]);
            }
            let txn = txn.and_then(ops.clone());
            async move { client.txn(txn).await }
        })?;
        if !committed.succeeded() {
            return Err(StoreError::Fenced);
        }
        Ok(())
    }
}

impl Store for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some((_, value)) = self.shared.buffer().overlay.get(key) {
            return Ok(value.clone());
        }
        let (key, options) = (self.shared.key(key), self.shared.read_options());
        let response = self.shared.run(|mut client| {
            let (key, options) = (key.clone(), options.clone());
            async move { client.get(key, Some(options)).await }
        })?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.shared.records_under(prefix)
    }

    /// A `Flushed` batch is committed by a quorum when this returns `Ok`, and not at all when
    /// it returns an error (unless etcd committed it and its answer was lost); a `Lazy` one is
    /// committed by the next flush, its own or another's, or by the store within
    /// [`LAZY_FLUSH_EVERY`]. Refused at once while the leadership lapsed.
    fn apply(&self, writes: Vec<Write>, durability: Durability) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        if writes.len() > MAX_TXN_OPS {
            return Err(StoreError::Io(format!(
                "etcd: a batch of {} writes is more than one transaction holds ({MAX_TXN_OPS})",
                writes.len()
            )));
        }
        if let Some(unrenewed) = self.shared.lapsed() {
            return Err(StoreError::LeadershipLapsed {
                seconds: unrenewed.as_secs(),
            });
        }
        let batch = self.shared.buffer().push(writes);
        if durability == Durability::Lazy {
            return Ok(());
        }
        let Err(e) = self.shared.commit() else {
            return Ok(());
        };
        // No commit runs while this one looks (none can take the batch meanwhile).
        let _one = self
            .shared
            .committing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut buffer = self.shared.buffer();
        if buffer.committed_upto >= batch {
            // Committed; a later transaction of the same commit failed.
            return Ok(());
        }
        // Still waiting (put back) or dropped: either way it will not be committed.
        if let Some(at) = buffer.batches.iter().position(|(n, _)| *n == batch)
            && let Some(mine) = buffer.batches.remove(at)
        {
            buffer.drop_batches(&[mine]);
        }
        Err(e)
    }

    /// Commits every batch applied before it (group commit: see [`Shared::commit`]).
    fn flush(&self) -> Result<(), StoreError> {
        self.shared.commit()
    }

    /// Commits what was applied, then reads every record at one revision (with any batch
    /// applied meanwhile over it).
    fn snapshot(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.shared.commit()?;
        self.shared.records_under("")
    }

    fn acting(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        Some(self.shared.lapse.acting.subscribe())
    }

    /// Compacts the whole cluster's history up to now (physically: answered once every
    /// member has applied it), so no older value of any key can be read any more.
    fn compact_history(&self) -> Result<bool, StoreError> {
        let revision = self
            .shared
            .run(|mut client| async move { client.get("\0", None).await })?
            .header()
            .map(|h| h.revision())
            .unwrap_or(0);
        if revision == 0 {
            return Ok(false);
        }
        let compacted = self.shared.run(|mut client| async move {
            client
                .compact(
                    revision,
                    Some(etcd_client::CompactionOptions::new().with_physical()),
                )
                .await
        });
        match compacted {
            Ok(_) => Ok(true),
            // Another compaction got there first.
            Err(StoreError::Io(message))
                if message.contains("required revision has been compacted") =>
            {
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }
}

impl EtcdStore {
    /// The election this fleet's coordinators run: beside the prefix, not under it (snapshots
    /// and migrations read the prefix).
    fn election(&self) -> String {
        format!("{}.leader", self.shared.prefix.trim_end_matches('/'))
    }

    /// Who leads the fleet now (the oldest candidacy's value), if anyone.
    pub fn leader(&self) -> Result<Option<String>, StoreError> {
        let oldest = self.candidacies(
            GetOptions::new()
                .with_sort(
                    etcd_client::SortTarget::Create,
                    etcd_client::SortOrder::Ascend,
                )
                .with_limit(1),
        )?;
        Ok(oldest
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// The candidacies in the election, as `options` select them.
    fn candidacies(&self, options: GetOptions) -> Result<etcd_client::GetResponse, StoreError> {
        let election = format!("{}/", self.election());
        let options = options.with_range(range_end(election.as_bytes()));
        self.shared.run(|mut client| {
            let (election, options) = (election.clone(), options.clone());
            async move { client.get(election, Some(options)).await }
        })
    }

    /// The creation revision of the candidacy `key`, if it still exists.
    fn candidacy(&self, key: &str) -> Result<Option<i64>, StoreError> {
        let found = self.shared.run(|mut client| {
            let key = key.to_string();
            async move { client.get(key, None).await }
        })?;
        Ok(found.kvs().first().map(|kv| kv.create_revision()))
    }

    /// Campaigns until this coordinator leads the fleet (waiting as long as another one does),
    /// then fences every later batch with its term. The lease is kept alive from the start;
    /// A leader whose keep-alives fail (no quorum, or no route to one) stops acting
    /// [`ACT_FOR`] after it asked for its last renewal, before etcd may let its lease expire:
    /// writes are refused, reads are served from the member it reaches, [`Store::acting`]
    /// says `false`; a renewal that gets through again resumes it. `on_lost` is called,
    /// once, when etcd says the lease ended (another coordinator may lead by then): the
    /// caller must stop at once.
    pub fn lead(
        &self,
        who: &str,
        on_lost: impl FnOnce(String) + Send + 'static,
    ) -> Result<Leadership, StoreError> {
        let asked = Instant::now();
        let lease = self
            .shared
            .run(|mut client| async move { client.lease_grant(LEADER_LEASE_SECONDS, None).await })?
            .id();
        let (mut keeper, mut answers) = self
            .shared
            .run(|mut client| async move { client.lease_keep_alive(lease).await })?;
        let runtime = &self.shared.handle;
        let mut client = self.shared.client.clone();
        let lapse = self.shared.lapse.clone();
        lapse.renewed(asked);
        runtime.spawn(async move {
            // A keep-alive that fails is tried again (a member down, no quorum, a leader
            // change) for as long as it takes; meanwhile the lapse watcher below stops this
            // coordinator acting. Only etcd's word that the lease ended ends the lead.
            let reason = loop {
                let asked = Instant::now();
                let answer = tokio::time::timeout(KEEP_ALIVE_EVERY, async {
                    keeper.keep_alive().await?;
                    answers.message().await
                })
                .await;
                let failure = match answer {
                    Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                        lapse.renewed(asked);
                        None
                    }
                    Ok(Ok(Some(_))) => break "etcd says the lease expired".to_string(),
                    Ok(Ok(None)) => Some("etcd closed the keep-alive stream".to_string()),
                    Ok(Err(e)) => Some(format!("the lease keep-alive failed: {e}")),
                    Err(_) => Some("no keep-alive answer from etcd".to_string()),
                };
                if let Some(failure) = failure {
                    tracing::debug!(%failure, "lease not renewed; trying again");
                    tokio::time::sleep(KEEP_ALIVE_RETRY).await;
                    match tokio::time::timeout(KEEP_ALIVE_EVERY, client.lease_keep_alive(lease))
                        .await
                    {
                        Ok(Ok(fresh)) => (keeper, answers) = fresh,
                        // The client's word for a first answer with no time left.
                        Ok(Err(etcd_client::Error::LeaseKeepAliveError(e)))
                            if e == "lease not found" =>
                        {
                            break "etcd says the lease expired".to_string();
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "no keep-alive stream"),
                        Err(_) => tracing::debug!("no keep-alive stream in time"),
                    }
                    continue;
                }
                tokio::time::sleep(KEEP_ALIVE_EVERY).await;
            };
            on_lost(reason);
        });
        let lapse = self.shared.lapse.clone();
        runtime.spawn(async move {
            loop {
                let lapsed = lapse.lapsed_for();
                let acting = lapsed.is_none();
                if lapse.acting.send_if_modified(|now| std::mem::replace(now, acting) != acting) {
                    match lapsed {
                        Some(unrenewed) => tracing::error!(
                            unrenewed_ms = unrenewed.as_millis() as u64,
                            "leadership not renewed: stopped acting (writes refused, nothing delivered) until etcd renews it"
                        ),
                        None => tracing::warn!("leadership renewed: acting again"),
                    }
                }
                tokio::time::sleep(LAPSE_POLL).await;
            }
        });
        // The candidacy is a key under the election, bound to the lease (it goes with it);
        // the candidate whose key is oldest leads. No call blocks for long: a campaign call
        // cancelled by its timeout would resign its key on the server, perhaps after the next
        // attempt found it.
        let key = format!("{}/{lease:x}", self.election());
        let created = self.shared.run(|mut client| {
            let (key, who) = (key.clone(), who.to_string());
            async move {
                client
                    .txn(
                        Txn::new()
                            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                            .and_then([TxnOp::put(
                                key.clone(),
                                who,
                                Some(etcd_client::PutOptions::new().with_lease(lease)),
                            )])
                            .or_else([TxnOp::get(key, None)]),
                    )
                    .await
            }
        })?;
        let term = match self.candidacy(&key)? {
            Some(revision) => revision,
            None => {
                return Err(StoreError::Io(format!(
                    "etcd: the candidacy {key} vanished at once (answer: {created:?})"
                )));
            }
        };
        loop {
            // etcd counts a range before its revision filters: the keys themselves are read.
            let older = self.candidacies(
                GetOptions::new()
                    .with_max_create_revision(term - 1)
                    .with_keys_only(),
            )?;
            if older.kvs().is_empty() {
                break;
            }
            if self.candidacy(&key)?.is_none() {
                return Err(StoreError::Io(
                    "etcd: this coordinator's candidacy ended (its lease expired) while it waited"
                        .into(),
                ));
            }
            std::thread::sleep(CANDIDATE_POLL);
        }
        let leadership = Leadership {
            key: key.into_bytes(),
            term,
            lease,
        };
        *self.shared.fence.lock().unwrap_or_else(|p| p.into_inner()) = Some(leadership.clone());
        self.shared.buffer().fenced = false;
        Ok(leadership)
    }

    /// Copies `records` (a snapshot of another store) into this prefix, which must hold
    /// nothing yet, a transaction per [`MAX_TXN_OPS`] records. If a transaction fails, what
    /// was copied is deleted again.
    pub fn fill(&self, records: Vec<(String, Vec<u8>)>) -> Result<usize, StoreError> {
        if !self.shared.records_under("")?.is_empty() {
            return Err(StoreError::Io(format!(
                "etcd: the prefix {:?} holds records already: only an empty one is filled",
                self.shared.prefix
            )));
        }
        let count = records.len();
        for chunk in records.chunks(MAX_TXN_OPS) {
            let writes = chunk
                .iter()
                .map(|(k, v)| Write::Put(k.clone(), v.clone()))
                .collect();
            if let Err(e) = self.apply(writes, Durability::Flushed) {
                let (prefix, end) = (
                    self.shared.prefix.clone(),
                    range_end(self.shared.prefix.as_bytes()),
                );
                let options = etcd_client::DeleteOptions::new().with_range(end);
                let _ = self.shared.run(|mut client| {
                    let (prefix, options) = (prefix.clone(), options.clone());
                    async move { client.delete(prefix, Some(options)).await }
                });
                return Err(e);
            }
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Write {
        Write::Put(key.into(), value.as_bytes().to_vec())
    }

    fn seen(buffer: &Buffer, prefix: &str) -> Vec<(String, Option<String>)> {
        buffer
            .under(prefix)
            .into_iter()
            .map(|(k, v)| (k, v.map(|v| String::from_utf8(v).unwrap())))
            .collect()
    }

    /// Reads see the latest batch for each key until it is committed; committing older
    /// batches leaves a newer write of the same key seen.
    #[test]
    fn the_buffer_shows_the_latest_write_of_each_key_until_it_is_committed() {
        let mut buffer = Buffer::default();
        let first = buffer.push(vec![put("host/a", "1"), put("host/b", "1")]);
        let second = buffer.push(vec![put("host/a", "2"), Write::Delete("host/c".into())]);
        assert_eq!((first, second), (1, 2));
        assert_eq!(
            seen(&buffer, "host/"),
            [
                ("host/a".into(), Some("2".into())),
                ("host/b".into(), Some("1".into())),
                ("host/c".into(), None),
            ]
        );
        assert!(seen(&buffer, "hosts").is_empty());
        buffer.batches.clear();
        buffer.committed(first);
        assert_eq!(buffer.committed_upto, 1);
        assert_eq!(
            seen(&buffer, ""),
            [("host/a".into(), Some("2".into())), ("host/c".into(), None)]
        );
        buffer.committed(second);
        assert!(buffer.overlay.is_empty());
    }

    /// A batch that will never be committed leaves what the remaining batches wrote, in
    /// order; batches put back go before those applied since.
    #[test]
    fn dropping_a_batch_restores_what_the_others_wrote() {
        let mut buffer = Buffer::default();
        buffer.push(vec![put("k", "old"), put("x", "1")]);
        buffer.push(vec![put("k", "mine")]);
        let taken: Vec<_> = buffer.batches.drain(..).collect();
        buffer.push(vec![put("y", "later")]);
        buffer.put_back(taken.into_iter());
        assert_eq!(
            buffer.batches.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let mine = buffer.batches.remove(1).unwrap();
        buffer.drop_batches(&[mine]);
        assert_eq!(
            seen(&buffer, ""),
            [
                ("k".into(), Some("old".into())),
                ("x".into(), Some("1".into())),
                ("y".into(), Some("later".into())),
            ]
        );
        // Every batch dropped: nothing is seen but etcd.
        let all: Vec<_> = buffer.batches.drain(..).collect();
        buffer.drop_batches(&all);
        assert!(buffer.overlay.is_empty());
    }

    #[test]
    fn a_prefix_range_ends_after_its_last_key() {
        assert_eq!(range_end(b"/berth/"), b"/berth0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), vec![0]);
        assert_eq!(range_end(b""), vec![0]);
    }
}
