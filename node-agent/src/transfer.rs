//! A tenant's volume as a stream, and back, for moving it to another host during a drain.
//!
//! Ensures: only what is on disk is sent (the holes of a sparse backing file are skipped, and
//! come back as holes); the sender and the receiver each compute a SHA-256 of the volume
//! (every entry, and the SHA-256 of every 1 MiB block of every file) and the volume is put in
//! place only when both agree; nothing from the stream can write outside the volume (paths
//! are relative and plain, links are recreated, never followed); nothing outside the volume
//! is ever read into the stream (the sender opens every entry beneath the volume's root with
//! no link followed, so a running tenant that swaps a directory for a link to a host
//! directory during a pre-copy only makes that walk fail); a volume
//! that is attached (open or mounted) is never read; a received volume replaces whatever an
//! earlier failed attempt left only once it is complete.
//!
//! An encrypted volume travels as its LUKS2 backing file, so only ciphertext leaves the host;
//! an unencrypted one as its ext4 image (or, made before volumes had sizes, as its directory
//! tree). All take the same path through this code.
//!
//! A volume can be copied twice: a *pre-copy* while its tenant still runs (read as it is,
//! kept aside on the receiver, never put in place), then, once the tenant stopped, a copy
//! that sends only the 1 MiB blocks whose SHA-256 differs from what the pre-copy sent; the
//! volume's SHA-256 counts the blocks kept from the pre-copy, so a pre-copied volume is
//! checked end to end like a whole one. A file the sender finds with the same inode stamp as
//! when it pre-copied it (see [`Stamp`]) is not even read again.

pub mod peer;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_shared::ids::TenantId;
use berth_shared::proto::peer_service_client::PeerServiceClient;
use berth_shared::proto::{self, volume_chunk::Body};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::transfer::peer::IncomingChunks;
use crate::volume::{TENANT_ID, VolumeError, shred_copy};

/// Data bytes per chunk, and the size of the blocks a pre-copied file is compared by: a chunk
/// never spans two blocks.
pub const CHUNK_BYTES: usize = 1 << 20;

type BlockHash = [u8; 32];

/// What a copy was, on either end: the SHA-256 of each block of each regular file (by
/// relative path). Kept after a pre-copy, it is the base the next copy sends changes to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Base {
    pub transfer_id: u64,
    pub layout: i32,
    pub files: BTreeMap<String, Vec<BlockHash>>,
    /// The sender's only: each file's stamp when it was read, if it was settled then.
    pub stamps: BTreeMap<String, Stamp>,
}

/// How long after a file's last change its stamp is trusted: more than the coarsest timestamp
/// granularity of the filesystems volumes live on (1 s: ext4 with small inodes) plus a clock
/// tick, so that a write in the same tick as the stat cannot leave the stamp as it was.
pub const STAMP_SETTLED: Duration = Duration::from_secs(2);

/// What a regular file's inode says of its contents. Its ctime changes with every write and
/// cannot be set, so a file whose stamp is the same as when it was read, and which had been
/// settled then, holds what was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of a file stat'ed at `now`; `None` while its last change is too recent to
    /// rule out another in the same timestamp tick.
    fn settled(meta: &std::fs::Metadata, now: SystemTime) -> Option<Self> {
        let changed = UNIX_EPOCH.checked_add(Duration::new(
            u64::try_from(meta.ctime()).ok()?,
            u32::try_from(meta.ctime_nsec()).ok()?,
        ))?;
        (changed.checked_add(STAMP_SETTLED)? <= now).then_some(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// The outcome of an export or an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// Data bytes streamed.
    pub data_bytes: u64,
    /// The digest of the whole volume (hex).
    pub volume_sha256: String,
    pub base: Base,
}

fn blocks_in(size: u64) -> usize {
    size.div_ceil(CHUNK_BYTES as u64) as usize
}

/// The stream format this agent sends and reads ([`proto::VolumeStreamHeader::stream_format`]).
pub const STREAM_FORMAT: u32 = 2;

/// The unit data is compared and sent in: an all-zero page is a hole however the file holds
/// it (a hole, an allocated range never written, zeros written), so a volume's digest and the
/// blocks a copy sends do not depend on what its filesystem happens to hold as zeros.
const PAGE: u64 = 4096;

/// The pages of `data` (at `offset` in its file), at whole-page boundaries of the file.
fn pages(offset: u64, data: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        (at < data.len()).then(|| {
            let page_offset = offset + at as u64;
            let end = (((page_offset / PAGE + 1) * PAGE - offset) as usize).min(data.len());
            let page = (page_offset, &data[at..end]);
            at = end;
            page
        })
    })
}

fn all_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

/// Feeds one piece of a block's data (at `offset` in the file) to the block's hash: each
/// non-zero page with its place.
fn hash_piece(block: &mut Sha256, offset: u64, data: &[u8]) {
    for (page_offset, page) in pages(offset, data).filter(|(_, page)| !all_zero(page)) {
        block.update(page_offset.to_le_bytes());
        block.update((page.len() as u64).to_le_bytes());
        block.update(page);
    }
}

/// The runs of non-zero pages of `data` (at `offset` in its file): what is sent of it.
fn nonzero_runs(offset: u64, data: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (page_offset, page) in pages(offset, data) {
        if all_zero(page) {
            continue;
        }
        let start = (page_offset - offset) as usize;
        match runs.last_mut() {
            Some(run) if run.end == start => run.end = start + page.len(),
            _ => runs.push(start..start + page.len()),
        }
    }
    runs
}

/// The pieces of `extents` to read, each within one block and at most one chunk long.
fn pieces(extents: &[(u64, u64)]) -> impl Iterator<Item = (u64, usize)> + '_ {
    extents.iter().flat_map(|&(start, len)| {
        let end = start + len;
        let mut offset = start;
        std::iter::from_fn(move || {
            (offset < end).then(|| {
                let boundary = (offset / CHUNK_BYTES as u64 + 1) * CHUNK_BYTES as u64;
                let piece = (offset, (boundary.min(end) - offset) as usize);
                offset += piece.1 as u64;
                piece
            })
        })
    })
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Reading or writing the volume failed.
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{0} has no volume on this host")]
    NoVolume(String),
    #[error("the volume of {0} is attached (open or mounted): it is read only once closed")]
    Attached(String),
    /// The stream broke the format: a bad path, chunks out of order, a wrong checksum.
    #[error("volume stream: {0}")]
    Stream(String),
    #[error("the volume stream ended early")]
    Cut,
    #[error("the target stopped taking the stream")]
    TargetGone,
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

/// Why a copy between two hosts ended without its volume in place.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cancelled by the coordinator")]
    Cancelled,
    #[error(transparent)]
    Peer(#[from] crate::transfer::peer::PeerError),
    /// The target's answer to the push.
    #[error("the target: {0}")]
    Target(String),
    #[error(transparent)]
    Broke(#[from] crate::transfer::peer::StreamBroke),
    #[error(transparent)]
    Volume(#[from] TransferError),
    #[error("{what} task: {message}")]
    Task { what: &'static str, message: String },
}

fn io(path: &Path, e: std::io::Error) -> TransferError {
    TransferError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn bad(reason: impl Into<String>) -> TransferError {
    TransferError::Stream(reason.into())
}

/// Where a tenant's volume lives under the agent's volume root, by layout.
#[derive(Debug, Clone)]
pub struct VolumeLocation {
    pub root: PathBuf,
    pub tenant: TenantId,
}

impl VolumeLocation {
    fn image(&self) -> PathBuf {
        self.root
            .join("volumes")
            .join(format!("{}.img", self.tenant))
    }
    fn plain_image(&self) -> PathBuf {
        self.root
            .join("volumes")
            .join(format!("{}.ext4", self.tenant))
    }
    /// The one file a file layout travels as, by its name under `volumes/`.
    fn file_name(&self, layout: proto::VolumeLayout) -> Option<String> {
        match layout {
            proto::VolumeLayout::LuksFile => Some(format!("{}.img", self.tenant)),
            proto::VolumeLayout::PlainImage => Some(format!("{}.ext4", self.tenant)),
            _ => None,
        }
    }
    fn plain(&self) -> PathBuf {
        self.root.join("plain").join(self.tenant.as_str())
    }
    fn mount(&self) -> PathBuf {
        self.root.join("mnt").join(self.tenant.as_str())
    }
    /// Where an import is assembled, on the same filesystem so the final rename is atomic.
    fn staging(&self) -> PathBuf {
        self.root.join("incoming").join(self.tenant.as_str())
    }

    /// Where the tenant's files are while its volume is open (the LUKS volume's mount or the
    /// image's); `None` when neither is mounted.
    pub fn open_contents(&self) -> Result<Option<PathBuf>, std::io::Error> {
        for dir in [self.mount(), self.plain()] {
            if mount_point(&dir)? {
                return Ok(Some(dir));
            }
        }
        Ok(None)
    }

    /// The layout on disk: the LUKS file when there is one, else the unencrypted image, else
    /// the plain directory.
    pub fn layout(&self) -> Option<proto::VolumeLayout> {
        if self.image().is_file() {
            Some(proto::VolumeLayout::LuksFile)
        } else if self.plain_image().is_file() {
            Some(proto::VolumeLayout::PlainImage)
        } else if self.plain().is_dir() {
            Some(proto::VolumeLayout::PlainDirectory)
        } else {
            None
        }
    }
}

/// The digest of a whole volume: each entry's metadata and each of its blocks' SHA-256, in
/// stream order (what was sent in a pre-copy counts as much as what was sent now).
#[derive(Debug, Default, Clone)]
struct VolumeDigest(Sha256);

impl VolumeDigest {
    fn entry(&mut self, e: &proto::VolumeEntry, blocks: &[BlockHash]) {
        self.0.update(b"E");
        self.0.update(e.path.as_bytes());
        self.0.update([0, u8::from(e.directory)]);
        self.0.update(e.mode.to_le_bytes());
        self.0.update(e.size.to_le_bytes());
        self.0.update(e.symlink.as_bytes());
        self.0.update([0]);
        self.0.update((blocks.len() as u64).to_le_bytes());
        for b in blocks {
            self.0.update(b);
        }
    }
    fn hex(&self) -> String {
        hex::encode(self.0.clone().finalize())
    }
}

/// Whether a filesystem is mounted at `dir` (it is on another device than its parent). A
/// missing directory is not.
fn mount_point(dir: &Path) -> Result<bool, std::io::Error> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let parent = std::fs::metadata(dir.parent().unwrap_or(Path::new("/")))?;
    Ok(meta.is_dir() && meta.dev() != parent.dev())
}

/// `FIFREEZE` and `FITHAW` (linux/fs.h: `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)`).
const FIFREEZE: nix::libc::c_ulong = 0xC004_5877;
const FITHAW: nix::libc::c_ulong = 0xC004_5878;

/// Writes out everything of the filesystem mounted at `dir`, its journal checkpointed into
/// place: frozen and thawed at once (writes wait the milliseconds between). Where it cannot be
/// frozen (not supported, or frozen by someone else, who thaws it), its data is written out.
fn settle(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = File::open(dir)?;
    // SAFETY: both requests take no memory from the caller; `d` stays open across the calls.
    #[allow(unsafe_code)]
    let freeze = |request| unsafe { nix::libc::ioctl(d.as_raw_fd(), request, 0) };
    if freeze(FIFREEZE) != 0 {
        return nix::unistd::syncfs(&d).map_err(std::io::Error::from);
    }
    // A filesystem left frozen stops its tenant: the thaw is retried before giving up.
    for _ in 0..3 {
        if freeze(FITHAW) == 0 {
            return Ok(());
        }
    }
    Err(std::io::Error::last_os_error())
}

/// Whether the mount point of a volume is in use: mounted, or holding anything (a filesystem
/// mounted where this process cannot see it, files that must not be lost).
fn in_use(dir: &Path) -> Result<bool, TransferError> {
    if mount_point(dir).map_err(|e| io(dir, e))? {
        return Ok(true);
    }
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(dir, e)),
    }
}

/// The data extents of a file: (offset, length) of every non-hole range.
fn extents(file: &File, size: u64) -> Result<Vec<(u64, u64)>, std::io::Error> {
    use nix::unistd::{Whence, lseek};
    let mut out = Vec::new();
    let mut offset: i64 = 0;
    let end = size as i64;
    while offset < end {
        let data = match lseek(file, offset, Whence::SeekData) {
            Ok(d) => d,
            // No data after `offset`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            // A filesystem without SEEK_DATA: all of it is data.
            Err(nix::errno::Errno::EINVAL) => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(file, data, Whence::SeekHole).map_err(std::io::Error::from)?;
        out.push((data as u64, (hole.min(end) - data) as u64));
        offset = hole;
    }
    Ok(out)
}

/// One file or directory to send, with its extents.
#[derive(Debug)]
struct Item {
    path: PathBuf,
    entry: proto::VolumeEntry,
    extents: Vec<(u64, u64)>,
    /// A regular file's stamp, taken before any of it is read.
    stamp: Option<Stamp>,
}

impl Item {
    fn is_file(&self) -> bool {
        !self.entry.directory && self.entry.symlink.is_empty()
    }
}

/// A tree the tenant can change while it is read (a running tenant's plain volume), opened so
/// that no path ever leaves it: every open resolves beneath the tree's root with no symbolic
/// link followed (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`). A tenant that swaps
/// a directory for a link to `/etc` mid-walk makes the walk fail, never read the host.
#[derive(Debug)]
struct Tree {
    root: std::os::fd::OwnedFd,
    path: PathBuf,
}

impl Tree {
    fn open(path: &Path) -> Result<Self, TransferError> {
        use nix::fcntl::OFlag;
        let root = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io(path, e.into()))?;
        Ok(Self {
            root,
            path: path.to_path_buf(),
        })
    }

    fn path_of(&self, relative: &str) -> PathBuf {
        self.path.join(relative)
    }

    /// `relative` opened with `flags`, resolved beneath the root without following links.
    fn resolve(&self, relative: &str, flags: nix::fcntl::OFlag) -> Result<File, TransferError> {
        use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
        let how = OpenHow::new()
            .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let target = if relative.is_empty() { "." } else { relative };
        nix::fcntl::openat2(&self.root, target, how)
            .map(File::from)
            .map_err(|e| io(&self.path_of(relative), e.into()))
    }

    /// A regular file, to read (never a FIFO left to block on, never a link).
    fn file(&self, relative: &str) -> Result<File, TransferError> {
        use nix::fcntl::OFlag;
        let file = self.resolve(relative, OFlag::O_RDONLY | OFlag::O_NONBLOCK)?;
        let meta = file
            .metadata()
            .map_err(|e| io(&self.path_of(relative), e))?;
        if !meta.is_file() {
            return Err(io(
                &self.path_of(relative),
                std::io::Error::other("no longer a regular file"),
            ));
        }
        Ok(file)
    }

    /// The names in directory `relative`, sorted.
    fn names(&self, relative: &str) -> Result<Vec<String>, TransferError> {
        use nix::fcntl::OFlag;
        let dir = self.resolve(relative, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        let path = self.path_of(relative);
        let mut names = Vec::new();
        for entry in nix::dir::Dir::from_fd(dir.into()).map_err(|e| io(&path, e.into()))? {
            let entry = entry.map_err(|e| io(&path, e.into()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

fn item(tree: &Tree, relative: String) -> Result<Item, TransferError> {
    let now = SystemTime::now();
    let path = tree.path_of(&relative);
    // The entry itself, a link included, without following anything.
    let entry_fd = tree.resolve(&relative, nix::fcntl::OFlag::O_PATH)?;
    let meta = entry_fd.metadata().map_err(|e| io(&path, e))?;
    let mut entry = proto::VolumeEntry {
        path: relative,
        mode: meta.mode() & 0o777,
        ..Default::default()
    };
    let mut extents_of = Vec::new();
    let mut stamp = None;
    if meta.file_type().is_symlink() {
        entry.symlink = nix::fcntl::readlinkat(&entry_fd, "")
            .map_err(|e| io(&path, e.into()))?
            .to_string_lossy()
            .into_owned();
    } else if meta.is_dir() {
        entry.directory = true;
    } else if meta.is_file() {
        let file = tree.file(&entry.path)?;
        let meta = file.metadata().map_err(|e| io(&path, e))?;
        entry.size = meta.len();
        stamp = Stamp::settled(&meta, now);
        extents_of = extents(&file, meta.len()).map_err(|e| io(&path, e))?;
    } else {
        // Sockets, fifos, devices: not volume data.
        return Ok(Item {
            path,
            entry: proto::VolumeEntry::default(),
            extents: Vec::new(),
            stamp: None,
        });
    }
    Ok(Item {
        path,
        entry,
        extents: extents_of,
        stamp,
    })
}

/// Every entry under `prefix` of `tree`, parents before children, in name order.
fn walk(tree: &Tree, prefix: &str, out: &mut Vec<Item>) -> Result<(), TransferError> {
    for name in tree.names(prefix)? {
        let relative = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let it = item(tree, relative.clone())?;
        if it.entry.path.is_empty() {
            continue;
        }
        let is_dir = it.entry.directory;
        out.push(it);
        if is_dir {
            walk(tree, &relative, out)?;
        }
    }
    Ok(())
}

/// The SHA-256 of each block of a file, read piece by piece.
fn block_hashes(
    tree: &Tree,
    it: &Item,
    buffer: &mut [u8],
) -> Result<Vec<BlockHash>, TransferError> {
    let mut blocks = vec![Sha256::new(); blocks_in(it.entry.size)];
    let file = tree.file(&it.entry.path)?;
    for (offset, len) in pieces(&it.extents) {
        let got = read_at(&file, &mut buffer[..len], offset).map_err(|e| io(&it.path, e))?;
        if got == 0 {
            continue;
        }
        hash_piece(
            &mut blocks[(offset / CHUNK_BYTES as u64) as usize],
            offset,
            &buffer[..got],
        );
    }
    Ok(blocks.into_iter().map(|b| b.finalize().into()).collect())
}

/// Streams the tenant's volume into `send`, one chunk at a time (blocking: `send` may wait for
/// the network): a closed volume, or with `precopy` one still in use, read as it is. With a
/// `base` this host sent before (of the same layout), a file it held is sent as its changed
/// blocks only. Returns what was sent and the new base.
pub fn export(
    at: &VolumeLocation,
    transfer_id: u64,
    precopy: bool,
    base: Option<&Base>,
    mut send: impl FnMut(proto::VolumeChunk) -> Result<(), TransferError>,
) -> Result<Copied, TransferError> {
    let mapped = Path::new("/dev/mapper").join(format!("berth-{}", at.tenant));
    let layout = at
        .layout()
        .ok_or_else(|| TransferError::NoVolume(at.tenant.to_string()))?;
    let attached = mapped.exists()
        || in_use(&at.mount())?
        || (layout == proto::VolumeLayout::PlainImage && in_use(&at.plain())?);
    if !precopy && attached {
        return Err(TransferError::Attached(at.tenant.to_string()));
    }
    if attached {
        // What the tenant wrote sits in its filesystem's cache and journal until written out to
        // its home in the image (or the LUKS file); written out now, the pre-copy carries it,
        // and the copy after the stop has only what changes from here on to send.
        for dir in [at.mount(), at.plain()] {
            if mount_point(&dir).map_err(|e| io(&dir, e))? {
                settle(&dir).map_err(|e| io(&dir, e))?;
            }
        }
    }
    let (tree, items) = match at.file_name(layout) {
        Some(name) => {
            let tree = Tree::open(&at.root.join("volumes"))?;
            let image = item(&tree, name)?;
            (tree, vec![image])
        }
        None => {
            let tree = Tree::open(&at.plain())?;
            let mut items = Vec::new();
            walk(&tree, "", &mut items)?;
            (tree, items)
        }
    };
    let base = base.filter(|b| b.layout == layout as i32);
    let mut buffer = vec![0u8; CHUNK_BYTES];
    // A file the base holds: its blocks now, and which of them differ (read before the
    // header, which says how many bytes follow).
    let mut against_base: Vec<Option<(Vec<BlockHash>, BTreeSet<u64>)>> = Vec::new();
    let mut data_bytes = 0u64;
    for it in &items {
        let known = base.and_then(|b| b.files.get(&it.entry.path));
        let plan = match known {
            Some(before) if it.is_file() => {
                let was = base.and_then(|b| b.stamps.get(&it.entry.path));
                let now = match (it.stamp, was) {
                    (Some(stamp), Some(was)) if stamp == *was => before.clone(),
                    _ => block_hashes(&tree, it, &mut buffer)?,
                };
                let changed: BTreeSet<u64> = (0..now.len())
                    .filter(|&i| before.get(i) != Some(&now[i]))
                    .map(|i| i as u64)
                    .collect();
                data_bytes += pieces(&it.extents)
                    .filter(|(o, _)| changed.contains(&(o / CHUNK_BYTES as u64)))
                    .map(|(_, len)| len as u64)
                    .sum::<u64>();
                Some((now, changed))
            }
            _ => {
                data_bytes += it.extents.iter().map(|(_, len)| len).sum::<u64>();
                None
            }
        };
        against_base.push(plan);
    }
    send(chunk(Body::Header(proto::VolumeStreamHeader {
        transfer_id,
        tenant_id: at.tenant.to_string(),
        layout: layout as i32,
        data_bytes,
        base_transfer_id: base.map_or(0, |b| b.transfer_id),
        // Set by the transport that carries the stream (see send_volume).
        transfer_token: Vec::new(),
        stream_format: STREAM_FORMAT,
    })))?;
    let mut volume = VolumeDigest::default();
    let mut sent_base = Base {
        transfer_id,
        layout: layout as i32,
        files: BTreeMap::new(),
        stamps: BTreeMap::new(),
    };
    let mut sent = 0u64;
    for (it, plan) in items.into_iter().zip(against_base) {
        let mut entry = it.entry.clone();
        if let Some((_, changed)) = &plan {
            entry.from_base = true;
            entry.changed_blocks = changed.iter().copied().collect();
        }
        send(chunk(Body::Entry(entry)))?;
        // The blocks' hashes as sent; a file sent against the base has them already.
        let mut blocks = match plan {
            None if it.is_file() => vec![Sha256::new(); blocks_in(it.entry.size)],
            _ => Vec::new(),
        };
        if !it.extents.is_empty() {
            let file = tree.file(&it.entry.path)?;
            for (offset, len) in pieces(&it.extents) {
                let block = offset / CHUNK_BYTES as u64;
                if plan
                    .as_ref()
                    .is_some_and(|(_, changed)| !changed.contains(&block))
                {
                    continue;
                }
                let got =
                    read_at(&file, &mut buffer[..len], offset).map_err(|e| io(&it.path, e))?;
                if got == 0 {
                    // The file shrank since it was listed: what is left is a hole.
                    continue;
                }
                if plan.is_none() {
                    hash_piece(&mut blocks[block as usize], offset, &buffer[..got]);
                }
                for run in nonzero_runs(offset, &buffer[..got]) {
                    let data = proto::VolumeData {
                        offset: offset + run.start as u64,
                        data: buffer[run.clone()].to_vec().into(),
                    };
                    sent += run.len() as u64;
                    send(chunk(Body::Data(data)))?;
                }
            }
        }
        let hashes: Vec<BlockHash> = match plan {
            Some((now, _)) => now,
            None => blocks.into_iter().map(|b| b.finalize().into()).collect(),
        };
        volume.entry(&it.entry, &hashes);
        if it.is_file() {
            sent_base.files.insert(it.entry.path.clone(), hashes);
            if let Some(stamp) = it.stamp {
                sent_base.stamps.insert(it.entry.path.clone(), stamp);
            }
        }
    }
    let volume_sha256 = volume.hex();
    send(chunk(Body::End(proto::VolumeStreamEnd {
        data_bytes: sent,
        volume_sha256: volume_sha256.clone(),
    })))?;
    Ok(Copied {
        data_bytes: sent,
        volume_sha256,
        base: sent_base,
    })
}

fn read_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read_at(&mut buffer[filled..], offset + filled as u64)? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn chunk(body: Body) -> proto::VolumeChunk {
    proto::VolumeChunk { body: Some(body) }
}

/// A relative path made only of plain names: nothing absolute, no `.` or `..`, no empty part.
fn safe_relative(path: &str) -> Result<PathBuf, TransferError> {
    let p = Path::new(path);
    if path.is_empty()
        || path.len() > 4096
        || path.contains('\0')
        || !p.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(bad(format!(
            "entry path {path:?} is not a plain relative path"
        )));
    }
    Ok(p.to_path_buf())
}

/// A block of the file being received: kept from the base, or being written now.
#[derive(Debug)]
enum Block {
    Kept(BlockHash),
    Fresh(Sha256),
}

/// The regular file being received.
#[derive(Debug)]
struct Receiving {
    file: File,
    entry: proto::VolumeEntry,
    blocks: Vec<Block>,
}

/// Writes a received stream into a staging area and puts it in place once it checks out. A
/// stream that builds on a pre-copy is written over the pre-copy the staging area holds.
#[derive(Debug)]
pub struct Importer {
    at: VolumeLocation,
    transfer_id: u64,
    /// The pre-copy in the staging area, if this host holds one.
    base: Option<Base>,
    layout: Option<proto::VolumeLayout>,
    volume: VolumeDigest,
    received: u64,
    current: Option<Receiving>,
    /// Every path the stream listed: what else the staging area holds goes at the end.
    listed: BTreeSet<PathBuf>,
    files: BTreeMap<String, Vec<BlockHash>>,
    done: Option<(u64, String)>,
}

impl Importer {
    /// An import of transfer `transfer_id`; `base` is the pre-copy this host holds in its
    /// staging area (a stream that does not build on it clears the area first).
    pub fn new(at: VolumeLocation, transfer_id: u64, base: Option<Base>) -> Self {
        Self {
            at,
            transfer_id,
            base,
            layout: None,
            volume: VolumeDigest::default(),
            received: 0,
            current: None,
            listed: BTreeSet::new(),
            files: BTreeMap::new(),
            done: None,
        }
    }

    /// Takes one chunk, in stream order.
    pub fn accept(&mut self, chunk: proto::VolumeChunk) -> Result<(), TransferError> {
        if self.done.is_some() {
            return Err(bad("data after the end"));
        }
        let body = chunk.body.ok_or_else(|| bad("a chunk without a body"))?;
        match (self.layout, body) {
            (None, Body::Header(h)) => self.header(h),
            (None, _) => Err(bad("the first chunk must be the header")),
            (Some(_), Body::Header(_)) => Err(bad("a second header")),
            (Some(layout), Body::Entry(e)) => self.entry(layout, e),
            (Some(_), Body::Data(d)) => self.data(d),
            (Some(_), Body::End(end)) => self.end(end),
        }
    }

    fn header(&mut self, h: proto::VolumeStreamHeader) -> Result<(), TransferError> {
        if h.transfer_id != self.transfer_id {
            return Err(bad(format!(
                "transfer {} is not the expected {}",
                h.transfer_id, self.transfer_id
            )));
        }
        if h.stream_format != STREAM_FORMAT {
            return Err(bad(format!(
                "stream format {} (from an agent of another version); this agent reads format \
                 {STREAM_FORMAT}: run the same berth-agent version on both hosts of a move",
                h.stream_format
            )));
        }
        if h.tenant_id != self.at.tenant.as_str() {
            return Err(bad(format!(
                "the stream is {}'s volume, not {}'s",
                h.tenant_id, self.at.tenant
            )));
        }
        let layout = match proto::VolumeLayout::try_from(h.layout) {
            Ok(
                l @ (proto::VolumeLayout::LuksFile
                | proto::VolumeLayout::PlainImage
                | proto::VolumeLayout::PlainDirectory),
            ) => l,
            _ => return Err(bad(format!("unknown layout {}", h.layout))),
        };
        let staging = self.at.staging();
        if h.base_transfer_id == 0 {
            self.base = None;
            shred_copy(&staging)?;
            std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
        } else if !self.base.as_ref().is_some_and(|b| {
            b.transfer_id == h.base_transfer_id && b.layout == h.layout && staging.is_dir()
        }) {
            return Err(bad(format!(
                "the stream builds on pre-copy {}, which this host does not hold",
                h.base_transfer_id
            )));
        }
        self.layout = Some(layout);
        Ok(())
    }

    /// Ends the file being received: its blocks' hashes go into the volume's digest.
    fn close_current(&mut self) {
        if let Some(r) = self.current.take() {
            let hashes: Vec<BlockHash> = r
                .blocks
                .into_iter()
                .map(|b| match b {
                    Block::Kept(h) => h,
                    Block::Fresh(h) => h.finalize().into(),
                })
                .collect();
            self.volume.entry(&r.entry, &hashes);
            self.files.insert(r.entry.path, hashes);
        }
    }

    fn entry(
        &mut self,
        layout: proto::VolumeLayout,
        e: proto::VolumeEntry,
    ) -> Result<(), TransferError> {
        self.close_current();
        let relative = safe_relative(&e.path)?;
        if let Some(name) = self.at.file_name(layout)
            && (e.path != name || e.directory || !e.symlink.is_empty())
        {
            return Err(bad(format!(
                "a volume of this layout is the one file {name}, not {:?}",
                e.path
            )));
        }
        if e.from_base && (e.directory || !e.symlink.is_empty()) {
            return Err(bad(format!(
                "{:?}: only a regular file comes from the base",
                e.path
            )));
        }
        let path = self.at.staging().join(&relative);
        // Parents arrive before children, so a missing parent is a broken stream; a parent
        // that is a link would lead outside.
        let parent = path.parent().unwrap_or(&path);
        let parent_meta = std::fs::symlink_metadata(parent).map_err(|e| io(parent, e))?;
        if !parent_meta.is_dir() {
            return Err(bad(format!("{:?}: its parent is not a directory", e.path)));
        }
        if !self.listed.insert(relative) {
            return Err(bad(format!("{:?} listed twice", e.path)));
        }
        let mode = e.mode & 0o777;
        // What a pre-copy left at this path, unless the stream keeps it.
        let existing = std::fs::symlink_metadata(&path).ok();
        let keep_dir = e.directory && existing.as_ref().is_some_and(|m| m.is_dir());
        match &existing {
            Some(_) if e.from_base || keep_dir => {}
            Some(m) if m.is_dir() => {
                std::fs::remove_dir_all(&path).map_err(|err| io(&path, err))?
            }
            Some(_) => std::fs::remove_file(&path).map_err(|err| io(&path, err))?,
            None => {}
        }
        if !e.symlink.is_empty() {
            std::os::unix::fs::symlink(&e.symlink, &path).map_err(|err| io(&path, err))?;
            self.volume.entry(&e, &[]);
        } else if e.directory {
            if !keep_dir {
                std::fs::create_dir(&path).map_err(|err| io(&path, err))?;
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|err| io(&path, err))?;
            self.volume.entry(&e, &[]);
        } else {
            let blocks = if e.from_base {
                self.kept_blocks(&e, &path)?
            } else {
                (0..blocks_in(e.size))
                    .map(|_| Block::Fresh(Sha256::new()))
                    .collect()
            };
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(!e.from_base)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|err| io(&path, err))?;
            file.set_len(e.size).map_err(|err| io(&path, err))?;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|err| io(&path, err))?;
            for (i, block) in blocks.iter().enumerate() {
                if matches!(block, Block::Fresh(_)) && e.from_base {
                    clear_block(&file, i as u64, e.size).map_err(|err| io(&path, err))?;
                }
            }
            self.current = Some(Receiving {
                file,
                entry: e,
                blocks,
            });
            return self.own(layout, &path);
        }
        self.own(layout, &path)
    }

    /// The blocks of a file kept from the base: all but its changed ones, which must exist.
    fn kept_blocks(
        &self,
        e: &proto::VolumeEntry,
        path: &Path,
    ) -> Result<Vec<Block>, TransferError> {
        let before = self
            .base
            .as_ref()
            .and_then(|b| b.files.get(&e.path))
            .filter(|_| std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()))
            .ok_or_else(|| bad(format!("{:?} is not a file of the pre-copy", e.path)))?;
        let count = blocks_in(e.size);
        let changed: BTreeSet<u64> = e.changed_blocks.iter().copied().collect();
        if changed.iter().any(|&b| b >= count as u64) {
            return Err(bad(format!("{:?}: a changed block past its end", e.path)));
        }
        (0..count)
            .map(|i| match changed.contains(&(i as u64)) {
                true => Ok(Block::Fresh(Sha256::new())),
                false => before.get(i).map(|h| Block::Kept(*h)).ok_or_else(|| {
                    bad(format!(
                        "{:?}: block {i} is neither sent nor in the pre-copy",
                        e.path
                    ))
                }),
            })
            .collect()
    }

    /// A plain volume's entries belong to the tenant's user.
    fn own(&self, layout: proto::VolumeLayout, path: &Path) -> Result<(), TransferError> {
        if layout == proto::VolumeLayout::PlainDirectory {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                path,
                Some(nix::unistd::Uid::from_raw(TENANT_ID)),
                Some(nix::unistd::Gid::from_raw(TENANT_ID)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|err| io(path, err.into()))?;
        }
        Ok(())
    }

    fn data(&mut self, d: proto::VolumeData) -> Result<(), TransferError> {
        let r = self
            .current
            .as_mut()
            .ok_or_else(|| bad("data outside a regular file"))?;
        let size = r.entry.size;
        let end = d.offset.saturating_add(d.data.len() as u64);
        if end > size {
            return Err(bad(format!(
                "data at {}+{} beyond the file's {size} bytes",
                d.offset,
                d.data.len()
            )));
        }
        let block = d.offset / CHUNK_BYTES as u64;
        if d.data.is_empty() || (end - 1) / CHUNK_BYTES as u64 != block {
            return Err(bad(format!(
                "data at {}+{} is not within one block",
                d.offset,
                d.data.len()
            )));
        }
        match r.blocks.get_mut(block as usize) {
            Some(Block::Fresh(h)) => hash_piece(h, d.offset, &d.data),
            _ => {
                return Err(bad(format!(
                    "data at {} for a block kept from the pre-copy",
                    d.offset
                )));
            }
        }
        r.file
            .write_all_at(&d.data, d.offset)
            .map_err(|e| io(&self.at.staging(), e))?;
        self.received += d.data.len() as u64;
        Ok(())
    }

    fn end(&mut self, end: proto::VolumeStreamEnd) -> Result<(), TransferError> {
        self.close_current();
        if end.data_bytes != self.received {
            return Err(bad(format!(
                "sent {} data bytes, received {}",
                end.data_bytes, self.received
            )));
        }
        remove_unlisted(&self.at.staging(), Path::new(""), &self.listed)?;
        let volume = self.volume.hex();
        if end.volume_sha256 != volume {
            return Err(bad(format!(
                "checksum mismatch: the volume's SHA-256 was {} when sent, {volume} as received",
                end.volume_sha256
            )));
        }
        self.done = Some((self.received, volume));
        Ok(())
    }

    /// After the end: moves the volume into place (replacing an older copy), or with
    /// `keep_aside` (a pre-copy) leaves it in the staging area as the next import's base.
    pub fn finish(self, keep_aside: bool) -> Result<Copied, TransferError> {
        let (data_bytes, volume_sha256) = self.done.clone().ok_or(TransferError::Cut)?;
        let copied = Copied {
            data_bytes,
            volume_sha256,
            base: Base {
                transfer_id: self.transfer_id,
                layout: self.layout.map_or(0, |l| l as i32),
                files: self.files.clone(),
                stamps: BTreeMap::new(),
            },
        };
        let staging = self.at.staging();
        let layout = self.layout.ok_or(TransferError::Cut)?;
        let (from, to) = match self.at.file_name(layout) {
            Some(name) => (
                staging.join(&name),
                self.at.root.join("volumes").join(&name),
            ),
            None => (staging.clone(), self.at.plain()),
        };
        if !from.exists() {
            return Err(bad("the stream held no volume"));
        }
        // On disk before the coordinator hears of it: after a whole copy it shreds the source's
        // copy. A pre-copy is written out too, so the copy after the stop has little left to
        // write during the tenant's downtime.
        let written = File::open(&staging).and_then(|dir| Ok(nix::unistd::syncfs(&dir)?));
        written.map_err(|e| io(&staging, e))?;
        if keep_aside {
            return Ok(copied);
        }
        // Never over a volume in use here: its tenant runs on this host.
        let plain = self.at.plain();
        if mount_point(&plain).map_err(|e| io(&plain, e))? {
            return Err(TransferError::Attached(self.at.tenant.to_string()));
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        // The copy received is the tenant's volume: an unencrypted one in another layout that
        // an earlier stay here left goes (the mount point of an image stays, emptied).
        match layout {
            proto::VolumeLayout::PlainDirectory => {
                for stale in [
                    self.at.plain_image(),
                    self.at.plain_image().with_extension("ext4.partial"),
                ] {
                    if stale.exists() {
                        std::fs::remove_file(&stale).map_err(|e| io(&stale, e))?;
                    }
                }
            }
            proto::VolumeLayout::PlainImage if plain.is_dir() => {
                std::fs::remove_dir_all(&plain).map_err(|e| io(&plain, e))?;
            }
            _ => {}
        }
        if to.is_dir() {
            std::fs::remove_dir_all(&to).map_err(|e| io(&to, e))?;
        }
        std::fs::rename(&from, &to).map_err(|e| io(&to, e))?;
        if layout == proto::VolumeLayout::PlainDirectory {
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| io(&to, e))?;
            nix::unistd::chown(
                &to,
                Some(nix::unistd::Uid::from_raw(TENANT_ID)),
                Some(nix::unistd::Gid::from_raw(TENANT_ID)),
            )
            .map_err(|e| io(&to, e.into()))?;
        } else if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|e| io(&staging, e))?;
        }
        // And the rename that put it in place.
        let placed = File::open(to.parent().unwrap_or(&to)).and_then(|dir| dir.sync_all());
        placed.map_err(|e| io(&to, e))?;
        Ok(copied)
    }
}

/// Empties block `index` of a file of `size` bytes (a hole where the filesystem can punch
/// one, zeros elsewhere) before its new data is written.
fn clear_block(file: &File, index: u64, size: u64) -> std::io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let start = index * CHUNK_BYTES as u64;
    let len = (start + CHUNK_BYTES as u64).min(size) - start;
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, punch, start as i64, len as i64) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => file.write_all_at(&vec![0u8; len as usize], start),
        Err(e) => Err(e.into()),
    }
}

/// Removes what the staging area holds under `relative` that the stream did not list (what a
/// pre-copy had and the volume no longer has). Never follows a link.
fn remove_unlisted(
    staging: &Path,
    relative: &Path,
    listed: &BTreeSet<PathBuf>,
) -> Result<(), TransferError> {
    let dir = staging.join(relative);
    for name in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
        let name = name.map_err(|e| io(&dir, e))?.file_name();
        let rel = relative.join(&name);
        let path = staging.join(&rel);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io(&path, e))?;
        match (listed.contains(&rel), meta.is_dir()) {
            (true, true) => remove_unlisted(staging, &rel, listed)?,
            (true, false) => {}
            (false, true) => std::fs::remove_dir_all(&path).map_err(|e| io(&path, e))?,
            (false, false) => std::fs::remove_file(&path).map_err(|e| io(&path, e))?,
        }
    }
    Ok(())
}

/// Chunks in flight between the disk and the network, per transfer.
const PIPE_CHUNKS: usize = 4;

/// The nice value of a pre-copy's disk and hash work: a tenant still runs on the source, and
/// the previous one is starting on the target; the copy takes the CPU time they leave.
const PRECOPY_NICE: i32 = 10;

/// Runs `work` off the async threads: a pre-copy's on a thread of its own at
/// [`PRECOPY_NICE`] (a thread may always lower its own priority, and this one ends with the
/// work), anything else on the blocking pool.
async fn off_runtime<T: Send + 'static>(
    precopy: bool,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CopyError> {
    let failed = |message: String| CopyError::Task {
        what: if precopy { "pre-copy" } else { "copy" },
        message,
    };
    if !precopy {
        return tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| failed(e.to_string()));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("berth-precopy".into())
        .spawn(move || {
            let tid = nix::unistd::gettid().as_raw() as libc::id_t;
            // SAFETY: setpriority reads only its three integer arguments; with PRIO_PROCESS
            // and a thread id, Linux sets that thread's nice value.
            #[allow(unsafe_code)]
            let lowered = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, PRECOPY_NICE) };
            if lowered != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "pre-copy priority unchanged");
            }
            let _ = tx.send(work());
        })
        .map_err(|e| failed(e.to_string()))?;
    rx.await.map_err(|_| failed("the thread died".into()))
}

/// How often an import reports its progress at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Resolves once `cancelled` turns true (never when its sender is gone).
async fn cancelled_by(mut cancelled: watch::Receiver<bool>) {
    if cancelled.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Exports the tenant's volume (see [`export`]) as transfer `transfer_id` with its `token`,
/// pushed to the target's transfer port through `target`.
pub async fn send_volume(
    mut target: PeerServiceClient<Channel>,
    at: VolumeLocation,
    transfer_id: u64,
    token: Vec<u8>,
    precopy: bool,
    base: Option<Base>,
    cancelled: watch::Receiver<bool>,
) -> Result<Copied, CopyError> {
    let (tx, rx) = mpsc::channel(PIPE_CHUNKS);
    let reader = off_runtime(precopy, move || {
        let mut token = Some(token);
        export(&at, transfer_id, precopy, base.as_ref(), |mut c| {
            // The token belongs to the transport, not to the volume: only the header has it.
            if let (Some(Body::Header(h)), Some(token)) = (&mut c.body, token.take()) {
                h.transfer_token = token;
            }
            tx.blocking_send(c).map_err(|_| TransferError::TargetGone)
        })
    });
    let copy = async { tokio::join!(reader, target.push_volume(ReceiverStream::new(rx))) };
    // Cancelled, the stream is dropped, so the reader's next send fails and it ends.
    let (read, call) = tokio::select! {
        done = copy => done,
        () = cancelled_by(cancelled) => return Err(CopyError::Cancelled),
    };
    match (read?, call) {
        // The call says why the target stopped taking the stream.
        (Ok(_) | Err(TransferError::TargetGone), Err(status)) => {
            Err(CopyError::Target(status.message().to_string()))
        }
        (Err(e), _) => Err(e.into()),
        (Ok(done), Ok(_)) => Ok(done),
    }
}

/// Imports the transfer `transfer_id` pushed to this host (`chunks`) as the tenant's
/// volume, or with `precopy` as a base kept aside; `base` is the pre-copy this host holds.
/// `report` hears the stream's data bytes and those received so far, a few times a second.
/// A failed or cancelled import leaves nothing behind.
pub async fn receive_volume(
    mut chunks: IncomingChunks,
    at: VolumeLocation,
    transfer_id: u64,
    precopy: bool,
    base: Option<Base>,
    report: impl Fn(u64, u64),
    cancelled: watch::Receiver<bool>,
) -> Result<Copied, CopyError> {
    let (tx, mut rx) = mpsc::channel::<proto::VolumeChunk>(PIPE_CHUNKS);
    let staging = at.staging();
    let writer = tokio::spawn(off_runtime(precopy, move || {
        let mut importer = Importer::new(at, transfer_id, base);
        while let Some(chunk) = rx.blocking_recv() {
            importer.accept(chunk)?;
        }
        importer.finish(precopy)
    }));
    let (mut total, mut received) = (0u64, 0u64);
    let mut reported = std::time::Instant::now();
    let cancel = cancelled_by(cancelled);
    tokio::pin!(cancel);
    let broken = loop {
        let next = tokio::select! {
            next = chunks.recv() => next,
            () = &mut cancel => break Some(CopyError::Cancelled),
        };
        match next {
            Some(Ok(chunk)) => {
                match &chunk.body {
                    Some(Body::Header(h)) => total = h.data_bytes,
                    Some(Body::Data(d)) => received += d.data.len() as u64,
                    _ => {}
                }
                if reported.elapsed() >= PROGRESS_EVERY {
                    report(total, received);
                    reported = std::time::Instant::now();
                }
                if tx.send(chunk).await.is_err() {
                    break None;
                }
            }
            None => break None,
            Some(Err(why)) => break Some(why.into()),
        }
    };
    drop(tx);
    // Cancelled or broken, the writer sees the stream end early and fails.
    let written = writer
        .await
        .map_err(|e| CopyError::Task {
            what: "import",
            message: e.to_string(),
        })
        .and_then(|joined| joined)?
        .map_err(CopyError::from);
    let outcome = match broken {
        Some(why) => Err(why),
        None => written,
    };
    if outcome.is_err()
        && let Err(error) = shred_copy(&staging)
    {
        tracing::error!(%error, "the copy of an import cut short was not erased");
    }
    outcome
}

#[cfg(test)]
mod tests;
