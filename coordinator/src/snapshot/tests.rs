use std::os::unix::fs::PermissionsExt;

use berth_shared::store::{Durability, Write};

use super::*;
use crate::keys::KeyVault;

/// A coordinator's state directory with a store, both keyrings, a CA and a master key.
struct StateDir {
    _dir: tempfile::TempDir,
    config: CoordinatorConfig,
}

fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

fn config_in(dir: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        state_dir: dir.to_path_buf(),
        ..CoordinatorConfig::default()
    }
}

fn records() -> Vec<(String, Vec<u8>)> {
    vec![
        ("host/h1".into(), br#"{"host_id":"h1"}"#.to_vec()),
        ("revoked/0a1b".into(), b"{}".to_vec()),
        ("tenant/acme".into(), br#"{"tenant_id":"acme"}"#.to_vec()),
        ("tenant/beta".into(), br#"{"tenant_id":"beta"}"#.to_vec()),
    ]
}

fn state_dir() -> StateDir {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(&dir.path().join("state"));
    std::fs::create_dir_all(&config.state_dir).unwrap();
    MasterKey::create(&config.master_key_file()).unwrap();
    CertificateAuthority::init(&config.ca_dir()).unwrap();
    let store = SledStore::open(&config.db_dir()).unwrap();
    let writes = records()
        .into_iter()
        .map(|(k, v)| Write::Put(k, v))
        .collect();
    store.apply(writes, Durability::Flushed).unwrap();
    for (file, tenants) in [
        (config.keyring_file(), ["acme", "beta"].as_slice()),
        (config.backup_keyring_file(), ["acme"].as_slice()),
    ] {
        let vault = KeyVault::new(
            MasterKey::load(&config.master_key_file()).unwrap(),
            Keyring::open(&file).unwrap(),
        );
        for t in tenants {
            vault.ensure(&tenant(t)).unwrap();
        }
        vault.sync().unwrap();
    }
    StateDir { _dir: dir, config }
}

fn offline(config: &CoordinatorConfig) -> Snapshot {
    let store = std::sync::Arc::new(SledStore::open(&config.db_dir()).unwrap());
    take_offline(config, store, 1_700_000_000_000).unwrap()
}

fn vault(config: &CoordinatorConfig, file: PathBuf) -> KeyVault {
    KeyVault::new(
        MasterKey::load(&config.master_key_file()).unwrap(),
        Keyring::open(&file).unwrap(),
    )
}

/// Everything that is not the master key, as the files hold it.
fn files_of(config: &CoordinatorConfig) -> Vec<(PathBuf, Vec<u8>)> {
    // Paths relative to the state directory.
    [
        config.keyring_file(),
        config.backup_keyring_file(),
        config.ca_dir().join("ca.crt"),
        config.ca_dir().join("ca.key"),
    ]
    .into_iter()
    .map(|p| {
        let bytes = std::fs::read(&p).unwrap();
        (
            p.strip_prefix(&config.state_dir).unwrap().to_path_buf(),
            bytes,
        )
    })
    .collect()
}

#[test]
fn a_snapshot_restores_the_store_the_keys_and_the_ca_on_a_fresh_directory() {
    let source = state_dir();
    let snapshot = offline(&source.config);
    let summary = snapshot.summary();
    assert_eq!((summary.records, summary.hosts, summary.tenants), (4, 1, 2));
    assert_eq!((summary.volume_keys, summary.backup_keys), (2, 1));
    let out = source.config.state_dir.join("../snapshot.json");
    snapshot.write(&out).unwrap();
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let read = Snapshot::read(&out).unwrap();
    assert_eq!(read, snapshot);

    // A new machine: only the master key was kept apart.
    let target_dir = tempfile::tempdir().unwrap();
    let target = config_in(&target_dir.path().join("state"));
    std::fs::create_dir_all(&target.state_dir).unwrap();
    std::fs::copy(source.config.master_key_file(), target.master_key_file()).unwrap();
    std::fs::set_permissions(
        target.master_key_file(),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    assert_eq!(restore(&read, &target).unwrap(), summary);

    let restored = SledStore::open(&target.db_dir()).unwrap();
    assert_eq!(restored.snapshot().unwrap(), records());
    assert_eq!(files_of(&target), files_of(&source.config));
    let ca = CertificateAuthority::load(&target.ca_dir()).unwrap();
    assert_eq!(
        ca.fingerprint(),
        CertificateAuthority::load(&source.config.ca_dir())
            .unwrap()
            .fingerprint()
    );
    for (file_of, tenants) in [
        (
            CoordinatorConfig::keyring_file as fn(&_) -> _,
            ["acme", "beta"].as_slice(),
        ),
        (CoordinatorConfig::backup_keyring_file, ["acme"].as_slice()),
    ] {
        let (before, after) = (
            vault(&source.config, file_of(&source.config)),
            vault(&target, file_of(&target)),
        );
        for t in tenants {
            let id = tenant(t);
            assert_eq!(before.get(&id).unwrap(), after.get(&id).unwrap(), "{t}");
        }
    }
}

#[test]
fn a_snapshot_holds_no_key_in_the_clear() {
    let source = state_dir();
    let snapshot = offline(&source.config);
    let text = serde_json::to_string(&snapshot).unwrap();
    let master = std::fs::read(source.config.master_key_file()).unwrap();
    let ca_key = std::fs::read_to_string(source.config.ca_dir().join("ca.key")).unwrap();
    let volume = vault(&source.config, source.config.keyring_file());
    let acme = volume.get(&tenant("acme")).unwrap().unwrap();
    let base64 = |bytes: &[u8]| b64().encode(bytes);
    for (what, secret) in [
        ("master key", base64(&master)),
        ("volume key", base64(&acme)),
        ("CA key", ca_key.lines().nth(1).unwrap().to_string()),
    ] {
        assert!(!text.contains(&secret), "the {what} is in the snapshot");
    }
    let bytes = text.as_bytes();
    for secret in [&master[..], &acme[..]] {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret));
    }
}

#[test]
fn a_restore_refuses_state_a_wrong_master_key_and_a_running_coordinator_and_writes_nothing() {
    let source = state_dir();
    let snapshot = offline(&source.config);

    // Into the source itself: it holds state.
    let before = files_of(&source.config);
    let err = restore(&snapshot, &source.config).unwrap_err();
    assert!(
        matches!(err, SnapshotError::StateExists(ref p) if *p == source.config.db_dir()),
        "{err}"
    );
    assert_eq!(files_of(&source.config), before);

    let target_dir = tempfile::tempdir().unwrap();
    let target = config_in(&target_dir.path().join("state"));
    std::fs::create_dir_all(&target.state_dir).unwrap();
    // No master key in place.
    let err = restore(&snapshot, &target).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "no master key at {}",
            target.master_key_file().display()
        )),
        "{err}"
    );
    // Another master key.
    MasterKey::create(&target.master_key_file()).unwrap();
    let err = restore(&snapshot, &target).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the master key does not open this snapshot's CA key: it is not the master key of the coordinator that made it"
    );
    let left: Vec<_> = std::fs::read_dir(&target.state_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["master.key"], "nothing was written");

    // A coordinator answering on the admin socket.
    std::fs::remove_file(target.master_key_file()).unwrap();
    std::fs::copy(source.config.master_key_file(), target.master_key_file()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(target.admin_socket()).unwrap();
    let err = restore(&snapshot, &target).unwrap_err();
    assert!(matches!(err, SnapshotError::CoordinatorRunning(_)), "{err}");
    drop(listener);
    std::fs::remove_file(target.admin_socket()).unwrap();
    restore(&snapshot, &target).unwrap();
}

#[test]
fn a_key_sealed_under_another_master_key_is_named_and_nothing_is_written() {
    let source = state_dir();
    let mut snapshot = offline(&source.config);
    let stranger = KeyVault::new(MasterKey::generate().unwrap(), Keyring::in_memory());
    stranger.ensure(&tenant("zeta")).unwrap();
    let (_, blob) = stranger.wrapped_keys().remove(0);
    snapshot
        .backup_keys
        .insert("zeta".into(), b64().encode(blob));
    let target_dir = tempfile::tempdir().unwrap();
    let target = config_in(&target_dir.path().join("state"));
    std::fs::create_dir_all(&target.state_dir).unwrap();
    std::fs::copy(source.config.master_key_file(), target.master_key_file()).unwrap();
    let err = restore(&snapshot, &target).unwrap_err();
    assert!(err.to_string().contains("backup_keys of zeta"), "{err}");
    assert!(!target.ca_dir().exists() && !target.db_dir().exists());
}

#[test]
fn damaged_and_foreign_files_are_refused_by_what_is_wrong() {
    let source = state_dir();
    let snapshot = offline(&source.config);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, value: &serde_json::Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, serde_json::to_vec(value).unwrap()).unwrap();
        path
    };
    let good = serde_json::to_value(&snapshot).unwrap();

    let mut other = good.clone();
    other["format"] = "something-else".into();
    let err = Snapshot::read(&write("format", &other)).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("not a coordinator snapshot: format \"something-else\""),
        "{err}"
    );

    let mut newer = good.clone();
    newer["version"] = 2.into();
    let err = Snapshot::read(&write("version", &newer)).unwrap_err();
    assert!(
        err.to_string()
            .contains("version 2 (this coordinator reads version 1)"),
        "{err}"
    );

    let mut extra = good.clone();
    extra["surprise"] = true.into();
    let err = Snapshot::read(&write("extra", &extra)).unwrap_err();
    assert!(
        err.to_string().contains("unknown field `surprise`"),
        "{err}"
    );

    let path = dir.path().join("garbage");
    std::fs::write(&path, b"\x00\x01 not json").unwrap();
    assert!(matches!(
        Snapshot::read(&path).unwrap_err(),
        SnapshotError::Unreadable { .. }
    ));

    let master = MasterKey::load(&source.config.master_key_file()).unwrap();
    let mut bad_record = snapshot.clone();
    bad_record.records[2].value = "not base64!".into();
    let err = check(&bad_record, &master).err().unwrap();
    assert!(
        err.to_string()
            .starts_with("the snapshot's records[2] (tenant/acme) is damaged"),
        "{err}"
    );

    let mut unordered = snapshot.clone();
    unordered.records.swap(0, 1);
    let err = check(&unordered, &master).err().unwrap();
    assert!(err.to_string().ends_with("out of key order"), "{err}");

    let mut bad_tenant = snapshot.clone();
    let blob = bad_tenant.volume_keys.remove("acme").unwrap();
    bad_tenant.volume_keys.insert("../etc".into(), blob);
    let err = check(&bad_tenant, &master).err().unwrap();
    assert!(
        err.to_string()
            .starts_with("the snapshot's volume_keys.../etc is damaged"),
        "{err}"
    );

    let err = snapshot.write(&write("exists", &good)).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("exists: a snapshot never replaces a file"),
        "{err}"
    );
}

#[test]
fn a_snapshot_directory_keeps_the_newest_and_nothing_else_is_touched() {
    let source = state_dir();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let mut written = Vec::new();
    for (n, at) in [1_700_000_000_000i64, 1_700_000_060_000, 1_700_003_600_500]
        .into_iter()
        .enumerate()
    {
        let mut snapshot = offline(&source.config);
        snapshot.created_unix_ms = at;
        let (path, deleted) = snapshot.write_into(dir.path(), 2).unwrap();
        assert_eq!(deleted.len(), n.saturating_sub(1), "{deleted:?}");
        written.push(path);
    }
    assert_eq!(
        written[2].file_name().unwrap(),
        "berth-coordinator-20231114T231320500Z.snapshot"
    );
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            written[1].clone(),
            written[2].clone(),
            dir.path().join("notes.txt")
        ]
    );
    // The same instant twice: the second is refused, the first kept.
    let mut again = offline(&source.config);
    again.created_unix_ms = 1_700_003_600_500;
    assert!(matches!(
        again.write_into(dir.path(), 2),
        Err(SnapshotError::OutputExists { .. })
    ));
}
