//! A tenant's files for its operator (a GDPR export): a tar of its open volume's files as they
//! are, or of one of its snapshots, uploaded to the coordinator while it is made.
//!
//! Ensures: nothing is staged on disk: the tar goes out in chunks of at most [`CHUNK_BYTES`] as
//! the uploader takes them (a slow reader slows the tar, a reader gone stops it); a snapshot is
//! read with the key sent for this export only, one restic at a time on the tenant's
//! repository; the volume's `lost+found` and a restore's staging directory are left out; the
//! upload always ends with a last chunk that says it is done, or why not.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use berth_shared::ids::TenantId;
use berth_shared::proto;
use tokio::sync::mpsc;

use super::schedule::OpenVolumes;
use super::{BackupEngine, BackupError, RESTORE_STAGING, RepositoryLocks, command_access};
use crate::command::{CommandError, stream_command_in};

/// The largest chunk of an upload.
pub const CHUNK_BYTES: usize = 256 << 10;

/// An export to run: writes the tar to its writer; the bytes written.
pub type ExportJob = Box<dyn FnOnce(&mut dyn Write) -> Result<u64, ExportError> + Send>;

/// Why an export was refused, or failed; the message goes back to the operator.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("tenant_id: {0}")]
    TenantId(berth_shared::ids::IdError),
    #[error("{0} is not placed on this host")]
    NotPlaced(TenantId),
    #[error("this host cannot export yet: its volumes are not set up")]
    NotReady,
    #[error("volume: {0}")]
    Volume(std::io::Error),
    #[error("volume: {0} is not open on this host")]
    NotOpen(TenantId),
    #[error("snapshot_id: {0}")]
    SnapshotId(berth_shared::backup::BadSnapshotId),
    /// The command's repository or key, or restic's dump of the snapshot.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// tar of the open volume.
    #[error(transparent)]
    Tar(CommandError),
    #[error("export task: {0}")]
    Task(tokio::task::JoinError),
    #[error("upload: {}", .0.message())]
    Upload(tonic::Status),
}

/// Makes exports of this host's tenants.
#[derive(Debug, Clone)]
pub struct Exporter {
    pub engine: Arc<dyn BackupEngine>,
    pub volumes: Arc<dyn OpenVolumes>,
    pub locks: RepositoryLocks,
}

impl Exporter {
    /// The export `command` asks of `tenant`, checked now and run as the upload consumes it.
    pub fn job(
        &self,
        tenant: &TenantId,
        command: &proto::VolumeCommand,
    ) -> Result<ExportJob, ExportError> {
        if command.snapshot_id.is_empty() {
            let contents = self
                .volumes
                .contents(tenant)
                .map_err(ExportError::Volume)?
                .ok_or_else(|| ExportError::NotOpen(tenant.clone()))?;
            return Ok(Box::new(move |out| tar_directory(&contents, out)));
        }
        let id = berth_shared::backup::snapshot_id(&command.snapshot_id)
            .map_err(ExportError::SnapshotId)?
            .to_string();
        let access = command_access(command)?;
        let (me, tenant) = (self.clone(), tenant.clone());
        Ok(Box::new(move |out| {
            let lock = me.locks.of(&tenant);
            let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
            Ok(me.engine.dump(&access.repository, &access.key, &id, out)?)
        }))
    }
}

/// Counts what goes through to the writer inside.
struct Counted<'a> {
    inner: &'a mut dyn Write,
    bytes: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// GNU tar of `dir`'s contents to `out`. Its exit status 1 (a file changed while it was read,
/// which a running tenant may do) still leaves a whole archive: such a file is in it as tar
/// read it.
fn tar_directory(dir: &Path, out: &mut dyn Write) -> Result<u64, ExportError> {
    let mut counted = Counted {
        inner: out,
        bytes: 0,
    };
    let lost_found = "--exclude=./lost+found".to_string();
    let staging = format!("--exclude=./{RESTORE_STAGING}");
    let made = stream_command_in(
        dir,
        "tar",
        &[
            "--create",
            "--file=-",
            "--one-file-system",
            &lost_found,
            &staging,
            ".",
        ],
        &[],
        None,
        &mut counted,
    );
    match made {
        Ok(_) => Ok(counted.bytes),
        Err(CommandError::Failed { status, stderr, .. }) if status == "exit status: 1" => {
            tracing::warn!(dir = %dir.display(), %stderr, "export: files changed while they were read");
            Ok(counted.bytes)
        }
        Err(e) => Err(ExportError::Tar(e)),
    }
}

/// Cuts what is written into upload chunks of at most [`CHUNK_BYTES`], each sent as soon as it
/// is full (waiting while the uploader has four unsent).
#[derive(Debug)]
pub struct ChunkWriter {
    export_id: u64,
    pending: Vec<u8>,
    chunks: mpsc::Sender<proto::ExportChunk>,
}

impl ChunkWriter {
    pub fn new(export_id: u64, chunks: mpsc::Sender<proto::ExportChunk>) -> Self {
        Self {
            export_id,
            pending: Vec::with_capacity(CHUNK_BYTES),
            chunks,
        }
    }

    fn send(&mut self, chunk: proto::ExportChunk) -> std::io::Result<()> {
        self.chunks
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload ended"))
    }

    /// Sends what is left, then the last chunk: done, or why not.
    pub fn finish(mut self, made: &Result<u64, ExportError>) -> std::io::Result<()> {
        let data = std::mem::take(&mut self.pending);
        let error = made
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        self.send(proto::ExportChunk {
            export_id: self.export_id,
            data,
            done: true,
            error,
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(CHUNK_BYTES - self.pending.len());
        self.pending.extend_from_slice(&buf[..n]);
        if self.pending.len() == CHUNK_BYTES {
            let data = std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK_BYTES));
            self.send(proto::ExportChunk {
                export_id: self.export_id,
                data,
                done: false,
                error: String::new(),
            })?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `job` and uploads its tar through `client` as export `export_id`; the bytes made.
pub async fn upload(
    mut client: proto::agent_service_client::AgentServiceClient<berth_shared::leader::FleetChannel>,
    export_id: u64,
    job: ExportJob,
) -> Result<u64, ExportError> {
    let (tx, rx) = mpsc::channel(4);
    let producer = tokio::task::spawn_blocking(move || {
        let mut writer = ChunkWriter::new(export_id, tx);
        let made = job(&mut writer);
        // The uploader gone, nobody hears the end: the upload's own error says why.
        let _ = writer.finish(&made);
        made
    });
    let uploaded = client
        .upload_export(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let made = producer.await.map_err(ExportError::Task)?;
    uploaded.map_err(ExportError::Upload)?;
    made
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::backup::FakeEngine;

    #[derive(Debug)]
    struct Dirs(std::path::PathBuf);

    impl OpenVolumes for Dirs {
        fn contents(&self, tenant: &TenantId) -> std::io::Result<Option<std::path::PathBuf>> {
            let dir = self.0.join(tenant.as_str());
            Ok(dir.is_dir().then_some(dir))
        }
    }

    fn exporter(root: &Path) -> (Exporter, Arc<FakeEngine>) {
        let engine = Arc::new(FakeEngine::default());
        let exporter = Exporter {
            engine: engine.clone(),
            volumes: Arc::new(Dirs(root.to_path_buf())),
            locks: RepositoryLocks::default(),
        };
        (exporter, engine)
    }

    fn command(snapshot: &str, repository: &str, key: usize) -> proto::VolumeCommand {
        proto::VolumeCommand {
            tenant_id: "acme".into(),
            action: proto::VolumeAction::ExportFiles as i32,
            export_id: 7,
            snapshot_id: snapshot.into(),
            backup_repository: repository.into(),
            backup_key: vec![1; key],
            ..Default::default()
        }
    }

    /// Runs `job` into chunks as the uploader would see them.
    fn chunks(job: ExportJob) -> Vec<proto::ExportChunk> {
        let (tx, mut rx) = mpsc::channel(1024);
        let mut writer = ChunkWriter::new(7, tx);
        let made = job(&mut writer);
        writer.finish(&made).unwrap();
        let mut out = Vec::new();
        while let Ok(c) = rx.try_recv() {
            out.push(c);
        }
        out
    }

    #[test]
    fn the_files_now_go_out_as_a_tar_in_bounded_chunks_without_lost_found() {
        let root = tempfile::tempdir().unwrap();
        let volume = root.path().join("acme");
        std::fs::create_dir_all(volume.join("chats")).unwrap();
        std::fs::create_dir_all(volume.join("lost+found")).unwrap();
        std::fs::create_dir_all(volume.join(RESTORE_STAGING)).unwrap();
        std::fs::write(volume.join("chats/monday.txt"), "hello").unwrap();
        let big: Vec<u8> = (0..(CHUNK_BYTES * 2 + 100)).map(|i| i as u8).collect();
        std::fs::write(volume.join("files.bin"), &big).unwrap();
        let (exporter, _) = exporter(root.path());
        let acme = TenantId::new("acme").unwrap();
        let got = chunks(exporter.job(&acme, &command("", "", 0)).unwrap());
        assert!(
            got.iter()
                .all(|c| c.data.len() <= CHUNK_BYTES && c.export_id == 7)
        );
        let last = got.last().unwrap();
        assert!(last.done && last.error.is_empty(), "{last:?}");
        assert_eq!(got.iter().filter(|c| c.done).count(), 1);
        let tar: Vec<u8> = got.iter().flat_map(|c| c.data.clone()).collect();
        let unpacked = tempfile::tempdir().unwrap();
        std::fs::write(unpacked.path().join("x.tar"), &tar).unwrap();
        let listed = std::process::Command::new("tar")
            .args(["-tf", "x.tar"])
            .current_dir(unpacked.path())
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&listed.stdout);
        assert!(names.contains("./chats/monday.txt"), "{names}");
        assert!(!names.contains("lost+found") && !names.contains(RESTORE_STAGING));
        let out = std::process::Command::new("tar")
            .args(["-xOf", "x.tar", "./files.bin"])
            .current_dir(unpacked.path())
            .output()
            .unwrap();
        assert_eq!(out.stdout, big);
    }

    #[test]
    fn a_snapshot_is_dumped_with_the_key_sent_and_bad_commands_change_nothing() {
        let root = tempfile::tempdir().unwrap();
        let (exporter, engine) = exporter(root.path());
        let acme = TenantId::new("acme").unwrap();
        let job = exporter
            .job(&acme, &command("cabe28d5", "/srv/backups/acme", 32))
            .unwrap();
        let got = chunks(job);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, b"tar of cabe28d5");
        assert_eq!(
            engine.calls.lock().unwrap().clone(),
            ["dump /srv/backups/acme cabe28d5"]
        );
        for (bad, error) in [
            (
                command("--target=/", "/srv/backups/acme", 32),
                "snapshot_id: invalid snapshot id \"--target=/\": 8 to 64 hex digits",
            ),
            (
                command("cabe28d5", "relative", 32),
                "backup_repository: invalid backup repository \"relative\": an absolute path, or sftp:, s3:, rest: followed by its address",
            ),
            (
                command("cabe28d5", "/srv/backups/acme", 8),
                "backup_key: 8 bytes, expected 32",
            ),
            (command("", "", 0), "volume: acme is not open on this host"),
        ] {
            let refused = exporter.job(&acme, &bad).err().map(|e| e.to_string());
            assert_eq!(refused.as_deref(), Some(error));
        }
        assert_eq!(engine.calls.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_failed_export_ends_with_its_reason() {
        let (tx, mut rx) = mpsc::channel(4);
        let writer = ChunkWriter::new(9, tx);
        writer
            .finish(&Err(ExportError::Backup(BackupError::NoAccess)))
            .unwrap();
        let last = rx.try_recv().unwrap();
        assert!(last.done);
        assert_eq!(
            last.error,
            "no backup access for it on this host (the coordinator delivers it with the volume keys)"
        );
    }
}
