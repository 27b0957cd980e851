//! Scheduled backups: each tenant's volume backed up by the host that runs it, on the
//! tenant's backup policy, with no coordinator in the loop (a coordinator that is down stops no
//! backup; the key it delivered is held in memory).
//!
//! Ensures: the backup of the night is made in the tenant's nightly restart while its
//! container is stopped (a snapshot of files nothing writes to: consistent as a clean shutdown
//! leaves them), when the last good one is at least three quarters of the interval old; between
//! restarts (an interval under a day, restarts off, or a restart skipped) a live backup is made
//! once the interval has passed (each file as it was when read), and after a failure it is tried
//! again after an hour at most; one tenant is never backed up twice at once, and live backups
//! run one at a time per host; every attempt is recorded (durably, in the agent's store) with
//! its outcome, and reported in the tenant's status; old snapshots are forgotten and pruned
//! with the tenant's retention at most once a day, after a good backup and outside the
//! restart's downtime.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_shared::clock::Clock;
use berth_shared::ids::TenantId;
use berth_shared::spec::TenantSpec;

use super::{BackupEngine, BackupError, BackupSource, BackupSummary, RepositoryLocks, Retention};

/// Where a tenant's open volume keeps its files, at the host boundary (mounts).
pub trait OpenVolumes: Send + Sync + std::fmt::Debug {
    fn contents(&self, tenant: &TenantId) -> std::io::Result<Option<PathBuf>>;
}

/// The longest a failed backup waits before it is tried again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(3600);
/// How often old snapshots are forgotten and pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(86400);

/// The host's scheduled backups.
#[derive(Debug, Clone)]
pub struct Backups {
    pub engine: Arc<dyn BackupEngine>,
    pub source: Arc<dyn BackupSource>,
    pub volumes: Arc<dyn OpenVolumes>,
    pub clock: Arc<dyn Clock>,
    pub locks: RepositoryLocks,
    /// Tenants being backed up now.
    under_way: Arc<Mutex<BTreeSet<TenantId>>>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Backups {
    pub fn new(
        engine: Arc<dyn BackupEngine>,
        source: Arc<dyn BackupSource>,
        volumes: Arc<dyn OpenVolumes>,
        clock: Arc<dyn Clock>,
        locks: RepositoryLocks,
    ) -> Self {
        Self {
            engine,
            source,
            volumes,
            clock,
            locks,
            under_way: Arc::default(),
        }
    }

    fn under_way(&self) -> std::sync::MutexGuard<'_, BTreeSet<TenantId>> {
        self.under_way.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the tenant is backed up at all here: its policy on, its access delivered.
    fn scheduled(&self, spec: &TenantSpec) -> bool {
        spec.backup.enabled && self.source.backup_access(&spec.tenant_id).is_some()
    }

    /// Whether its nightly restart backs it up while it is stopped: not while another restic
    /// holds its repository (an export of a snapshot, say), which would keep it down meanwhile;
    /// a live backup catches up later.
    pub fn due_in_restart(&self, spec: &TenantSpec) -> bool {
        if !self.scheduled(spec)
            || self.under_way().contains(&spec.tenant_id)
            || self.locks.busy(&spec.tenant_id)
        {
            return false;
        }
        let last_good = self
            .source
            .last_backup(&spec.tenant_id)
            .map_or(0, |r| r.last_good_unix_ms);
        self.clock.now_unix_ms() - last_good >= ms(spec.backup.interval) / 4 * 3
    }

    /// Whether it is backed up now, live: the interval has passed since its last good backup,
    /// and since its last attempt (after a failure, an hour at most).
    pub fn due_live(&self, spec: &TenantSpec) -> bool {
        if !self.scheduled(spec) || self.under_way().contains(&spec.tenant_id) {
            return false;
        }
        let Some(last) = self.source.last_backup(&spec.tenant_id) else {
            return true;
        };
        let now = self.clock.now_unix_ms();
        let interval = ms(spec.backup.interval);
        let retry = match last.ok {
            true => interval,
            false => interval.min(ms(RETRY_AFTER_FAILURE)),
        };
        now - last.last_good_unix_ms >= interval && now - last.unix_ms >= retry
    }

    /// Backs the tenant's open volume up now (blocking: restic takes as long as the volume
    /// does) and records the outcome; `stopped`: its container is stopped meanwhile.
    pub fn back_up(
        &self,
        spec: &TenantSpec,
        stopped: bool,
    ) -> Result<BackupSummary, ScheduledError> {
        let tenant = &spec.tenant_id;
        if !self.under_way().insert(tenant.clone()) {
            return Err(ScheduledError::UnderWay);
        }
        let outcome = {
            let repository = self.locks.of(tenant);
            let _held = repository.lock().unwrap_or_else(|p| p.into_inner());
            self.attempt(tenant)
        };
        self.under_way().remove(tenant);
        let before = self.source.last_backup(tenant).unwrap_or_default();
        let record = before.after(self.clock.now_unix_ms(), stopped, &outcome);
        match &outcome {
            Ok(s) => {
                tracing::info!(%tenant, snapshot = %s.snapshot_id, bytes_added = s.bytes_added, duration_ms = s.duration_ms, stopped, "scheduled backup made")
            }
            Err(e) => tracing::warn!(%tenant, error = %e, stopped, "scheduled backup failed"),
        }
        if let Err(e) = self.source.record_backup(tenant, &record) {
            tracing::warn!(%tenant, error = %e, "backup record not written");
        }
        Ok(outcome?)
    }

    fn attempt(&self, tenant: &TenantId) -> Result<BackupSummary, BackupError> {
        let access = self
            .source
            .backup_access(tenant)
            .ok_or(BackupError::NoAccess)?;
        let contents = self
            .volumes
            .contents(tenant)
            .map_err(|e| BackupError::Io {
                path: PathBuf::from(tenant.as_str()),
                source: e,
            })?
            .ok_or(BackupError::NotOpen)?;
        self.engine
            .ensure_repository(&access.repository, &access.key)?;
        self.engine
            .backup(&access.repository, &access.key, &contents)
    }

    /// Forgets the snapshots the tenant's retention does not keep and prunes their data, when
    /// its last good backup is newer than the last prune and that is a day old (blocking).
    pub fn prune_if_due(&self, spec: &TenantSpec) {
        let tenant = &spec.tenant_id;
        let (Some(mut record), Some(access)) = (
            self.source.last_backup(tenant),
            self.source.backup_access(tenant),
        ) else {
            return;
        };
        let now = self.clock.now_unix_ms();
        if record.last_good_unix_ms <= record.last_prune_unix_ms
            || now - record.last_prune_unix_ms < ms(PRUNE_EVERY)
        {
            return;
        }
        let retention = Retention {
            keep_daily: spec.backup.keep_daily,
            keep_weekly: spec.backup.keep_weekly,
        };
        let repository = self.locks.of(tenant);
        let held = repository.lock().unwrap_or_else(|p| p.into_inner());
        let forgotten = self
            .engine
            .forget(&access.repository, &access.key, retention);
        drop(held);
        match forgotten {
            Ok(()) => {
                tracing::info!(%tenant, keep_daily = retention.keep_daily, keep_weekly = retention.keep_weekly, "old snapshots forgotten and pruned");
                record.last_prune_unix_ms = now;
                if let Err(e) = self.source.record_backup(tenant, &record) {
                    tracing::warn!(%tenant, error = %e, "backup record not written");
                }
            }
            // Tried again after the next good backup.
            Err(e) => tracing::warn!(%tenant, error = %e, "forgetting old snapshots failed"),
        }
    }

    /// Starts the live backups that are due among `running` (one at a time per host): a task
    /// that backs up, then prunes.
    pub fn start_live(&self, running: &[&TenantSpec]) -> Option<tokio::task::JoinHandle<()>> {
        if !self.under_way().is_empty() {
            return None;
        }
        let spec = running.iter().find(|s| self.due_live(s))?;
        let (me, spec) = (self.clone(), (*spec).clone());
        Some(tokio::task::spawn_blocking(move || {
            if me.back_up(&spec, false).is_ok() {
                me.prune_if_due(&spec);
            }
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduledError {
    /// Another backup of the tenant runs.
    #[error("a backup of it is under way")]
    UnderWay,
    #[error(transparent)]
    Backup(#[from] BackupError),
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::testing::backup::{FakeBackupSource, FakeEngine};
    use berth_shared::clock::ManualClock;

    #[derive(Debug)]
    struct Dirs(PathBuf);

    impl OpenVolumes for Dirs {
        fn contents(&self, tenant: &TenantId) -> std::io::Result<Option<PathBuf>> {
            let dir = self.0.join(tenant.as_str());
            Ok(dir.is_dir().then_some(dir))
        }
    }

    const HOUR: i64 = 3_600_000;

    fn spec(id: &str, interval_hours: u64) -> TenantSpec {
        let mut spec = crate::testing::backup::spec(id);
        spec.backup.interval = Duration::from_secs(interval_hours * 3600);
        spec
    }

    fn backups(
        root: &std::path::Path,
    ) -> (
        Backups,
        Arc<FakeEngine>,
        Arc<FakeBackupSource>,
        Arc<ManualClock>,
    ) {
        let engine = Arc::new(FakeEngine::default());
        let source = Arc::new(FakeBackupSource::default());
        source.access.store(true, Ordering::SeqCst);
        let clock = Arc::new(ManualClock::at(1_000 * HOUR));
        let b = Backups::new(
            engine.clone(),
            source.clone(),
            Arc::new(Dirs(root.to_path_buf())),
            clock.clone(),
            RepositoryLocks::default(),
        );
        (b, engine, source, clock)
    }

    #[test]
    fn a_nightly_backup_comes_in_the_restart_and_a_live_one_once_the_interval_passed() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("acme")).unwrap();
        let (b, engine, source, clock) = backups(root.path());
        let acme = spec("acme", 24);
        // Never backed up: due both ways.
        assert!(b.due_in_restart(&acme) && b.due_live(&acme));
        let made = b.back_up(&acme, true).unwrap();
        assert_eq!(made.snapshot_id, "cabe28d5");
        let record = source.last_backup(&acme.tenant_id).unwrap();
        assert!(record.ok && record.stopped);
        assert_eq!(record.last_good_unix_ms, 1_000 * HOUR);
        assert_eq!(
            engine.calls.lock().unwrap().clone(),
            [
                "ensure /repo/acme".to_string(),
                format!("backup /repo/acme {}", root.path().join("acme").display())
            ]
        );
        // The next night (23 h later, its slot moving within the window) backs up again; a
        // live one waits for the whole interval.
        clock.advance_ms((17 * 3600) * 1000);
        assert!(!b.due_in_restart(&acme));
        clock.advance_ms((3600) * 1000);
        assert!(b.due_in_restart(&acme));
        assert!(!b.due_live(&acme));
        clock.advance_ms((6 * 3600) * 1000);
        assert!(b.due_live(&acme));
        // Not while another restic holds its repository (the restart would wait for it).
        let repository = b.locks.of(&acme.tenant_id);
        let held = repository.lock().unwrap();
        assert!(!b.due_in_restart(&acme));
        drop(held);
        assert!(b.due_in_restart(&acme));
        // Off, or without its access: never.
        let mut off = acme.clone();
        off.backup.enabled = false;
        assert!(!b.due_live(&off) && !b.due_in_restart(&off));
        source.access.store(false, Ordering::SeqCst);
        assert!(!b.due_live(&acme));
    }

    #[test]
    fn a_failed_backup_is_recorded_and_tried_again_within_the_hour() {
        let root = tempfile::tempdir().unwrap();
        let (b, _, source, clock) = backups(root.path());
        let acme = spec("acme", 24);
        // Its volume is not open: recorded as failed, with why.
        let err = b.back_up(&acme, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the volume is not open on this host (its tenant does not run here)"
        );
        let record = source.last_backup(&acme.tenant_id).unwrap();
        assert!(!record.ok && !record.stopped);
        assert_eq!(record.error, err.to_string());
        assert_eq!(record.last_good_unix_ms, 0);
        assert!(!b.due_live(&acme));
        clock.advance_ms((3600) * 1000);
        assert!(b.due_live(&acme));
    }

    #[test]
    fn old_snapshots_are_pruned_after_a_good_backup_at_most_daily() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("acme")).unwrap();
        let (b, engine, source, clock) = backups(root.path());
        let acme = spec("acme", 6);
        let forgets = || {
            engine
                .calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.starts_with("forget"))
                .count()
        };
        b.prune_if_due(&acme);
        assert_eq!(forgets(), 0, "nothing backed up yet");
        b.back_up(&acme, false).unwrap();
        b.prune_if_due(&acme);
        assert_eq!(forgets(), 1);
        assert_eq!(
            engine.calls.lock().unwrap().last().unwrap(),
            "forget /repo/acme daily 7 weekly 4"
        );
        clock.advance_ms((6 * 3600) * 1000);
        b.back_up(&acme, false).unwrap();
        b.prune_if_due(&acme);
        assert_eq!(forgets(), 1, "once a day");
        clock.advance_ms((18 * 3600) * 1000);
        b.back_up(&acme, false).unwrap();
        b.prune_if_due(&acme);
        assert_eq!(forgets(), 2);
        assert!(
            source
                .last_backup(&acme.tenant_id)
                .unwrap()
                .last_prune_unix_ms
                > 0
        );
    }
}
