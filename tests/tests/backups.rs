//! The agent's backup engine on the real restic: a tenant's files backed up, changed, backed
//! up again (the second upload a small fraction of the first), restored to the first snapshot
//! with equal checksums; a wrong key opens nothing; retention and a whole purge forget
//! snapshots; the key is in no process's argv or environment and in no file meanwhile. Once to
//! a local repository, once over SFTP to Debian's sshd in a network namespace the test made
//! (restic's ssh runs in a second namespace of the same test network). Then through the
//! whole fleet: `berthctl backup` of a tenant running on the real Docker engine, `berthctl
//! backups`, the snapshot read back with the tenant's backup key from the coordinator,
//! `berthctl restore` in place (done once, not again after an agent restart), and a purge that
//! forgets the snapshots and destroys that key.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use berth_node_agent::backup::restic::Restic;
use berth_node_agent::backup::{BackupEngine, BackupKey, Retention, restore_volume};
use berth_tests::docker::inspect;
use berth_tests::fleet::{fleet_configured, http_get, unique};
use berth_tests::keyscan::{ProcScan, files_holding, key_forms};
use berth_tests::missing_component;
use berth_tests::netns::{self, TestNet};
use berth_tests::procs::CoordinatorProc;
use sha2::{Digest, Sha256};

fn restic_available() -> Result<(), String> {
    let out = Command::new("restic")
        .arg("version")
        .output()
        .map_err(|e| format!("restic: {e} (the test command installs Debian's restic)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err("restic version failed".into())
    }
}

/// Path → SHA-256 of every file under `dir` (except `lost+found`), sorted.
fn checksums(dir: &Path) -> Vec<(PathBuf, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_name() == "lost+found" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            } else {
                let digest = Sha256::digest(std::fs::read(&path).unwrap());
                out.push((
                    path.strip_prefix(root).unwrap().to_path_buf(),
                    hex_string(&digest),
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

/// The whole cycle against `repository` through `engine`.
fn cycle(engine: &Restic, repository: &str, work: &Path) {
    let key_bytes = random_bytes(32);
    let key = BackupKey::new(key_bytes.clone());
    let volume = work.join("volume");
    std::fs::create_dir_all(volume.join("chats")).unwrap();
    std::fs::create_dir(volume.join("lost+found")).unwrap();
    std::fs::write(volume.join("files.bin"), random_bytes(64 << 20)).unwrap();
    std::fs::write(volume.join("chats/monday.txt"), "customer chat, monday\n").unwrap();
    std::fs::write(volume.join("credentials.json"), "{\"token\":\"t-1\"}").unwrap();

    let scan = ProcScan::start();
    assert!(engine.ensure_repository(repository, &key).unwrap(), "made");
    assert!(!engine.ensure_repository(repository, &key).unwrap(), "kept");
    let first = engine.backup(repository, &key, &volume).unwrap();
    let at_first = checksums(&volume);
    assert_eq!(first.files_new, 3);
    assert!(
        first.bytes_added >= 64 << 20,
        "the first upload holds the volume: {first:?}"
    );

    // A day's change: one chat added, the big file changed in 64 KiB.
    std::fs::write(volume.join("chats/tuesday.txt"), "customer chat, tuesday\n").unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(volume.join("files.bin"))
            .unwrap();
        f.write_all_at(&random_bytes(64 << 10), 4 << 20).unwrap();
    }
    let second = engine.backup(repository, &key, &volume).unwrap();
    eprintln!(
        "{repository}: first backup added {} B of {} B read in {} ms; second {} B of {} B in {} ms",
        first.bytes_added,
        first.bytes_processed,
        first.duration_ms,
        second.bytes_added,
        second.bytes_processed,
        second.duration_ms
    );
    assert_eq!((second.files_new, second.files_changed), (1, 1));
    // restic cuts files into content-defined chunks of 0.5 to 8 MiB (1 MiB on average): a
    // change of 64 KiB uploads the one or two chunks around it again, at most 16 MiB.
    assert!(
        second.bytes_added <= first.bytes_added / 4,
        "incremental: {second:?} after {first:?}"
    );
    let snapshots = engine.snapshots(repository, &key).unwrap();
    assert_eq!(
        snapshots
            .iter()
            .map(|s| &s.short_id[..])
            .collect::<Vec<_>>(),
        [&first.snapshot_id[..], &second.snapshot_id[..]]
    );

    // Back to the first snapshot: the same files, byte for byte; Tuesday's chat is gone.
    restore_volume(engine, repository, &key, &snapshots[0].id, &volume).unwrap();
    assert_eq!(checksums(&volume), at_first);
    assert!(volume.join("lost+found").is_dir());

    // Another key opens nothing and changes nothing.
    let wrong = BackupKey::new(random_bytes(32));
    let err = engine.snapshots(repository, &wrong).unwrap_err();
    assert!(err.to_string().contains("wrong password"), "{err}");
    assert!(engine.ensure_repository(repository, &wrong).is_err());

    // Retention keeps one a day (both are from today: the newer stays); a purge forgets all.
    engine
        .forget(repository, &key, Retention::default())
        .unwrap();
    assert_eq!(engine.snapshots(repository, &key).unwrap().len(), 1);
    assert_eq!(engine.forget_all(repository, &key).unwrap(), 1);
    assert!(engine.snapshots(repository, &key).unwrap().is_empty());

    let seen = scan.finish();
    assert!(seen.count("restic") > 0, "the scan watched restic");
    let forms = key_forms(&key_bytes);
    assert_eq!(seen.holding(&forms), Vec::<String>::new());
    assert_eq!(files_holding(work, &forms), Vec::<PathBuf>::new());
}

#[test]
fn a_tenant_volume_backs_up_incrementally_and_restores_exactly_to_a_local_repository() {
    if let Err(why) = restic_available() {
        return missing_component("restic", &why);
    }
    let work = tempfile::tempdir().unwrap();
    let engine = Restic::new(&work.path().join("cache"), None);
    let repository = work.path().join("repository/acme");
    cycle(&engine, repository.to_str().unwrap(), work.path());
}

/// Debian's sshd in `host`'s namespace, taking `client_key` for root, with SFTP.
struct Sshd {
    child: Child,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "berth-test", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_tenant_volume_backs_up_and_restores_over_sftp_to_sshd() {
    if let Err(why) = restic_available() {
        return missing_component("restic", &why);
    }
    if !Path::new("/usr/sbin/sshd").exists() {
        return missing_component(
            "sshd",
            "no /usr/sbin/sshd (the test command installs openssh-server)",
        );
    }
    if let Err(why) = netns::available() {
        return missing_component("network namespaces", &why);
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let mut net = TestNet::new().unwrap();
    let server = net.add_host(2).unwrap();
    let client = net.add_host(3).unwrap();
    let (host_key, client_key) = (dir.join("host_key"), dir.join("client_key"));
    keygen(&host_key);
    keygen(&client_key);
    std::fs::copy(
        client_key.with_extension("pub"),
        dir.join("authorized_keys"),
    )
    .unwrap();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress {}\nPort 22\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\nSubsystem sftp internal-sftp\n",
            server.address,
            host_key.display(),
            dir.join("authorized_keys").display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
    let _sshd = Sshd {
        child: Command::new("ip")
            .args([
                "netns",
                "exec",
                &server.netns,
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
            ])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    };
    let public = std::fs::read_to_string(host_key.with_extension("pub")).unwrap();
    let known = dir.join("known_hosts");
    std::fs::write(&known, format!("{} {public}", server.address)).unwrap();
    let ssh = format!(
        "ip netns exec {} ssh -i {} -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} -o ConnectTimeout=5 root@{} -s sftp",
        client.netns,
        client_key.display(),
        known.display(),
        server.address
    );
    // sshd takes a moment to listen.
    berth_tests::wait_for("sshd answering", Duration::from_secs(10), || {
        Command::new("ip")
            .args(["netns", "exec", &client.netns, "ssh", "-i"])
            .arg(&client_key)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
            ])
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .arg(format!("root@{}", server.address))
            .arg("true")
            .stdin(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
    });
    let engine = Restic::new(&dir.join("cache"), Some(ssh));
    let repository = format!(
        "sftp:root@{}:{}/storagebox/acme",
        server.address,
        dir.display()
    );
    cycle(&engine, &repository, dir);
    assert!(
        dir.join("storagebox/acme/config").is_file(),
        "the repository is on the SFTP server's disk"
    );
}

#[test]
fn berthctl_backs_a_running_tenant_up_and_lists_its_snapshots() {
    if let Err(why) = restic_available() {
        return missing_component("restic", &why);
    }
    let repository = tempfile::tempdir().unwrap();
    let Some(mut f) = fleet_configured(
        &format!(
            "[backup]\nrepository = {:?}\n",
            repository.path().display().to_string()
        ),
        "",
    ) else {
        return;
    };
    let tenant = unique("bk");
    // Backed up when the test says, not on its host's own schedule.
    f.place_toml(
        &tenant,
        "128MiB",
        (250, 0),
        &[],
        "[backup]\nenabled = false\n",
    );
    let view = f.wait_serving(&tenant, Duration::from_secs(60));
    let port = view["published_port"].as_u64().unwrap() as u16;
    assert_eq!(
        http_get(port, "/write?name=chat.txt&text=hello-backup").as_deref(),
        Some("wrote 12 bytes\n")
    );

    let scan = ProcScan::start();
    let (ok, out, err) = f.coordinator.berthctl(&["--json", "backup", &tenant]);
    assert!(ok, "backup: {err}");
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    let snapshot = done["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(snapshot.len(), 8, "{done}");
    assert_eq!(done["host_id"], f.agent.host_id.as_str());
    assert!(done["files_new"].as_u64() >= Some(1), "{done}");
    let (ok, out, err) = f.coordinator.berthctl(&["--json", "backups", &tenant]);
    assert!(ok, "backups: {err}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1, "{out}");
    assert_eq!(listed[0]["short_id"], snapshot.as_str());

    // The snapshot holds what the tenant wrote, under the key the coordinator keeps for it.
    let copy = tempfile::tempdir().unwrap();
    for file in ["master.key", "backup-keys"] {
        std::fs::copy(f.coordinator.state_dir().join(file), copy.path().join(file)).unwrap();
    }
    let vault = berth_coordinator::keys::KeyVault::new(
        berth_coordinator::keys::MasterKey::load(&copy.path().join("master.key")).unwrap(),
        berth_coordinator::keys::keyring::Keyring::open(&copy.path().join("backup-keys")).unwrap(),
    );
    let key = vault
        .get(&berth_shared::ids::TenantId::new(&tenant).unwrap())
        .unwrap()
        .expect("a backup key");
    let engine = Restic::new(&copy.path().join("cache"), None);
    let restored = copy.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    engine
        .restore(
            &format!("{}/{tenant}", repository.path().display()),
            &BackupKey::new(key.to_vec()),
            listed[0]["id"].as_str().unwrap(),
            &restored,
        )
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(restored.join("chat.txt")).unwrap(),
        "hello-backup"
    );

    let (ok, _, err) = f.coordinator.berthctl(&["backup", "no-such-tenant"]);
    assert!(!ok && err.contains("unknown tenant"), "{err}");
    // REST gives what berthctl gives, and refuses what it refuses.
    let (code, from_rest) =
        f.coordinator
            .rest("GET", &format!("/v1/tenants/{tenant}/backups"), None, true);
    assert_eq!(code, 200, "{from_rest}");
    assert_eq!(from_rest, serde_json::Value::Array(listed.clone()));
    let (code, refused) = f.coordinator.rest(
        "POST",
        &format!("/v1/tenants/{tenant}/restore"),
        Some(r#"{"snapshot":"--target=/"}"#),
        true,
    );
    assert_eq!(code, 400, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .starts_with("snapshot_id: invalid snapshot id"),
        "{refused}"
    );
    let (code, refused) = f.coordinator.rest(
        "POST",
        &format!("/v1/tenants/{tenant}/restore"),
        Some(r#"{"snapshots":"abc"}"#),
        true,
    );
    assert_eq!(code, 400, "{refused}");

    // A GDPR export: the files now, from the host, and a snapshot's, as tars; never over a
    // file that exists.
    let exports = tempfile::tempdir().unwrap();
    let unpack = |name: &str| -> PathBuf {
        let tar = exports.path().join(name);
        let (ok, _, err) =
            f.coordinator
                .berthctl(&["export", &tenant, "--output", tar.to_str().unwrap()]);
        assert!(ok, "export: {err}");
        assert!(err.contains("bytes of tar"), "{err}");
        let dir = exports.path().join(format!("{name}.d"));
        std::fs::create_dir(&dir).unwrap();
        let (ok, _, err) = berth_tests::procs::run({
            let mut c = Command::new("tar");
            c.arg("-xf").arg(&tar).arg("-C").arg(&dir);
            c
        });
        assert!(ok, "tar: {err}");
        dir
    };
    let now = unpack("now.tar");
    assert_eq!(
        std::fs::read_to_string(now.join("chat.txt")).unwrap(),
        "hello-backup"
    );
    assert!(!now.join("lost+found").exists());
    let (ok, _, err) = f.coordinator.berthctl(&[
        "export",
        &tenant,
        "--output",
        exports.path().join("now.tar").to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("exists; an export never overwrites"),
        "{err}"
    );
    let (ok, _, err) = f.coordinator.berthctl(&[
        "export",
        "no-such-tenant",
        "--output",
        exports.path().join("none.tar").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("unknown tenant"), "{err}");
    assert!(!exports.path().join("none.tar").exists());
    assert!(!exports.path().join("none.tar.partial").exists());
    // REST gives the same tar to an admin, and nothing to a read token.
    let curl_export = |token: &str, to: &Path| {
        let mut cmd = Command::new("curl");
        cmd.args(["-X", "POST", "--cacert"])
            .arg(f.coordinator.ca_cert())
            .arg(format!(
                "{}/v1/tenants/{tenant}/export",
                f.coordinator.operator_url()
            ))
            .args(["-H", &format!("Authorization: Bearer {token}"), "-o"])
            .arg(to);
        berth_tests::curl_status(cmd).0
    };
    let admin = std::fs::read_to_string(f.coordinator.operator_token_file()).unwrap();
    let from_rest = exports.path().join("rest.tar");
    assert_eq!(curl_export(admin.trim(), &from_rest), 200);
    let listing = Command::new("tar")
        .arg("-tf")
        .arg(&from_rest)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listing.stdout).contains("./chat.txt"),
        "{listing:?}"
    );
    let reader = f.coordinator.operator_token("auditor", "read", "1h");
    assert_eq!(curl_export(&reader, &exports.path().join("read.tar")), 403);

    // Changed since, then restored in place: the container stops, the host restores the
    // snapshot, a new container serves the snapshot's files (the later ones are gone). A
    // snapshot that does not exist is refused before anything stops.
    assert_eq!(
        http_get(port, "/write?name=chat.txt&text=changed").as_deref(),
        Some("wrote 7 bytes\n")
    );
    assert_eq!(
        http_get(port, "/write?name=later.txt&text=after-the-backup").as_deref(),
        Some("wrote 16 bytes\n")
    );
    let container_id = |name: &str| inspect(name).map(|c| c["Id"].clone());
    let container = container_id(&f.container(&tenant));
    assert!(container.is_some());
    // The snapshot's files, not the ones now.
    let tar = exports.path().join("snapshot.tar");
    let (ok, _, err) = f.coordinator.berthctl(&[
        "export",
        &tenant,
        "--snapshot",
        &snapshot,
        "-o",
        tar.to_str().unwrap(),
    ]);
    assert!(ok, "export --snapshot: {err}");
    let listing = Command::new("tar").arg("-tf").arg(&tar).output().unwrap();
    let names = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.status.success(),
        "{} bytes: {}",
        std::fs::metadata(&tar).unwrap().len(),
        String::from_utf8_lossy(&listing.stderr)
    );
    assert!(
        names
            .lines()
            .any(|n| n.trim_start_matches("./") == "chat.txt"),
        "{names}"
    );
    assert!(!names.contains("later.txt"), "{names}");
    let (ok, _, err) = f
        .coordinator
        .berthctl(&["restore", &tenant, "--snapshot", "deadbeef"]);
    assert!(!ok && err.contains("no snapshot deadbeef of"), "{err}");
    let (ok, _, err) = f
        .coordinator
        .berthctl(&["restore", &tenant, "--snapshot", "../x"]);
    assert!(
        !ok && err.contains("snapshot_id: invalid snapshot id"),
        "{err}"
    );
    assert_eq!(
        container_id(&f.container(&tenant)),
        container,
        "nothing stopped"
    );
    let (ok, out, err) = f.coordinator.berthctl(&["--json", "restore", &tenant]);
    assert!(ok, "restore: {err}");
    let restored: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        restored["restored"]["short_id"],
        snapshot.as_str(),
        "{restored}"
    );
    assert_eq!(
        restored["restored"]["time"], listed[0]["time"],
        "{restored}"
    );
    assert_ne!(
        container_id(&f.container(&tenant)),
        container,
        "a new container"
    );
    let view = f.wait_serving(&tenant, Duration::from_secs(60));
    let port = view["published_port"].as_u64().unwrap() as u16;
    assert_eq!(
        http_get(port, "/read?name=chat.txt").as_deref(),
        Some("hello-backup")
    );
    assert!(
        http_get(port, "/read?name=later.txt")
            .is_some_and(|answer| answer.contains("No such file")),
        "gone"
    );
    assert_eq!(view["restored"]["id"], listed[0]["id"], "{view}");
    // Done once: an agent restart does not restore again.
    assert_eq!(
        http_get(port, "/write?name=after-restore.txt&text=kept").as_deref(),
        Some("wrote 4 bytes\n")
    );
    f.agent.kill9();
    f.agent.start_with_docker(true);
    std::thread::sleep(Duration::from_secs(3));
    let view = f.wait_serving(&tenant, Duration::from_secs(60));
    let port = view["published_port"].as_u64().unwrap() as u16;
    assert_eq!(
        http_get(port, "/read?name=after-restore.txt").as_deref(),
        Some("kept")
    );
    // Through the backup, the listings and the restore: restic ran, and no process showed
    // the backup key in its argv or environment.
    let seen = scan.finish();
    assert!(seen.count("restic") > 0, "the scan watched restic");
    assert_eq!(seen.holding(&key_forms(&key)), Vec::<String>::new());

    // A purge forgets the snapshots, then destroys the backup key.
    let repository_of_tenant = format!("{}/{tenant}", repository.path().display());
    let old_key = BackupKey::new(key.to_vec());
    // A copy of the repository taken before, as a provider's snapshot of the storage would be.
    let kept_copy = copy.path().join("repository-copy");
    let (ok, _, err) = berth_tests::procs::run({
        let mut c = Command::new("cp");
        c.arg("-a").arg(&repository_of_tenant).arg(&kept_copy);
        c
    });
    assert!(ok, "cp: {err}");
    let (ok, out, err) = f
        .coordinator
        .berthctl(&["--json", "remove", "--purge", &tenant]);
    assert!(ok, "purge: {err}");
    let removal: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(removal["purged"], true, "{removal}");
    assert_eq!(removal["backups_forgotten"], 1, "{removal}");
    assert_eq!(removal["backup_key_destroyed"], true, "{removal}");
    assert!(
        engine
            .snapshots(&repository_of_tenant, &old_key)
            .unwrap()
            .is_empty(),
        "no snapshot is left"
    );
    std::fs::copy(
        f.coordinator.state_dir().join("backup-keys"),
        copy.path().join("backup-keys-after"),
    )
    .unwrap();
    let after = berth_coordinator::keys::KeyVault::new(
        berth_coordinator::keys::MasterKey::load(&copy.path().join("master.key")).unwrap(),
        berth_coordinator::keys::keyring::Keyring::open(&copy.path().join("backup-keys-after"))
            .unwrap(),
    );
    assert!(
        after
            .get(&berth_shared::ids::TenantId::new(&tenant).unwrap())
            .unwrap()
            .is_none(),
        "the backup key is destroyed"
    );
    // The copy is a whole repository (the old key still opens it), but nothing left on the
    // coordinator or the host holds that key.
    assert_eq!(
        engine
            .snapshots(kept_copy.to_str().unwrap(), &old_key)
            .unwrap()
            .len(),
        1
    );
    let forms = key_forms(&key);
    for dir in [f.coordinator.dir.path(), f.agent.dir.path()] {
        assert_eq!(
            files_holding(dir, &forms),
            Vec::<PathBuf>::new(),
            "{}",
            dir.display()
        );
    }
}

#[test]
fn without_a_backup_repository_a_backup_is_refused_and_says_why() {
    let coordinator = CoordinatorProc::start(None, "");
    let (ok, _, err) = coordinator.berthctl(&["backup", "acme"]);
    assert!(!ok, "refused");
    assert!(err.contains("backups are off"), "{err}");
}

/// Consistency and schedule: a tenant's host backs it up on its own. Its first, live attempt
/// fails (the repository's place is a file) and is reported with restic's reason; the night's
/// backup then comes in its nightly restart, with the container stopped: the snapshot was taken
/// after the container stopped and before it started again, and holds what the tenant wrote.
#[test]
fn the_nightly_restart_backs_the_stopped_tenant_up_and_a_failed_backup_is_reported() {
    if let Err(why) = restic_available() {
        return missing_component("restic", &why);
    }
    let place = tempfile::tempdir().unwrap();
    let repository = place.path().join("repository");
    std::fs::write(&repository, "not a directory").unwrap();
    let Some(f) = fleet_configured(
        &format!(
            "[backup]\nrepository = {:?}\n",
            repository.display().to_string()
        ),
        "[restarts]\nskip_if_started_within = \"0s\"\n",
    ) else {
        return;
    };
    let (tenant, window, _slot) = berth_tests::fleet::nightly_slot_soon(
        &unique("nb"),
        Duration::from_secs(20),
        Duration::from_secs(45),
    );
    f.place_with_window(&tenant, &window);
    let view = f.wait_serving(&tenant, Duration::from_secs(30));
    let port = view["published_port"].as_u64().unwrap() as u16;
    assert_eq!(
        http_get(port, "/write?name=chat.txt&text=before-the-night").as_deref(),
        Some("wrote 16 bytes\n")
    );
    let failed = berth_tests::wait_for(
        "the first backup attempt reported",
        Duration::from_secs(20),
        || {
            f.tenant(&tenant)
                .filter(|t| t["last_backup"]["ok"] == false)
        },
    );
    let error = failed["last_backup"]["error"].as_str().unwrap();
    assert!(error.contains("restic"), "{failed:#}");
    assert!(failed["last_backup"]["last_good"].is_null(), "{failed:#}");
    let (ok, table, _) = f.coordinator.berthctl(&["tenants"]);
    assert!(ok && table.contains("never (failed)"), "{table}");

    std::fs::remove_file(&repository).unwrap();
    std::fs::create_dir(&repository).unwrap();
    let container = f.container(&tenant);
    let first_start = berth_tests::docker::started_at(&container);
    let (started, _) = f.wait_nightly_restart(&tenant, &first_start, Duration::from_secs(90));
    let good = berth_tests::wait_for(
        "the night's backup reported",
        Duration::from_secs(30),
        || f.tenant(&tenant).filter(|t| t["last_backup"]["ok"] == true),
    );
    assert_eq!(good["last_backup"]["stopped"], true, "{good:#}");
    let snapshot_id = good["last_backup"]["snapshot_id"].as_str().unwrap();
    let (ok, out, err) = f.coordinator.berthctl(&["--json", "backups", &tenant]);
    assert!(ok, "{err}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1, "{out}");
    assert!(
        listed[0]["id"].as_str().unwrap().starts_with(snapshot_id),
        "{out} {good:#}"
    );
    // Taken between the container's stop and its start again.
    let stopped: jiff::Timestamp = inspect(&container).unwrap()["State"]["FinishedAt"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let taken: jiff::Timestamp = listed[0]["time"].as_str().unwrap().parse().unwrap();
    let started: jiff::Timestamp = started.parse().unwrap();
    assert!(
        stopped <= taken && taken <= started,
        "stopped {stopped}, snapshot {taken}, started {started}"
    );
    // It holds what the tenant wrote.
    let (ok, out, err) = f.coordinator.berthctl(&["--json", "restore", &tenant]);
    assert!(ok, "restore: {err}");
    assert!(out.contains(snapshot_id), "{out}");
    let view = f.wait_serving(&tenant, Duration::from_secs(60));
    let port = view["published_port"].as_u64().unwrap() as u16;
    assert_eq!(
        http_get(port, "/read?name=chat.txt").as_deref(),
        Some("before-the-night")
    );
}
