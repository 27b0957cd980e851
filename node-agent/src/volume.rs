//! One tenant's encrypted volume on this host: a sparse backing file under
//! `<root>/volumes/<tenant>.img` (or a given block device), LUKS2 with the tenant's key, ext4
//! inside, mounted at `<root>/mnt/<tenant>`, mapped as `/dev/mapper/berth-<tenant>`.
//!
//! Ensures: nothing is formatted unless the backing store is new (an existing file or device
//! that is not LUKS is refused, never overwritten); a size of 0 or above the free disk is
//! refused before anything is made; attaching twice changes nothing; a purge erases the
//! keyslots before the file goes, so even a recovered file opens with no key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use berth_shared::ids::TenantId;
use berth_shared::proto;
use berth_shared::spec::TenantSpec;

use crate::command::{CommandError, run_command};
use crate::cryptsetup::{CryptError, Cryptsetup, VolumeKey};
use crate::reconcile::{Failure, VolumeStep};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A volume needs a size.
    #[error("volume size: must be greater than 0")]
    ZeroSize,
    #[error("volume size: {size} bytes is more than the {free} bytes free on {path}")]
    NoRoom { size: u64, free: u64, path: PathBuf },
    #[error("{0}: exists and is not a LUKS volume; refusing to format it")]
    NotLuks(PathBuf),
    #[error("{0}: the block device does not exist")]
    NoDevice(PathBuf),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(transparent)]
    Crypt(#[from] CryptError),
    #[error(transparent)]
    Command(#[from] CommandError),
}

fn io(path: &Path, e: std::io::Error) -> VolumeError {
    VolumeError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Filesystems and mounts, behind a trait so the volume logic is tested with a recording fake.
pub trait Mounter: Send + Sync + std::fmt::Debug {
    /// Whether `device` already holds an ext4 filesystem.
    fn has_filesystem(&self, device: &Path) -> Result<bool, VolumeError>;
    fn make_filesystem(&self, device: &Path) -> Result<(), VolumeError>;
    fn is_mounted(&self, target: &Path) -> Result<bool, VolumeError>;
    fn mount(&self, device: &Path, target: &Path) -> Result<(), VolumeError>;
    fn unmount(&self, target: &Path) -> Result<(), VolumeError>;
    /// Bytes free on the filesystem holding `path`.
    fn free_bytes(&self, path: &Path) -> Result<u64, VolumeError>;
}

/// The real programs: `mke2fs`, `mount`, `umount`; mounts read from /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct SystemMounter {
    pub mke2fs: String,
    pub timeout: Duration,
}

impl Default for SystemMounter {
    fn default() -> Self {
        Self {
            mke2fs: "mke2fs".into(),
            timeout: Duration::from_secs(120),
        }
    }
}

/// ext4's superblock magic, 0xEF53 little-endian at byte 1080 of the device.
const EXT4_MAGIC_AT: u64 = 1080;

impl Mounter for SystemMounter {
    fn has_filesystem(&self, device: &Path) -> Result<bool, VolumeError> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(device).map_err(|e| io(device, e))?;
        let mut magic = [0u8; 2];
        f.seek(SeekFrom::Start(EXT4_MAGIC_AT))
            .and_then(|_| f.read_exact(&mut magic))
            .map_err(|e| io(device, e))?;
        Ok(magic == [0x53, 0xEF])
    }

    fn make_filesystem(&self, device: &Path) -> Result<(), VolumeError> {
        let device = device.to_string_lossy();
        run_command(&self.mke2fs, &["-q", "-t", "ext4", &device], self.timeout)?;
        Ok(())
    }

    fn is_mounted(&self, target: &Path) -> Result<bool, VolumeError> {
        let table = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| io(Path::new("/proc/self/mountinfo"), e))?;
        let target = target.to_string_lossy();
        Ok(table
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(target.as_ref())))
    }

    fn mount(&self, device: &Path, target: &Path) -> Result<(), VolumeError> {
        std::fs::create_dir_all(target).map_err(|e| io(target, e))?;
        run_command(
            "mount",
            &[
                "-o",
                "nodev,nosuid",
                &device.to_string_lossy(),
                &target.to_string_lossy(),
            ],
            self.timeout,
        )?;
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), VolumeError> {
        run_command("umount", &[&target.to_string_lossy()], self.timeout)?;
        Ok(())
    }

    fn free_bytes(&self, path: &Path) -> Result<u64, VolumeError> {
        let v = nix::sys::statvfs::statvfs(path).map_err(|e| io(path, e.into()))?;
        Ok(v.blocks_available() * v.fragment_size())
    }
}

/// Where one tenant's volume lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePaths {
    /// The backing file, or the block device given for the tenant.
    pub backing: PathBuf,
    /// Whether `backing` is a block device that must already exist.
    pub device: bool,
    pub mapper_name: String,
    pub mount: PathBuf,
}

impl VolumePaths {
    /// A sparse file under `<root>/volumes`, mounted under `<root>/mnt` (the tenant id is a
    /// validated DNS label, so it is safe in paths and device names).
    pub fn file(root: &Path, tenant: &TenantId) -> Self {
        Self {
            backing: root.join("volumes").join(format!("{tenant}.img")),
            device: false,
            mapper_name: format!("berth-{tenant}"),
            mount: root.join("mnt").join(tenant.as_str()),
        }
    }

    /// A given block device (a Hetzner Volume, an EBS disk) instead of a file.
    pub fn block_device(root: &Path, tenant: &TenantId, device: &Path) -> Self {
        Self {
            backing: device.to_path_buf(),
            device: true,
            ..Self::file(root, tenant)
        }
    }

    pub fn mapped(&self) -> PathBuf {
        Path::new("/dev/mapper").join(&self.mapper_name)
    }
}

/// What a step did, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Made, formatted and mounted for the first time.
    Created,
    /// An existing volume, opened and mounted.
    Opened,
    /// Already open and mounted: nothing done.
    AlreadyMounted,
}

/// The volume operations over the two host-side traits.
#[derive(Debug)]
pub struct Volumes<'a> {
    pub crypt: &'a dyn Cryptsetup,
    pub mounter: &'a dyn Mounter,
}

impl Volumes<'_> {
    /// Makes (when new), opens and mounts the volume; `size` for a new backing file.
    pub fn attach(
        &self,
        paths: &VolumePaths,
        size: u64,
        key: &VolumeKey,
    ) -> Result<Attached, VolumeError> {
        if self.mounter.is_mounted(&paths.mount)? {
            return Ok(Attached::AlreadyMounted);
        }
        let fresh = self.ensure_backing(paths, size, key)?;
        if !paths.mapped().exists() {
            self.crypt.open(&paths.backing, &paths.mapper_name, key)?;
        }
        let mapped = paths.mapped();
        if fresh || !self.mounter.has_filesystem(&mapped)? {
            self.mounter.make_filesystem(&mapped)?;
        }
        self.mounter.mount(&mapped, &paths.mount)?;
        Ok(if fresh {
            Attached::Created
        } else {
            Attached::Opened
        })
    }

    /// The backing store exists and is LUKS; returns whether it was formatted just now.
    fn ensure_backing(
        &self,
        paths: &VolumePaths,
        size: u64,
        key: &VolumeKey,
    ) -> Result<bool, VolumeError> {
        let exists = paths.backing.exists();
        if paths.device && !exists {
            return Err(VolumeError::NoDevice(paths.backing.clone()));
        }
        if exists {
            if !self.crypt.is_luks(&paths.backing)? {
                if paths.device && !self.mounter.has_filesystem(&paths.backing)? {
                    // A new, empty device given for this tenant.
                    self.crypt.format(&paths.backing, key)?;
                    return Ok(true);
                }
                return Err(VolumeError::NotLuks(paths.backing.clone()));
            }
            return Ok(false);
        }
        if size == 0 {
            return Err(VolumeError::ZeroSize);
        }
        let dir = paths.backing.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let free = self.mounter.free_bytes(dir)?;
        if size > free {
            return Err(VolumeError::NoRoom {
                size,
                free,
                path: dir.to_path_buf(),
            });
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&paths.backing)
            .map_err(|e| io(&paths.backing, e))?;
        file.set_len(size).map_err(|e| io(&paths.backing, e))?;
        if let Err(e) = self.crypt.format(&paths.backing, key) {
            let _ = std::fs::remove_file(&paths.backing);
            return Err(e.into());
        }
        Ok(true)
    }

    /// Unmounts and closes; the ciphertext stays.
    pub fn detach(&self, paths: &VolumePaths) -> Result<(), VolumeError> {
        if self.mounter.is_mounted(&paths.mount)? {
            self.mounter.unmount(&paths.mount)?;
        }
        if paths.mapped().exists() {
            self.crypt.close(&paths.mapper_name)?;
        }
        Ok(())
    }

    /// Crypto-shreds: detach, erase every keyslot, then delete the backing file (a given
    /// block device is erased, not deleted). Says what it found to erase and delete.
    pub fn purge(&self, paths: &VolumePaths) -> Result<Purged, VolumeError> {
        self.detach(paths)?;
        let mut purged = Purged::default();
        if paths.backing.exists() && self.crypt.is_luks(&paths.backing)? {
            self.crypt.erase(&paths.backing)?;
            purged.erased = true;
        }
        if !paths.device && paths.backing.exists() {
            std::fs::remove_file(&paths.backing).map_err(|e| io(&paths.backing, e))?;
            purged.deleted = true;
        }
        Ok(purged)
    }
}

/// What a purge removed: keyslots erased, a backing file (or a plain directory) deleted. Both
/// false when there was nothing left on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub erased: bool,
    pub deleted: bool,
}

/// Where the agent gets a tenant's volume key: the coordinator's last delivery, in memory.
pub trait KeySource: Send + Sync + std::fmt::Debug {
    fn volume_key(&self, tenant: &TenantId) -> Option<VolumeKey>;
}

/// The uid and gid tenant containers run as; they own their volume's root.
const TENANT_ID: u32 = 65534;

/// The agent's volume step: an encrypted volume (with the key the coordinator delivered) for
/// a tenant whose spec asks for one, a plain directory on the host disk otherwise.
#[derive(Debug)]
pub struct HostVolumes {
    /// `/var/lib/berth` by default.
    pub root: PathBuf,
    pub crypt: Arc<dyn Cryptsetup>,
    pub mounter: Arc<dyn Mounter>,
    pub keys: Arc<dyn KeySource>,
    /// The host has device-mapper with the crypt target.
    pub dm_crypt: bool,
}

fn own_by_tenant(dir: &Path) -> Result<(), VolumeError> {
    nix::unistd::chown(
        dir,
        Some(nix::unistd::Uid::from_raw(TENANT_ID)),
        Some(nix::unistd::Gid::from_raw(TENANT_ID)),
    )
    .map_err(|e| io(dir, e.into()))
}

#[tonic::async_trait]
impl VolumeStep for HostVolumes {
    async fn prepare(&self, spec: &TenantSpec) -> Result<PathBuf, Failure> {
        let tenant = spec.tenant_id.clone();
        if !spec.volume.encrypted {
            let dir = self.root.join("plain").join(tenant.as_str());
            std::fs::create_dir_all(&dir).map_err(|e| format!("volume: {}", io(&dir, e)))?;
            own_by_tenant(&dir).map_err(|e| format!("volume: {e}"))?;
            return Ok(dir);
        }
        if !self.dm_crypt {
            return Err(
                "encrypted volume: this host has no dm-crypt (device-mapper with the crypt target)"
                    .into(),
            );
        }
        let Some(key) = self.keys.volume_key(&tenant) else {
            return Err(Failure {
                state: proto::TenantState::WaitingForKey,
                message: "waiting for its volume key from the coordinator".into(),
            });
        };
        let size = spec.resources.volume_bytes;
        self.blocking(&tenant, move |volumes, paths| {
            if volumes.attach(paths, size, &key)? == Attached::Created {
                own_by_tenant(&paths.mount)?;
            }
            Ok(paths.mount.clone())
        })
        .await
        .map_err(Failure::from)
    }

    async fn release(&self, tenant: &str) -> Result<(), String> {
        // A container whose tenant label is not a valid id never had a volume made.
        let Ok(tenant) = TenantId::new(tenant) else {
            return Ok(());
        };
        self.blocking(&tenant, |volumes, paths| volumes.detach(paths))
            .await
    }

    async fn purge(&self, tenant: &TenantId) -> Result<Purged, String> {
        let plain = self.root.join("plain").join(tenant.as_str());
        let mut purged = self
            .blocking(tenant, |volumes, paths| volumes.purge(paths))
            .await?;
        // A plain volume, and what a copy to this host left aside (a pre-copy, or an import
        // cut short).
        let staging = self.root.join("incoming").join(tenant.as_str());
        if plain.exists() {
            std::fs::remove_dir_all(&plain).map_err(|e| format!("volume: {}", io(&plain, e)))?;
            purged.deleted = true;
        }
        if staging.exists() {
            // A LUKS copy kept aside is erased before it is deleted, as the live one is.
            purged.erased |= crate::transfer::shred_copy(&staging).map_err(|e| e.to_string())?;
            purged.deleted = true;
        }
        Ok(purged)
    }
}

impl HostVolumes {
    /// Runs `op` on the tenant's file-backed volume off the async runtime (cryptsetup and
    /// mount block).
    async fn blocking<T: Send + 'static>(
        &self,
        tenant: &TenantId,
        op: impl FnOnce(&Volumes<'_>, &VolumePaths) -> Result<T, VolumeError> + Send + 'static,
    ) -> Result<T, String> {
        let paths = VolumePaths::file(&self.root, tenant);
        let (crypt, mounter) = (self.crypt.clone(), self.mounter.clone());
        tokio::task::spawn_blocking(move || {
            let volumes = Volumes {
                crypt: crypt.as_ref(),
                mounter: mounter.as_ref(),
            };
            op(&volumes, &paths)
        })
        .await
        .map_err(|e| format!("volume: {e}"))?
        .map_err(|e| format!("volume: {e}"))
    }
}

#[cfg(test)]
mod tests;
