//! A production-shaped host (takes several minutes: software emulation). Debian 12 in qemu
//! with systemd as PID 1 and cgroup v2 runs the packaged agent from its .deb, under its
//! packaged, unmodified unit, enrolled to the coordinator this test runs here (reached over
//! qemu's user network). An encrypted tenant runs in Docker on its LUKS volume, and the test
//! checks what the tenant itself sees: its file is on the volume, the volume is mounted where
//! dockerd resolves the bind, its backing file holds no plaintext; the memory cap holds under
//! cgroup v2; egress is default-deny; after a reboot the tenant waits for its key while the
//! coordinator is away and runs with its data once it is back; a package upgrade leaves it
//! running; a purge leaves neither its data nor its key anywhere on the host's disk.
//!
//! By hand: `sudo BERTH_REQUIRE_REAL=1 cargo test -p berth-tests --test production_host --
//! --nocapture` after the test command has built the packages (`target/packages`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_tests::debroot::{cached_root, packages_dir};
use berth_tests::keyscan::{key_forms, occurrences_in_file};
use berth_tests::missing_component;
use berth_tests::procs::CoordinatorProc;
use berth_tests::vmhost::{GUEST_ADDRESS, HOST_ALIAS, HostImage, VmHost};
use berth_tests::wait_for;

const HOST: &str = "vm-host-1";
const TENANT: &str = "sealed";
/// The egress test network inside the guest: a namespace holding the servers.
const PEER: &str = "192.0.2.2";

/// The one package file in `dir` whose name starts with `berth-agent_`.
fn agent_deb(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("berth-agent_") && n.ends_with(".deb"))
        })
}

/// `GET path` on the tenant's gateway port (the guest's loopback), from inside the guest:
/// the body, or `None` when the connection failed.
fn gateway(vm: &VmHost, port: u64, path: &str) -> Option<String> {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 20 cat <&3"
    );
    let answer = vm.try_ssh(&script).ok()?;
    answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

/// The agent's Prometheus page, from inside the guest.
fn agent_metrics(vm: &VmHost) -> String {
    vm.ssh(
        "exec 3<>/dev/tcp/127.0.0.1/7481 && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 10 cat <&3",
    )
}

/// The value of the sample `name` (with its labels, as printed) on a Prometheus page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn tenant_view(coordinator: &CoordinatorProc) -> Option<serde_json::Value> {
    let (ok, out, _) = coordinator.berthctl(&["tenants", "--json"]);
    if !ok {
        return None;
    }
    serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .ok()?
        .into_iter()
        .find(|t| t["tenant_id"] == TENANT)
}

fn wait_running(coordinator: &CoordinatorProc, what: &str) -> serde_json::Value {
    wait_for(what, Duration::from_secs(240), || {
        tenant_view(coordinator).filter(|t| t["state"] == "running" && t["published_port"] != 0)
    })
}

#[test]
fn an_encrypted_tenant_on_a_systemd_host_keeps_its_data_its_cap_and_its_rules() {
    let started = Instant::now();
    let image = match HostImage::build(&cached_root()) {
        Ok(image) => image,
        Err(why) => return missing_component("a systemd host in qemu", &why),
    };
    let packages = packages_dir();
    let (Some(current), Some(previous)) =
        (agent_deb(&packages), agent_deb(&packages.join("previous")))
    else {
        return missing_component(
            "the agent's packages",
            &format!(
                "no berth-agent .deb in {0} and {0}/previous (the test command builds them)",
                packages.display()
            ),
        );
    };
    if let Err(why) = berth_tests::docker::available() {
        return missing_component("Docker (for the tenant image)", &why);
    }
    eprintln!("host image built in {:?}", image.built_in);
    let coordinator = CoordinatorProc::start_for_vm_hosts("");
    let mut vm = VmHost::boot(&image, HOST, 1536, &[]).expect("boot");
    eprintln!("booted in {:?}", vm.booted_in);
    vm.diagnostics = vec![
        "journalctl -u berth-agent --no-pager | tail -n 60".into(),
        "docker ps -a; findmnt -R /var/lib/berth; ls -la /var/lib/berth/*".into(),
    ];
    assert_eq!(vm.ssh("stat -fc %T /sys/fs/cgroup").trim(), "cgroup2fs");
    assert_eq!(vm.ssh("ps -o comm= -p 1").trim(), "systemd");

    // 1. The packaged agent, installed offline, enrolled, started by its own unit.
    vm.copy_in(&previous, "/root/berth-agent-previous.deb");
    vm.ssh("apt-get install -y -q /root/berth-agent-previous.deb >/dev/null");
    let unit = vm.ssh("cat /usr/lib/systemd/system/berth-agent.service");
    assert_eq!(
        unit,
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/berth-agent.service")
        )
        .unwrap(),
        "the packaged unit, unmodified"
    );
    let token = coordinator.token(HOST, "10m");
    vm.ssh(&format!(
        "BERTH_ENROLL_TOKEN={token} berth-agent enroll --coordinator https://{HOST_ALIAS}:{} --ca-fingerprint {}",
        coordinator.endpoints.operator.port(),
        coordinator.endpoints.ca_fingerprint
    ));
    vm.ssh("systemctl enable --now berth-agent");
    wait_for(
        "the agent in the VM reporting",
        Duration::from_secs(120),
        || (coordinator.host_state(HOST).as_deref() == Some("ready")).then_some(()),
    );

    // 2. An encrypted tenant, from the test image loaded into the VM's Docker.
    let tenant_image = berth_tests::docker::test_tenant_image();
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("tenant.tar");
    let (ok, _, err) = berth_tests::procs::run({
        let mut c = std::process::Command::new("docker");
        c.args(["save", "-o"]).arg(&tar).arg(&tenant_image);
        c
    });
    assert!(ok, "docker save: {err}");
    vm.copy_in(&tar, "/root/tenant.tar");
    vm.ssh("docker load -q -i /root/tenant.tar && rm /root/tenant.tar");
    // The egress servers: a namespace behind a veth, one server allowed, one not.
    vm.copy_in(&berth_tests::procs::bin("berth-test-tenant"), "/root/probe");
    vm.ssh(&format!(
        "chmod 755 /root/probe && ip netns add peer && ip link add vpeer type veth peer name vpeer-in \
         && ip link set vpeer-in netns peer && ip addr add 192.0.2.1/24 dev vpeer && ip link set vpeer up \
         && ip -n peer addr add {PEER}/24 dev vpeer-in && ip -n peer link set vpeer-in up && ip -n peer link set lo up \
         && ip -n peer route add default via 192.0.2.1 \
         && systemd-run -q --unit probe-8080 -E PORT=8080 ip netns exec peer /root/probe \
         && systemd-run -q --unit probe-9090 -E PORT=9090 ip netns exec peer /root/probe"
    ));
    let spec = dir.path().join("sealed.toml");
    std::fs::write(
        &spec,
        format!(
            "tenant_id = \"{TENANT}\"\nimage = \"{tenant_image}\"\negress = [\"{PEER}:8080\"]\n[resources]\nmemory = \"128MiB\"\ncpu_millicores = 250\nvolume = \"64MiB\"\n[volume]\nencrypted = true\n"
        ),
    )
    .unwrap();
    let (ok, _, err) = coordinator.berthctl(&["place", spec.to_str().unwrap()]);
    assert!(ok, "place: {err}");
    let view = wait_running(&coordinator, "the encrypted tenant running in the VM");
    assert_eq!(view["encrypted"], true);
    let port = view["published_port"].as_u64().unwrap();
    let marker = format!("berth-customer-chat-{:016x}", rand::random::<u64>());
    assert_eq!(
        gateway(&vm, port, &format!("/write?name=chat.txt&text={marker}")).as_deref(),
        Some(format!("wrote {} bytes\n", marker.len()).as_str())
    );
    assert_eq!(
        gateway(&vm, port, "/read?name=chat.txt"),
        Some(marker.clone())
    );

    // Where it landed: the LUKS mount, seen alike from the init mount namespace, the agent's
    // (the unit's own) and the container's (dockerd resolved the bind there).
    let mount = format!("/var/lib/berth/mnt/{TENANT}");
    let mapper = format!("/dev/mapper/berth-{TENANT}");
    let init_view = vm.ssh(&format!("findmnt -n -o SOURCE {mount}"));
    let agent_view = vm.ssh(&format!(
        "nsenter -t $(systemctl show -p MainPID --value berth-agent) -m findmnt -n -o SOURCE {mount}"
    ));
    assert_eq!(
        init_view.trim(),
        mapper,
        "the init namespace sees the volume"
    );
    // There it shows twice: at the path and inside the unit's bind mount of /var/lib/berth
    // (ReadWritePaths=), both propagated from the init namespace.
    assert!(
        !agent_view.trim().is_empty() && agent_view.lines().all(|l| l == mapper),
        "the agent's namespace sees the volume: {agent_view}"
    );
    assert_ne!(
        vm.ssh("readlink /proc/1/ns/mnt"),
        vm.ssh("readlink /proc/$(systemctl show -p MainPID --value berth-agent)/ns/mnt"),
        "the unit runs in a mount namespace of its own (ProtectSystem=, PrivateTmp=)"
    );
    let container = berth_tests::docker::container_name(HOST, TENANT);
    let pid = vm.ssh(&format!(
        "docker inspect -f '{{{{.State.Pid}}}}' {container}"
    ));
    let container_mounts = vm.ssh(&format!("cat /proc/{}/mountinfo", pid.trim()));
    let volume_line = container_mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/home/node/.openclaw"))
        .unwrap_or_else(|| panic!("no volume mount in the container: {container_mounts}"));
    let dm_device = vm.ssh(&format!("stat -Lc '%t:%T' {mapper}"));
    let (major, minor) = dm_device.trim().split_once(':').unwrap();
    let device = format!(
        "{}:{}",
        u32::from_str_radix(major, 16).unwrap(),
        u32::from_str_radix(minor, 16).unwrap()
    );
    assert_eq!(
        volume_line.split(' ').nth(2),
        Some(device.as_str()),
        "the container's volume is the LUKS device: {volume_line}"
    );
    vm.ssh("sync");
    let backing = format!("/var/lib/berth/volumes/{TENANT}.img");
    assert_eq!(
        vm.ssh(&format!("grep -c -a -F {marker} {backing} || true"))
            .trim(),
        "0",
        "the backing file holds no plaintext"
    );
    assert!(
        vm.ssh(&format!("cryptsetup isLuks {backing} && echo luks"))
            .contains("luks")
    );

    // 3. The memory cap under cgroup v2: an allocation past it is OOM-killed, reported, and
    // the tenant runs again; the agent's figure is the cgroup's memory.current.
    let _ = gateway(&vm, port, "/alloc?mb=400");
    let view = wait_for("the OOM kill reported", Duration::from_secs(180), || {
        tenant_view(&coordinator).filter(|t| t["oom_kills"].as_u64() >= Some(1))
    });
    eprintln!("after the OOM kill: {view}");
    let view = wait_running(&coordinator, "the tenant running again after its OOM kill");
    let port = view["published_port"].as_u64().unwrap();
    let read = wait_for(
        "the tenant answering after its OOM kill",
        Duration::from_secs(120),
        || gateway(&vm, port, "/read?name=chat.txt"),
    );
    assert_eq!(read, marker);
    let id = vm.ssh(&format!("docker inspect -f '{{{{.Id}}}}' {container}"));
    let cgroup = format!("/sys/fs/cgroup/system.slice/docker-{}.scope", id.trim());
    assert_eq!(
        vm.ssh(&format!("cat {cgroup}/memory.max")).trim(),
        (128u64 << 20).to_string()
    );
    wait_for(
        "the agent's memory figure matching memory.current",
        Duration::from_secs(60),
        || {
            let current: f64 = vm
                .ssh(&format!("cat {cgroup}/memory.current"))
                .trim()
                .parse()
                .ok()?;
            let page = agent_metrics(&vm);
            let reported = sample(
                &page,
                &format!("berth_agent_tenant_memory_used_bytes{{tenant=\"{TENANT}\"}}"),
            )?;
            let cap = sample(
                &page,
                &format!("berth_agent_tenant_memory_cap_bytes{{tenant=\"{TENANT}\"}}"),
            )?;
            assert_eq!(cap, (128u64 << 20) as f64);
            ((reported - current).abs() <= (current / 10.0).max(1024.0 * 1024.0)).then_some(())
        },
    );

    // 4. Egress: the allowed server only; not the other port, not the host itself.
    assert_eq!(
        gateway(&vm, port, &format!("/connect?addr={PEER}:8080")).as_deref(),
        Some("connected\n")
    );
    for denied in [format!("{PEER}:9090"), format!("{GUEST_ADDRESS}:22")] {
        // A request that got no answer at all (ssh or the gateway busy under emulation) is
        // asked again; an answer must be a refusal.
        let answer = wait_for("the gateway's answer", Duration::from_secs(60), || {
            gateway(&vm, port, &format!("/connect?addr={denied}"))
        });
        assert!(answer.starts_with("refused"), "{denied}: {answer}");
    }
    assert_eq!(
        vm.ssh("ip netns exec peer bash -c 'exec 3<>/dev/tcp/127.0.0.1/9090 && echo open'")
            .trim(),
        "open",
        "the denied server does listen"
    );

    // 5. Reboot with the coordinator away: the tenant waits for its key, stopped; once the
    // coordinator is back it runs, its file intact.
    let mut coordinator = coordinator;
    coordinator.kill9();
    let took = vm.reboot().expect("reboot");
    eprintln!("rebooted in {took:?}");
    wait_for(
        "the agent waiting for the key",
        Duration::from_secs(120),
        || {
            let page = vm.try_ssh(
            "exec 3<>/dev/tcp/127.0.0.1/7481 && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 10 cat <&3",
        ).ok()?;
            (sample(&page, "berth_agent_tenants{state=\"waiting_for_key\"}") == Some(1.0))
                .then_some(())
        },
    );
    assert_eq!(vm.ssh("systemctl is-active berth-agent").trim(), "active");
    assert_ne!(
        vm.ssh(&format!(
            "docker inspect -f '{{{{.State.Running}}}}' {container} 2>/dev/null || echo absent"
        ))
        .trim(),
        "true",
        "no key, no tenant"
    );
    assert!(
        vm.try_ssh(&format!("findmnt {mount}")).is_err(),
        "no key, no mount"
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_ne!(
        vm.ssh(&format!(
            "docker inspect -f '{{{{.State.Running}}}}' {container} 2>/dev/null || echo absent"
        ))
        .trim(),
        "true",
        "still stopped without the coordinator"
    );
    coordinator.restart();
    let view = wait_running(
        &coordinator,
        "the tenant running once the coordinator is back",
    );
    let port = view["published_port"].as_u64().unwrap();
    assert_eq!(
        gateway(&vm, port, "/read?name=chat.txt"),
        Some(marker.clone())
    );

    // 6. Upgrade: the tenant's container keeps running, its volume mounted.
    let started_at = vm.ssh(&format!(
        "docker inspect -f '{{{{.State.StartedAt}}}}' {container}"
    ));
    vm.copy_in(&current, "/root/berth-agent.deb");
    vm.ssh("apt-get install -y -q /root/berth-agent.deb >/dev/null");
    let version = vm.ssh("dpkg-query -W -f='${Version}' berth-agent");
    assert!(!version.starts_with("0.0.9"), "upgraded: {version}");
    wait_for(
        "the upgraded agent reporting",
        Duration::from_secs(120),
        || (coordinator.host_state(HOST).as_deref() == Some("ready")).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        vm.ssh(&format!(
            "docker inspect -f '{{{{.State.StartedAt}}}}' {container}"
        )),
        started_at,
        "the upgrade restarted the agent, not the tenant"
    );
    assert_eq!(
        vm.ssh(&format!("findmnt -n -o SOURCE {mount}")).trim(),
        mapper
    );
    assert_eq!(
        gateway(&vm, port, "/read?name=chat.txt"),
        Some(marker.clone())
    );

    // 8. The journal: readiness, watchdog keep-alives, no errors; the unit's exposure.
    let journal = vm.ssh("journalctl -u berth-agent --no-pager");
    assert!(
        journal.contains("Started berth-agent.service") || journal.contains("Started berth agent"),
        "{journal}"
    );
    assert!(!journal.contains("Watchdog timeout"), "{journal}");
    assert!(!journal.contains(" ERROR "), "{journal}");
    let pinged = vm.ssh("systemctl show -p WatchdogTimestampMonotonic --value berth-agent");
    // The units' exposure as systemd rates it (the coordinator's unit analysed from its file).
    vm.copy_in(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/berth-coordinator.service"),
        "/etc/systemd/system/berth-coordinator.service",
    );
    vm.ssh("systemctl daemon-reload");
    for (unit, at_most) in [("berth-agent", 4.0), ("berth-coordinator", 3.0)] {
        let security = vm.ssh(&format!("systemd-analyze security --no-pager {unit}"));
        let level: f64 = security
            .lines()
            .find_map(|l| {
                l.split_once(&format!("Overall exposure level for {unit}.service: "))?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{security}"));
        eprintln!("systemd-analyze security {unit}: {level}");
        assert!(
            level <= at_most,
            "{unit} exposure {level} > {at_most}:\n{security}"
        );
    }

    // 7. Purge: the volume is erased and deleted; the disk holds neither its data nor its key.
    let key = {
        let copy = dir.path().join("keys");
        std::fs::create_dir_all(&copy).unwrap();
        for f in ["master.key", "volume-keys"] {
            std::fs::copy(coordinator.state_dir().join(f), copy.join(f)).unwrap();
        }
        let vault = berth_coordinator::keys::KeyVault::new(
            berth_coordinator::keys::MasterKey::load(&copy.join("master.key")).unwrap(),
            berth_coordinator::keys::keyring::Keyring::open(&copy.join("volume-keys")).unwrap(),
        );
        let tenant = berth_shared::ids::TenantId::new(TENANT).unwrap();
        vault
            .get(&tenant)
            .unwrap()
            .expect("the tenant's key")
            .to_vec()
    };
    let (ok, out, err) = coordinator.berthctl(&["--json", "remove", "--purge", TENANT]);
    assert!(ok, "remove --purge: {err}");
    let removal: serde_json::Value = serde_json::from_str(&out).unwrap();
    for done in ["purged", "erased", "deleted", "key_destroyed"] {
        assert_eq!(removal[done], true, "{done}: {removal}");
    }
    wait_for(
        "the volume erased and deleted",
        Duration::from_secs(120),
        || {
            vm.try_ssh(&format!("test ! -e {backing} && test ! -e {mapper} && ! findmnt {mount} >/dev/null && echo gone"))
            .ok()
            .filter(|s| s.contains("gone"))
        },
    );
    // The watchdog was fed meanwhile (every 15 s: WatchdogSec=30s).
    wait_for("a watchdog keep-alive", Duration::from_secs(40), || {
        let again = vm.ssh("systemctl show -p WatchdogTimestampMonotonic --value berth-agent");
        (again.trim().parse::<u64>().ok()? > pinged.trim().parse::<u64>().ok()?).then_some(())
    });
    vm.power_off(Duration::from_secs(120));
    let mut needles = key_forms(&key);
    needles.push(marker.clone().into_bytes());
    let found = occurrences_in_file(&vm.disk, &needles).unwrap();
    assert_eq!(
        found,
        Vec::new(),
        "(needle, offset) on the VM's disk after the purge"
    );
    eprintln!("whole test: {:?}", started.elapsed());
}
