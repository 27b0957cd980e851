//! A recording backup engine: restores write the files it is given (or fail after them), every
//! call is recorded as a line.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use berth_shared::ids::TenantId;
use berth_shared::store::StoreError;

use crate::backup::{BackupAccess, BackupRecord, BackupSource, Restored};
use crate::backup::{BackupEngine, BackupError, BackupKey, BackupSummary, Retention, Snapshot};

/// A tenant's spec as an agent receives it: image `img:1`, 128 MiB.
pub fn spec(id: &str) -> berth_shared::spec::TenantSpec {
    berth_shared::spec::TenantSpec::from_resolved(berth_shared::proto::TenantSpec {
        tenant_id: id.into(),
        image: "img:1".into(),
        resources: Some(berth_shared::proto::Resources {
            memory_bytes: 128 << 20,
            cpu_millicores: 100,
            cpu_limit_millicores: 0,
            volume_bytes: 0,
        }),
        ..Default::default()
    })
    .unwrap()
}

/// Backup access for every tenant (or none), restore marks in memory.
#[derive(Debug, Default)]
pub struct FakeBackupSource {
    pub access: std::sync::atomic::AtomicBool,
    pub marks: Mutex<HashMap<TenantId, Restored>>,
    pub records: Mutex<HashMap<TenantId, BackupRecord>>,
}

impl BackupSource for FakeBackupSource {
    fn backup_access(&self, tenant: &TenantId) -> Option<BackupAccess> {
        let held = self.access.load(std::sync::atomic::Ordering::SeqCst);
        held.then(|| BackupAccess {
            repository: format!("/repo/{tenant}"),
            key: BackupKey::new(vec![7; 32]),
        })
    }
    fn restored(&self, tenant: &TenantId) -> Option<Restored> {
        self.marks.lock().unwrap().get(tenant).cloned()
    }
    fn record_restored(&self, tenant: &TenantId, r: &Restored) -> Result<(), StoreError> {
        self.marks.lock().unwrap().insert(tenant.clone(), r.clone());
        Ok(())
    }
    fn last_backup(&self, tenant: &TenantId) -> Option<BackupRecord> {
        self.records.lock().unwrap().get(tenant).cloned()
    }
    fn record_backup(&self, tenant: &TenantId, r: &BackupRecord) -> Result<(), StoreError> {
        self.records
            .lock()
            .unwrap()
            .insert(tenant.clone(), r.clone());
        Ok(())
    }
}

/// Restores by writing the files it was given into the target, or fails; records each call.
#[derive(Debug, Default)]
pub struct FakeEngine {
    /// What a restore writes into its target.
    pub files: Vec<(&'static str, &'static str)>,
    /// Restores fail (after writing the files).
    pub fail: bool,
    /// What a listing answers.
    pub snapshots: Vec<Snapshot>,
    /// Each call, as a line.
    pub calls: Mutex<Vec<String>>,
}

impl BackupEngine for FakeEngine {
    fn ensure_repository(&self, repository: &str, _: &BackupKey) -> Result<bool, BackupError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("ensure {repository}"));
        Ok(false)
    }

    fn backup(
        &self,
        repository: &str,
        _: &BackupKey,
        volume: &Path,
    ) -> Result<BackupSummary, BackupError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("backup {repository} {}", volume.display()));
        Ok(BackupSummary {
            snapshot_id: "cabe28d5".into(),
            ..BackupSummary::default()
        })
    }

    fn snapshots(&self, _: &str, _: &BackupKey) -> Result<Vec<Snapshot>, BackupError> {
        Ok(self.snapshots.clone())
    }

    fn restore(
        &self,
        repository: &str,
        _: &BackupKey,
        id: &str,
        into: &Path,
    ) -> Result<(), BackupError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("restore {repository} {id} {}", into.display()));
        assert_eq!(
            std::fs::read_dir(into).unwrap().count(),
            0,
            "an empty target"
        );
        for (name, text) in &self.files {
            let file = into.join(name);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
        }
        if self.fail {
            return Err(BackupError::Output {
                action: "restore",
                repository: repository.into(),
                message: "cut short".into(),
            });
        }
        Ok(())
    }

    fn forget(&self, repository: &str, _: &BackupKey, r: Retention) -> Result<(), BackupError> {
        self.calls.lock().unwrap().push(format!(
            "forget {repository} daily {} weekly {}",
            r.keep_daily, r.keep_weekly
        ));
        Ok(())
    }

    fn forget_all(&self, _: &str, _: &BackupKey) -> Result<usize, BackupError> {
        Ok(0)
    }

    fn dump(
        &self,
        repository: &str,
        _: &BackupKey,
        id: &str,
        out: &mut dyn std::io::Write,
    ) -> Result<u64, BackupError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("dump {repository} {id}"));
        let tar = format!("tar of {id}");
        out.write_all(tar.as_bytes()).map_err(|e| BackupError::Io {
            path: repository.into(),
            source: e,
        })?;
        Ok(tar.len() as u64)
    }
}
