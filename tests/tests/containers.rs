//! Tenant containers on the real Docker engine: hardening, memory caps and OOM kills, enforcement
//! without the coordinator, adoption across an agent restart, removal, and containers berth does
//! not own. Images are local only (built `FROM scratch`); nothing is ever pulled from outside.

use std::process::Command;
use std::time::Duration;

use berth_tests::docker::{inspect, inspect_network, started_at};
use berth_tests::fleet::{fleet, http_get, unique};
use berth_tests::procs::mounted_at;
use berth_tests::wait_for;

/// Removes a container (or a network) the test made itself, however the test ends.
struct RemovedAtEnd {
    name: String,
    network: bool,
}

impl RemovedAtEnd {
    fn container(name: &str) -> Self {
        Self {
            name: name.into(),
            network: false,
        }
    }
}

impl Drop for RemovedAtEnd {
    fn drop(&mut self) {
        let args = match self.network {
            true => ["network", "rm", &self.name],
            false => ["rm", "-f", &self.name],
        };
        let _ = Command::new("docker").args(args).output();
    }
}

/// How fast a placement runs is a benchmark's figure (docs/performance.md), not this test's:
/// the bound here only keeps a stuck placement from hanging the suite.
#[test]
fn a_placed_tenant_runs_hardened_under_its_cap() {
    let Some(f) = fleet() else { return };
    let tenant = unique("hard");
    assert!(inspect_network(&f.network(&tenant)).is_none());
    f.place(&tenant, "128MiB");
    let view = f.wait_running(&tenant, Duration::from_secs(60));
    let port = view["published_port"].as_u64().unwrap() as u16;
    assert!((20000..=29999).contains(&port));
    assert_eq!(
        http_get(port, "/healthz").as_deref(),
        Some("ok\n"),
        "the gateway answers on 127.0.0.1"
    );

    let c = inspect(&f.container(&tenant)).expect("container");
    let hc = &c["HostConfig"];
    assert_eq!(hc["Memory"], 128 << 20);
    assert_eq!(hc["MemorySwap"], 128 << 20, "no swap");
    // A CPU request and no limit: a weight when the host's CPU is contended, no quota.
    assert_eq!(hc["CpuShares"], 256);
    assert_eq!(
        (hc["CpuPeriod"].as_i64(), hc["CpuQuota"].as_i64()),
        (Some(0), Some(0))
    );
    assert_eq!(hc["PidsLimit"], 512);
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    assert!(hc["SecurityOpt"].to_string().contains("no-new-privileges"));
    assert_eq!(hc["ReadonlyRootfs"], true);
    assert!(hc["Tmpfs"]["/tmp"].as_str().unwrap().contains("noexec"));
    assert_eq!(c["Config"]["User"], "65534:65534");
    assert_eq!(hc["NetworkMode"], f.network(&tenant));
    let binding = &hc["PortBindings"]["18789/tcp"][0];
    assert_eq!(
        (binding["HostIp"].as_str(), binding["HostPort"].as_str()),
        (Some("127.0.0.1"), Some(port.to_string().as_str()))
    );
    assert_eq!(hc["RestartPolicy"]["Name"], "on-failure");
    assert_eq!(hc["LogConfig"]["Type"], "json-file");
    assert_eq!(hc["LogConfig"]["Config"]["max-size"], "10m");
    assert_eq!(c["Config"]["Labels"]["berth.tenant"], tenant.as_str());
    assert_eq!(
        c["Config"]["Labels"]["berth.host"],
        f.agent.host_id.as_str()
    );
    // The cap is in the cgroup file.
    let id = c["Id"].as_str().unwrap();
    let limit = [
        "/sys/fs/cgroup/memory/docker",
        "/sys/fs/cgroup/system.slice",
        "/sys/fs/cgroup/docker",
    ]
    .iter()
    .find_map(|root| {
        let v1 = format!("{root}/{id}/memory.limit_in_bytes");
        let v2 = format!("{root}/docker-{id}.scope/memory.max");
        let v2b = format!("{root}/{id}/memory.max");
        [v1, v2, v2b]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
    })
    .expect("the container's memory cgroup");
    assert_eq!(limit.trim(), (128u64 << 20).to_string());
    assert!(
        view["memory_used_bytes"].as_u64().unwrap() > 0,
        "usage read from the cgroup: {view}"
    );
    assert_eq!(view["memory_cap_bytes"].as_u64(), Some(128 << 20));
    assert_eq!(view["message"], "");
    // Its (unencrypted, as the spec asks) volume is bound in, owned by the tenant's user.
    let binds = hc["Binds"].as_array().expect("binds");
    let bind = binds[0].as_str().unwrap();
    assert!(
        bind.ends_with(&format!("/plain/{tenant}:/home/node/.openclaw:rw")),
        "{bind}"
    );
    let dir = bind.split(':').next().unwrap();
    let meta = std::fs::metadata(dir).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);
}

#[test]
fn an_oom_kill_is_reported_the_tenant_comes_back_and_its_neighbour_is_untouched() {
    let Some(f) = fleet() else { return };
    let (greedy, neighbour) = (unique("oom"), unique("nb"));
    f.place(&greedy, "96MiB");
    f.place(&neighbour, "96MiB");
    let g = f.wait_serving(&greedy, Duration::from_secs(5));
    f.wait_serving(&neighbour, Duration::from_secs(5));
    let neighbour_started = started_at(&f.container(&neighbour));
    let port = g["published_port"].as_u64().unwrap() as u16;
    // Past the cap: the kernel kills it mid-request.
    assert_ne!(
        http_get(port, "/alloc?mb=400").as_deref(),
        Some("allocated 400\n")
    );
    let reported = wait_for("the OOM kill reported", Duration::from_secs(15), || {
        f.tenant(&greedy)
            .filter(|t| t["oom_kills"].as_u64() >= Some(1))
    });
    // Docker's own record agrees (it may lag the event the agent counted by a moment).
    wait_for(
        "Docker's record of the kill",
        Duration::from_secs(5),
        || {
            let c = inspect(&f.container(&greedy))?;
            (c["State"]["OOMKilled"] == true || c["RestartCount"].as_u64() >= Some(1)).then_some(())
        },
    );
    // Docker restarts it (with backoff); it answers again.
    wait_for("the tenant back", Duration::from_secs(20), || {
        (http_get(port, "/healthz").as_deref() == Some("ok\n")).then_some(())
    });
    eprintln!(
        "reported: oom_kills={} restarts={}",
        reported["oom_kills"], reported["restarts"]
    );
    let n = inspect(&f.container(&neighbour)).unwrap();
    assert_eq!(
        started_at(&f.container(&neighbour)),
        neighbour_started,
        "the neighbour never restarted"
    );
    assert_eq!(n["RestartCount"], 0);
    assert_eq!(n["State"]["OOMKilled"], false);
}

#[test]
fn enforcement_goes_on_without_the_coordinator_and_an_agent_restart_restarts_nothing() {
    let Some(mut f) = fleet() else { return };
    let tenant = unique("res");
    f.place(&tenant, "64MiB");
    f.wait_running(&tenant, Duration::from_secs(5));
    let name = f.container(&tenant);
    f.coordinator.kill9();
    // A stopped container (stopped by hand, so Docker's restart policy does not apply) is
    // started again by the agent alone.
    assert!(
        Command::new("docker")
            .args(["stop", "-t", "1", &name])
            .status()
            .unwrap()
            .success()
    );
    wait_for("the agent restarting it", Duration::from_secs(12), || {
        (inspect(&name)?["State"]["Running"] == true).then_some(())
    });
    let before = started_at(&name);
    let restarts = inspect(&name).unwrap()["RestartCount"].clone();
    // Agent SIGKILL and restart: the running container is adopted, not restarted.
    f.agent.kill9();
    f.agent.start_with_docker(true);
    std::thread::sleep(Duration::from_secs(7));
    assert!(
        f.agent.log().matches("berth-agent starting").count() >= 2,
        "the agent restarted"
    );
    assert_eq!(started_at(&name), before, "container start time unchanged");
    assert_eq!(inspect(&name).unwrap()["RestartCount"], restarts);
}

#[test]
fn removal_leaves_nothing_behind_and_foreign_containers_are_never_touched() {
    let Some(f) = fleet() else { return };
    let plain = unique("plain");
    let _cleanup = RemovedAtEnd::container(&plain);
    let run = Command::new("docker")
        .args(["run", "-d", "--name", &plain, &f.image])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let plain_started = started_at(&plain);
    // A network named as this host's tenant networks are, without berth's labels.
    let foreign_network = f.network(&unique("fgn"));
    let _network_cleanup = RemovedAtEnd {
        name: foreign_network.clone(),
        network: true,
    };
    let made = Command::new("docker")
        .args(["network", "create", &foreign_network])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let tenant = unique("rm");
    f.place(&tenant, "64MiB");
    f.wait_running(&tenant, Duration::from_secs(5));
    let (ok, _, err) = f.coordinator.berthctl(&["remove", &tenant]);
    assert!(ok, "{err}");
    let name = f.container(&tenant);
    wait_for(
        "container and network gone",
        Duration::from_secs(10),
        || {
            (inspect(&name).is_none() && inspect_network(&f.network(&tenant)).is_none())
                .then_some(())
        },
    );
    assert!(f.tenant(&tenant).is_none());
    // Several reconcile passes later the unlabelled container is exactly as it was.
    std::thread::sleep(Duration::from_secs(6));
    let p = inspect(&plain).expect("the foreign container still exists");
    assert_eq!(p["State"]["Running"], true);
    assert_eq!(started_at(&plain), plain_started);
    assert!(
        inspect_network(&foreign_network).is_some(),
        "the unlabelled network still exists"
    );
}

#[test]
fn an_image_that_is_absent_and_cannot_be_pulled_fails_the_tenant_with_the_reason() {
    let Some(mut f) = fleet() else { return };
    // A registry on loopback that refuses: the pull fails at once, nothing leaves the machine.
    f.image = "localhost:1/berth/absent:1".into();
    let tenant = unique("abs");
    f.place(&tenant, "64MiB");
    let t = wait_for("the failure reported", Duration::from_secs(15), || {
        f.tenant(&tenant).filter(|t| t["state"] == "failed")
    });
    let message = t["message"].as_str().unwrap();
    assert!(
        message.starts_with("image localhost:1/berth/absent:1 is not present and cannot be pulled"),
        "{message}"
    );
    assert!(inspect(&f.container(&tenant)).is_none(), "nothing created");
}

#[test]
fn a_host_runs_more_tenants_than_dockers_default_address_pools_hold() {
    // Docker's default pools hold 31 bridge networks; every tenant has its own network, so the
    // agent allocates /28s from its own pool.
    let Some(f) = fleet() else { return };
    let tenants: Vec<String> = (0..40).map(|_| unique("many")).collect();
    for t in &tenants {
        f.place_with_cpu(t, "64MiB", 20);
    }
    wait_for("40 tenants running", Duration::from_secs(90), || {
        let (_, out, _) = f.coordinator.berthctl(&["tenants", "--json"]);
        (out.matches("\"state\": \"running\"").count() == tenants.len()).then_some(())
    });
    let subnets: std::collections::BTreeSet<String> = tenants
        .iter()
        .map(|t| {
            inspect_network(&f.network(t)).unwrap()["IPAM"]["Config"][0]["Subnet"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(subnets.len(), tenants.len(), "one subnet each");
    assert!(
        subnets
            .iter()
            .all(|s| s.starts_with("10.213.") && s.ends_with("/28")),
        "{subnets:?}"
    );
}

#[test]
fn a_plain_remove_keeps_the_volume_for_a_return_and_a_purge_deletes_it_after_the_container() {
    let Some(f) = fleet() else { return };
    let tenant = unique("pg");
    f.place(&tenant, "64MiB");
    f.wait_running(&tenant, Duration::from_secs(5));
    let name = f.container(&tenant);
    let volume_dir = |name: &str| -> std::path::PathBuf {
        let c = inspect(name).expect("the container");
        let bind = c["HostConfig"]["Binds"][0].as_str().unwrap().to_string();
        bind.split(':').next().unwrap().into()
    };
    let dir = volume_dir(&name);
    std::fs::write(dir.join("chat.log"), "customer data").unwrap();
    let image = f.agent.volume_image(&tenant);

    // Removed without purge: the container goes, the volume stays (unmounted), and comes back
    // with it.
    let (ok, out, err) = f.coordinator.berthctl(&["remove", &tenant]);
    assert!(ok, "{err}");
    assert!(
        out.contains("(its volume is kept: it can be placed again)"),
        "an unencrypted volume has no key: {out}"
    );
    wait_for("container gone", Duration::from_secs(10), || {
        inspect(&name).is_none().then_some(())
    });
    wait_for("its volume unmounted", Duration::from_secs(10), || {
        (!mounted_at(&dir)).then_some(())
    });
    assert!(image.is_file(), "the volume's image is kept");
    f.place(&tenant, "64MiB");
    f.wait_running(&tenant, Duration::from_secs(5));
    assert_eq!(volume_dir(&name), dir);
    assert_eq!(
        std::fs::read_to_string(dir.join("chat.log")).unwrap(),
        "customer data"
    );

    // Purged: answered only once the agent removed the container and deleted the volume.
    let (ok, out, err) = f
        .coordinator
        .berthctl(&["--json", "remove", &tenant, "--purge"]);
    assert!(ok, "{err}");
    let removed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(removed["purged"], true, "{removed}");
    assert_eq!(removed["deleted"], true, "{removed}");
    assert_eq!(removed["host_id"], f.agent.host_id.as_str(), "{removed}");
    assert_eq!(removed["key_destroyed"], false, "a plain volume has no key");
    assert!(inspect(&name).is_none(), "the container went first");
    assert!(!dir.exists() && !image.exists(), "the volume is deleted");
    // Nothing is left to remove or purge.
    let (ok, _, err) = f.coordinator.berthctl(&["remove", &tenant, "--purge"]);
    assert!(!ok);
    assert!(
        err.contains(&format!("unknown tenant \"{tenant}\"")),
        "{err}"
    );
}

/// The agent's stop of a leaving tenant returns once the container's processes have exited
/// (before Docker has taken down its network endpoint and root filesystem): at that moment
/// nothing of it runs any more, so its volume may be released and copied.
#[test]
fn a_stop_returns_only_once_every_process_of_the_container_has_exited() {
    use berth_node_agent::runtime::{ContainerRuntime, DockerRuntime};
    if let Err(why) = berth_tests::docker::available() {
        return berth_tests::missing_component("docker", &why);
    }
    let image = berth_tests::docker::test_tenant_image();
    let name = unique("stop");
    let _cleanup = RemovedAtEnd::container(&name);
    let run = Command::new("docker")
        .args(["run", "-d", "--init", "--name", &name, &image])
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let id = String::from_utf8_lossy(&run.stdout).trim().to_string();
    // Every live process in the container's cgroup (v1 or v2), whose path holds its id. A
    // zombie (exited, its memory, files and namespaces released, waiting for containerd's
    // shim to reap it) runs nothing and is left out.
    let in_container = || -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .filter(|e| {
                std::fs::read_to_string(e.path().join("cgroup")).is_ok_and(|c| c.contains(&id))
            })
            .filter(|e| {
                // The state follows the command name in parentheses.
                std::fs::read_to_string(e.path().join("stat")).is_ok_and(|stat| {
                    let state = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
                    !state.starts_with(['Z', 'X'])
                })
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let running = in_container();
    assert_eq!(
        running.len(),
        2,
        "Docker's init and the gateway: {running:?}"
    );
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let docker = DockerRuntime::connect(std::path::Path::new("/var/run/docker.sock"))
            .await
            .unwrap();
        docker.stop(&id).await.unwrap();
        let left: Vec<String> = in_container()
            .iter()
            .map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
            .collect();
        assert!(left.is_empty(), "still running in the container: {left:?}");
        docker.remove(&id).await.unwrap();
    });
    assert!(inspect(&id).is_none(), "removed");
}

/// A tenant that writes without end fills its own volume and nothing else: its writes stop at
/// the volume's size with ENOSPC, the host disk keeps what the volume did not take, and its
/// neighbour and the agent (a new tenant's volume made after) go on writing.
#[test]
fn a_tenant_writing_without_end_stops_at_its_volume_size_and_the_others_keep_writing() {
    let Some(f) = fleet() else { return };
    let (greedy, calm) = (unique("greedy"), unique("calm"));
    for tenant in [&greedy, &calm] {
        f.place(tenant, "64MiB");
    }
    let port = |tenant: &str| {
        f.wait_serving(tenant, Duration::from_secs(10))["published_port"]
            .as_u64()
            .unwrap() as u16
    };
    let (greedy_port, calm_port) = (port(&greedy), port(&calm));
    let image = f.agent.volume_image(&greedy);
    let allocated = |file: &std::path::Path| {
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(file).unwrap()) * 512
    };
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 64 << 20);
    assert!(
        allocated(&image) >= 64 << 20,
        "the volume's blocks are all allocated before it runs"
    );
    let host_free = || {
        nix::sys::statvfs::statvfs(&image)
            .map(|v| v.blocks_available() * v.fragment_size())
            .unwrap()
    };
    let free_before = host_free();

    let verdict = berth_tests::fleet::http_get_within(
        greedy_port,
        "/fill?name=endless.bin",
        Duration::from_secs(60),
    )
    .expect("the greedy tenant answers");
    let mib: u64 = verdict
        .split("wrote ")
        .nth(1)
        .and_then(|v| v.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{verdict}"));
    assert!(
        verdict.contains("No space left on device"),
        "stopped by its full volume: {verdict}"
    );
    assert!(
        (40..64).contains(&mib),
        "it wrote most of its 64 MiB volume and no more: {verdict}"
    );
    assert!(
        allocated(&image) <= (64 << 20) + (1 << 20),
        "its image took no disk beyond its size (and the host's map of its blocks): {}",
        allocated(&image)
    );
    // Other writers on the host disk may come and go meanwhile; the tenant's writes took none.
    assert!(
        host_free() + (256 << 20) > free_before,
        "the host disk kept its room: {} bytes free before, {} after",
        free_before,
        host_free()
    );
    let wrote = http_get(calm_port, "/fill?name=chat.log&mb=4").unwrap();
    assert!(
        wrote.ends_with("wrote 4 MiB\n"),
        "the neighbour writes: {wrote}"
    );
    let late = unique("late");
    f.place(&late, "64MiB");
    f.wait_serving(&late, Duration::from_secs(10));
    assert!(
        f.agent.volume_image(&late).is_file(),
        "the agent made a new tenant's volume"
    );
}

/// An unencrypted volume made before volumes had sizes (a directory of files) moves into an
/// image of the tenant's size when its tenant starts, files, modes and owner kept; the tenant
/// reads them from its volume.
#[test]
fn a_volume_directory_from_before_sizes_moves_into_an_image_with_its_files() {
    let Some(f) = fleet() else { return };
    let tenant = unique("older");
    let dir = f.agent.dir.path().join("volumes/plain").join(&tenant);
    std::fs::create_dir_all(dir.join("chats")).unwrap();
    std::fs::write(dir.join("chats/today.log"), "kept across the move").unwrap();
    for path in [dir.clone(), dir.join("chats"), dir.join("chats/today.log")] {
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
    }
    f.place(&tenant, "64MiB");
    let port = f.wait_serving(&tenant, Duration::from_secs(20))["published_port"]
        .as_u64()
        .unwrap() as u16;
    assert!(
        mounted_at(&dir),
        "the directory is now the image's mount point"
    );
    assert_eq!(
        std::fs::metadata(f.agent.volume_image(&tenant))
            .unwrap()
            .len(),
        64 << 20
    );
    assert_eq!(
        http_get(port, "/read?name=chats/today.log").as_deref(),
        Some("kept across the move"),
        "the tenant reads its files from its new volume"
    );
    let meta = std::fs::metadata(dir.join("chats/today.log")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);
    let wrote = http_get(port, "/fill?name=new.bin&mb=1").unwrap();
    assert!(
        wrote.ends_with("wrote 1 MiB\n"),
        "the tenant writes its volume: {wrote}"
    );
}
