use std::path::Path;

use super::*;
use crate::testing::backup::FakeEngine;

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
            matches!(err, BackupError::BadSnapshot(ref id) if id.0 == bad),
            "{bad}: {err}"
        );
    }
    assert!(engine.calls.lock().unwrap().is_empty());
    assert_eq!(names(volume.path()), ["dir", "lost+found", "old.txt"]);
}

#[test]
fn the_key_goes_to_restic_as_one_hex_line_and_is_never_printed() {
    let key = BackupKey::new(vec![0x01, 0xfe]);
    assert_eq!(key.password_line().as_slice(), b"01fe\n");
    assert_eq!(format!("{key:?}"), "BackupKey(..)");
}

/// restic gets the S3 credentials file by its path, and nothing else of the agent's
/// environment but PATH, HOME and TMPDIR.
#[test]
fn restic_gets_the_s3_credentials_file_by_its_path_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("restic");
    std::fs::write(
        &program,
        "#!/bin/sh\nenv > \"$0.env\"\ncat > /dev/null\necho '[]'\n",
    )
    .unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let engine = crate::backup::restic::Restic {
        program: program.to_string_lossy().into_owned(),
        s3_credentials_file: Some("/run/credentials/berth-agent.service/aws".into()),
        ..crate::backup::restic::Restic::new(&dir.path().join("cache"), None)
    };
    let listed = engine
        .snapshots("s3:s3.eu-central-1.amazonaws.com/acme-berth/acme", &key())
        .unwrap();
    assert!(listed.is_empty());
    let env = std::fs::read_to_string(dir.path().join("restic.env")).unwrap();
    assert!(
        env.lines()
            .any(|l| l == "AWS_SHARED_CREDENTIALS_FILE=/run/credentials/berth-agent.service/aws"),
        "{env}"
    );
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(n, _)| n))
        .filter(|n| !["PATH", "HOME", "TMPDIR", "PWD", "SHLVL", "_", "OLDPWD"].contains(n))
        .collect();
    assert_eq!(names, ["AWS_SHARED_CREDENTIALS_FILE"], "{env}");
}
