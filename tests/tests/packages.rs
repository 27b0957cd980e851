//! The packages themselves (built by the test command with `cargo deb` and `cargo
//! generate-rpm` into `target/packages`): their contents, lintian, `systemd-analyze verify` of
//! the installed units, and an install into a fresh Debian 12 root (debootstrap) where the
//! coordinator and the agent run from the installed files — the agent enrolls, reports and runs a
//! tenant on the host's Docker engine — then an upgrade from the previous agent package that
//! leaves the tenant's container running.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_tests::debroot::{DebianRoot, packages_dir};
use berth_tests::docker::{started_at, test_tenant_image};
use berth_tests::{missing_component, wait_for};

/// The one file in `dir` whose name starts with `prefix` and ends with `suffix`.
fn package(dir: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (the test command builds the packages)",
                dir.display()
            )
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(suffix)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{prefix}*{suffix} in {}: {found:?}",
        dir.display()
    );
    found[0].clone()
}

fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("command");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn packages_present() -> bool {
    if packages_dir().is_dir() {
        return true;
    }
    missing_component(
        "packages",
        "target/packages is missing (the test command builds it with cargo deb)",
    );
    false
}

#[test]
fn the_packages_hold_the_binaries_units_and_config_and_lintian_finds_no_error() {
    if !packages_present() {
        return;
    }
    if Command::new("lintian").arg("--version").output().is_err() {
        return missing_component("lintian", "not installed (the test command installs it)");
    }
    let dir = packages_dir();
    for (deb, files, conffile) in [
        (
            package(&dir, "berth-agent_", "_amd64.deb"),
            vec![
                "./usr/bin/berth-agent",
                "./lib/systemd/system/berth-agent.service",
                "./usr/lib/modules-load.d/berth-agent.conf",
                "./etc/berth/agent.toml",
            ],
            "/etc/berth/agent.toml",
        ),
        (
            package(&dir, "berth-coordinator_", "_amd64.deb"),
            vec![
                "./usr/bin/berth-coordinator",
                "./usr/bin/berthctl",
                "./lib/systemd/system/berth-coordinator.service",
                "./lib/systemd/system/berth-coordinator-backup.service",
                "./lib/systemd/system/berth-coordinator-backup.timer",
                "./etc/berth/coordinator.toml",
            ],
            "/etc/berth/coordinator.toml",
        ),
    ] {
        let (ok, listing) = output(Command::new("dpkg-deb").arg("-c").arg(&deb));
        assert!(ok, "{listing}");
        for f in files {
            assert!(
                listing.contains(f),
                "{} lacks {f}:\n{listing}",
                deb.display()
            );
        }
        let (ok, conffiles) = output(
            Command::new("dpkg-deb")
                .arg("-I")
                .arg(&deb)
                .arg("conffiles"),
        );
        assert!(ok && conffiles.contains(conffile), "{conffiles}");
        let (ok, report) = output(
            Command::new("lintian")
                .args(["--fail-on", "error", "--allow-root"])
                .arg(&deb),
        );
        eprintln!("lintian {}:\n{report}", deb.display());
        assert!(ok, "lintian found errors in {}:\n{report}", deb.display());
        assert!(
            !report.contains("\nE: ") && !report.starts_with("E: "),
            "{report}"
        );
    }
    let (_, control) = output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(package(&dir, "berth-agent_", "_amd64.deb"))
            .arg("Depends"),
    );
    assert!(control.contains("docker.io | docker-ce"), "{control}");
    for needed in ["nftables", "e2fsprogs", "mount"] {
        assert!(control.contains(needed), "{control}");
    }
    for rpm in [
        package(&dir, "berth-agent-", ".rpm"),
        package(&dir, "berth-coordinator-", ".rpm"),
    ] {
        let bytes = std::fs::read(&rpm).unwrap();
        assert_eq!(
            &bytes[..4],
            b"\xed\xab\xee\xdb",
            "{} is an RPM",
            rpm.display()
        );
        assert!(
            bytes.len() > 1 << 20,
            "{} holds the binaries",
            rpm.display()
        );
    }
}

/// The value of `key=` in a unit file.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_string()
}

/// Removes the Docker objects and nftables table of the agent under test, whatever happens.
struct HostCleanup {
    host: String,
    table: String,
}

impl Drop for HostCleanup {
    fn drop(&mut self) {
        berth_tests::docker::remove_host_objects(&self.host);
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .output();
    }
}

#[test]
fn installed_from_the_packages_an_agent_enrolls_reports_and_an_upgrade_keeps_its_tenant_running() {
    if !packages_present() {
        return;
    }
    if let Err(why) = berth_tests::docker::available() {
        return missing_component("Docker engine", &why);
    }
    let mut root = match DebianRoot::new() {
        Ok(root) => root,
        Err(why) => return missing_component("a Debian 12 root", &why),
    };
    // The agent's volumes where the host's Docker engine finds them at the same path.
    let volume_root = root.shared_dir();
    let dir = packages_dir();
    let host = format!("pkg-{}", std::process::id() % 100_000);
    let cleanup = HostCleanup {
        table: format!("berth_{}", host.replace('-', "_")),
        host: host.clone(),
    };
    let image = test_tenant_image();
    for (from, to) in [
        (
            package(&dir, "berth-coordinator_", "_amd64.deb"),
            "/tmp/coordinator.deb",
        ),
        (
            package(&dir.join("previous"), "berth-agent_", "_amd64.deb"),
            "/tmp/agent-previous.deb",
        ),
        (
            package(&dir, "berth-agent_", "_amd64.deb"),
            "/tmp/agent.deb",
        ),
    ] {
        std::fs::copy(from, root.path(to)).unwrap();
    }
    root.run(&[
        "dpkg",
        "-i",
        "/tmp/coordinator.deb",
        "/tmp/agent-previous.deb",
    ]);

    // What the maintainer scripts made: the service user, its private state directory.
    assert!(
        root.run(&["getent", "passwd", "berth"])
            .starts_with("berth:")
    );
    assert_eq!(
        root.run(&["stat", "-c", "%U %a", "/var/lib/berth/coordinator"])
            .trim(),
        "berth 700"
    );
    // The installed units verify (binaries, users and directives as systemd sees them).
    let (ok, report) = output(root.command("systemd-analyze").args([
        "verify",
        "--man=no",
        "/lib/systemd/system/berth-agent.service",
        "/lib/systemd/system/berth-coordinator.service",
        "/lib/systemd/system/berth-coordinator-backup.service",
        "/lib/systemd/system/berth-coordinator-backup.timer",
    ]));
    // It exits 0 on warnings such as an unknown key: nothing at all must be said.
    assert!(
        ok && report.trim().is_empty(),
        "systemd-analyze verify:\n{report}"
    );

    // The coordinator as its unit runs it: as berth, from the installed files.
    let coordinator_unit =
        std::fs::read_to_string(root.path("/lib/systemd/system/berth-coordinator.service"))
            .unwrap();
    assert_eq!(unit_value(&coordinator_unit, "Type"), "notify");
    assert_eq!(unit_value(&coordinator_unit, "CapabilityBoundingSet"), "");
    let user = unit_value(&coordinator_unit, "User");
    let as_user = [
        "setpriv",
        "--reuid",
        &user,
        "--regid",
        &user,
        "--init-groups",
        "--",
    ];
    std::fs::write(
        root.path("/etc/berth/coordinator.toml"),
        "agent_listen = \"127.0.0.1:0\"\noperator_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let coordinator = |args: &[&str]| {
        let mut all: Vec<&str> = as_user.to_vec();
        all.extend([
            "/usr/bin/berth-coordinator",
            "--config",
            "/etc/berth/coordinator.toml",
        ]);
        all.extend(args);
        root.run(&all)
    };
    coordinator(&["ca", "init"]);
    let exec = unit_value(&coordinator_unit, "ExecStart");
    let mut args: Vec<&str> = as_user.to_vec();
    args.extend(exec.split_whitespace());
    let log_dir = tempfile::tempdir().unwrap();
    root.spawn(&args, &log_dir.path().join("coordinator.log"));
    let endpoints_path = root.path("/var/lib/berth/coordinator/endpoints.json");
    let endpoints: serde_json::Value = wait_for(
        "the coordinator's endpoints",
        Duration::from_secs(15),
        || serde_json::from_str(&std::fs::read_to_string(&endpoints_path).ok()?).ok(),
    );
    let operator = endpoints["operator"].as_str().unwrap().to_string();
    let fingerprint = endpoints["ca_fingerprint"].as_str().unwrap().to_string();
    let token = coordinator(&["token", "create", "--host-id", &host, "--ttl", "10m"]);
    let operator_token = coordinator(&["operator-token", "create", "--name", "pkg-test"]);
    // The hourly snapshot as its unit takes it: as berth, through the running coordinator,
    // into the directory its StateDirectory= makes.
    let backup_unit =
        std::fs::read_to_string(root.path("/lib/systemd/system/berth-coordinator-backup.service"))
            .unwrap();
    assert_eq!(unit_value(&backup_unit, "Type"), "oneshot");
    root.run(&[
        "install",
        "-d",
        "-m",
        "0700",
        "-o",
        &user,
        "-g",
        &user,
        "/var/lib/berth/snapshots",
    ]);
    let mut snapshot_args: Vec<&str> = as_user.to_vec();
    let backup_exec = unit_value(&backup_unit, "ExecStart");
    snapshot_args.extend(backup_exec.split_whitespace());
    let said = root.run(&snapshot_args);
    assert!(
        said.contains("wrote /var/lib/berth/snapshots/berth-coordinator-"),
        "{said}"
    );
    std::fs::write(root.path("/root/operator.token"), operator_token.trim()).unwrap();
    let url = format!("https://{operator}");
    let berthctl = |args: &[&str]| {
        let mut all = vec![
            "/usr/bin/berthctl",
            "--coordinator",
            url.as_str(),
            "--ca-cert",
            "/var/lib/berth/coordinator/ca/ca.crt",
            "--token-file",
            "/root/operator.token",
            "--json",
        ];
        all.extend(args);
        serde_json::from_str::<serde_json::Value>(&root.run(&all)).unwrap()
    };

    // The agent: configured, enrolled, then started as its unit starts it.
    std::fs::write(
        root.path("/etc/berth/agent.toml"),
        format!(
            "provider = \"hetzner\"\nregion = \"fsn1\"\nreport_interval = \"1s\"\nmetrics_listen = \"127.0.0.1:0\"\nvolume_root = {:?}\n[egress]\ntable = \"{}\"\ntenant_resolvers = []\n",
            volume_root.display().to_string(),
            cleanup.table
        ),
    )
    .unwrap();
    let agent_unit =
        std::fs::read_to_string(root.path("/lib/systemd/system/berth-agent.service")).unwrap();
    assert_eq!(unit_value(&agent_unit, "Type"), "notify");
    assert_eq!(unit_value(&agent_unit, "KillMode"), "process");
    assert_eq!(
        unit_value(&agent_unit, "ConditionPathExists"),
        "/var/lib/berth/agent/enrollment.json"
    );
    assert!(
        !root.path("/var/lib/berth/agent/enrollment.json").exists(),
        "not enrolled yet"
    );
    root.run(&[
        "/usr/bin/berth-agent",
        "enroll",
        "--coordinator",
        &url,
        "--token",
        token.trim(),
        "--ca-fingerprint",
        &fingerprint,
    ]);
    assert!(root.path("/var/lib/berth/agent/enrollment.json").exists());
    let agent_exec = unit_value(&agent_unit, "ExecStart");
    let agent_args: Vec<&str> = agent_exec.split_whitespace().collect();
    let agent_log = log_dir.path().join("agent.log");
    let agent = root.spawn(&agent_args, &agent_log);
    let ready = || {
        berthctl(&["hosts"])
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["host_id"] == host.as_str() && h["state"] == "ready")
    };
    wait_for(
        "the packaged agent reporting",
        Duration::from_secs(20),
        || ready().then_some(()),
    );

    // A tenant on the host's Docker engine.
    std::fs::write(
        root.path("/root/tenant.toml"),
        format!(
            "tenant_id = \"{host}-t\"\nimage = \"{image}\"\n[resources]\nmemory = \"128MiB\"\ncpu_millicores = 250\nvolume = \"64MiB\"\n[volume]\nencrypted = false\n"
        ),
    )
    .unwrap();
    let mut place = vec![
        "/usr/bin/berthctl",
        "--coordinator",
        url.as_str(),
        "--ca-cert",
    ];
    place.extend([
        "/var/lib/berth/coordinator/ca/ca.crt",
        "--token-file",
        "/root/operator.token",
    ]);
    place.extend(["place", "/root/tenant.toml"]);
    root.run(&place);
    let running = || {
        berthctl(&["tenants"])
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["tenant_id"] == format!("{host}-t") && t["state"] == "running")
    };
    wait_for("the tenant running", Duration::from_secs(30), || {
        running().then_some(())
    });
    let container = berth_tests::docker::container_name(&host, &format!("{host}-t"));
    let started = started_at(&container);
    // What the tenant writes lands in its volume, the image the packaged agent made and
    // mounted, not in a directory Docker made beneath it.
    let port = berthctl(&["tenants"])
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant_id"] == format!("{host}-t"))
        .and_then(|t| t["published_port"].as_u64())
        .unwrap() as u16;
    let wrote = wait_for("the tenant's gateway", Duration::from_secs(20), || {
        berth_tests::fleet::http_get(port, "/fill?name=written-by-the-tenant&mb=1")
    });
    assert_eq!(wrote, "wrote 1 MiB\n");
    let volume = volume_root.join("plain").join(format!("{host}-t"));
    assert!(
        berth_tests::procs::mounted_at(&volume),
        "its volume is mounted"
    );
    assert_eq!(
        std::fs::metadata(volume.join("written-by-the-tenant"))
            .unwrap()
            .len(),
        1 << 20
    );

    // Upgrade: dpkg replaces the package; the daemon is restarted (systemd's try-restart,
    // done here by hand: no systemd in a chroot) and adopts the container.
    let previous = root.run(&["dpkg-query", "-W", "-f=${Version}", "berth-agent"]);
    root.run(&["dpkg", "-i", "/tmp/agent.deb"]);
    let now = root.run(&["dpkg-query", "-W", "-f=${Version}", "berth-agent"]);
    assert!(
        previous.starts_with("0.0.9") && now != previous,
        "{previous} -> {now}"
    );
    root.terminate(agent);
    assert_eq!(
        started_at(&container),
        started,
        "stopping the agent leaves the tenant"
    );
    root.spawn(&agent_args, &log_dir.path().join("agent-upgraded.log"));
    wait_for(
        "the upgraded agent reporting",
        Duration::from_secs(20),
        || ready().then_some(()),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(running());
    assert_eq!(
        started_at(&container),
        started,
        "the upgrade restarted the daemon, not the tenant"
    );
    let state = berth_tests::docker::inspect(&container).unwrap()["State"]["Status"].clone();
    assert_eq!(state, "running");
    drop(root);
    drop(cleanup);
}
