//! The agent's copy of its desired state, kept in its own store so that it survives agent
//! restarts and coordinator outages.
//!
//! Ensures: a desired state older than the applied one is refused (fencing); a desired state
//! with any invalid tenant is refused whole and changes nothing; an accepted one is on disk
//! before it is acknowledged.

use std::path::Path;

use berth_shared::field::FieldError;
use berth_shared::ids::TenantId;
use berth_shared::proto;
use berth_shared::spec::TenantSpec;
use berth_shared::store::{Durability, Store, StoreError, Write, decode, encode};
use serde::{Deserialize, Serialize};

use crate::backup::{BackupRecord, Restored};

mod record_file;
pub use record_file::RecordFile;

const KEY: &str = "desired";
/// Per tenant, the last restore this host did of its volume.
const RESTORED_PREFIX: &str = "restored/";
/// Per tenant, how its last backup on this host went.
const BACKUP_PREFIX: &str = "backup/";

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("desired state generation {got} is older than the applied generation {applied}")]
    Stale { got: u64, applied: u64 },
    #[error("tenants[{index}]: {error}")]
    Invalid { index: usize, error: FieldError },
    #[error("staged[{index}]: {error}")]
    InvalidStaged { index: usize, error: FieldError },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub generation: u64,
    pub tenants: Vec<TenantSpec>,
    /// Made ready (image, network, egress rules) but not run: their volume is on its way.
    #[serde(default)]
    pub staged: Vec<TenantSpec>,
}

#[derive(Debug)]
pub struct DesiredStore {
    store: Box<dyn Store>,
    current: Desired,
}

impl DesiredStore {
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        Self::with_store(Box::new(RecordFile::open(state_dir)?))
    }

    pub fn with_store(store: Box<dyn Store>) -> Result<Self, StoreError> {
        let current = match store.get(KEY)? {
            Some(bytes) => decode(KEY, &bytes)?,
            None => Desired::default(),
        };
        Ok(Self { store, current })
    }

    pub fn current(&self) -> &Desired {
        &self.current
    }

    /// The last restore this host did of `tenant`'s volume.
    pub fn restored(&self, tenant: &TenantId) -> Result<Option<Restored>, StoreError> {
        self.tenant_record(RESTORED_PREFIX, tenant)
    }

    /// Records a restore of `tenant`'s volume, on disk before it returns.
    pub fn record_restored(
        &self,
        tenant: &TenantId,
        restored: &Restored,
    ) -> Result<(), StoreError> {
        self.put_tenant_record(RESTORED_PREFIX, tenant, restored)
    }

    /// How the last backup of `tenant`'s volume on this host went.
    pub fn last_backup(&self, tenant: &TenantId) -> Result<Option<BackupRecord>, StoreError> {
        self.tenant_record(BACKUP_PREFIX, tenant)
    }

    /// Records a backup attempt of `tenant`'s volume, on disk before it returns.
    pub fn record_backup(
        &self,
        tenant: &TenantId,
        record: &BackupRecord,
    ) -> Result<(), StoreError> {
        self.put_tenant_record(BACKUP_PREFIX, tenant, record)
    }

    fn tenant_record<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
        tenant: &TenantId,
    ) -> Result<Option<T>, StoreError> {
        let key = format!("{prefix}{tenant}");
        self.store
            .get(&key)?
            .map(|bytes| decode(&key, &bytes))
            .transpose()
    }

    fn put_tenant_record<T: Serialize>(
        &self,
        prefix: &str,
        tenant: &TenantId,
        value: &T,
    ) -> Result<(), StoreError> {
        self.store.apply(
            vec![Write::Put(format!("{prefix}{tenant}"), encode(value))],
            Durability::Flushed,
        )
    }

    /// Validates and stores a desired state from the coordinator.
    pub fn accept(&mut self, desired: proto::DesiredState) -> Result<(), AcceptError> {
        if desired.generation < self.current.generation {
            return Err(AcceptError::Stale {
                got: desired.generation,
                applied: self.current.generation,
            });
        }
        let tenants = desired
            .tenants
            .into_iter()
            .enumerate()
            .map(|(index, t)| {
                TenantSpec::from_resolved(t).map_err(|error| AcceptError::Invalid { index, error })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let staged = desired
            .staged
            .into_iter()
            .enumerate()
            .map(|(index, t)| {
                TenantSpec::from_resolved(t)
                    .map_err(|error| AcceptError::InvalidStaged { index, error })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let next = Desired {
            generation: desired.generation,
            tenants,
            staged,
        };
        self.store.apply(
            vec![Write::Put(KEY.into(), encode(&next))],
            Durability::Flushed,
        )?;
        self.current = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_shared::store::MemStore;

    fn tenant(id: &str, memory: u64) -> proto::TenantSpec {
        proto::TenantSpec {
            tenant_id: id.into(),
            image: "ghcr.io/openclaw/gateway:1".into(),
            resources: Some(proto::Resources {
                memory_bytes: memory,
                cpu_millicores: 500,
                cpu_limit_millicores: 0,
                volume_bytes: 1 << 30,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn fencing_refuses_older_generations() {
        let mut d = DesiredStore::with_store(Box::new(MemStore::default())).unwrap();
        d.accept(proto::DesiredState {
            generation: 5,
            tenants: vec![tenant("a", 256 << 20)],
            staged: vec![],
        })
        .unwrap();
        let err = d
            .accept(proto::DesiredState {
                generation: 4,
                tenants: vec![],
                staged: vec![],
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "desired state generation 4 is older than the applied generation 5"
        );
        assert_eq!(d.current().tenants.len(), 1, "nothing changed");
        d.accept(proto::DesiredState {
            generation: 5,
            tenants: vec![tenant("a", 256 << 20)],
            staged: vec![],
        })
        .expect("the same generation again is fine");
    }

    #[test]
    fn one_bad_tenant_refuses_the_whole_state() {
        let mut d = DesiredStore::with_store(Box::new(MemStore::default())).unwrap();
        let err = d
            .accept(proto::DesiredState {
                generation: 2,
                tenants: vec![
                    tenant("a", 256 << 20),
                    tenant("b", 1 << 20),
                    tenant("Bad", 1 << 30),
                ],
                staged: vec![],
            })
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "tenants[1]: invalid resources.memory_bytes: 1048576 bytes is below the minimum of 64 MiB"
        );
        assert_eq!(d.current(), &Desired::default());
        let mut bad_image = tenant("c", 1 << 30);
        bad_image.image = "Not An Image".into();
        assert!(
            d.accept(proto::DesiredState {
                generation: 3,
                tenants: vec![bad_image],
                staged: vec![],
            })
            .unwrap_err()
            .to_string()
            .starts_with("tenants[0]: invalid image")
        );
    }

    #[test]
    fn survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut d = DesiredStore::open(dir.path()).unwrap();
            d.accept(proto::DesiredState {
                generation: 9,
                tenants: vec![tenant("a", 256 << 20)],
                staged: vec![],
            })
            .unwrap();
        }
        let d = DesiredStore::open(dir.path()).unwrap();
        assert_eq!(d.current().generation, 9);
        assert_eq!(d.current().tenants[0].tenant_id.as_str(), "a");
    }
}
