use std::path::Path;
use std::sync::Mutex;

use super::*;

/// Restores by writing the files it was given into the target, or fails; records each call.
#[derive(Debug, Default)]
struct FakeEngine {
    files: Vec<(&'static str, &'static str)>,
    fail: bool,
    calls: Mutex<Vec<String>>,
}

impl BackupEngine for FakeEngine {
    fn ensure_repository(&self, repository: &str, _: &BackupKey) -> Result<bool, BackupError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("ensure {repository}"));
        Ok(false)
    }

    fn backup(&self, _: &str, _: &BackupKey, _: &Path) -> Result<BackupSummary, BackupError> {
        panic!("the restore tests never back up")
    }

    fn snapshots(&self, _: &str, _: &BackupKey) -> Result<Vec<Snapshot>, BackupError> {
        Ok(Vec::new())
    }

    fn restore(
        &self,
        repository: &str,
        _: &BackupKey,
        id: &str,
        into: &Path,
    ) -> Result<(), BackupError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("restore {repository} {id} {}", into.display()));
        assert_eq!(
            std::fs::read_dir(into).unwrap().count(),
            0,
            "an empty target"
        );
        for (name, text) in &self.files {
            let file = into.join(name);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
        }
        if self.fail {
            return Err(BackupError::Output {
                action: "restore",
                repository: repository.into(),
                message: "cut short".into(),
            });
        }
        Ok(())
    }

    fn forget(&self, _: &str, _: &BackupKey, _: Retention) -> Result<(), BackupError> {
        Ok(())
    }

    fn forget_all(&self, _: &str, _: &BackupKey) -> Result<usize, BackupError> {
        Ok(0)
    }
}

fn key() -> BackupKey {
    BackupKey::new(vec![0xab; 32])
}

/// A volume holding `old.txt`, `dir/inner.txt` and an empty `lost+found`.
fn volume() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("old.txt"), "old").unwrap();
    std::fs::create_dir_all(dir.path().join("dir")).unwrap();
    std::fs::write(dir.path().join("dir/inner.txt"), "old inner").unwrap();
    std::fs::create_dir(dir.path().join("lost+found")).unwrap();
    dir
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_restore_replaces_the_volume_contents_with_the_snapshot() {
    let volume = volume();
    let engine = FakeEngine {
        files: vec![
            ("chat.txt", "restored"),
            ("dir/inner.txt", "restored inner"),
        ],
        ..FakeEngine::default()
    };
    restore_volume(&engine, "/repo/t", &key(), "cabe28d5", volume.path()).unwrap();
    assert_eq!(names(volume.path()), ["chat.txt", "dir", "lost+found"]);
    assert_eq!(
        std::fs::read_to_string(volume.path().join("dir/inner.txt")).unwrap(),
        "restored inner"
    );
    let staging = volume.path().join(RESTORE_STAGING);
    assert_eq!(
        *engine.calls.lock().unwrap(),
        [format!("restore /repo/t cabe28d5 {}", staging.display())]
    );
}

#[test]
fn a_failed_restore_leaves_the_volume_as_it_was() {
    let volume = volume();
    let engine = FakeEngine {
        files: vec![("half.txt", "partial")],
        fail: true,
        ..FakeEngine::default()
    };
    let err = restore_volume(&engine, "/repo/t", &key(), "cabe28d5", volume.path()).unwrap_err();
    assert!(err.to_string().contains("cut short"), "{err}");
    assert_eq!(names(volume.path()), ["dir", "lost+found", "old.txt"]);
    assert_eq!(
        std::fs::read_to_string(volume.path().join("old.txt")).unwrap(),
        "old"
    );
}

#[test]
fn an_interrupted_restore_is_cleared_before_the_next() {
    let volume = volume();
    std::fs::create_dir(volume.path().join(RESTORE_STAGING)).unwrap();
    std::fs::write(volume.path().join(RESTORE_STAGING).join("stale"), "x").unwrap();
    let engine = FakeEngine {
        files: vec![("chat.txt", "restored")],
        ..FakeEngine::default()
    };
    restore_volume(&engine, "/repo/t", &key(), "cabe28d5", volume.path()).unwrap();
    assert_eq!(names(volume.path()), ["chat.txt", "lost+found"]);
}

#[test]
fn a_bad_snapshot_id_changes_nothing() {
    let volume = volume();
    let engine = FakeEngine::default();
    for bad in [
        "",
        "latest",
        "cabe28d",
        "cabe28d5:/sub",
        "../../etc",
        "--target=/",
    ] {
        let err = restore_volume(&engine, "/repo/t", &key(), bad, volume.path()).unwrap_err();
        assert!(
            matches!(err, BackupError::BadSnapshot(ref id) if id == bad),
            "{bad}: {err}"
        );
    }
    assert!(engine.calls.lock().unwrap().is_empty());
    assert_eq!(names(volume.path()), ["dir", "lost+found", "old.txt"]);
}

#[test]
fn repository_locations_are_checked() {
    for good in [
        "/srv/berth-backups",
        "sftp:u123@u123.your-storagebox.de:berth",
        "s3:s3.eu-central-1.amazonaws.com/acme-berth",
        "rest:https://backup.example.com:8000/",
    ] {
        Repository::new(good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    let tenant = TenantId::new("acme").unwrap();
    assert_eq!(
        Repository::new("rest:https://backup.example.com:8000/")
            .unwrap()
            .of(&tenant),
        "rest:https://backup.example.com:8000/acme"
    );
    let long = format!("/{}", "a".repeat(Repository::MAX_LEN));
    for bad in [
        "",
        "relative/path",
        "sftp:",
        "sftp:-oProxyCommand=touch /tmp/x",
        "/with space",
        "/line\nbreak",
        "ftp://example.com/x",
        long.as_str(),
    ] {
        let err = Repository::new(bad).unwrap_err();
        assert!(
            matches!(err, BackupError::BadRepository(ref r) if r == bad),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn the_key_goes_to_restic_as_one_hex_line_and_is_never_printed() {
    let key = BackupKey::new(vec![0x01, 0xfe]);
    assert_eq!(key.password_line().as_slice(), b"01fe\n");
    assert_eq!(format!("{key:?}"), "BackupKey(..)");
}
