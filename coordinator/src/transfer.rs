//! The relay of a drain's volume copies: the source agent streams a tenant's volume in, the
//! target agent streams it out, each over its own mTLS session.
//!
//! Ensures: a transfer is opened by the coordinator for one tenant between two named hosts,
//! and only the source host may send it and only the target host may receive it, each once;
//! the stream is passed through as it is (ciphertext for an encrypted volume) with bounded
//! buffering, and its progress (bytes copied of the total) is visible while it runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use berth_shared::ids::{HostId, TenantId};
use berth_shared::proto::{self, volume_chunk::Body};
use tokio::sync::mpsc;
use tonic::Status;

/// Chunks (of up to 1 MiB) buffered between the two agents.
const RELAY_CHUNKS: usize = 8;

/// How far a transfer got.
#[derive(Debug)]
pub struct Progress {
    pub copied: AtomicU64,
    pub total: AtomicU64,
    pub started: Instant,
    /// Its owner gave up (an abort, a deadline): the relay stops at the next chunk.
    pub abandoned: std::sync::atomic::AtomicBool,
}

impl Progress {
    /// Milliseconds left at the rate so far; 0 when not known yet.
    pub fn eta_ms(&self) -> u64 {
        let (copied, total) = (
            self.copied.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        let elapsed = self.started.elapsed().as_millis() as u64;
        if copied == 0 || elapsed == 0 || copied >= total {
            return 0;
        }
        (total - copied).saturating_mul(elapsed) / copied
    }
}

type ChunkSender = mpsc::Sender<Result<proto::VolumeChunk, Status>>;
type ChunkReceiver = mpsc::Receiver<Result<proto::VolumeChunk, Status>>;

#[derive(Debug)]
struct Slot {
    tenant: TenantId,
    source: HostId,
    target: HostId,
    sender: Option<ChunkSender>,
    receiver: Option<ChunkReceiver>,
    progress: Arc<Progress>,
}

/// The open transfers.
#[derive(Debug, Default)]
pub struct Transfers {
    next: AtomicU64,
    slots: Mutex<HashMap<u64, Slot>>,
}

/// Closes a transfer when its owner is done with it, however that happens.
#[derive(Debug)]
pub struct TransferGuard<'a> {
    transfers: &'a Transfers,
    pub id: u64,
    pub progress: Arc<Progress>,
}

impl Drop for TransferGuard<'_> {
    fn drop(&mut self) {
        self.progress.abandoned.store(true, Ordering::Relaxed);
        self.transfers
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Transfers {
    /// Opens a transfer of `tenant`'s volume from `source` to `target`.
    pub fn open(&self, tenant: &TenantId, source: &HostId, target: &HostId) -> TransferGuard<'_> {
        let sequence = self.next.fetch_add(1, Ordering::Relaxed) & 0xfffff;
        let now = berth_shared::clock::Clock::now_unix_ms(&berth_shared::clock::SystemClock);
        let id = ((now as u64) << 20) | sequence;
        let (sender, receiver) = mpsc::channel(RELAY_CHUNKS);
        let progress = Arc::new(Progress {
            copied: AtomicU64::new(0),
            total: AtomicU64::new(0),
            started: Instant::now(),
            abandoned: Default::default(),
        });
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Slot {
                tenant: tenant.clone(),
                source: source.clone(),
                target: target.clone(),
                sender: Some(sender),
                receiver: Some(receiver),
                progress: progress.clone(),
            },
        );
        TransferGuard {
            transfers: self,
            id,
            progress,
        }
    }

    /// The source's side: checks the header against the transfer and takes its sending end.
    fn take_sender(
        &self,
        host: &HostId,
        header: &proto::VolumeStreamHeader,
    ) -> Result<(ChunkSender, Arc<Progress>), Status> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .get_mut(&header.transfer_id)
            .ok_or_else(|| Status::not_found(format!("no open transfer {}", header.transfer_id)))?;
        if slot.source != *host || slot.tenant.as_str() != header.tenant_id {
            return Err(Status::permission_denied(format!(
                "transfer {} is not {host}'s to send for tenant {:?}",
                header.transfer_id,
                header.tenant_id.chars().take(64).collect::<String>()
            )));
        }
        let sender = slot.sender.take().ok_or_else(|| {
            Status::already_exists(format!("transfer {} is already sent", header.transfer_id))
        })?;
        slot.progress
            .total
            .store(header.data_bytes, Ordering::Relaxed);
        Ok((sender, slot.progress.clone()))
    }

    /// The target's side: takes the receiving end of a transfer addressed to `host`.
    pub fn take_receiver(&self, host: &HostId, transfer_id: u64) -> Result<ChunkReceiver, Status> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .get_mut(&transfer_id)
            .ok_or_else(|| Status::not_found(format!("no open transfer {transfer_id}")))?;
        if slot.target != *host {
            return Err(Status::permission_denied(format!(
                "transfer {transfer_id} is not addressed to {host}"
            )));
        }
        slot.receiver.take().ok_or_else(|| {
            Status::already_exists(format!("transfer {transfer_id} is already received"))
        })
    }

    /// Relays a source agent's stream to the target; returns the data bytes passed.
    pub async fn relay(
        &self,
        host: &HostId,
        mut inbound: tonic::Streaming<proto::VolumeChunk>,
    ) -> Result<u64, Status> {
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("volume stream: empty"))?;
        let Some(Body::Header(header)) = &first.body else {
            return Err(Status::invalid_argument(
                "volume stream: the first chunk must be the header",
            ));
        };
        let (sender, progress) = self.take_sender(host, header)?;
        let gone = || Status::cancelled("the receiving host went away");
        sender.send(Ok(first)).await.map_err(|_| gone())?;
        let mut passed = 0u64;
        loop {
            match inbound.message().await {
                Ok(Some(_)) if progress.abandoned.load(Ordering::Relaxed) => {
                    let status = Status::aborted("the transfer was abandoned (drain stopped)");
                    let _ = sender.send(Err(status.clone())).await;
                    return Err(status);
                }
                Ok(Some(chunk)) => {
                    if let Some(Body::Data(d)) = &chunk.body {
                        passed += d.data.len() as u64;
                        progress.copied.store(passed, Ordering::Relaxed);
                    }
                    sender.send(Ok(chunk)).await.map_err(|_| gone())?;
                }
                Ok(None) => return Ok(passed),
                Err(status) => {
                    // The receiver learns the stream broke rather than seeing it end.
                    let _ = sender
                        .send(Err(Status::aborted(format!(
                            "the sending host's stream broke: {}",
                            status.message()
                        ))))
                        .await;
                    return Err(status);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(transfer_id: u64, tenant: &str) -> proto::VolumeStreamHeader {
        proto::VolumeStreamHeader {
            transfer_id,
            tenant_id: tenant.into(),
            layout: proto::VolumeLayout::PlainDirectory as i32,
            data_bytes: 100,
            ..Default::default()
        }
    }

    #[test]
    fn only_the_named_hosts_send_and_receive_a_transfer_and_each_once() {
        let transfers = Transfers::default();
        let (a, b, c) = (
            HostId::new("a").unwrap(),
            HostId::new("b").unwrap(),
            HostId::new("c").unwrap(),
        );
        let tenant = TenantId::new("acme").unwrap();
        let guard = transfers.open(&tenant, &a, &b);
        let id = guard.id;
        let err = transfers.take_sender(&c, &header(id, "acme")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let err = transfers.take_sender(&a, &header(id, "other")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            transfers.take_receiver(&a, id).unwrap_err().code(),
            tonic::Code::PermissionDenied,
            "the source cannot receive its own transfer"
        );
        let (_sender, progress) = transfers.take_sender(&a, &header(id, "acme")).unwrap();
        assert_eq!(progress.total.load(Ordering::Relaxed), 100);
        assert_eq!(
            transfers
                .take_sender(&a, &header(id, "acme"))
                .unwrap_err()
                .code(),
            tonic::Code::AlreadyExists
        );
        transfers.take_receiver(&b, id).unwrap();
        assert_eq!(
            transfers.take_receiver(&b, id).unwrap_err().code(),
            tonic::Code::AlreadyExists
        );
        drop(guard);
        assert_eq!(
            transfers.take_receiver(&b, id).unwrap_err().code(),
            tonic::Code::NotFound,
            "closed with its guard"
        );
    }

    #[test]
    fn the_eta_follows_the_rate_so_far() {
        let progress = Progress {
            copied: AtomicU64::new(25),
            total: AtomicU64::new(100),
            started: Instant::now() - std::time::Duration::from_secs(1),
            abandoned: Default::default(),
        };
        let eta = progress.eta_ms();
        assert!((2900..=3100).contains(&eta), "{eta}");
        progress.copied.store(100, Ordering::Relaxed);
        assert_eq!(progress.eta_ms(), 0);
    }
}
