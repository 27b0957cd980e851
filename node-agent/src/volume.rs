//! One tenant's volume on this host: a filesystem of a fixed size that only its tenant's
//! container sees.
//!
//! - Encrypted: a backing file `<root>/volumes/<tenant>.img` (or a given block device), LUKS2
//!   with the tenant's key, ext4 inside, mapped as `/dev/mapper/berth-<tenant>` and mounted at
//!   `<root>/mnt/<tenant>`.
//! - Unencrypted: an ext4 image `<root>/volumes/<tenant>.ext4`, mounted (through a loop
//!   device) at `<root>/plain/<tenant>`.
//!
//! Ensures: nothing is formatted unless the backing store is new (an existing file or device
//! that is not LUKS, or not ext4 for an unencrypted volume, is refused, never overwritten); a
//! size of 0 or above the free disk is refused before anything is made; a backing file's blocks
//! are all allocated (`fallocate`) before it is first mounted, so a tenant writing without end
//! stops at its volume's size with ENOSPC while the host's disk, the other tenants and the agent
//! keep their room; attaching twice changes nothing; volumes are mounted in the container
//! engine's mount namespace, where Docker resolves bind mounts, whatever namespace the agent
//! runs in; a purge erases the keyslots before the file goes, so even a recovered file opens
//! with no key. An unencrypted volume made before volumes had sizes (a directory at the mount
//! point) moves into an image of its size (`mke2fs -d`) the next time its tenant starts, and
//! its directory is emptied only once the image is complete on disk.

pub mod cryptsetup;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use berth_shared::ids::TenantId;
use berth_shared::spec::TenantSpec;

use crate::command::{CommandError, run_command};
use crate::volume::cryptsetup::{CryptError, Cryptsetup, VolumeKey};

/// The uid and gid tenant containers run as; they own their volume's root.
pub const TENANT_ID: u32 = 65534;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A volume needs a size.
    #[error("volume size: must be greater than 0")]
    ZeroSize,
    #[error("volume size: {size} bytes is more than the {free} bytes free on {path}")]
    NoRoom { size: u64, free: u64, path: PathBuf },
    #[error("{0}: exists and is not a LUKS volume; refusing to format it")]
    NotLuks(PathBuf),
    #[error("{0}: exists and is not an ext4 filesystem; refusing to format it")]
    NotExt4(PathBuf),
    /// An encrypted volume is opened with its key, an unencrypted one with none.
    #[error("{path}: an encrypted volume needs its key, an unencrypted one takes none")]
    KeyMismatch { path: PathBuf },
    #[error(
        "{path}: the directory holds {used} bytes, more than the volume's size of {size} bytes; \
         raise the tenant's volume size"
    )]
    DirectoryTooBig { path: PathBuf, used: u64, size: u64 },
    #[error(
        "{directory}: holds files while the volume's image {image} exists; move one of them \
         away (the image is what the tenant used last unless this directory is newer)"
    )]
    DirectoryAndImage { directory: PathBuf, image: PathBuf },
    #[error("the container engine's mount namespace, from its socket {socket}: {message}")]
    Engine { socket: PathBuf, message: String },
    #[error("{0}: the block device does not exist")]
    NoDevice(PathBuf),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(transparent)]
    Crypt(#[from] CryptError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("volume task: {0}")]
    Task(String),
}

/// Why a tenant's volume is not ready for its container.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("encrypted volume: this host has no dm-crypt (device-mapper with the crypt target)")]
    NoDmCrypt,
    /// Not a failure: the coordinator delivers keys after each desired state.
    #[error("waiting for its volume key from the coordinator")]
    WaitingForKey,
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

/// The tenant's data volume, ready before its container starts (a trait so the reconciler is
/// tested with a recording fake).
#[tonic::async_trait]
pub trait VolumeStep: Send + Sync + std::fmt::Debug {
    /// Makes the volume ready; returns the host directory to bind at the spec's mount path.
    async fn prepare(&self, spec: &TenantSpec) -> Result<PathBuf, PrepareError>;
    /// Closes the volume of a tenant whose container is gone (it stays on disk).
    async fn release(&self, tenant: &str) -> Result<(), VolumeError>;
    /// Crypto-shreds the volume of a tenant no longer desired here (its container gone).
    async fn purge(&self, tenant: &TenantId) -> Result<Purged, VolumeError>;
}

fn io(path: &Path, e: std::io::Error) -> VolumeError {
    VolumeError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Filesystems and mounts, behind a trait so the volume logic is tested with a recording fake.
pub trait Mounter: Send + Sync + std::fmt::Debug {
    /// Whether `device` (a block device or an image file) already holds an ext4 filesystem.
    fn has_filesystem(&self, device: &Path) -> Result<bool, VolumeError>;
    /// Makes an ext4 filesystem on `device`, its root owned by `owner` (uid and gid), holding
    /// a copy of `contents` when given.
    fn make_filesystem(
        &self,
        device: &Path,
        owner: u32,
        contents: Option<&Path>,
    ) -> Result<(), VolumeError>;
    fn is_mounted(&self, target: &Path) -> Result<bool, VolumeError>;
    /// Mounts `device` (a block device, or an image file through a loop device) at `target`.
    fn mount(&self, device: &Path, target: &Path) -> Result<(), VolumeError>;
    fn unmount(&self, target: &Path) -> Result<(), VolumeError>;
    /// Bytes free on the filesystem holding `path`.
    fn free_bytes(&self, path: &Path) -> Result<u64, VolumeError>;
    /// Allocates every block of the `size`-byte file `file` (its data unchanged), so writes
    /// into it never need the host disk's free space.
    fn reserve(&self, file: &Path, size: u64) -> Result<(), VolumeError>;
}

/// Whose mount namespace volumes are mounted in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountNamespace {
    /// The agent's own (a host without a container engine).
    Own,
    /// The container engine's: that of the process at the other end of its socket (dockerd,
    /// or systemd when the socket is activated), where Docker resolves a container's bind
    /// mounts. An agent in a mount namespace of its own (systemd's `ProtectSystem=` and
    /// `PrivateTmp=`, `ip netns exec`) would otherwise mount where Docker never looks, and the
    /// tenant would get the empty directory beneath.
    EngineAt(PathBuf),
}

/// The real programs: `mke2fs`, `mount`, `umount` (through `nsenter` into the engine's mount
/// namespace); mounts read from that namespace's `mountinfo`.
#[derive(Debug, Clone)]
pub struct SystemMounter {
    pub mke2fs: String,
    pub timeout: Duration,
    pub namespace: MountNamespace,
}

impl SystemMounter {
    /// Mounts in the namespace of the engine listening on `socket`.
    pub fn for_engine(socket: &Path) -> Self {
        Self {
            mke2fs: "mke2fs".into(),
            timeout: Duration::from_secs(120),
            namespace: MountNamespace::EngineAt(socket.to_path_buf()),
        }
    }

    /// `/proc/<pid>` of a process in the namespace mounts are made in.
    fn namespace_process(&self) -> Result<PathBuf, VolumeError> {
        let MountNamespace::EngineAt(socket) = &self.namespace else {
            return Ok(PathBuf::from("/proc/self"));
        };
        let engine = |message: String| VolumeError::Engine {
            socket: socket.clone(),
            message,
        };
        let stream = std::os::unix::net::UnixStream::connect(socket)
            .map_err(|e| engine(format!("cannot connect: {e}")))?;
        let peer =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|e| engine(format!("no peer credentials: {e}")))?;
        Ok(PathBuf::from(format!("/proc/{}", peer.pid())))
    }

    /// Runs a mount program in the namespace mounts are made in.
    fn in_namespace(&self, program: &str, args: &[&str]) -> Result<(), VolumeError> {
        if self.namespace == MountNamespace::Own {
            run_command(program, args, self.timeout)?;
            return Ok(());
        }
        let ns = format!(
            "--mount={}",
            self.namespace_process()?.join("ns/mnt").display()
        );
        let mut all = vec![ns.as_str(), "--", program];
        all.extend_from_slice(args);
        run_command("nsenter", &all, self.timeout)?;
        Ok(())
    }
}

/// ext4's superblock magic, 0xEF53 little-endian at byte 1080 of the device.
const EXT4_MAGIC_AT: u64 = 1080;

/// Whether `device` (a block device or an image file) holds ext4: its superblock magic.
pub fn holds_ext4(device: &Path) -> Result<bool, VolumeError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(device).map_err(|e| io(device, e))?;
    let mut magic = [0u8; 2];
    match f
        .seek(SeekFrom::Start(EXT4_MAGIC_AT))
        .and_then(|_| f.read_exact(&mut magic))
    {
        Ok(()) => Ok(magic == [0x53, 0xEF]),
        // Shorter than a superblock: no filesystem.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io(device, e)),
    }
}

impl Mounter for SystemMounter {
    fn has_filesystem(&self, device: &Path) -> Result<bool, VolumeError> {
        holds_ext4(device)
    }

    fn make_filesystem(
        &self,
        device: &Path,
        owner: u32,
        contents: Option<&Path>,
    ) -> Result<(), VolumeError> {
        let device = device.to_string_lossy();
        let root_owner = format!("root_owner={owner}:{owner}");
        let mut args = vec!["-q", "-t", "ext4", "-E", &root_owner];
        let contents = contents.map(|c| c.to_string_lossy());
        if let Some(c) = &contents {
            args.extend(["-d", c]);
        }
        args.push(&device);
        run_command(&self.mke2fs, &args, self.timeout)?;
        Ok(())
    }

    fn is_mounted(&self, target: &Path) -> Result<bool, VolumeError> {
        let mountinfo = self.namespace_process()?.join("mountinfo");
        let table = std::fs::read_to_string(&mountinfo).map_err(|e| io(&mountinfo, e))?;
        let target = target.to_string_lossy();
        Ok(table
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(target.as_ref())))
    }

    fn mount(&self, device: &Path, target: &Path) -> Result<(), VolumeError> {
        std::fs::create_dir_all(target).map_err(|e| io(target, e))?;
        let file = std::fs::metadata(device).is_ok_and(|m| m.is_file());
        let options = if file {
            "loop,nodev,nosuid"
        } else {
            "nodev,nosuid"
        };
        self.in_namespace(
            "mount",
            &[
                "-o",
                options,
                &device.to_string_lossy(),
                &target.to_string_lossy(),
            ],
        )
    }

    fn unmount(&self, target: &Path) -> Result<(), VolumeError> {
        // A loop device set up by `mount` is freed with the mount (autoclear).
        self.in_namespace("umount", &[&target.to_string_lossy()])
    }

    fn free_bytes(&self, path: &Path) -> Result<u64, VolumeError> {
        let v = nix::sys::statvfs::statvfs(path).map_err(|e| io(path, e.into()))?;
        Ok(v.blocks_available() * v.fragment_size())
    }

    fn reserve(&self, file: &Path, size: u64) -> Result<(), VolumeError> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .map_err(|e| io(file, e))?;
        nix::fcntl::fallocate(
            &f,
            nix::fcntl::FallocateFlags::empty(),
            0,
            i64::try_from(size).unwrap_or(i64::MAX),
        )
        .map_err(|e| io(file, e.into()))
    }
}

/// Where one tenant's volume lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePaths {
    /// The backing file, or the block device given for the tenant.
    pub backing: PathBuf,
    /// Whether `backing` is a block device that must already exist.
    pub device: bool,
    /// The device-mapper name of an encrypted volume; `None` for an unencrypted one, whose
    /// filesystem is the backing file itself.
    pub mapper_name: Option<String>,
    pub mount: PathBuf,
}

impl VolumePaths {
    /// An encrypted volume in a file under `<root>/volumes`, mounted under `<root>/mnt` (the
    /// tenant id is a validated DNS label, so it is safe in paths and device names).
    pub fn file(root: &Path, tenant: &TenantId) -> Self {
        Self {
            backing: root.join("volumes").join(format!("{tenant}.img")),
            device: false,
            mapper_name: Some(format!("berth-{tenant}")),
            mount: root.join("mnt").join(tenant.as_str()),
        }
    }

    /// An encrypted volume on a given block device (a Hetzner Volume, an EBS disk).
    pub fn block_device(root: &Path, tenant: &TenantId, device: &Path) -> Self {
        Self {
            backing: device.to_path_buf(),
            device: true,
            ..Self::file(root, tenant)
        }
    }

    /// An unencrypted volume: an ext4 image under `<root>/volumes`, mounted under
    /// `<root>/plain`.
    pub fn plain(root: &Path, tenant: &TenantId) -> Self {
        Self {
            backing: root.join("volumes").join(format!("{tenant}.ext4")),
            device: false,
            mapper_name: None,
            mount: root.join("plain").join(tenant.as_str()),
        }
    }

    /// The opened LUKS device of an encrypted volume.
    pub fn mapped(&self) -> Option<PathBuf> {
        self.mapper_name
            .as_ref()
            .map(|name| Path::new("/dev/mapper").join(name))
    }

    /// Where an unencrypted image is made before it is complete.
    fn partial(&self) -> PathBuf {
        self.backing.with_extension("ext4.partial")
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
    /// Makes (when new), opens and mounts the volume; `size` for a new backing file; `key`
    /// for an encrypted volume, `None` for an unencrypted one.
    pub fn attach(
        &self,
        paths: &VolumePaths,
        size: u64,
        key: Option<&VolumeKey>,
    ) -> Result<Attached, VolumeError> {
        if self.mounter.is_mounted(&paths.mount)? {
            return Ok(Attached::AlreadyMounted);
        }
        let (fresh, filesystem) = match (&paths.mapper_name, paths.mapped(), key) {
            (Some(mapper_name), Some(mapped), Some(key)) => {
                let fresh = self.ensure_luks(paths, size, key)?;
                if !mapped.exists() {
                    self.crypt.open(&paths.backing, mapper_name, key)?;
                }
                if fresh || !self.mounter.has_filesystem(&mapped)? {
                    self.mounter.make_filesystem(&mapped, TENANT_ID, None)?;
                }
                (fresh, mapped)
            }
            (None, None, None) => (self.ensure_image(paths, size)?, paths.backing.clone()),
            _ => {
                return Err(VolumeError::KeyMismatch {
                    path: paths.backing.clone(),
                });
            }
        };
        if !paths.device {
            let size = std::fs::metadata(&paths.backing)
                .map_err(|e| io(&paths.backing, e))?
                .len();
            match self.mounter.reserve(&paths.backing, size) {
                Ok(()) => {}
                // A new file fits the free disk (checked before it was made).
                Err(e) if fresh => return Err(e),
                // One made before backing files were allocated whole, on a disk now too full:
                // it works as it did, sparse.
                Err(e) => tracing::warn!(error = %e, "volume: its blocks are not all allocated"),
            }
        }
        self.mounter.mount(&filesystem, &paths.mount)?;
        Ok(if fresh {
            Attached::Created
        } else {
            Attached::Opened
        })
    }

    /// A new `size`-byte file at `path`, once `size` is known to fit the free disk.
    fn new_file(&self, path: &Path, size: u64) -> Result<(), VolumeError> {
        if size == 0 {
            return Err(VolumeError::ZeroSize);
        }
        let dir = path.parent().unwrap_or(Path::new("/"));
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
            .open(path)
            .map_err(|e| io(path, e))?;
        file.set_len(size).map_err(|e| io(path, e))
    }

    /// The backing store exists and is LUKS; returns whether it was formatted just now.
    fn ensure_luks(
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
        self.new_file(&paths.backing, size)?;
        if let Err(e) = self.crypt.format(&paths.backing, key) {
            let _ = std::fs::remove_file(&paths.backing);
            return Err(e.into());
        }
        Ok(true)
    }

    /// The unencrypted image exists and holds ext4; returns whether it was made just now.
    fn ensure_image(&self, paths: &VolumePaths, size: u64) -> Result<bool, VolumeError> {
        if paths.backing.exists() {
            if !self.mounter.has_filesystem(&paths.backing)? {
                return Err(VolumeError::NotExt4(paths.backing.clone()));
            }
            return Ok(false);
        }
        self.new_file(&paths.backing, size)?;
        if let Err(e) = self
            .mounter
            .make_filesystem(&paths.backing, TENANT_ID, None)
        {
            let _ = std::fs::remove_file(&paths.backing);
            return Err(e);
        }
        Ok(true)
    }

    /// Moves an unencrypted volume made before volumes had sizes (files in a directory at the
    /// mount point, nothing mounted there) into an image of `size` bytes: made aside from the
    /// directory (`mke2fs -d`), written out, and only then is the directory emptied and the
    /// image renamed into place. Each step can be cut short and taken again: an image aside
    /// with the directory empty is complete. Returns whether it moved anything.
    pub fn adopt_directory(&self, paths: &VolumePaths, size: u64) -> Result<bool, VolumeError> {
        if paths.mapper_name.is_some() || self.mounter.is_mounted(&paths.mount)? {
            return Ok(false);
        }
        let partial = paths.partial();
        let holds_files = match std::fs::read_dir(&paths.mount) {
            Ok(mut entries) => entries.next().is_some(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io(&paths.mount, e)),
        };
        if !holds_files {
            if partial.exists() && !paths.backing.exists() {
                // Cut short after the directory was emptied: the image aside is complete.
                rename_synced(&partial, &paths.backing)?;
                return Ok(true);
            }
            return Ok(false);
        }
        if paths.backing.exists() {
            return Err(VolumeError::DirectoryAndImage {
                directory: paths.mount.clone(),
                image: paths.backing.clone(),
            });
        }
        let used = used_bytes(&paths.mount)?;
        if used > size {
            return Err(VolumeError::DirectoryTooBig {
                path: paths.mount.clone(),
                used,
                size,
            });
        }
        if partial.exists() {
            // An attempt cut short before the directory was touched.
            std::fs::remove_file(&partial).map_err(|e| io(&partial, e))?;
        }
        self.new_file(&partial, size)?;
        let made = self
            .mounter
            .make_filesystem(&partial, TENANT_ID, Some(&paths.mount))
            .and_then(|()| sync_file(&partial));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        for entry in std::fs::read_dir(&paths.mount).map_err(|e| io(&paths.mount, e))? {
            let entry = entry.map_err(|e| io(&paths.mount, e))?.path();
            let removed = match std::fs::symlink_metadata(&entry) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&entry),
                _ => std::fs::remove_file(&entry),
            };
            removed.map_err(|e| io(&entry, e))?;
        }
        sync_file(&paths.mount)?;
        rename_synced(&partial, &paths.backing)?;
        Ok(true)
    }

    /// Unmounts and closes; the ciphertext (or the image) stays.
    pub fn detach(&self, paths: &VolumePaths) -> Result<(), VolumeError> {
        if self.mounter.is_mounted(&paths.mount)? {
            self.mounter.unmount(&paths.mount)?;
        }
        if let (Some(mapper_name), Some(mapped)) = (&paths.mapper_name, paths.mapped())
            && mapped.exists()
        {
            self.crypt.close(mapper_name)?;
        }
        Ok(())
    }

    /// Crypto-shreds: detach, erase every keyslot, then delete the backing file (a given
    /// block device is erased, not deleted). An unencrypted image is deleted. Says what it
    /// found to erase and delete.
    pub fn purge(&self, paths: &VolumePaths) -> Result<Purged, VolumeError> {
        self.detach(paths)?;
        let mut purged = Purged::default();
        if paths.mapper_name.is_some()
            && paths.backing.exists()
            && self.crypt.is_luks(&paths.backing)?
        {
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

/// The disk space a directory tree takes (links not followed).
fn used_bytes(dir: &Path) -> Result<u64, VolumeError> {
    use std::os::unix::fs::MetadataExt;
    let mut used = 0u64;
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = entry.map_err(|e| io(dir, e))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io(&path, e))?;
        used += meta.blocks() * 512;
        if meta.is_dir() {
            used += used_bytes(&path)?;
        }
    }
    Ok(used)
}

/// Writes out a file (or a directory's entries).
fn sync_file(path: &Path) -> Result<(), VolumeError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(path, e))
}

/// Renames `from` to `to` and writes the rename out.
fn rename_synced(from: &Path, to: &Path) -> Result<(), VolumeError> {
    std::fs::rename(from, to).map_err(|e| io(to, e))?;
    sync_file(to.parent().unwrap_or(Path::new("/")))
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

/// The LUKS2 header and keyslot area as berth formats volumes (cryptsetup's defaults): the
/// first 16 MiB of the backing file.
const LUKS_HEADER_BYTES: u64 = 16 << 20;
/// What one write of zeros covers.
const ERASE_CHUNK_BYTES: usize = 1 << 20;

/// Removes a copy of a tenant's volume that is not its live one (a pre-copy kept aside, an
/// import cut short or replaced): each LUKS file in `dir` first has its header and keyslot area
/// overwritten with zeros and written out, as `luksErase` leaves a volume, so the blocks it
/// leaves on the disk open with no key (the tenant's key lives on while its live volume does).
/// Returns whether a LUKS copy was erased.
pub fn shred_copy(dir: &Path) -> Result<bool, VolumeError> {
    let mut erased = false;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| io(dir, e))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io(&path, e))?;
        if !meta.is_file() {
            continue;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .map_err(|e| io(&path, e))?;
        let mut magic = [0u8; 6];
        if file.read_at(&mut magic, 0).map_err(|e| io(&path, e))? < magic.len()
            || &magic != b"LUKS\xba\xbe"
        {
            continue;
        }
        let zeros = vec![0u8; ERASE_CHUNK_BYTES];
        let end = meta.len().min(LUKS_HEADER_BYTES);
        let mut at = 0;
        while at < end {
            let n = (end - at).min(ERASE_CHUNK_BYTES as u64) as usize;
            file.write_all_at(&zeros[..n], at)
                .map_err(|e| io(&path, e))?;
            at += n as u64;
        }
        file.sync_all().map_err(|e| io(&path, e))?;
        erased = true;
    }
    std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
    Ok(erased)
}

/// The agent's volume step: an encrypted volume (with the key the coordinator delivered) for
/// a tenant whose spec asks for one, an unencrypted image otherwise; both of the spec's size.
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

#[tonic::async_trait]
impl VolumeStep for HostVolumes {
    async fn prepare(&self, spec: &TenantSpec) -> Result<PathBuf, PrepareError> {
        let tenant = spec.tenant_id.clone();
        let size = spec.resources.volume_bytes;
        if !spec.volume.encrypted {
            let paths = VolumePaths::plain(&self.root, &tenant);
            return self
                .blocking(paths, move |volumes, paths| {
                    if volumes.adopt_directory(paths, size)? {
                        tracing::info!(%tenant, "volume: its directory moved into an image of its size");
                    }
                    volumes.attach(paths, size, None)?;
                    Ok(paths.mount.clone())
                })
                .await
                .map_err(PrepareError::from);
        }
        if !self.dm_crypt {
            return Err(PrepareError::NoDmCrypt);
        }
        let Some(key) = self.keys.volume_key(&tenant) else {
            return Err(PrepareError::WaitingForKey);
        };
        self.blocking(
            VolumePaths::file(&self.root, &tenant),
            move |volumes, paths| {
                volumes.attach(paths, size, Some(&key))?;
                Ok(paths.mount.clone())
            },
        )
        .await
        .map_err(PrepareError::from)
    }

    async fn release(&self, tenant: &str) -> Result<(), VolumeError> {
        // A container whose tenant label is not a valid id never had a volume made.
        let Ok(tenant) = TenantId::new(tenant) else {
            return Ok(());
        };
        for paths in [
            VolumePaths::file(&self.root, &tenant),
            VolumePaths::plain(&self.root, &tenant),
        ] {
            self.blocking(paths, |volumes, paths| volumes.detach(paths))
                .await?;
        }
        Ok(())
    }

    async fn purge(&self, tenant: &TenantId) -> Result<Purged, VolumeError> {
        let mut purged = Purged::default();
        for paths in [
            VolumePaths::file(&self.root, tenant),
            VolumePaths::plain(&self.root, tenant),
        ] {
            let done = self
                .blocking(paths, |volumes, paths| volumes.purge(paths))
                .await?;
            purged.erased |= done.erased;
            purged.deleted |= done.deleted;
        }
        // The mount point of an unencrypted volume (with what a volume from before images
        // held), an image being made from it, and what a copy to this host left aside (a
        // pre-copy, or an import cut short).
        let plain = VolumePaths::plain(&self.root, tenant);
        let staging = self.root.join("incoming").join(tenant.as_str());
        if plain.mount.exists() {
            std::fs::remove_dir_all(&plain.mount).map_err(|e| io(&plain.mount, e))?;
            purged.deleted = true;
        }
        let partial = plain.partial();
        if partial.exists() {
            std::fs::remove_file(&partial).map_err(|e| io(&partial, e))?;
            purged.deleted = true;
        }
        if staging.exists() {
            // A LUKS copy kept aside is erased before it is deleted, as the live one is.
            purged.erased |= shred_copy(&staging)?;
            purged.deleted = true;
        }
        Ok(purged)
    }
}

impl HostVolumes {
    /// Runs `op` on a volume off the async runtime (cryptsetup, mke2fs and mount block).
    async fn blocking<T: Send + 'static>(
        &self,
        paths: VolumePaths,
        op: impl FnOnce(&Volumes<'_>, &VolumePaths) -> Result<T, VolumeError> + Send + 'static,
    ) -> Result<T, VolumeError> {
        let (crypt, mounter) = (self.crypt.clone(), self.mounter.clone());
        tokio::task::spawn_blocking(move || {
            let volumes = Volumes {
                crypt: crypt.as_ref(),
                mounter: mounter.as_ref(),
            };
            op(&volumes, &paths)
        })
        .await
        .map_err(|e| VolumeError::Task(e.to_string()))?
    }
}

#[cfg(test)]
mod tests;
