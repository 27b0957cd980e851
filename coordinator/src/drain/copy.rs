//! A drain's volume copies as the coordinator sees them: the source agent pushes the tenant's
//! volume straight to the target agent's transfer port; the coordinator only names the two
//! ends and follows the copy.
//!
//! Ensures: each transfer has a fresh id and a fresh random token, which reach only the two
//! hosts over their own sessions (the target accepts the stream only from the source it was
//! told of, with that token); only the target may report the transfer's progress; progress
//! (bytes copied of the total, ETA) is visible while the copy runs; a transfer is forgotten
//! when its owner is done with it, however that happens.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use berth_shared::ids::HostId;
use berth_shared::proto;

/// The bytes of a transfer's token.
const TOKEN_BYTES: usize = 32;

/// How far a transfer got.
#[derive(Debug)]
pub struct Progress {
    pub copied: AtomicU64,
    pub total: AtomicU64,
    pub started: Instant,
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

/// The open transfers: each one's target host (the only one that reports on it).
#[derive(Debug, Default)]
pub struct Transfers {
    next: AtomicU64,
    open: Mutex<HashMap<u64, (HostId, Arc<Progress>)>>,
}

/// An open transfer; closed when dropped.
#[derive(Debug)]
pub struct TransferGuard<'a> {
    transfers: &'a Transfers,
    pub id: u64,
    pub token: zeroize::Zeroizing<Vec<u8>>,
    pub progress: Arc<Progress>,
}

impl Drop for TransferGuard<'_> {
    fn drop(&mut self) {
        self.transfers
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Transfers {
    /// Opens a transfer to `target`.
    pub fn open(&self, target: &HostId) -> TransferGuard<'_> {
        let sequence = self.next.fetch_add(1, Ordering::Relaxed) & 0xfffff;
        let now = berth_shared::clock::Clock::now_unix_ms(&berth_shared::clock::SystemClock);
        // Unique across coordinator restarts too, so a late stream of an old transfer never
        // passes for a new one.
        let id = ((now as u64) << 20) | sequence;
        let progress = Arc::new(Progress {
            copied: AtomicU64::new(0),
            total: AtomicU64::new(0),
            started: Instant::now(),
        });
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (target.clone(), progress.clone()));
        TransferGuard {
            transfers: self,
            id,
            token: zeroize::Zeroizing::new(rand::random::<[u8; TOKEN_BYTES]>().to_vec()),
            progress,
        }
    }

    /// Takes `host`'s report on a transfer; `false` (and nothing changed) unless it is an
    /// open transfer to `host`.
    pub fn record_progress(&self, host: &HostId, report: &proto::VolumeProgress) -> bool {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        match open.get(&report.transfer_id) {
            Some((target, progress)) if target == host => {
                progress.total.store(report.data_bytes, Ordering::Relaxed);
                progress
                    .copied
                    .store(report.received_bytes, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_target_reports_an_open_transfer_and_each_has_its_own_token() {
        let transfers = Transfers::default();
        let (a, b) = (HostId::new("a").unwrap(), HostId::new("b").unwrap());
        let guard = transfers.open(&b);
        let other = transfers.open(&b);
        assert_ne!(guard.id, other.id);
        assert_eq!(guard.token.len(), TOKEN_BYTES);
        assert_ne!(*guard.token, *other.token);
        let report = proto::VolumeProgress {
            transfer_id: guard.id,
            data_bytes: 100,
            received_bytes: 40,
        };
        assert!(!transfers.record_progress(&a, &report), "not the target");
        assert_eq!(guard.progress.copied.load(Ordering::Relaxed), 0);
        assert!(transfers.record_progress(&b, &report));
        assert_eq!(guard.progress.copied.load(Ordering::Relaxed), 40);
        assert_eq!(guard.progress.total.load(Ordering::Relaxed), 100);
        let id = guard.id;
        drop(guard);
        let late = proto::VolumeProgress {
            transfer_id: id,
            ..report
        };
        assert!(
            !transfers.record_progress(&b, &late),
            "closed with its guard"
        );
    }

    #[test]
    fn the_eta_follows_the_rate_so_far() {
        let progress = Progress {
            copied: AtomicU64::new(25),
            total: AtomicU64::new(100),
            started: Instant::now() - std::time::Duration::from_secs(1),
        };
        let eta = progress.eta_ms();
        assert!((2900..=3100).contains(&eta), "{eta}");
        progress.copied.store(100, Ordering::Relaxed);
        assert_eq!(progress.eta_ms(), 0);
    }
}
