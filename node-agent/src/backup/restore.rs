//! Restores that the desired state asks for (`berthctl restore`, or a lost host's tenant
//! started here by a drain): the tenant's volume is filled from its backups after it is opened
//! and before its container starts.
//!
//! Ensures: a restore is done at most once per request id on this host: its mark is durable in
//! the agent's store only after the contents were swapped in, so a crash in between restores
//! again (from the same snapshot) rather than never; a request waits (the container does not
//! start) until the coordinator delivered the tenant's backup access, and a failed restore
//! leaves the container stopped with restic's reason, never started on an empty volume; "the
//! latest snapshot" is resolved here, against the repository, and the snapshot restored is
//! what the mark and the tenant's status name.

use std::path::Path;
use std::sync::Arc;

use berth_shared::spec::TenantSpec;
use berth_shared::store::StoreError;

use super::{BackupEngine, BackupError, BackupSource, RepositoryLocks, Restored, restore_volume};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Not a failure: the coordinator delivers backup access with the volume keys.
    #[error("waiting for its backup access from the coordinator, to restore its volume")]
    WaitingForAccess,
    /// The snapshot asked for is not in the repository.
    #[error("restore: no snapshot {wanted} in {repository}")]
    NoSnapshot { wanted: String, repository: String },
    #[error("restore: {0}")]
    Backup(#[from] BackupError),
    /// The restore was done, but its mark could not be written (it is done again).
    #[error("restore: done, but not recorded: {0}")]
    Mark(#[from] StoreError),
}

/// Carries out the restores the desired state asks for.
#[derive(Debug, Clone)]
pub struct Restorer {
    pub engine: Arc<dyn BackupEngine>,
    pub source: Arc<dyn BackupSource>,
    pub locks: RepositoryLocks,
}

impl Restorer {
    /// Whether `spec` asks for a restore this host has not done.
    pub fn pending(&self, spec: &TenantSpec) -> bool {
        spec.restore.as_ref().is_some_and(|r| {
            self.source
                .restored(&spec.tenant_id)
                .is_none_or(|done| done.id != r.id)
        })
    }

    /// Does the restore `spec` asks for into the mounted, unused volume at `volume`, unless
    /// it is done; the snapshot restored. Blocking: restic runs as long as the volume takes.
    pub fn restore(
        &self,
        spec: &TenantSpec,
        volume: &Path,
    ) -> Result<Option<Restored>, RestoreError> {
        let Some(request) = spec.restore.as_ref().filter(|_| self.pending(spec)) else {
            return Ok(None);
        };
        let tenant = &spec.tenant_id;
        let access = self
            .source
            .backup_access(tenant)
            .ok_or(RestoreError::WaitingForAccess)?;
        let repository = self.locks.of(tenant);
        let _held = repository.lock().unwrap_or_else(|p| p.into_inner());
        let snapshots = self.engine.snapshots(&access.repository, &access.key)?;
        let chosen = match &request.snapshot {
            // Listed oldest first.
            None => snapshots.last(),
            Some(id) => snapshots.iter().find(|s| s.id.starts_with(id.as_str())),
        };
        let snapshot = chosen.cloned().ok_or_else(|| RestoreError::NoSnapshot {
            wanted: request.snapshot.clone().unwrap_or_else(|| "at all".into()),
            repository: access.repository.clone(),
        })?;
        tracing::info!(%tenant, snapshot = %snapshot.short_id, time = %snapshot.time, "restoring the volume");
        restore_volume(
            self.engine.as_ref(),
            &access.repository,
            &access.key,
            &snapshot.id,
            volume,
        )?;
        let restored = Restored {
            id: request.id,
            snapshot,
        };
        self.source.record_restored(tenant, &restored)?;
        tracing::info!(%tenant, snapshot = %restored.snapshot.short_id, "volume restored");
        Ok(Some(restored))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::Snapshot;
    use crate::testing::backup::{FakeBackupSource as Source, FakeEngine};
    use berth_shared::spec::Restore;

    fn snapshot(id: &str, time: &str) -> Snapshot {
        Snapshot {
            id: id.repeat(8),
            short_id: id.into(),
            time: time.into(),
        }
    }

    fn spec(restore: Option<Restore>) -> TenantSpec {
        let mut spec = crate::testing::backup::spec("acme");
        spec.restore = restore;
        spec
    }

    fn restorer(access: bool) -> (Restorer, Arc<FakeEngine>, Arc<Source>) {
        let engine = Arc::new(FakeEngine {
            files: vec![("notes.txt", "from the backup")],
            snapshots: vec![
                snapshot("aaaaaaaa", "2026-12-01T03:00:00Z"),
                snapshot("bbbbbbbb", "2026-12-02T03:00:00Z"),
            ],
            ..FakeEngine::default()
        });
        let source = Arc::new(Source {
            access: access.into(),
            ..Source::default()
        });
        let restorer = Restorer {
            engine: engine.clone(),
            source: source.clone(),
            locks: RepositoryLocks::default(),
        };
        (restorer, engine, source)
    }

    #[test]
    fn the_latest_snapshot_is_restored_once_per_request() {
        let volume = tempfile::tempdir().unwrap();
        std::fs::write(volume.path().join("notes.txt"), "written after").unwrap();
        let (restorer, engine, _) = restorer(true);
        let asked = spec(Some(Restore {
            id: 9,
            snapshot: None,
        }));
        assert!(restorer.pending(&asked));
        let done = restorer.restore(&asked, volume.path()).unwrap().unwrap();
        assert_eq!(done.id, 9);
        assert_eq!(done.snapshot.short_id, "bbbbbbbb", "the latest");
        assert_eq!(
            std::fs::read_to_string(volume.path().join("notes.txt")).unwrap(),
            "from the backup"
        );
        assert!(!restorer.pending(&asked));
        assert_eq!(restorer.restore(&asked, volume.path()).unwrap(), None);
        let restores = engine
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("restore "))
            .count();
        assert_eq!(restores, 1, "done once");
        // A new request (another id) is done again; none at all is nothing to do.
        let again = spec(Some(Restore {
            id: 10,
            snapshot: Some("aaaaaaaa".into()),
        }));
        assert!(restorer.pending(&again));
        let done = restorer.restore(&again, volume.path()).unwrap().unwrap();
        assert_eq!(done.snapshot.short_id, "aaaaaaaa");
        assert!(!restorer.pending(&spec(None)));
    }

    #[test]
    fn without_access_or_a_snapshot_nothing_is_restored_or_marked() {
        let volume = tempfile::tempdir().unwrap();
        std::fs::write(volume.path().join("notes.txt"), "live").unwrap();
        let (restorer, engine, source) = restorer(false);
        let asked = spec(Some(Restore {
            id: 3,
            snapshot: None,
        }));
        assert!(matches!(
            restorer.restore(&asked, volume.path()),
            Err(RestoreError::WaitingForAccess)
        ));
        let (restorer, _, _) = self::restorer(true);
        let missing = spec(Some(Restore {
            id: 4,
            snapshot: Some("cccccccc".into()),
        }));
        let err = restorer.restore(&missing, volume.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "restore: no snapshot cccccccc in /repo/acme"
        );
        assert!(engine.calls.lock().unwrap().is_empty());
        assert!(source.marks.lock().unwrap().is_empty());
        assert_eq!(
            std::fs::read_to_string(volume.path().join("notes.txt")).unwrap(),
            "live"
        );
    }

    #[test]
    fn a_failed_restore_keeps_the_volume_and_leaves_the_request_pending() {
        let volume = tempfile::tempdir().unwrap();
        std::fs::write(volume.path().join("notes.txt"), "live").unwrap();
        let (mut restorer, _, source) = restorer(true);
        restorer.engine = Arc::new(FakeEngine {
            files: vec![("notes.txt", "half")],
            snapshots: vec![snapshot("aaaaaaaa", "2026-12-01T03:00:00Z")],
            fail: true,
            ..FakeEngine::default()
        });
        let asked = spec(Some(Restore {
            id: 5,
            snapshot: None,
        }));
        assert!(matches!(
            restorer.restore(&asked, volume.path()),
            Err(RestoreError::Backup(_))
        ));
        assert!(restorer.pending(&asked));
        assert!(source.marks.lock().unwrap().is_empty());
        assert_eq!(
            std::fs::read_to_string(volume.path().join("notes.txt")).unwrap(),
            "live"
        );
    }
}
