//! Exports under way: a tenant's tar, uploaded by the host that makes it and streamed on to
//! the operator who asked.
//!
//! Ensures: an upload is taken only for an export this coordinator asked of that very host
//! (the id is random, and the uploading host must be the one asked); what a host uploads goes
//! to the operator with back-pressure (a slow operator slows the host's tar; an operator gone
//! ends the upload); an export is forgotten once it ended, however it ended.

use std::collections::HashMap;
use std::sync::Mutex;

use berth_shared::ids::{HostId, TenantId};
use tokio::sync::mpsc;

/// The next bytes of an export, or why it stopped.
pub type ExportData = Result<Vec<u8>, String>;

#[derive(Debug)]
struct Export {
    host: HostId,
    tenant: TenantId,
    data: mpsc::Sender<ExportData>,
}

/// Why an upload is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// No such export is under way.
    #[error("no export {0} is under way")]
    Unknown(u64),
    /// The export was asked of another host.
    #[error("export {id} was asked of another host, not {host}")]
    OtherHost { id: u64, host: HostId },
}

#[derive(Debug, Default)]
pub struct Exports {
    open: Mutex<HashMap<u64, Export>>,
}

impl Exports {
    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Export>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new export of `tenant` by `host`: its id and where its data comes out.
    pub fn start(&self, host: &HostId, tenant: &TenantId) -> (u64, mpsc::Receiver<ExportData>) {
        let (data, out) = mpsc::channel(4);
        let mut open = self.open();
        let id = loop {
            let id = rand::random::<u64>();
            if id != 0 && !open.contains_key(&id) {
                break id;
            }
        };
        open.insert(
            id,
            Export {
                host: host.clone(),
                tenant: tenant.clone(),
                data,
            },
        );
        (id, out)
    }

    /// Where `host`'s upload for export `id` goes, and whose files they are.
    pub fn upload(
        &self,
        id: u64,
        host: &HostId,
    ) -> Result<(TenantId, mpsc::Sender<ExportData>), UploadError> {
        let open = self.open();
        let export = open.get(&id).ok_or(UploadError::Unknown(id))?;
        if export.host != *host {
            return Err(UploadError::OtherHost {
                id,
                host: host.clone(),
            });
        }
        Ok((export.tenant.clone(), export.data.clone()))
    }

    /// Ends export `id` (with `error` for the operator, if it failed, after what was sent).
    pub async fn finish(&self, id: u64, error: Option<String>) {
        let export = self.open().remove(&id);
        if let (Some(export), Some(error)) = (export, error) {
            let _ = export.data.send(Err(error)).await;
        }
    }

    pub fn under_way(&self) -> usize {
        self.open().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_host_asked_uploads_and_an_ended_export_is_forgotten() {
        let exports = Exports::default();
        let (a, b) = (HostId::new("a").unwrap(), HostId::new("b").unwrap());
        let acme = TenantId::new("acme").unwrap();
        let (id, mut out) = exports.start(&a, &acme);
        assert_eq!(
            exports.upload(id, &b).unwrap_err(),
            UploadError::OtherHost {
                id,
                host: b.clone()
            }
        );
        assert_eq!(
            exports.upload(id ^ 1, &a).unwrap_err(),
            UploadError::Unknown(id ^ 1)
        );
        let (tenant, data) = exports.upload(id, &a).unwrap();
        assert_eq!(tenant, acme);
        data.send(Ok(b"tar".to_vec())).await.unwrap();
        drop(data);
        exports
            .finish(id, Some("restic dump: wrong password".into()))
            .await;
        assert_eq!(out.recv().await, Some(Ok(b"tar".to_vec())));
        assert_eq!(
            out.recv().await,
            Some(Err("restic dump: wrong password".into()))
        );
        assert_eq!(out.recv().await, None, "ended");
        assert_eq!(exports.under_way(), 0);
        assert!(exports.upload(id, &a).is_err());
    }
}
