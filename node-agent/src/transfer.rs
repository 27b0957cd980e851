//! A tenant's volume as a stream, and back, for moving it to another host during a drain.
//!
//! Ensures: only what is on disk is sent (the holes of a sparse backing file are skipped, and
//! come back as holes); the sender and the receiver each compute a SHA-256 over the stream and
//! the volume is put in place only when both agree; nothing from the stream can write outside
//! the volume (paths are relative and plain, links are recreated, never followed); a volume
//! that is attached (open or mounted) is never read; a received volume replaces whatever an
//! earlier failed attempt left only once it is complete.
//!
//! An encrypted volume travels as its LUKS2 backing file, so only ciphertext leaves the host;
//! a plain volume as its directory tree. Both take the same path through this code.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use berth_shared::ids::TenantId;
use berth_shared::proto::agent_service_client::AgentServiceClient;
use berth_shared::proto::{self, volume_chunk::Body};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Data bytes per chunk.
pub const CHUNK_BYTES: usize = 1 << 20;

/// The uid and gid a plain volume's files belong to (the tenant's user).
const TENANT_ID: u32 = 65534;

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

    /// The layout on disk: the LUKS file when there is one, else the plain directory.
    pub fn layout(&self) -> Option<proto::VolumeLayout> {
        if self.image().is_file() {
            Some(proto::VolumeLayout::LuksFile)
        } else if self.plain().is_dir() {
            Some(proto::VolumeLayout::PlainDirectory)
        } else {
            None
        }
    }
}

/// The running SHA-256 of a stream, fed the same way on both ends.
#[derive(Debug, Default, Clone)]
struct StreamDigest(Sha256);

impl StreamDigest {
    fn entry(&mut self, e: &proto::VolumeEntry) {
        self.0.update(b"E");
        self.0.update(e.path.as_bytes());
        self.0.update([0, u8::from(e.directory)]);
        self.0.update(e.mode.to_le_bytes());
        self.0.update(e.size.to_le_bytes());
        self.0.update(e.symlink.as_bytes());
        self.0.update([0]);
    }
    fn data(&mut self, d: &proto::VolumeData) {
        self.0.update(b"D");
        self.0.update(d.offset.to_le_bytes());
        self.0.update((d.data.len() as u64).to_le_bytes());
        self.0.update(&d.data);
    }
    fn hex(&self) -> String {
        hex::encode(self.0.clone().finalize())
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
}

fn item(path: &Path, relative: String) -> Result<Item, TransferError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| io(path, e))?;
    let mut entry = proto::VolumeEntry {
        path: relative,
        mode: meta.mode() & 0o777,
        ..Default::default()
    };
    let mut extents_of = Vec::new();
    if meta.file_type().is_symlink() {
        entry.symlink = std::fs::read_link(path)
            .map_err(|e| io(path, e))?
            .to_string_lossy()
            .into_owned();
    } else if meta.is_dir() {
        entry.directory = true;
    } else if meta.is_file() {
        entry.size = meta.len();
        let file = File::open(path).map_err(|e| io(path, e))?;
        extents_of = extents(&file, meta.len()).map_err(|e| io(path, e))?;
    } else {
        // Sockets, fifos, devices: not volume data.
        return Ok(Item {
            path: path.to_path_buf(),
            entry: proto::VolumeEntry::default(),
            extents: Vec::new(),
        });
    }
    Ok(Item {
        path: path.to_path_buf(),
        entry,
        extents: extents_of,
    })
}

/// Every entry under `dir`, parents before children, in name order.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<Item>) -> Result<(), TransferError> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| io(dir, e))?;
    names.sort();
    for name in names {
        let name = name.to_string_lossy().into_owned();
        let relative = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let path = dir.join(&name);
        let it = item(&path, relative.clone())?;
        if it.entry.path.is_empty() {
            continue;
        }
        let is_dir = it.entry.directory;
        out.push(it);
        if is_dir {
            walk(&path, &relative, out)?;
        }
    }
    Ok(())
}

/// Streams the tenant's closed volume into `send`, one chunk at a time (blocking: `send` may
/// wait for the network). Returns the data bytes sent and the stream's SHA-256.
pub fn export(
    at: &VolumeLocation,
    transfer_id: u64,
    mut send: impl FnMut(proto::VolumeChunk) -> Result<(), TransferError>,
) -> Result<(u64, String), TransferError> {
    let mapped = Path::new("/dev/mapper").join(format!("berth-{}", at.tenant));
    let mounted = at.mount().is_dir()
        && std::fs::read_dir(at.mount())
            .map_err(|e| io(&at.mount(), e))?
            .next()
            .is_some();
    if mounted || mapped.exists() {
        return Err(TransferError::Attached(at.tenant.to_string()));
    }
    let layout = at
        .layout()
        .ok_or_else(|| TransferError::NoVolume(at.tenant.to_string()))?;
    let items = match layout {
        proto::VolumeLayout::LuksFile => vec![item(&at.image(), format!("{}.img", at.tenant))?],
        _ => {
            let mut items = Vec::new();
            walk(&at.plain(), "", &mut items)?;
            items
        }
    };
    let data_bytes: u64 = items
        .iter()
        .flat_map(|i| i.extents.iter().map(|(_, len)| len))
        .sum();
    send(chunk(Body::Header(proto::VolumeStreamHeader {
        transfer_id,
        tenant_id: at.tenant.to_string(),
        layout: layout as i32,
        data_bytes,
    })))?;
    let mut digest = StreamDigest::default();
    let mut sent = 0u64;
    let mut buffer = vec![0u8; CHUNK_BYTES];
    for it in items {
        digest.entry(&it.entry);
        send(chunk(Body::Entry(it.entry.clone())))?;
        if it.extents.is_empty() {
            continue;
        }
        let mut file = File::open(&it.path).map_err(|e| io(&it.path, e))?;
        for (start, len) in it.extents {
            let mut offset = start;
            while offset < start + len {
                let want = (start + len - offset).min(CHUNK_BYTES as u64) as usize;
                let got =
                    read_at(&mut file, &mut buffer[..want], offset).map_err(|e| io(&it.path, e))?;
                if got == 0 {
                    // The file shrank since it was listed: what is left is a hole.
                    break;
                }
                let data = proto::VolumeData {
                    offset,
                    data: buffer[..got].to_vec(),
                };
                digest.data(&data);
                sent += got as u64;
                offset += got as u64;
                send(chunk(Body::Data(data)))?;
            }
        }
    }
    let sha256 = digest.hex();
    send(chunk(Body::End(proto::VolumeStreamEnd {
        sha256: sha256.clone(),
        data_bytes: sent,
    })))?;
    Ok((sent, sha256))
}

fn read_at(file: &mut File, buffer: &mut [u8], offset: u64) -> std::io::Result<usize> {
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

/// Writes a received stream into a staging area and puts it in place once it checks out.
#[derive(Debug)]
pub struct Importer {
    at: VolumeLocation,
    transfer_id: u64,
    layout: Option<proto::VolumeLayout>,
    digest: StreamDigest,
    received: u64,
    current: Option<(File, u64)>,
    done: Option<(u64, String)>,
}

impl Importer {
    /// Clears what an earlier failed import left in the staging area.
    pub fn new(at: VolumeLocation, transfer_id: u64) -> Result<Self, TransferError> {
        let staging = at.staging();
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|e| io(&staging, e))?;
        }
        std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
        Ok(Self {
            at,
            transfer_id,
            layout: None,
            digest: StreamDigest::default(),
            received: 0,
            current: None,
            done: None,
        })
    }

    /// Takes one chunk, in stream order.
    pub fn accept(&mut self, chunk: proto::VolumeChunk) -> Result<(), TransferError> {
        if self.done.is_some() {
            return Err(bad("data after the end"));
        }
        let body = chunk.body.ok_or_else(|| bad("a chunk without a body"))?;
        match (self.layout, body) {
            (None, Body::Header(h)) => {
                if h.transfer_id != self.transfer_id {
                    return Err(bad(format!(
                        "transfer {} is not the expected {}",
                        h.transfer_id, self.transfer_id
                    )));
                }
                if h.tenant_id != self.at.tenant.as_str() {
                    return Err(bad(format!(
                        "the stream is {}'s volume, not {}'s",
                        h.tenant_id, self.at.tenant
                    )));
                }
                self.layout = match proto::VolumeLayout::try_from(h.layout) {
                    Ok(
                        l @ (proto::VolumeLayout::LuksFile | proto::VolumeLayout::PlainDirectory),
                    ) => Some(l),
                    _ => return Err(bad(format!("unknown layout {}", h.layout))),
                };
                Ok(())
            }
            (None, _) => Err(bad("the first chunk must be the header")),
            (Some(_), Body::Header(_)) => Err(bad("a second header")),
            (Some(layout), Body::Entry(e)) => self.entry(layout, e),
            (Some(_), Body::Data(d)) => {
                let (file, size) = self
                    .current
                    .as_ref()
                    .ok_or_else(|| bad("data outside a regular file"))?;
                if d.offset.saturating_add(d.data.len() as u64) > *size {
                    return Err(bad(format!(
                        "data at {}+{} beyond the file's {size} bytes",
                        d.offset,
                        d.data.len()
                    )));
                }
                file.write_all_at(&d.data, d.offset)
                    .map_err(|e| io(&self.at.staging(), e))?;
                self.received += d.data.len() as u64;
                self.digest.data(&d);
                Ok(())
            }
            (Some(_), Body::End(end)) => {
                let ours = self.digest.hex();
                if end.sha256 != ours || end.data_bytes != self.received {
                    return Err(bad(format!(
                        "checksum mismatch: sent {} bytes with SHA-256 {}, received {} bytes with {ours}",
                        end.data_bytes, end.sha256, self.received
                    )));
                }
                self.current = None;
                self.done = Some((self.received, ours));
                Ok(())
            }
        }
    }

    fn entry(
        &mut self,
        layout: proto::VolumeLayout,
        e: proto::VolumeEntry,
    ) -> Result<(), TransferError> {
        let relative = safe_relative(&e.path)?;
        if layout == proto::VolumeLayout::LuksFile
            && (e.path != format!("{}.img", self.at.tenant) || e.directory || !e.symlink.is_empty())
        {
            return Err(bad(format!(
                "a LUKS volume is the one file {}.img, not {:?}",
                self.at.tenant, e.path
            )));
        }
        let path = self.at.staging().join(relative);
        // Parents arrive before children, so a missing parent is a broken stream; a parent
        // that is a link would lead outside.
        let parent = path.parent().unwrap_or(&path);
        let parent_meta = std::fs::symlink_metadata(parent).map_err(|e| io(parent, e))?;
        if !parent_meta.is_dir() {
            return Err(bad(format!("{:?}: its parent is not a directory", e.path)));
        }
        self.digest.entry(&e);
        self.current = None;
        let mode = e.mode & 0o777;
        if !e.symlink.is_empty() {
            std::os::unix::fs::symlink(&e.symlink, &path).map_err(|err| io(&path, err))?;
        } else if e.directory {
            std::fs::create_dir(&path).map_err(|err| io(&path, err))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|err| io(&path, err))?;
        } else {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|err| io(&path, err))?;
            file.set_len(e.size).map_err(|err| io(&path, err))?;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|err| io(&path, err))?;
            self.current = Some((file, e.size));
        }
        if layout == proto::VolumeLayout::PlainDirectory {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &path,
                Some(nix::unistd::Uid::from_raw(TENANT_ID)),
                Some(nix::unistd::Gid::from_raw(TENANT_ID)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|err| io(&path, err.into()))?;
        }
        Ok(())
    }

    /// After the end: moves the volume into place (replacing an older copy) and returns the
    /// data bytes and the checksum.
    pub fn finish(self) -> Result<(u64, String), TransferError> {
        let done = self.done.clone().ok_or(TransferError::Cut)?;
        let staging = self.at.staging();
        let (from, to) = match self.layout {
            Some(proto::VolumeLayout::LuksFile) => (
                staging.join(format!("{}.img", self.at.tenant)),
                self.at.image(),
            ),
            _ => (staging.clone(), self.at.plain()),
        };
        if !from.exists() {
            return Err(bad("the stream held no volume"));
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        if to.is_dir() {
            std::fs::remove_dir_all(&to).map_err(|e| io(&to, e))?;
        }
        std::fs::rename(&from, &to).map_err(|e| io(&to, e))?;
        if self.layout == Some(proto::VolumeLayout::PlainDirectory) {
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
        Ok(done)
    }
}

/// Chunks in flight between the disk and the network, per transfer.
const PIPE_CHUNKS: usize = 4;

/// Exports the tenant's volume to the coordinator's transfer `transfer_id`.
pub async fn send_volume(
    mut client: AgentServiceClient<Channel>,
    at: VolumeLocation,
    transfer_id: u64,
) -> Result<(u64, String), String> {
    let (tx, rx) = mpsc::channel(PIPE_CHUNKS);
    let reader = tokio::task::spawn_blocking(move || {
        export(&at, transfer_id, |c| {
            tx.blocking_send(c)
                .map_err(|_| bad("the coordinator stopped taking the stream"))
        })
    });
    let (read, call) = tokio::join!(reader, client.send_volume(ReceiverStream::new(rx)));
    let read = read.map_err(|e| format!("export task: {e}"))?;
    match (read, call) {
        (Err(e), _) => Err(e.to_string()),
        (Ok(_), Err(status)) => Err(format!("the coordinator: {}", status.message())),
        (Ok(done), Ok(_)) => Ok(done),
    }
}

/// Imports the coordinator's transfer `transfer_id` as the tenant's volume; a failed import
/// leaves nothing behind.
pub async fn receive_volume(
    mut client: AgentServiceClient<Channel>,
    at: VolumeLocation,
    transfer_id: u64,
) -> Result<(u64, String), String> {
    let mut stream = client
        .receive_volume(proto::ReceiveVolumeRequest { transfer_id })
        .await
        .map_err(|status| format!("the coordinator: {}", status.message()))?
        .into_inner();
    let (tx, mut rx) = mpsc::channel::<proto::VolumeChunk>(PIPE_CHUNKS);
    let staging = at.staging();
    let writer = tokio::task::spawn_blocking(move || {
        let mut importer = Importer::new(at, transfer_id)?;
        while let Some(chunk) = rx.blocking_recv() {
            importer.accept(chunk)?;
        }
        importer.finish()
    });
    let mut broken = None;
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(status) => {
                broken = Some(format!("the coordinator: {}", status.message()));
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| format!("import task: {e}"))?
        .map_err(|e| e.to_string());
    let outcome = match broken {
        Some(why) => Err(why),
        None => written,
    };
    if outcome.is_err() && staging.exists() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    outcome
}

#[cfg(test)]
mod tests;
