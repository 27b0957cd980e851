//! [`BackupEngine`] on the `restic` program (0.14 or later).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{
    BackupEngine, BackupError, BackupKey, BackupSummary, RESTORE_STAGING, Retention, Snapshot,
};
use crate::command::{CommandError, run_command_in, stream_command_in};

/// What restic says when there is no repository at the location.
const NO_REPOSITORY: &str = "Is there a repository at the following location?";
/// What restic says when another restic holds the repository's lock.
const LOCKED: &str = "unable to create lock in backend";
/// How long a run waits for another restic's lock on the repository.
pub const LOCK_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct Restic {
    pub program: String,
    /// restic's cache (it would use the home directory, which the agent's unit hides).
    pub cache_dir: PathBuf,
    /// For `sftp:` repositories: the command restic reaches the server with (`ssh ... -s
    /// sftp`), which names the identity file and known hosts.
    pub sftp_command: Option<String>,
    /// For `s3:` repositories: an AWS credentials file (`[default]` with
    /// `aws_access_key_id` and `aws_secret_access_key`), handed to restic by its path only.
    pub s3_credentials_file: Option<PathBuf>,
    pub timeout: Duration,
}

#[derive(Deserialize)]
struct Summary {
    message_type: String,
    #[serde(default)]
    snapshot_id: String,
    #[serde(default)]
    files_new: u64,
    #[serde(default)]
    files_changed: u64,
    #[serde(default)]
    data_added: u64,
    #[serde(default)]
    total_bytes_processed: u64,
    #[serde(default)]
    total_duration: f64,
}

#[derive(Deserialize)]
struct ListedSnapshot {
    id: String,
    short_id: String,
    time: String,
}

impl Restic {
    pub fn new(cache_dir: &Path, sftp_command: Option<String>) -> Self {
        Self {
            program: "restic".into(),
            cache_dir: cache_dir.to_path_buf(),
            sftp_command,
            s3_credentials_file: None,
            timeout: Duration::from_secs(6 * 3600),
        }
    }

    /// The variables restic runs with besides PATH, HOME and TMPDIR: where the S3 credentials
    /// file is (a path, never a secret).
    fn environment(&self) -> Vec<(&'static str, &std::ffi::OsStr)> {
        self.s3_credentials_file
            .iter()
            .map(|path| ("AWS_SHARED_CREDENTIALS_FILE", path.as_os_str()))
            .collect()
    }

    /// restic's arguments for `args` on `repository`: the repository, the cache, and how to
    /// reach an SFTP server.
    fn arguments(&self, repository: &str, args: &[&str]) -> Vec<String> {
        let mut all = vec![
            "--repo".to_string(),
            repository.to_string(),
            "--cache-dir".to_string(),
            self.cache_dir.to_string_lossy().into_owned(),
        ];
        if let Some(command) = &self.sftp_command {
            all.extend(["--option".to_string(), format!("sftp.command={command}")]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        all
    }

    /// Runs `restic -r <repository> <args>` in `dir` with the key on stdin; while the
    /// repository is locked by another restic, again (for up to [`LOCK_WAIT`]).
    fn run(
        &self,
        action: &'static str,
        repository: &str,
        key: &BackupKey,
        dir: &Path,
        args: &[&str],
    ) -> Result<String, BackupError> {
        let all = self.arguments(repository, args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let password = key.password_line();
        let mut pause = Duration::from_millis(500);
        let mut waited = Duration::ZERO;
        loop {
            let ran = run_command_in(
                dir,
                &self.program,
                &all,
                &self.environment(),
                Some(password.as_slice()),
                self.timeout,
            );
            match ran {
                // Another host (or an operator) holds the repository's lock: a prune takes
                // seconds to minutes; restic 0.14 cannot wait for it itself.
                Err(CommandError::Failed { ref stderr, .. })
                    if stderr.contains(LOCKED) && waited < LOCK_WAIT =>
                {
                    std::thread::sleep(pause);
                    waited += pause;
                    pause = (pause * 2).min(Duration::from_secs(10));
                }
                other => {
                    return other.map_err(|source| BackupError::Restic {
                        action,
                        repository: repository.to_string(),
                        source,
                    });
                }
            }
        }
    }

    fn output_error(action: &'static str, repository: &str, message: String) -> BackupError {
        BackupError::Output {
            action,
            repository: repository.to_string(),
            message,
        }
    }

    fn list(&self, repository: &str, key: &BackupKey) -> Result<Vec<Snapshot>, BackupError> {
        let out = self.run(
            "snapshots",
            repository,
            key,
            Path::new("/"),
            &["snapshots", "--json"],
        )?;
        // restic says "reading repository password from stdin" on stdout first.
        let json = out.find('[').map(|at| &out[at..]).unwrap_or("");
        let listed: Vec<ListedSnapshot> = serde_json::from_str(json.trim())
            .map_err(|e| Self::output_error("snapshots", repository, e.to_string()))?;
        let mut snapshots: Vec<Snapshot> = listed
            .into_iter()
            .map(|s| Snapshot {
                id: s.id,
                short_id: s.short_id,
                time: s.time,
            })
            .collect();
        snapshots.sort_by(|a, b| a.time.cmp(&b.time));
        Ok(snapshots)
    }
}

impl BackupEngine for Restic {
    fn ensure_repository(&self, repository: &str, key: &BackupKey) -> Result<bool, BackupError> {
        match self.list(repository, key) {
            Ok(_) => Ok(false),
            Err(BackupError::Restic {
                source: CommandError::Failed { stderr, .. },
                ..
            }) if stderr.contains(NO_REPOSITORY) => {
                self.run("init", repository, key, Path::new("/"), &["init"])?;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    fn backup(
        &self,
        repository: &str,
        key: &BackupKey,
        volume: &Path,
    ) -> Result<BackupSummary, BackupError> {
        let out = self.run(
            "backup",
            repository,
            key,
            volume,
            &[
                "backup",
                "--json",
                "--one-file-system",
                "--exclude",
                RESTORE_STAGING,
                ".",
            ],
        )?;
        let summary = out
            .lines()
            .filter_map(|l| serde_json::from_str::<Summary>(l).ok())
            .find(|s| s.message_type == "summary")
            .ok_or_else(|| {
                Self::output_error("backup", repository, "no summary line".to_string())
            })?;
        Ok(BackupSummary {
            snapshot_id: summary.snapshot_id,
            files_new: summary.files_new,
            files_changed: summary.files_changed,
            bytes_added: summary.data_added,
            bytes_processed: summary.total_bytes_processed,
            duration_ms: (summary.total_duration * 1000.0).round() as u64,
        })
    }

    fn snapshots(&self, repository: &str, key: &BackupKey) -> Result<Vec<Snapshot>, BackupError> {
        match self.list(repository, key) {
            // Never made (no backup of the tenant succeeded yet): no snapshot.
            Err(BackupError::Restic {
                source: CommandError::Failed { stderr, .. },
                ..
            }) if stderr.contains(NO_REPOSITORY) => Ok(Vec::new()),
            other => other,
        }
    }

    fn restore(
        &self,
        repository: &str,
        key: &BackupKey,
        id: &str,
        into: &Path,
    ) -> Result<(), BackupError> {
        let id = berth_shared::backup::snapshot_id(id)?;
        let target = into.to_string_lossy();
        self.run(
            "restore",
            repository,
            key,
            Path::new("/"),
            &["restore", id, "--target", &target],
        )?;
        Ok(())
    }

    fn forget(
        &self,
        repository: &str,
        key: &BackupKey,
        retention: Retention,
    ) -> Result<(), BackupError> {
        let (daily, weekly) = (
            retention.keep_daily.to_string(),
            retention.keep_weekly.to_string(),
        );
        self.run(
            "forget",
            repository,
            key,
            Path::new("/"),
            &[
                "forget",
                "--keep-daily",
                &daily,
                "--keep-weekly",
                &weekly,
                "--prune",
            ],
        )?;
        Ok(())
    }

    fn forget_all(&self, repository: &str, key: &BackupKey) -> Result<usize, BackupError> {
        let snapshots = self.snapshots(repository, key)?;
        if snapshots.is_empty() {
            return Ok(0);
        }
        let mut args: Vec<&str> = vec!["forget", "--prune"];
        args.extend(snapshots.iter().map(|s| s.id.as_str()));
        self.run("forget", repository, key, Path::new("/"), &args)?;
        Ok(snapshots.len())
    }

    fn dump(
        &self,
        repository: &str,
        key: &BackupKey,
        id: &str,
        out: &mut dyn std::io::Write,
    ) -> Result<u64, BackupError> {
        let id = berth_shared::backup::snapshot_id(id)?;
        // The whole snapshot as a tar (restic's default archive for a directory); quiet, or
        // restic's "reading repository password from stdin" would open the stream.
        let args = self.arguments(repository, &["--quiet", "dump", id, "/"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let password = key.password_line();
        stream_command_in(
            Path::new("/"),
            &self.program,
            &args,
            &self.environment(),
            Some(password.as_slice()),
            out,
        )
        .map_err(|source| BackupError::Restic {
            action: "dump",
            repository: repository.to_string(),
            source,
        })
    }
}
