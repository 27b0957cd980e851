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
