//! Draining a host: every tenant moved to another host with its volume, then the host left
//! empty and cordoned.
//!
//! Ensures: nothing stops before a complete plan exists — every tenant with a target under
//! all its constraints, that capacity reserved atomically — or else a refusal names each
//! tenant that cannot move and why, and nothing changed; a tenant runs on at most one host at
//! any moment (the source stops it and its agent confirms before the target gets it, and a
//! rollback takes it from the target before the source gets it back); every step raises the
//! placement generation, so a host that comes back never restarts an old copy; each move's
//! phase is on disk before its step runs, so a coordinator killed mid-drain resumes each move
//! where it was; a tenant's volume is first copied while it runs (a pre-copy), so its
//! downtime carries only what changed since; a failure, an abort or the deadline before the
//! target is healthy rolls the tenant back to the source; a lost host's tenants stay assigned
//! to it (blocked) unless the operator accepts starting them elsewhere with empty volumes, and
//! what such a host still holds of them is deleted when it comes back.

pub mod copy;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_shared::ids::{HostId, TenantId};
use berth_shared::proto;
use berth_shared::store::{Durability, Store, StoreError, Write, decode, encode};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::coordinator::Coordinator;
use crate::drain::copy::{Progress, Transfers};
use crate::placement::compaction::{CompactOptions, DEFAULT_HEADROOM_PERCENT, DEFAULT_MAX_MOVES};
use crate::placement::{PlaceError, PlannedMove};
use crate::sessions::{AgentLink, LinkError};

const DRAIN_PREFIX: &str = "drain/";
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_MAX_PARALLEL: u32 = 2;
/// How long the source may take to confirm it stopped a tenant.
const STOP_WAIT: Duration = Duration::from_secs(60);
/// How long a drain waits for its hosts' sessions before it starts (or resumes).
const RECONNECT_WAIT: Duration = Duration::from_secs(30);
/// How long the releasing host may take to shred its old copy.
const RELEASE_WAIT: Duration = Duration::from_secs(60);
/// Moves that pre-copy their volume while `max_parallel` others are under way: a copy
/// overlaps the other moves' starts.
const PRECOPIES_AHEAD: usize = 1;

/// What a drain's moves take turns at, `max_parallel` of each.
#[derive(Debug, Clone)]
struct Slots {
    /// Held from a move's stop until its tenant runs on the target (or is rolled back).
    places: Arc<tokio::sync::Semaphore>,
    /// Held from the start of a move's pre-copy until the end of its copy after the stop. A
    /// pre-copy so overlaps the previous tenant's start on its target, never its stop and the
    /// copy of its changes, which are that tenant's downtime and compete for the same disk
    /// and CPUs.
    streams: Arc<tokio::sync::Semaphore>,
}

impl Slots {
    fn new(max_parallel: u32) -> Self {
        let each = || Arc::new(tokio::sync::Semaphore::new(max_parallel as usize));
        Self {
            places: each(),
            streams: each(),
        }
    }
}

async fn take(
    slots: &Arc<tokio::sync::Semaphore>,
) -> Result<tokio::sync::OwnedSemaphorePermit, MoveFailure> {
    slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| MoveFailure::Failed("the drain's slots are gone".into()))
}

/// Where a drain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainPhase {
    Running,
    Done,
    /// Ended with tenants that could not move (blocked on a lost host, or rolled back).
    Incomplete,
    Aborted,
    StoppedAtDeadline,
}

impl DrainPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::Incomplete => "incomplete",
            Self::Aborted => "aborted",
            Self::StoppedAtDeadline => "stopped_at_deadline",
        }
    }
}

/// Where one tenant's move is. The order of the first five is the order of the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MovePhase {
    /// Target chosen and its capacity reserved; nothing done yet.
    Planned,
    /// Still running on the source while its volume is copied to the target as it is (a
    /// pre-copy), so after the stop only what changed since has to travel.
    Precopying,
    /// Assigned (held) to the target: the source is stopping it.
    Stopping,
    /// Its volume is streaming from the source to the target.
    Copying,
    /// Delivered to the target, which opens the volume and starts it.
    Starting,
    /// Running on the target; the source shreds its old copy.
    Releasing,
    Done,
    /// Back on the source after a failure, an abort or the deadline.
    RolledBack,
    /// Not moved: its host is unreachable (see `--force-lost`).
    Blocked,
    /// Its host was lost: started on the target with an empty volume, as the operator asked
    /// (or because it was never backed up).
    StartedEmpty,
    /// Its host was lost: started on the target with its volume restored from its latest
    /// backup.
    Restored,
    /// Not started before the drain was aborted or hit its deadline: still on the source.
    NotMoved,
}

impl MovePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Planned => "planned",
            Self::Precopying => "precopying",
            Self::Stopping => "stopping",
            Self::Copying => "copying",
            Self::Starting => "starting",
            Self::Releasing => "releasing",
            Self::Done => "done",
            Self::RolledBack => "rolled_back",
            Self::Blocked => "blocked",
            Self::StartedEmpty => "started_empty",
            Self::Restored => "restored",
            Self::NotMoved => "not_moved",
        }
    }

    fn finished(self) -> bool {
        matches!(
            self,
            Self::Done
                | Self::RolledBack
                | Self::Blocked
                | Self::StartedEmpty
                | Self::Restored
                | Self::NotMoved
        )
    }

    /// It runs on its target.
    fn moved(self) -> bool {
        matches!(self, Self::Done | Self::StartedEmpty | Self::Restored)
    }

    /// Between the source stopping it and the target running it.
    fn in_flight(self) -> bool {
        matches!(
            self,
            Self::Stopping | Self::Copying | Self::Starting | Self::Releasing
        )
    }
}

/// How the operator asked the moves to go.
#[derive(Debug, Clone, Copy)]
struct Options {
    force_lost: bool,
    /// A lost host's tenants are restored from their backups (not started empty).
    restore: bool,
    precopy: bool,
}

/// One tenant to move, and from where to where.
#[derive(Debug, Clone)]
struct Move {
    source: HostId,
    tenant: TenantId,
    target: HostId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub tenant: TenantId,
    pub target: HostId,
    pub memory_bytes: u64,
    pub phase: MovePhase,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub bytes_copied: u64,
    #[serde(default)]
    pub bytes_after_stop: u64,
    /// A lost host's tenant restored from a backup: the snapshot (its recovery point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<RecoveryPoint>,
    /// The move starts no earlier than this (Unix ms): in its tenant's maintenance window;
    /// 0: at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_before_unix_ms: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// The snapshot a lost host's tenant was restored from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    pub snapshot_id: String,
    pub short_id: String,
    /// When the snapshot was taken (RFC 3339): the data is as it was then.
    pub time: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRecord {
    pub host: HostId,
    pub phase: DrainPhase,
    pub started_unix_ms: i64,
    pub deadline_unix_ms: i64,
    pub max_parallel: u32,
    pub force_lost: bool,
    /// With `force_lost`: started empty, not restored from backups.
    #[serde(default)]
    pub empty: bool,
    #[serde(default)]
    pub no_precopy: bool,
    pub moves: Vec<MoveRecord>,
    /// Tenants whose copy on this host outlived their move (started elsewhere while the host
    /// was lost, or an old copy its agent could not delete): deleted once its agent is back,
    /// and carried over to the host's next drain until then.
    #[serde(default)]
    pub stale_copies: BTreeSet<TenantId>,
}

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct DrainOptions {
    pub host: HostId,
    pub dry_run: bool,
    pub deadline: Duration,
    pub max_parallel: u32,
    pub force_lost: bool,
    /// With `force_lost`: start the lost host's tenants empty, without restoring.
    pub empty: bool,
    pub no_precopy: bool,
}

impl DrainOptions {
    /// From the API request, with defaults for zeros; the host id is validated.
    pub fn from_request(r: &proto::DrainRequest) -> Result<Self, DrainRequestError> {
        let host = HostId::new(&r.host_id).map_err(DrainRequestError::HostId)?;
        if r.max_parallel > 64 {
            return Err(DrainRequestError::MaxParallel(r.max_parallel));
        }
        if r.deadline_ms > 0 && r.deadline_ms < 1000 {
            return Err(DrainRequestError::Deadline(r.deadline_ms));
        }
        if r.empty && !r.force_lost {
            return Err(DrainRequestError::EmptyWithoutForceLost);
        }
        Ok(Self {
            host,
            dry_run: r.dry_run,
            deadline: match r.deadline_ms {
                0 => DEFAULT_DEADLINE,
                ms => Duration::from_millis(ms),
            },
            max_parallel: match r.max_parallel {
                0 => DEFAULT_MAX_PARALLEL,
                n => n,
            },
            force_lost: r.force_lost,
            empty: r.empty,
            no_precopy: r.no_precopy,
        })
    }
}

/// How long before its tenant's nightly restart a move in the maintenance window starts (its
/// pre-copy), so that its cut-over comes before that restart, which the target then skips (it
/// started the tenant that night).
const WINDOW_LEAD: Duration = Duration::from_secs(10 * 60);

/// When a compaction's move of a tenant whose host reported `status` may start: inside the
/// window of its next nightly restart, `WINDOW_LEAD` before it (not before the window opens);
/// at once (0) when it has none (nightly restarts off) or that time has come.
fn cut_over_from(status: &proto::TenantStatus, now: i64) -> i64 {
    if status.next_restart_unix_ms <= 0 {
        return 0;
    }
    let from = (status.next_restart_unix_ms - WINDOW_LEAD.as_millis() as i64)
        .max(status.restart_window_opens_unix_ms);
    if from <= now { 0 } else { from }
}

/// A compaction the operator asked for.
#[derive(Debug, Clone)]
pub struct CompactRequest {
    pub plan: CompactOptions,
    pub dry_run: bool,
    /// Cut every tenant over at once, not in its maintenance window.
    pub now: bool,
    /// Per emptied host's drain.
    pub deadline: Duration,
    pub max_parallel: u32,
}

/// The most moves one compaction may be allowed.
const MAX_MOVES_LIMIT: u32 = 10_000;
/// The most headroom a compaction may keep on its targets, in percent.
const MAX_HEADROOM_PERCENT: u32 = 90;

impl CompactRequest {
    /// From the API request, with defaults for zeros (and an unset headroom).
    pub fn from_request(r: &proto::CompactRequest) -> Result<Self, DrainRequestError> {
        if r.max_moves > MAX_MOVES_LIMIT {
            return Err(DrainRequestError::MaxMoves(r.max_moves));
        }
        let headroom_percent = r.headroom_percent.unwrap_or(DEFAULT_HEADROOM_PERCENT);
        if headroom_percent > MAX_HEADROOM_PERCENT {
            return Err(DrainRequestError::Headroom(headroom_percent));
        }
        if r.providers.len() > 8 {
            return Err(DrainRequestError::Providers(r.providers.len()));
        }
        let providers = r
            .providers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                berth_shared::host::Provider::parse(&format!("providers[{i}]"), p)
                    .map_err(DrainRequestError::Provider)
            })
            .collect::<Result<_, _>>()?;
        // The per-host options are a drain's.
        let drain = DrainOptions::from_request(&proto::DrainRequest {
            host_id: "compaction".into(),
            deadline_ms: r.deadline_ms,
            max_parallel: r.max_parallel,
            ..Default::default()
        })?;
        Ok(Self {
            plan: CompactOptions {
                max_moves: match r.max_moves {
                    0 => DEFAULT_MAX_MOVES,
                    n => n,
                },
                providers,
                headroom_percent,
            },
            dry_run: r.dry_run,
            now: r.now,
            deadline: drain.deadline,
            max_parallel: drain.max_parallel,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("unknown host {0:?}")]
    UnknownHost(String),
    #[error("host {0} is already draining: see `berthctl drain-status {0}`")]
    AlreadyDraining(String),
    #[error("no drain of host {0}")]
    NoDrain(String),
    #[error(
        "cannot drain {host}: {count} of its tenants cannot move; nothing was changed:\n  {list}",
        count = .refusals.len(),
        list = .refusals.join("\n  ")
    )]
    Refused { host: String, refusals: Vec<String> },
    #[error(
        "cannot restore {0}'s tenants: the coordinator's config has no [backup] repository; `berthctl drain {0} --force-lost --empty` starts them on empty volumes"
    )]
    NothingToRestore(String),
    #[error(
        "compaction stopped at host {host}: {cause}; the drains of {started} were started and go on (`berthctl drain-status HOST` follows one, `berthctl drain-abort HOST` stops it); no other host was touched",
        started = .started.join(", ")
    )]
    CompactionStopped {
        /// The host whose drain could not start.
        host: String,
        /// The hosts whose drains had started before it, in the plan's order.
        started: Vec<String>,
        cause: Box<DrainError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

/// A drain request that asks for what cannot be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainRequestError {
    #[error("host_id: {0}")]
    HostId(berth_shared::ids::IdError),
    #[error("max_parallel: {0} is more than 64")]
    MaxParallel(u32),
    #[error("deadline_ms: {0} ms is less than 1 s")]
    Deadline(u64),
    #[error("empty: only with force_lost (a reachable host's tenants move with their volumes)")]
    EmptyWithoutForceLost,
    #[error("max_moves: {0} is more than 10000")]
    MaxMoves(u32),
    #[error("headroom_percent: {0} is more than 90")]
    Headroom(u32),
    #[error("providers: {0} given, at most 8")]
    Providers(usize),
    #[error("{0}")]
    Provider(berth_shared::field::FieldError),
}

/// Drives the drains of a coordinator (see the module doc): starts, aborts, resumes them and
/// runs their moves through the coordinator's placements and its link to the agents.
#[derive(Debug)]
pub struct Drainer {
    pub coordinator: Arc<Coordinator>,
    pub drains: Drains,
    /// Volume copies under way between agents.
    pub transfers: Transfers,
}

impl Drainer {
    /// The drainer of `coordinator`, with the drain records `store` holds (resume the running
    /// ones with [`Drainer::resume`]).
    pub fn open(
        coordinator: Arc<Coordinator>,
        store: Arc<dyn Store>,
    ) -> Result<Arc<Self>, StoreError> {
        Ok(Arc::new(Self {
            coordinator,
            drains: Drains::load(store)?,
            transfers: Transfers::default(),
        }))
    }
}

/// The drains: their records (durable) and, for running ones, the abort switch and live copy
/// progress.
#[derive(Debug)]
pub struct Drains {
    store: Arc<dyn Store>,
    records: Mutex<BTreeMap<HostId, DrainRecord>>,
    cancel: Mutex<BTreeMap<HostId, watch::Sender<Option<DrainPhase>>>>,
    progress: Mutex<BTreeMap<TenantId, Arc<Progress>>>,
    finished: Mutex<BTreeMap<HostId, watch::Sender<bool>>>,
}

impl Drains {
    pub fn load(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let mut records = BTreeMap::new();
        for (key, bytes) in store.scan_prefix(DRAIN_PREFIX)? {
            let record: DrainRecord = decode(&key, &bytes)?;
            records.insert(record.host.clone(), record);
        }
        Ok(Self {
            store,
            records: Mutex::new(records),
            cancel: Mutex::default(),
            progress: Mutex::default(),
            finished: Mutex::default(),
        })
    }

    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<HostId, DrainRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, host: &HostId) -> Option<DrainRecord> {
        self.records().get(host).cloned()
    }

    pub fn running(&self) -> Vec<DrainRecord> {
        self.records()
            .values()
            .filter(|r| r.phase == DrainPhase::Running)
            .cloned()
            .collect()
    }

    /// Changes a drain's record and writes it through before returning.
    fn update(
        &self,
        host: &HostId,
        change: impl FnOnce(&mut DrainRecord),
    ) -> Result<DrainRecord, StoreError> {
        let mut records = self.records();
        let record = records
            .get_mut(host)
            .ok_or_else(|| StoreError::Io(format!("no drain record for {host}")))?;
        change(record);
        let record = record.clone();
        self.store.apply(
            vec![Write::Put(format!("{DRAIN_PREFIX}{host}"), encode(&record))],
            Durability::Flushed,
        )?;
        Ok(record)
    }

    fn insert(&self, record: DrainRecord) -> Result<(), StoreError> {
        self.store.apply(
            vec![Write::Put(
                format!("{DRAIN_PREFIX}{}", record.host),
                encode(&record),
            )],
            Durability::Flushed,
        )?;
        self.records().insert(record.host.clone(), record);
        Ok(())
    }

    fn set_move(
        &self,
        host: &HostId,
        tenant: &TenantId,
        change: impl FnOnce(&mut MoveRecord),
    ) -> Result<(), StoreError> {
        self.change_move(host, tenant, false, change)
    }

    /// [`Self::set_move`] for a move that left a copy of its tenant on `host` (see
    /// [`DrainRecord::stale_copies`]).
    fn set_move_leaving_copy(
        &self,
        host: &HostId,
        tenant: &TenantId,
        change: impl FnOnce(&mut MoveRecord),
    ) -> Result<(), StoreError> {
        self.change_move(host, tenant, true, change)
    }

    fn change_move(
        &self,
        host: &HostId,
        tenant: &TenantId,
        leaves_copy: bool,
        change: impl FnOnce(&mut MoveRecord),
    ) -> Result<(), StoreError> {
        self.update(host, |r| {
            if leaves_copy {
                r.stale_copies.insert(tenant.clone());
            }
            if let Some(m) = r.moves.iter_mut().find(|m| m.tenant == *tenant) {
                change(m);
            }
        })
        .map(|_| ())
    }

    fn phase_of(&self, host: &HostId, tenant: &TenantId) -> Option<MovePhase> {
        self.records()
            .get(host)?
            .moves
            .iter()
            .find(|m| m.tenant == *tenant)
            .map(|m| m.phase)
    }

    /// The status of a drain, with the live progress of its copies.
    pub fn status(&self, record: &DrainRecord) -> proto::DrainStatus {
        let progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        proto::DrainStatus {
            host_id: record.host.to_string(),
            phase: record.phase.as_str().into(),
            started_unix_ms: record.started_unix_ms,
            deadline_unix_ms: record.deadline_unix_ms,
            max_parallel: record.max_parallel,
            force_lost: record.force_lost,
            refusals: Vec::new(),
            stale_copies: record.stale_copies.iter().map(|t| t.to_string()).collect(),
            moves: record
                .moves
                .iter()
                .map(|m| {
                    let live = progress
                        .get(&m.tenant)
                        .filter(|_| matches!(m.phase, MovePhase::Precopying | MovePhase::Copying));
                    let load = |a: &std::sync::atomic::AtomicU64| {
                        a.load(std::sync::atomic::Ordering::Relaxed)
                    };
                    proto::TenantMove {
                        tenant_id: m.tenant.to_string(),
                        target_host_id: m.target.to_string(),
                        phase: m.phase.as_str().into(),
                        bytes_copied: m.bytes_copied + live.map_or(0, |p| load(&p.copied)),
                        // After a pre-copy, the copy under way is of the changes only.
                        bytes_total: match live {
                            Some(p) if m.bytes_copied == 0 => load(&p.total),
                            _ => m.bytes_total,
                        },
                        error: m.error.clone(),
                        eta_ms: live.map_or(0, |p| p.eta_ms()),
                        memory_bytes: m.memory_bytes,
                        bytes_after_stop: m.bytes_after_stop,
                        restored: m.restored.as_ref().map(|r| proto::BackupSnapshot {
                            id: r.snapshot_id.clone(),
                            short_id: r.short_id.clone(),
                            time: r.time.clone(),
                        }),
                        not_before_unix_ms: m.not_before_unix_ms,
                    }
                })
                .collect(),
        }
    }

    /// Resolves once the drain of `host` has no driver running (at once if none runs).
    pub async fn wait_finished(&self, host: &HostId) {
        let receiver = self
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .map(watch::Sender::subscribe);
        if let Some(mut r) = receiver {
            let _ = r.wait_for(|done| *done).await;
        }
    }
}

/// Why a host did not shred its copy of a tenant.
#[derive(Debug, thiserror::Error)]
enum ShredError {
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The agent's own words.
    #[error("{0}")]
    Refused(String),
}

/// Why a move could not be rolled back.
#[derive(Debug, thiserror::Error)]
enum RollbackError {
    #[error("{0} is no longer placed")]
    NotPlaced(TenantId),
    #[error(transparent)]
    Place(#[from] PlaceError),
    #[error("{target} did not stop it: {source}")]
    NotStopped {
        target: HostId,
        source: crate::coordinator::DeliveryError,
    },
    #[error("{target} did not release it: {source}")]
    NotReleased { target: HostId, source: ShredError },
}

/// Why a move stopped before its target ran the tenant.
#[derive(Debug)]
enum MoveFailure {
    /// Aborted or the deadline passed.
    Stopped(DrainPhase),
    Failed(String),
}

impl From<PlaceError> for MoveFailure {
    fn from(e: PlaceError) -> Self {
        Self::Failed(e.to_string())
    }
}

impl From<StoreError> for MoveFailure {
    fn from(e: StoreError) -> Self {
        Self::Failed(e.to_string())
    }
}

impl std::fmt::Display for MoveFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stopped(DrainPhase::StoppedAtDeadline) => {
                f.write_str("the drain's deadline passed")
            }
            Self::Stopped(_) => f.write_str("the drain was aborted"),
            Self::Failed(why) => f.write_str(why),
        }
    }
}

/// Runs `work` unless the drain is told to stop first.
async fn unless_stopped<T>(
    stop: &mut watch::Receiver<Option<DrainPhase>>,
    work: impl std::future::Future<Output = Result<T, MoveFailure>>,
) -> Result<T, MoveFailure> {
    if let Some(phase) = *stop.borrow() {
        return Err(MoveFailure::Stopped(phase));
    }
    tokio::select! {
        result = work => result,
        phase = stop.wait_for(Option::is_some) => Err(MoveFailure::Stopped(
            phase.ok().and_then(|p| *p).unwrap_or(DrainPhase::Aborted),
        )),
    }
}

impl Drainer {
    /// Starts draining a host (or, with `dry_run`, only plans it): see the module doc.
    pub async fn drain(
        self: &Arc<Self>,
        options: DrainOptions,
    ) -> Result<proto::DrainStatus, DrainError> {
        let host = options.host.clone();
        self.coordinator
            .registry
            .host(&host)?
            .ok_or_else(|| DrainError::UnknownHost(host.to_string()))?;
        if self
            .drains
            .get(&host)
            .is_some_and(|d| d.phase == DrainPhase::Running)
        {
            return Err(DrainError::AlreadyDraining(host.to_string()));
        }
        if options.force_lost
            && !options.empty
            && self.coordinator.config.backup_repository.is_none()
        {
            return Err(DrainError::NothingToRestore(host.to_string()));
        }
        let plan = self
            .coordinator
            .placements
            .plan_drain(&host, !options.dry_run)
            .map_err(|refusals| DrainError::Refused {
                host: host.to_string(),
                refusals,
            })?;
        if options.dry_run {
            let mut status = self.drains.status(&self.record(&options, plan));
            status.phase = "planned".into();
            return Ok(status);
        }
        self.start(&options, plan)
    }

    /// A new drain's record: `plan`'s moves, none started.
    fn record(&self, options: &DrainOptions, plan: Vec<PlannedMove>) -> DrainRecord {
        let now = self.coordinator.registry.now();
        DrainRecord {
            host: options.host.clone(),
            phase: DrainPhase::Running,
            started_unix_ms: now,
            deadline_unix_ms: now + options.deadline.as_millis() as i64,
            max_parallel: options.max_parallel,
            force_lost: options.force_lost,
            empty: options.empty,
            no_precopy: options.no_precopy,
            stale_copies: self
                .drains
                .get(&options.host)
                .map(|r| r.stale_copies)
                .unwrap_or_default(),
            moves: plan
                .into_iter()
                .map(|m| MoveRecord {
                    tenant: m.tenant,
                    target: m.target,
                    memory_bytes: m.memory_bytes,
                    phase: MovePhase::Planned,
                    error: String::new(),
                    bytes_total: m.volume_bytes,
                    bytes_copied: 0,
                    bytes_after_stop: 0,
                    restored: None,
                    not_before_unix_ms: m.not_before_unix_ms,
                })
                .collect(),
        }
    }

    /// Starts the drain of a host whose moves' targets are reserved (and which is out of
    /// scheduling): marked draining, recorded, driven on its own task.
    fn start(
        self: &Arc<Self>,
        options: &DrainOptions,
        plan: Vec<PlannedMove>,
    ) -> Result<proto::DrainStatus, DrainError> {
        let host = &options.host;
        let drain = self.record(options, plan);
        let registry = &self.coordinator.registry;
        let before = registry
            .host(host)?
            .ok_or_else(|| DrainError::UnknownHost(host.to_string()))?
            .admin;
        registry.set_draining(host, true, |h| self.coordinator.sync_host(h))?;
        if let Err(e) = self.drains.insert(drain.clone()) {
            // Not recorded, so never driven: the host must not stay marked as draining.
            if let Err(undo) = registry.set_admin(host, before, |h| self.coordinator.sync_host(h)) {
                tracing::error!(%host, error = %undo, "a drain that could not be recorded left its host marked draining: the coordinator's next start leaves it cordoned");
            }
            return Err(e.into());
        }
        tracing::info!(%host, moves = drain.moves.len(), max_parallel = drain.max_parallel, "drain started");
        self.spawn_driver(host, false);
        Ok(self.drains.status(&drain))
    }

    /// Empties the hosts a compaction plan names (or, with `dry_run`, only plans it): each
    /// one drained to its plan's targets, reserved before anything starts, and left cordoned.
    pub async fn compact(
        self: &Arc<Self>,
        request: CompactRequest,
    ) -> Result<proto::CompactResponse, DrainError> {
        let mut plan = self
            .coordinator
            .placements
            .plan_compaction(&request.plan, !request.dry_run);
        let now = self.coordinator.registry.now();
        if !request.now {
            for m in plan.emptied.iter_mut().flat_map(|e| e.moves.iter_mut()) {
                let status = self
                    .coordinator
                    .placements
                    .tenant(&m.tenant)
                    .and_then(|t| t.status);
                m.not_before_unix_ms = status.map_or(0, |s| cut_over_from(&s, now));
            }
        }
        let mut started = Vec::new();
        // The hosts whose drains this call started.
        let mut draining: Vec<String> = Vec::new();
        let mut failed = None;
        for emptied in &plan.emptied {
            let last_window = emptied
                .moves
                .iter()
                .map(|m| m.not_before_unix_ms.saturating_sub(now).max(0))
                .max()
                .unwrap_or(0);
            let options = DrainOptions {
                host: emptied.host.clone(),
                dry_run: request.dry_run,
                deadline: request.deadline + Duration::from_millis(last_window as u64),
                max_parallel: request.max_parallel,
                force_lost: false,
                empty: false,
                no_precopy: false,
            };
            let status = if request.dry_run || failed.is_some() {
                None
            } else {
                match self.start(&options, emptied.moves.clone()) {
                    Ok(status) => {
                        draining.push(emptied.host.to_string());
                        Some(status)
                    }
                    // The drains already started go on (each is whole and can be aborted
                    // alone); the error names them.
                    Err(cause) if !draining.is_empty() => {
                        failed = Some(DrainError::CompactionStopped {
                            host: emptied.host.to_string(),
                            started: draining.clone(),
                            cause: Box::new(cause),
                        });
                        None
                    }
                    Err(cause) => {
                        failed = Some(cause);
                        None
                    }
                }
            };
            if status.is_none() && !request.dry_run {
                // Not started: what the plan reserved for it goes back.
                for m in &emptied.moves {
                    self.give_back(&m.tenant).await;
                }
                self.coordinator
                    .placements
                    .set_schedulable(&emptied.host, true);
            }
            started.push(status.unwrap_or_else(|| {
                let mut status = self
                    .drains
                    .status(&self.record(&options, emptied.moves.clone()));
                status.phase = "planned".into();
                status
            }));
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let loads = self.coordinator.placements.host_loads();
        let returnable = self
            .coordinator
            .registry
            .hosts()?
            .into_iter()
            .filter(|h| h.admin == crate::registry::AdminState::Cordoned)
            .filter(|h| loads.get(&h.host_id).is_none_or(|l| l.tenants == 0))
            .map(|h| proto::ReturnableHost {
                host_id: h.host_id.to_string(),
                monthly_cost_cents: h.facts.as_ref().map_or(0, |f| f.monthly_cost_cents),
            })
            .collect();
        Ok(proto::CompactResponse {
            phase: if request.dry_run {
                "planned"
            } else {
                "started"
            }
            .into(),
            saving_cents: plan.saving_cents(),
            moves: plan.moves() as u32,
            emptied: plan
                .emptied
                .iter()
                .zip(started)
                .map(|(e, status)| proto::EmptiedHost {
                    host_id: e.host.to_string(),
                    provider: e.provider.as_str().into(),
                    monthly_cost_cents: e.monthly_cost_cents,
                    moves: status.moves,
                })
                .collect(),
            kept: plan
                .kept
                .into_iter()
                .map(|k| proto::KeptHost {
                    host_id: k.host.to_string(),
                    reason: k.reason,
                })
                .collect(),
            returnable,
        })
    }

    /// The status of the last drain of `host`.
    pub fn drain_status(&self, host: &HostId) -> Result<proto::DrainStatus, DrainError> {
        self.drains
            .get(host)
            .map(|d| self.drains.status(&d))
            .ok_or_else(|| DrainError::NoDrain(host.to_string()))
    }

    /// Aborts a running drain: moves not started stay, moves under way roll back unless
    /// their tenant already runs on its target. Answers once the drain has stopped.
    pub async fn abort_drain(&self, host: &HostId) -> Result<proto::DrainStatus, DrainError> {
        let record = self
            .drains
            .get(host)
            .ok_or_else(|| DrainError::NoDrain(host.to_string()))?;
        if record.phase == DrainPhase::Running {
            if let Some(stop) = self
                .drains
                .cancel
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(host)
            {
                stop.send_replace(Some(DrainPhase::Aborted));
            }
            tracing::warn!(%host, "drain abort requested");
            self.drains.wait_finished(host).await;
        }
        self.drain_status(host)
    }

    /// Resumes the drains a stopped coordinator left running, where each move was.
    pub fn resume(self: &Arc<Self>) {
        let running = self.drains.running();
        self.cordon_undriven(&running);
        for drain in running {
            for m in &drain.moves {
                if matches!(m.phase, MovePhase::Planned | MovePhase::Precopying) {
                    self.coordinator.placements.reserve(&m.tenant, &m.target);
                }
            }
            self.coordinator
                .placements
                .set_schedulable(&drain.host, false);
            tracing::info!(host = %drain.host, "resuming drain");
            self.spawn_driver(&drain.host, true);
        }
    }

    /// Leaves cordoned every host marked draining whose drain is not running: the coordinator
    /// stopped between marking it and recording its drain (or the record was refused and so
    /// was the undo), or after its drain ended and before the mark was cleared. Nothing would
    /// ever drive it, and a draining host cannot be uncordoned; cordoned, it takes no tenant
    /// until the operator says so, as after a drain.
    fn cordon_undriven(&self, running: &[DrainRecord]) {
        let registry = &self.coordinator.registry;
        let hosts = match registry.hosts() {
            Ok(hosts) => hosts,
            Err(e) => {
                tracing::error!(error = %e, "hosts marked draining not looked at");
                return;
            }
        };
        let undriven = hosts.iter().filter(|h| {
            h.admin == crate::registry::AdminState::Draining
                && !running.iter().any(|d| d.host == h.host_id)
        });
        for h in undriven {
            match registry.set_draining(&h.host_id, false, |r| self.coordinator.sync_host(r)) {
                Ok(_) => {
                    tracing::warn!(host = %h.host_id, "marked draining with no drain running: left cordoned")
                }
                Err(e) => {
                    tracing::error!(host = %h.host_id, error = %e, "marked draining with no drain running, and still marked")
                }
            }
        }
    }

    /// Runs the drain of `host` on its own task; a `resumed` one first gives the agents time
    /// to reconnect to the restarted coordinator.
    fn spawn_driver(self: &Arc<Self>, host: &HostId, resumed: bool) {
        let (stop, stopped) = watch::channel(None);
        self.drains
            .cancel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.clone(), stop);
        self.drains
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.clone(), watch::Sender::new(false));
        tokio::spawn(self.clone().drive(host.clone(), resumed, stopped));
    }

    /// Runs a drain's moves, at most `max_parallel` at once, until all are finished or the
    /// drain is aborted or hits its deadline.
    async fn drive(
        self: Arc<Self>,
        host: HostId,
        resumed: bool,
        stop: watch::Receiver<Option<DrainPhase>>,
    ) {
        let Some(record) = self.drains.get(&host) else {
            return;
        };
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(
                record
                    .deadline_unix_ms
                    .saturating_sub(self.coordinator.registry.now())
                    .max(0) as u64,
            );
        // After a coordinator restart the agents reconnect within seconds: give them that long
        // before a host counts as unreachable.
        let involved: BTreeSet<HostId> = std::iter::once(host.clone())
            .chain(record.moves.iter().map(|m| m.target.clone()))
            .collect();
        let reconnect = tokio::time::Instant::now() + RECONNECT_WAIT;
        while resumed
            && tokio::time::Instant::now() < reconnect
            && !involved
                .iter()
                .all(|h| self.coordinator.agents.is_connected(h))
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A move holds one of `max_parallel` places until its tenant runs on the target; the
        // source's old copy is released after that, outside the count.
        let mut moves = tokio::task::JoinSet::new();
        let mut releases = tokio::task::JoinSet::new();
        let slots = Slots::new(record.max_parallel);
        let mut started: BTreeSet<TenantId> = BTreeSet::new();
        loop {
            let record = self.drains.get(&host).unwrap_or(record.clone());
            let stopped = stop.borrow().is_some();
            if !stopped && tokio::time::Instant::now() >= deadline {
                if let Some(s) = self
                    .drains
                    .cancel
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&host)
                {
                    s.send_replace(Some(DrainPhase::StoppedAtDeadline));
                }
                continue;
            }
            let mut next: Vec<&MoveRecord> = record
                .moves
                .iter()
                .filter(|m| !m.phase.finished() && !started.contains(&m.tenant))
                .filter(|m| m.phase.in_flight() || !stopped)
                .collect();
            // Moves a killed coordinator left under way go first, then planned ones by the
            // time they may start.
            next.sort_by_key(|m| (!m.phase.in_flight(), m.not_before_unix_ms));
            let ahead = if record.no_precopy {
                0
            } else {
                PRECOPIES_AHEAD
            };
            for m in next {
                if moves.len() >= record.max_parallel as usize + ahead && !m.phase.in_flight() {
                    break;
                }
                started.insert(m.tenant.clone());
                moves.spawn(self.clone().migrate(
                    Move {
                        source: host.clone(),
                        tenant: m.tenant.clone(),
                        target: m.target.clone(),
                    },
                    Options {
                        force_lost: record.force_lost,
                        restore: !record.empty,
                        precopy: !record.no_precopy,
                    },
                    slots.clone(),
                    stop.clone(),
                ));
            }
            if moves.is_empty() {
                break;
            }
            let mut watch_stop = stop.clone();
            tokio::select! {
                joined = moves.join_next() => {
                    if let Some(Ok(Some((tenant, target)))) = joined {
                        releases.spawn(self.clone().release(host.clone(), tenant, target));
                    }
                }
                _ = watch_stop.wait_for(Option::is_some), if !stopped => {}
                () = tokio::time::sleep_until(deadline), if !stopped => {}
            }
        }
        while releases.join_next().await.is_some() {}
        let stopped = *stop.borrow();
        self.finish_drain(&host, stopped).await;
    }

    /// Gives back what a move that ends without moving its tenant reserved on its target, and
    /// unstages the tenant there.
    async fn give_back(self: &Arc<Self>, tenant: &TenantId) {
        let unstaged = match self.coordinator.placements.release_reservation(tenant) {
            Ok(Some(seq)) => self
                .coordinator
                .durable(seq)
                .await
                .map_err(|e| e.to_string()),
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = unstaged {
            tracing::warn!(%tenant, error = %e, "not unstaged on its move's target");
        }
    }

    /// Marks what never started, gives back its reservations, leaves the host cordoned.
    async fn finish_drain(self: &Arc<Self>, host: &HostId, stopped: Option<DrainPhase>) {
        let record = self.drains.update(host, |r| {
            for m in &mut r.moves {
                if matches!(m.phase, MovePhase::Planned | MovePhase::Precopying) {
                    m.phase = MovePhase::NotMoved;
                }
            }
            let all_moved = r.moves.iter().all(|m| m.phase.moved());
            r.phase = match stopped {
                Some(phase) => phase,
                None if all_moved => DrainPhase::Done,
                None => DrainPhase::Incomplete,
            };
        });
        match record {
            Ok(record) => {
                for m in &record.moves {
                    if !m.phase.moved() {
                        self.give_back(&m.tenant).await;
                    }
                }
                tracing::info!(%host, phase = record.phase.as_str(), "drain finished");
            }
            Err(e) => tracing::error!(%host, error = %e, "drain record not written"),
        }
        if let Err(e) = self
            .coordinator
            .registry
            .set_draining(host, false, |h| self.coordinator.sync_host(h))
        {
            tracing::error!(%host, error = %e, "host left draining");
        }
        self.drains
            .cancel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host);
        if let Some(done) = self
            .drains
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host)
        {
            done.send_replace(true);
        }
    }

    /// Moves one tenant from `source` to `target`, from whatever phase it is in, holding one
    /// of `places` from its stop until it runs on the target (or is rolled back). Returns the
    /// tenant and its target when it runs there and the source's copy is to be released.
    async fn migrate(
        self: Arc<Self>,
        m: Move,
        options: Options,
        slots: Slots,
        mut stop: watch::Receiver<Option<DrainPhase>>,
    ) -> Option<(TenantId, HostId)> {
        let phase = self.drains.phase_of(&m.source, &m.tenant)?;
        let mut place = None;
        let outcome = self
            .run_move(&m, phase, options, (&slots, &mut place), &mut stop)
            .await;
        let Move {
            source,
            tenant,
            target,
        } = m;
        let result = match outcome {
            Ok(MovePhase::Releasing) => return Some((tenant, target)),
            // The lost host's copy stays there until it is back.
            Ok(phase @ (MovePhase::StartedEmpty | MovePhase::Restored)) => self
                .drains
                .set_move_leaving_copy(&source, &tenant, |m| m.phase = phase),
            Ok(final_phase) => self
                .drains
                .set_move(&source, &tenant, |m| m.phase = final_phase),
            Err(failure) => {
                let why = failure.to_string();
                tracing::warn!(%tenant, %source, %target, error = %why, "move failed; rolling back");
                let rolled = self.roll_back(&source, &tenant, &target).await;
                self.drains.set_move(&source, &tenant, |m| match rolled {
                    Ok(phase) => {
                        m.phase = phase;
                        m.error = why;
                    }
                    Err(e) => {
                        m.phase = MovePhase::Blocked;
                        m.error = format!("{why}; and the rollback failed: {e}");
                    }
                })
            }
        };
        if let Err(e) = result {
            tracing::error!(%tenant, error = %e, "drain record not written");
        }
        self.give_back(&tenant).await;
        drop(place);
        None
    }

    /// The steps of a move from `phase` on; returns its final phase.
    async fn run_move(
        self: &Arc<Self>,
        Move {
            source,
            tenant,
            target,
        }: &Move,
        mut phase: MovePhase,
        options: Options,
        (slots, place): (&Slots, &mut Option<tokio::sync::OwnedSemaphorePermit>),
        stop: &mut watch::Receiver<Option<DrainPhase>>,
    ) -> Result<MovePhase, MoveFailure> {
        let set = |phase: MovePhase| {
            tracing::info!(%tenant, %source, %target, phase = phase.as_str(), "move");
            self.drains.set_move(source, tenant, |m| m.phase = phase)
        };
        // What the target holds of a pre-copy (a transfer id; 0: nothing).
        let mut base = 0;
        // This move's turn at streaming, while it pre-copies and until its copy after the stop.
        let mut stream_turn = None;
        if matches!(phase, MovePhase::Planned | MovePhase::Precopying) {
            if !self.coordinator.agents.is_connected(source) {
                if !options.force_lost {
                    self.give_back(tenant).await;
                    self.drains.set_move(source, tenant, |m| {
                        m.error = format!("host {source} is unreachable: {tenant} stays assigned to it; `berthctl drain {source} --force-lost` starts it on {target} restored from its latest backup");
                    })?;
                    return Ok(MovePhase::Blocked);
                }
                *place = Some(take(&slots.places).await?);
                return self
                    .start_lost(source, tenant, target, options.restore, stop)
                    .await;
            }
            let ready = unless_stopped(stop, async {
                let not_before = self.drains.get(source).map_or(0, |d| {
                    d.moves
                        .iter()
                        .find(|m| m.tenant == *tenant)
                        .map_or(0, |m| m.not_before_unix_ms)
                });
                let wait = not_before.saturating_sub(self.coordinator.registry.now());
                if wait > 0 {
                    tracing::info!(%tenant, %source, %target, seconds = wait / 1000, "move waits for its tenant's maintenance window");
                    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                }
                let (copied, turn) = match options.precopy {
                    true => {
                        let turn = take(&slots.streams).await?;
                        set(MovePhase::Precopying)?;
                        if let Some(seq) = self.coordinator.placements.prestage(tenant)? {
                            self.coordinator.durable(seq).await?;
                        }
                        (self.precopy(source, tenant, target).await, Some(turn))
                    }
                    false => (0, None),
                };
                Ok((copied, turn, take(&slots.places).await?))
            })
            .await;
            match ready {
                Ok((copied, turn, taken)) => {
                    base = copied;
                    stream_turn = turn;
                    *place = Some(taken);
                }
                Err(MoveFailure::Stopped(why)) => {
                    return self
                        .not_moved(source, tenant, target, why, options.precopy)
                        .await;
                }
                Err(e) => return Err(e),
            }
            set(MovePhase::Stopping)?;
            phase = MovePhase::Stopping;
        } else if phase != MovePhase::Releasing {
            // Resumed under way: it takes its place first.
            *place = Some(take(&slots.places).await?);
        }
        if phase == MovePhase::Stopping {
            // Held on the target: the source stops it, nobody starts it. (Resumed after a
            // restart, that may be done already: then its generation is awaited.)
            let generation = match self.coordinator.placements.tenant_record(tenant) {
                Some(r) if r.host_id == *target && r.held => r.generation,
                _ => {
                    let applied = self.coordinator.placements.relocate(tenant, target, true)?;
                    self.coordinator.durable(applied.seq).await?;
                    applied.placement.generation
                }
            };
            unless_stopped(stop, async {
                self.coordinator
                    .await_delivery(source, generation, STOP_WAIT)
                    .await
                    .map_err(|e| MoveFailure::Failed(format!("stopping on {source}: {e}")))
            })
            .await?;
            set(MovePhase::Copying)?;
            phase = MovePhase::Copying;
        }
        if phase == MovePhase::Copying {
            unless_stopped(stop, async {
                let copied = self.copy_volume(source, tenant, target, false, base).await;
                match copied {
                    Err(e) if base != 0 => {
                        tracing::warn!(%tenant, %source, %target, error = %e, "copy of the changes since the pre-copy failed; copying the whole volume");
                        self.copy_volume(source, tenant, target, false, 0).await
                    }
                    other => other,
                }
            })
            .await?;
            drop(stream_turn);
            set(MovePhase::Starting)?;
            phase = MovePhase::Starting;
        }
        if phase == MovePhase::Starting {
            let applied = match self.coordinator.placements.tenant_record(tenant) {
                Some(r) if r.host_id == *target && !r.held => r.generation,
                _ => {
                    let applied = self
                        .coordinator
                        .placements
                        .relocate(tenant, target, false)?;
                    self.coordinator.durable(applied.seq).await?;
                    applied.placement.generation
                }
            };
            unless_stopped(stop, self.await_healthy(tenant, target, applied)).await?;
            set(MovePhase::Releasing)?;
        }
        // The tenant runs on its target: from here on nothing rolls back.
        Ok(MovePhase::Releasing)
    }

    /// Deletes the source's copy of a tenant that runs on its target; the move is done then
    /// (a copy that cannot be deleted is noted, not retried: fencing keeps it from running).
    async fn release(self: Arc<Self>, source: HostId, tenant: TenantId, target: HostId) {
        let note = match self.shred_copy(&source, &tenant).await {
            Ok(()) => String::new(),
            Err(e) => format!("its old copy on {source} is not deleted: {e}"),
        };
        if !note.is_empty() {
            tracing::warn!(%tenant, %source, error = %note, "source copy left");
        }
        tracing::info!(%tenant, %source, %target, "tenant moved");
        let done = match note.is_empty() {
            true => self
                .drains
                .set_move(&source, &tenant, |m| m.phase = MovePhase::Done),
            false => self.drains.set_move_leaving_copy(&source, &tenant, |m| {
                m.phase = MovePhase::Done;
                m.error = note;
            }),
        };
        if let Err(e) = done {
            tracing::error!(%tenant, error = %e, "drain record not written");
        }
    }

    /// Asks `host` to shred its copy of `tenant` (volume, key, what a transfer left); `Err`
    /// says why it did not.
    async fn shred_copy(&self, host: &HostId, tenant: &TenantId) -> Result<(), ShredError> {
        match self
            .coordinator
            .agents
            .volume(
                host,
                crate::coordinator::purge_command(tenant),
                RELEASE_WAIT,
            )
            .await?
        {
            r if r.ok => Ok(()),
            r => Err(ShredError::Refused(r.error)),
        }
    }

    /// Deletes the copies `host` still holds of tenants that moved away while it was lost (or
    /// whose deletion failed); runs when its agent opens a session. A tenant placed on `host`
    /// again since has its live copy there, and is only struck off the list.
    pub async fn delete_stale_copies(self: Arc<Self>, host: HostId) {
        let Some(record) = self.drains.get(&host) else {
            return;
        };
        for tenant in record.stale_copies {
            let placed_here = self
                .coordinator
                .placements
                .tenant_record(&tenant)
                .is_some_and(|r| r.host_id == host);
            if !placed_here {
                if let Err(error) = self.shred_copy(&host, &tenant).await {
                    tracing::warn!(%tenant, %host, %error, "stale copy not deleted; tried again at the host's next session");
                    continue;
                }
                tracing::info!(%tenant, %host, "stale copy deleted");
            }
            let struck = self.drains.update(&host, |r| {
                r.stale_copies.remove(&tenant);
            });
            if let Err(e) = struck {
                tracing::error!(%tenant, error = %e, "drain record not written");
            }
        }
    }

    /// Copies the volume of a tenant still running on `source` to `target`, kept aside there;
    /// returns the transfer the copy after the stop can build on (0 when this one failed,
    /// which only makes that copy whole).
    async fn precopy(&self, source: &HostId, tenant: &TenantId, target: &HostId) -> u64 {
        match self.copy_volume(source, tenant, target, true, 0).await {
            Ok(transfer) => transfer,
            Err(e) => {
                tracing::warn!(%tenant, %source, %target, error = %e, "pre-copy failed; the whole volume is copied after the stop");
                0
            }
        }
    }

    /// A move stopped before its tenant left the source: the tenant stays where it runs, and
    /// the target drops what a pre-copy (if one ran) left there.
    async fn not_moved(
        &self,
        source: &HostId,
        tenant: &TenantId,
        target: &HostId,
        why: DrainPhase,
        precopied: bool,
    ) -> Result<MovePhase, MoveFailure> {
        let dropped = match precopied {
            true => self.shred_copy(target, tenant).await,
            false => Ok(()),
        };
        let left = match dropped {
            Ok(()) => String::new(),
            Err(e) => format!("; its pre-copy on {target} is not deleted: {e}"),
        };
        self.drains.set_move(source, tenant, |m| {
            m.error = format!(
                "{} before {tenant} stopped on {source}{left}",
                MoveFailure::Stopped(why)
            );
        })?;
        Ok(MovePhase::NotMoved)
    }

    /// Has the source agent push the volume straight to the target agent's transfer port: a
    /// pre-copy of a running tenant, or the copy after its stop (of only what changed since
    /// the pre-copy `base`, when both agents hold it). Returns the transfer's id.
    async fn copy_volume(
        &self,
        source: &HostId,
        tenant: &TenantId,
        target: &HostId,
        precopy: bool,
        base: u64,
    ) -> Result<u64, MoveFailure> {
        let address = self
            .coordinator
            .agents
            .transfer_address(target)
            .ok_or_else(|| {
                MoveFailure::Failed(format!(
                    "copy: {target} has no transfer port (not connected, or its agent serves none)"
                ))
            })?;
        let transfer = self.transfers.open(target);
        self.drains
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), transfer.progress.clone());
        // A copy is bounded by the drain's deadline (which stops it), not by a guess here.
        let wait = Duration::from_secs(24 * 3600);
        let command = |action: proto::VolumeAction, peer: &HostId, peer_address: String| {
            proto::VolumeCommand {
                tenant_id: tenant.to_string(),
                action: action as i32,
                transfer_id: transfer.id,
                precopy,
                base_transfer_id: base,
                peer_host_id: peer.to_string(),
                peer_address,
                transfer_token: transfer.token.to_vec(),
                ..Default::default()
            }
        };
        let import = command(proto::VolumeAction::Import, source, String::new());
        let export = command(proto::VolumeAction::Export, target, address.to_string());
        // Whatever stops this copy before both ends answered (an abort, the deadline) stops
        // both ends too.
        let mut both = CancelOnDrop {
            agents: self.coordinator.agents.as_ref(),
            hosts: [source, target],
            transfer_id: transfer.id,
            armed: true,
        };
        let received = self.coordinator.agents.volume(target, import, wait);
        let sent = self.coordinator.agents.volume(source, export, wait);
        tokio::pin!(received, sent);
        let done = |r: &Result<proto::VolumeResult, LinkError>| matches!(r, Ok(r) if r.ok);
        // An end that failed leaves the other waiting for a stream that never comes (or
        // goes): it is stopped.
        let (received, sent) = tokio::select! {
            received = &mut received => {
                if !done(&received) {
                    self.coordinator.agents.cancel_transfer(source, transfer.id);
                }
                (received, sent.await)
            }
            sent = &mut sent => {
                if !done(&sent) {
                    self.coordinator.agents.cancel_transfer(target, transfer.id);
                }
                (received.await, sent)
            }
        };
        both.armed = false;
        self.drains
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
        let failed =
            |host: &HostId, why: &str| MoveFailure::Failed(format!("copy ({host}): {why}"));
        let sent = sent.map_err(|e| failed(source, &e.to_string()))?;
        let received = received.map_err(|e| failed(target, &e.to_string()))?;
        if !sent.ok {
            return Err(failed(source, &sent.error));
        }
        if !received.ok {
            return Err(failed(target, &received.error));
        }
        if sent.sha256 != received.sha256 || sent.data_bytes != received.data_bytes {
            return Err(MoveFailure::Failed(format!(
                "copy: {source} sent {} bytes ({}), {target} received {} bytes ({})",
                sent.data_bytes, sent.sha256, received.data_bytes, received.sha256
            )));
        }
        let copied = received.data_bytes;
        tracing::info!(%tenant, precopy, base, bytes = sent.data_bytes, sha256 = %sent.sha256, "volume copied");
        self.drains.set_move(source, tenant, |m| {
            // A copy that builds on a pre-copy sends part of the volume only.
            if base == 0 {
                m.bytes_total = sent.data_bytes;
            }
            m.bytes_copied += copied;
            if !precopy {
                m.bytes_after_stop = copied;
            }
        })?;
        Ok(transfer.id)
    }

    /// A lost host's tenant, on the operator's word: started on the target, its volume
    /// restored from its latest backup when `restore` and it was ever backed up, else empty
    /// (an encrypted one under a new key either way, so the old copy can never be opened
    /// again).
    async fn start_lost(
        self: &Arc<Self>,
        source: &HostId,
        tenant: &TenantId,
        target: &HostId,
        restore: bool,
        stop: &mut watch::Receiver<Option<DrainPhase>>,
    ) -> Result<MovePhase, MoveFailure> {
        let failed = |e: crate::keys::KeyError| MoveFailure::Failed(e.to_string());
        let coordinator = &self.coordinator;
        if coordinator.keys.has(tenant).map_err(failed)? {
            coordinator.keys.replace(tenant).map_err(failed)?;
        }
        // Its snapshots, listed through the target (the repository is off-host): restored
        // from the latest if there is one.
        let backed_up = match restore {
            false => false,
            true => !coordinator
                .snapshots_through(tenant, target)
                .await
                .map_err(|e| {
                    MoveFailure::Failed(format!(
                        "its backups could not be listed through {target}: {e}"
                    ))
                })?
                .is_empty(),
        };
        let restoring = restore && backed_up;
        let applied = match restoring {
            true => coordinator
                .placements
                .relocate_restoring(tenant, target, None)?,
            false => coordinator.placements.relocate(tenant, target, false)?,
        };
        coordinator.durable(applied.seq).await?;
        self.drains.set_move(source, tenant, |m| {
            m.error = match (restoring, restore) {
                (true, _) => format!("{source} was lost: restoring it on {target} from its latest backup"),
                (false, true) => format!("{source} was lost and {tenant} has no backup: started on {target} with an empty volume"),
                (false, false) => format!("{source} was lost: started on {target} with an empty volume"),
            };
        })?;
        unless_stopped(
            stop,
            self.await_healthy(tenant, target, applied.placement.generation),
        )
        .await?;
        if !restoring {
            return Ok(MovePhase::StartedEmpty);
        }
        let restored = coordinator
            .placements
            .tenant(tenant)
            .and_then(|t| t.status)
            .and_then(|s| s.restored)
            .map(|s| RecoveryPoint {
                snapshot_id: s.id,
                short_id: s.short_id,
                time: s.time,
            });
        self.drains.set_move(source, tenant, |m| {
            if let Some(point) = &restored {
                m.error = format!(
                    "{source} was lost: restored on {target} from snapshot {} of {}",
                    point.short_id, point.time
                );
            }
            m.restored = restored.clone();
        })?;
        Ok(MovePhase::Restored)
    }

    /// Takes a tenant back to its source: first away from the target (confirmed by the
    /// target shredding its copy, so two copies never run), then delivered to the source.
    async fn roll_back(
        self: &Arc<Self>,
        source: &HostId,
        tenant: &TenantId,
        target: &HostId,
    ) -> Result<MovePhase, RollbackError> {
        let Some(record) = self.coordinator.placements.tenant_record(tenant) else {
            return Err(RollbackError::NotPlaced(tenant.clone()));
        };
        if record.host_id == *source {
            return Ok(MovePhase::RolledBack);
        }
        if record.host_id == *target {
            if !record.held {
                let applied = self.coordinator.placements.relocate(tenant, target, true)?;
                self.coordinator.durable(applied.seq).await?;
                self.coordinator
                    .await_delivery(target, applied.placement.generation, STOP_WAIT)
                    .await
                    .map_err(|source| RollbackError::NotStopped {
                        target: target.clone(),
                        source,
                    })?;
            }
            // Whatever the target received goes; a target that cannot say so never ran it
            // (it was held there), so the source may start it anyway.
            match (self.shred_copy(target, tenant).await, record.held) {
                (Ok(()), _) => {}
                (Err(_), true) => {
                    tracing::warn!(%tenant, %target, "partial copy on the target not deleted")
                }
                (Err(source), false) => {
                    return Err(RollbackError::NotReleased {
                        target: target.clone(),
                        source,
                    });
                }
            }
        }
        let applied = self
            .coordinator
            .placements
            .relocate(tenant, source, false)?;
        self.coordinator.durable(applied.seq).await?;
        tracing::info!(%tenant, %source, "move rolled back");
        Ok(MovePhase::RolledBack)
    }

    /// Waits until `tenant` runs on `host` at `generation` or later and passed its health check
    /// since it started there.
    async fn await_healthy(
        &self,
        tenant: &TenantId,
        host: &HostId,
        generation: u64,
    ) -> Result<(), MoveFailure> {
        let wait = self.coordinator.config.drain_start_timeout;
        let deadline = tokio::time::Instant::now() + wait;
        let mut last = proto::TenantStatus::default();
        let running = self
            .coordinator
            .placements
            .wait_for_report(deadline, crate::coordinator::RECHECK, || {
                let t = self.coordinator.placements.tenant(tenant)?;
                let status = t.status.unwrap_or_default();
                let placed = t.placement.unwrap_or_default();
                let done = placed.host_id == host.as_str()
                    && status.generation >= generation
                    && status.state == proto::TenantState::Running as i32
                    && status.healthy;
                last = status;
                done.then_some(())
            })
            .await;
        running.ok_or_else(|| {
            let state = match last.state == proto::TenantState::Running as i32 {
                true => "running but not healthy",
                false => berth_shared::spec::tenant_state_name(last.state),
            };
            MoveFailure::Failed(format!(
                "not healthy on {host} within {wait:?}: {state} {}",
                last.message
            ))
        })
    }
}

/// Cancels a transfer at both ends when dropped while armed.
struct CancelOnDrop<'a> {
    agents: &'a dyn AgentLink,
    hosts: [&'a HostId; 2],
    transfer_id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            for host in self.hosts {
                self.agents.cancel_transfer(host, self.transfer_id);
            }
        }
    }
}
