//! Values that must never reach swap or a core dump: volume keys, the master key.
//!
//! Ensures: a [`Locked`] value lives in memory pages of its own, left out of core dumps
//! (`MADV_DONTDUMP`) and locked in memory (`mlock`) so they are never written to swap;
//! dropped, the value is dropped in place and its pages are zeroed before they are unmapped.
//! Where the memlock limit refuses the lock, the value is kept anyway, still out of dumps, and
//! [`Locked::is_locked`] says so.

use std::num::NonZeroUsize;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The pages for a secret could not be mapped.
    #[error("cannot map memory for a secret: {0}")]
    Map(nix::Error),
    /// The pages could not be left out of core dumps.
    #[error("cannot leave a secret's memory out of core dumps: {0}")]
    DontDump(nix::Error),
}

/// A value in locked pages of its own, out of core dumps, zeroed when dropped.
pub struct Locked<T> {
    value: NonNull<T>,
    len: NonZeroUsize,
    locked: bool,
}

// SAFETY: `Locked<T>` owns its `T` as a `Box<T>` would; the pages are not shared.
#[allow(unsafe_code)]
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: as above; `&Locked<T>` only hands out `&T`.
#[allow(unsafe_code)]
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> std::fmt::Debug for Locked<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Locked(.., locked: {})", self.locked)
    }
}

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as usize)
}

impl<T> Locked<T> {
    /// Moves `value` into locked pages (the caller's copy is its own to clear: build secrets
    /// in place with [`Locked::new`] of a zeroed value, then write into it).
    pub fn new(value: T) -> Result<Self, SecretError> {
        assert!(
            std::mem::align_of::<T>() <= page_size(),
            "page-aligned memory holds any ordinary type"
        );
        let page = page_size();
        let bytes = std::mem::size_of::<T>().max(1).div_ceil(page) * page;
        let len = NonZeroUsize::new(bytes).expect("at least one page");
        // SAFETY: a fresh private anonymous mapping, aliasing nothing.
        #[allow(unsafe_code)]
        let pages = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .map_err(SecretError::Map)?;
        // SAFETY: `pages` is the mapping just made, `len` long.
        #[allow(unsafe_code)]
        let advised =
            unsafe { nix::sys::mman::madvise(pages, len.get(), MmapAdvise::MADV_DONTDUMP) };
        if let Err(e) = advised {
            // SAFETY: as above; nothing points into it yet.
            #[allow(unsafe_code)]
            let _ = unsafe { nix::sys::mman::munmap(pages, len.get()) };
            return Err(SecretError::DontDump(e));
        }
        // SAFETY: as above.
        #[allow(unsafe_code)]
        let locked = unsafe { nix::sys::mman::mlock(pages, len.get()) }.is_ok();
        let value_at = pages.cast::<T>();
        // SAFETY: the mapping is writable, page-aligned (so aligned for `T`) and at least
        // `size_of::<T>()` long.
        #[allow(unsafe_code)]
        unsafe {
            value_at.as_ptr().write(value)
        };
        Ok(Self {
            value: value_at,
            len,
            locked,
        })
    }

    /// Whether the pages are locked in memory (else the memlock limit refused it).
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Where the value lives (for tests that check its pages).
    pub fn address(&self) -> usize {
        self.value.as_ptr() as usize
    }
}

impl<T> std::ops::Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `value` was written in `new` and lives until `drop`.
        #[allow(unsafe_code)]
        unsafe {
            self.value.as_ref()
        }
    }
}

impl<T> std::ops::DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
        #[allow(unsafe_code)]
        unsafe {
            self.value.as_mut()
        }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        let pages = self.value.cast::<std::ffi::c_void>();
        // SAFETY: the value is dropped once, here; then its pages, still mapped and writable,
        // are zeroed through a slice over exactly the mapping, and unmapped.
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::drop_in_place(self.value.as_ptr());
            let bytes = std::slice::from_raw_parts_mut(pages.cast::<u8>().as_ptr(), self.len.get());
            zeroize::Zeroize::zeroize(bytes);
            if self.locked {
                let _ = nix::sys::mman::munlock(pages, self.len.get());
            }
            let _ = nix::sys::mman::munmap(pages, self.len.get());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` of the mapping holding `address`, from /proc/self/smaps.
    fn flags_at(address: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((from, to)) = range.split_once('-')
                && let (Ok(from), Ok(to)) = (
                    usize::from_str_radix(from, 16),
                    usize::from_str_radix(to, 16),
                )
            {
                inside = (from..to).contains(&address);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.split_whitespace().map(String::from).collect();
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    /// Whether this process holds CAP_IPC_LOCK (bit 14 of its effective capabilities).
    fn holds_ipc_lock() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << 14) != 0)
    }

    #[test]
    fn a_secret_lives_in_pages_out_of_core_dumps_and_locked_where_the_limit_allows() {
        let mut key = Locked::new([0u8; 32]).unwrap();
        key.copy_from_slice(&[7; 32]);
        assert_eq!(*key, [7; 32]);
        assert_eq!(key.address() % page_size(), 0, "a page of its own");
        let flags = flags_at(key.address());
        assert!(flags.contains(&"dd".to_string()), "not dumped: {flags:?}");
        assert_eq!(
            flags.contains(&"lo".to_string()),
            key.is_locked(),
            "locked as it says: {flags:?}"
        );
        if holds_ipc_lock() {
            assert!(
                key.is_locked(),
                "with CAP_IPC_LOCK no limit refuses the lock"
            );
        }
        assert!(!format!("{key:?}").contains('7'), "never printed");
        // A value larger than a page gets as many pages as it needs.
        let big = Locked::new([1u8; 10_000]).unwrap();
        assert!(big.iter().all(|&b| b == 1));
        assert!(flags_at(big.address() + 9_999).contains(&"dd".to_string()));
    }

    #[test]
    fn a_dropped_secret_is_dropped_in_place_once() {
        let counter = std::sync::Arc::new(());
        let held = Locked::new(counter.clone()).unwrap();
        assert_eq!(std::sync::Arc::strong_count(&counter), 2);
        drop(held);
        assert_eq!(std::sync::Arc::strong_count(&counter), 1);
    }
}
