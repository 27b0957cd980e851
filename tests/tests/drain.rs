//! Draining a host, for real: a coordinator and three agents, each in its own network
//! namespace, on the real Docker engine with real nftables (each agent's table lives in its
//! namespace). The volumes are unencrypted, as the spec says explicitly, because this kernel
//! has no device-mapper; an encrypted volume takes the same streaming path as its backing
//! file (see the agent's transfer tests).
//!
//! One fleet goes through: a dry run refused for lack of capacity (nothing changes), a drain
//! aborted midway (a consistent fleet), a drain whose coordinator is SIGKILLed midway and
//! restarted (it resumes), and at the end all six tenants run on the other hosts with their
//! files identical, their egress rules moved with them and the source empty. Throughout, a
//! watcher checks every 50 ms that no tenant ever runs twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_shared::ids::TenantId;
use berth_tests::docker::{remove_host_objects, test_tenant_image};
use berth_tests::fleet::unique;
use berth_tests::multihost::{
    Host, drain_status, fleet, fleet_configured, json, networks, placed, running, sha256_file,
    tenants_on, tenants_on_with,
};
use berth_tests::procs::CoordinatorProc;
use berth_tests::wait_for;

/// Polls Docker until stopped; records every moment a tenant of `ours` ran twice.
struct Watcher {
    stop: Arc<AtomicBool>,
    doubles: Arc<Mutex<Vec<String>>>,
    polls: Arc<Mutex<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(ours: BTreeSet<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let doubles = Arc::new(Mutex::new(Vec::new()));
        let polls = Arc::new(Mutex::new(0));
        let (s, d, p) = (stop.clone(), doubles.clone(), polls.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut hosts: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (t, h) in running() {
                    if ours.contains(&t) {
                        hosts.entry(t).or_default().push(h);
                    }
                }
                for (t, h) in hosts {
                    if h.len() > 1 {
                        d.lock().unwrap().push(format!("{t} on {h:?}"));
                    }
                }
                *p.lock().unwrap() += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            stop,
            doubles,
            polls,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let polls = *self.polls.lock().unwrap();
        (polls, self.doubles.lock().unwrap().clone())
    }
}

/// Every tenant runs on exactly one host, the one it is placed on, with its data intact.
fn assert_consistent(
    c: &CoordinatorProc,
    hosts: &BTreeMap<String, &Host>,
    data: &BTreeMap<String, String>,
) {
    let placements = wait_for("every tenant running", Duration::from_secs(60), || {
        let p = placed(c);
        p.values().all(|(_, s)| s == "running").then_some(p)
    });
    let containers = running();
    for (tenant, digest) in data {
        let (host, _) = &placements[tenant];
        let on: Vec<&String> = containers
            .iter()
            .filter(|(t, _)| t == tenant)
            .map(|(_, h)| h)
            .collect();
        assert_eq!(on, [host], "{tenant} runs exactly on its placed host");
        let volume = hosts[host].volume(tenant);
        assert_eq!(
            &sha256_file(&volume.join("data.bin")),
            digest,
            "{tenant}'s data on {host}"
        );
    }
    // A network where a tenant was staged for a move that did not happen, or that it left, is
    // removed by that host's next pass.
    wait_for(
        "each tenant's network only on its host",
        Duration::from_secs(20),
        || {
            let networks = networks();
            data.keys()
                .all(|tenant| {
                    let on: Vec<&String> = networks
                        .iter()
                        .filter(|(t, _)| t == tenant)
                        .map(|(_, h)| h)
                        .collect();
                    on == [&placements[tenant].0]
                })
                .then_some(())
        },
    );
}

#[test]
fn a_host_drains_with_its_volumes_never_running_a_tenant_twice_through_abort_and_a_coordinator_kill()
 {
    let Some((_net, mut coordinator, hosts)) = fleet(3, true) else {
        return;
    };
    let image = test_tenant_image();
    let by_id: BTreeMap<String, &Host> =
        hosts.iter().map(|h| (h.agent.host_id.clone(), h)).collect();
    let names: Vec<String> = hosts.iter().map(|h| h.agent.host_id.clone()).collect();
    let (src, ta, tb) = (&names[0], &names[1], &names[2]);
    // Six tenants on the source, each with an egress rule and 4 MiB of data in its volume.
    let data = tenants_on(&coordinator, &hosts[0], &[ta, tb], 6, 4);
    let tenants: Vec<String> = data.keys().cloned().collect();
    let watcher = Watcher::start(tenants.iter().cloned().collect());

    // 1. Not enough room elsewhere: the dry run (and the real thing) refuse, naming every
    // tenant, and nothing changes.
    let hosts_json = coordinator.hosts();
    let mut blockers = Vec::new();
    for target in [ta, tb] {
        let h = hosts_json
            .iter()
            .find(|h| h["host_id"] == target.as_str())
            .unwrap();
        let allocatable = h["memory_total_bytes"].as_u64().unwrap()
            - h["memory_reserved_bytes"].as_u64().unwrap_or(0);
        let blocker = unique("blk");
        let spec = format!(
            "tenant_id = \"{blocker}\"\nimage = \"{image}\"\n[resources]\nmemory = \"{}MiB\"\ncpu_millicores = 100\nvolume = \"16MiB\"\n[volume]\nencrypted = false\n",
            (allocatable >> 20) - 32
        );
        let path = coordinator.dir.path().join(format!("{blocker}.toml"));
        std::fs::write(&path, spec).unwrap();
        for other in [ta, tb, src] {
            assert!(
                coordinator
                    .berthctl(&[
                        if other == target {
                            "uncordon"
                        } else {
                            "cordon"
                        },
                        other
                    ])
                    .0
            );
        }
        let (ok, out, err) = coordinator.berthctl(&["--json", "place", path.to_str().unwrap()]);
        assert!(ok, "{err}");
        assert!(out.contains(target.as_str()), "{out}");
        blockers.push(blocker);
    }
    for h in [ta, tb, src] {
        assert!(coordinator.berthctl(&["uncordon", h]).0);
    }
    let before = placed(&coordinator);
    let (ok, _, err) = coordinator.berthctl(&["drain", src, "--dry-run"]);
    assert!(!ok, "refused");
    assert!(
        err.contains(&format!(
            "cannot drain {src}: 6 of its tenants cannot move; nothing was changed"
        )),
        "{err}"
    );
    for tenant in &tenants {
        assert!(
            err.contains(&format!("{tenant}: no host fits")),
            "{tenant} named: {err}"
        );
    }
    let (ok, _, err2) = coordinator.berthctl(&["drain", src]);
    assert!(
        !ok && err2.contains("6 of its tenants cannot move"),
        "{err2}"
    );
    assert_eq!(placed(&coordinator), before, "nothing moved");
    assert_eq!(
        coordinator.host_state(src).as_deref(),
        Some("ready"),
        "not even cordoned"
    );
    let (ok, _, err) = coordinator.berthctl(&["drain-status", src]);
    assert!(!ok && err.contains("no drain of host"), "{err}");
    for blocker in &blockers {
        assert!(coordinator.berthctl(&["remove", blocker, "--purge"]).0);
    }

    // 2. The dry run now gives every tenant a target.
    let plan = json(&coordinator, &["drain", src, "--dry-run"]);
    assert_eq!(plan["phase"], "planned");
    assert_eq!(plan["moves"].as_array().unwrap().len(), 6);
    assert_eq!(coordinator.host_state(src).as_deref(), Some("ready"));

    // 3. A drain aborted after its first move: what moved runs on its target, the rest on the
    // source, each once, with its data.
    let started = json(&coordinator, &["drain", src, "--max-parallel", "1"]);
    assert_eq!(started["phase"], "running");
    assert_eq!(coordinator.host_state(src).as_deref(), Some("draining"));
    wait_for("a first move done", Duration::from_secs(90), || {
        let s = drain_status(&coordinator, src);
        s["moves"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["phase"] == "done")
            .then_some(())
    });
    let aborted = json(&coordinator, &["drain-abort", src]);
    assert_eq!(aborted["phase"], "aborted", "{aborted}");
    // A moved tenant's volume was copied while it ran; after its stop only what changed since
    // travelled: it wrote nothing meanwhile, so only what its filesystem writes as it is
    // unmounted (its superblock and journal, a few pages).
    for m in aborted["moves"].as_array().unwrap() {
        if m["phase"] == "done" {
            let copied = m["bytes_copied"].as_u64().unwrap();
            assert!(copied >= 1 << 20, "the pre-copy carried the volume: {m}");
            let after_stop = m["bytes_after_stop"].as_u64().unwrap();
            assert!(after_stop < 1 << 20, "{m}");
        }
    }
    assert_eq!(coordinator.host_state(src).as_deref(), Some("cordoned"));
    assert_consistent(&coordinator, &by_id, &data);
    let moved_first = placed(&coordinator)
        .values()
        .filter(|(h, _)| h != src)
        .count();
    assert!(
        (1..6).contains(&moved_first),
        "{moved_first} moved before the abort"
    );

    // 4. Again, and the coordinator is SIGKILLed while a move is under way; restarted, it
    // resumes the drain to the end.
    json(&coordinator, &["drain", src, "--max-parallel", "2"]);
    wait_for("a move under way", Duration::from_secs(60), || {
        let s = drain_status(&coordinator, src);
        s["moves"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| ["stopping", "copying", "starting"].contains(&m["phase"].as_str().unwrap()))
            .then_some(())
    });
    coordinator.kill9();
    coordinator.restart();
    let done = wait_for("the resumed drain done", Duration::from_secs(180), || {
        let s = drain_status(&coordinator, src);
        (s["phase"] != "running").then_some(s)
    });
    assert_eq!(done["phase"], "done", "{done:#}");
    assert!(coordinator.log().contains("resuming drain"));

    // 5. All six elsewhere, once each, healthy (checked from inside each container's network
    // namespace), data identical, rules moved, the source empty.
    assert_consistent(&coordinator, &by_id, &data);
    let placements = placed(&coordinator);
    for t in json(&coordinator, &["tenants"]).as_array().unwrap() {
        assert_eq!(t["healthy"], true, "healthy on its target: {t:#}");
    }
    let source = by_id[src];
    let source_rules = source.nft_table();
    for tenant in &tenants {
        let (host, _) = &placements[tenant];
        assert_ne!(host, src, "{tenant} left the source");
        let target = by_id[host];
        assert_eq!(
            std::fs::read_to_string(target.volume(tenant).join("chats/today.log")).unwrap(),
            format!("{tenant} says hi")
        );
        assert!(
            !source.volume(tenant).exists(),
            "{tenant}'s old copy is gone"
        );
        let chain = berth_node_agent::egress::nft::chain(&TenantId::new(tenant).unwrap());
        assert!(
            target.nft_table().contains(&chain),
            "{tenant}'s rules on {host}"
        );
        assert!(
            !source_rules.contains(&chain),
            "{tenant}'s rules left {src}"
        );
    }
    assert!(
        running().iter().all(|(_, h)| h != src),
        "no container on the source"
    );
    let (polls, doubles) = watcher.finish();
    assert!(polls > 20, "the watcher kept watching: {polls} polls");
    assert_eq!(doubles, Vec::<String>::new(), "a tenant ran twice");
    drop(hosts);
}

#[test]
fn a_drain_stops_at_its_deadline_and_a_lost_hosts_tenants_come_back_from_their_backups_on_the_operators_word()
 {
    let repository = tempfile::tempdir().unwrap();
    let Some((_net, coordinator, mut hosts)) = fleet_configured(
        2,
        true,
        &format!(
            "[backup]\nrepository = {:?}\n",
            repository.path().display().to_string()
        ),
    ) else {
        return;
    };
    let (src, target) = (
        hosts[0].agent.host_id.clone(),
        hosts[1].agent.host_id.clone(),
    );
    // Backed up when the test says (below), not on the hosts' own schedule.
    let data = tenants_on_with(
        &coordinator,
        &hosts[0],
        &[&target],
        3,
        4,
        "[backup]\nenabled = false\n",
    );
    let by_id: BTreeMap<String, &Host> =
        hosts.iter().map(|h| (h.agent.host_id.clone(), h)).collect();

    // A deadline that stops the drain midway: what moved stays moved, the move under way
    // rolls back, the rest never starts, and every tenant runs once, where it is placed, with
    // its data.
    // `--wait` returns once it ended, prints where it ended and fails, since not done.
    let (ok, out, err) = coordinator.berthctl(&[
        "--json",
        "drain",
        &src,
        "--deadline",
        "1s",
        "--max-parallel",
        "1",
        "--wait",
    ]);
    assert!(!ok, "a drain stopped at its deadline is a failure: {out}");
    assert_eq!(
        err.trim(),
        format!("error: the drain of {src} ended stopped_at_deadline")
    );
    let ended: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        drain_status(&coordinator, &src)["phase"],
        "stopped_at_deadline"
    );
    assert_eq!(ended["phase"], "stopped_at_deadline", "{ended:#}");
    let phases: Vec<&str> = ended["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["phase"].as_str().unwrap())
        .collect();
    assert!(
        phases
            .iter()
            .all(|p| ["done", "rolled_back", "not_moved"].contains(p)),
        "nothing left half-way: {phases:?}"
    );
    assert!(
        phases.iter().any(|p| *p != "done"),
        "3 moves cannot all finish in 1 s: {phases:?}"
    );
    if phases.contains(&"rolled_back") {
        assert!(
            ended.to_string().contains("the drain's deadline passed"),
            "{ended:#}"
        );
    }
    assert_consistent(&coordinator, &by_id, &data);
    assert_eq!(coordinator.host_state(&src).as_deref(), Some("cordoned"));
    drop(by_id);
    let stranded: Vec<String> = placed(&coordinator)
        .into_iter()
        .filter(|(_, (h, _))| *h == src)
        .map(|(t, _)| t)
        .collect();
    assert!(!stranded.is_empty());
    // Each backed up (restic, into the test's repository), then changed: what changed after
    // the last backup is lost with the host.
    let mut snapshots = BTreeMap::new();
    for tenant in &stranded {
        let done = json(&coordinator, &["backup", tenant]);
        snapshots.insert(
            tenant.clone(),
            done["snapshot_id"].as_str().unwrap().to_string(),
        );
        std::fs::write(hosts[0].volume(tenant).join("after-backup.txt"), "lost").unwrap();
    }

    // The source is lost (its machine gone, containers and all).
    hosts[0].agent.kill9();
    remove_host_objects(&src);
    let blocked = json(&coordinator, &["drain", &src]);
    assert_eq!(blocked["phase"], "running");
    let blocked = wait_for("the drain ended", Duration::from_secs(30), || {
        let s = drain_status(&coordinator, &src);
        (s["phase"] != "running").then_some(s)
    });
    assert_eq!(blocked["phase"], "incomplete", "{blocked:#}");
    for m in blocked["moves"].as_array().unwrap() {
        assert_eq!(m["phase"], "blocked");
        assert!(
            m["error"].as_str().unwrap().contains("is unreachable: ")
                && m["error"].as_str().unwrap().contains("--force-lost"),
            "{m}"
        );
    }
    assert_eq!(blocked["moves"].as_array().unwrap().len(), stranded.len());
    let placements = placed(&coordinator);
    assert!(
        stranded.iter().all(|t| placements[t].0 == src),
        "still assigned to the lost host: {placements:?}"
    );

    // Accepted: each starts on the target, its volume restored from its latest backup (the
    // host is unreachable: the data can only come from the repository).
    let forced = json(&coordinator, &["drain", &src, "--force-lost"]);
    assert_eq!(forced["force_lost"], true);
    let done = wait_for("the forced drain ended", Duration::from_secs(90), || {
        let s = drain_status(&coordinator, &src);
        (s["phase"] != "running").then_some(s)
    });
    assert_eq!(done["phase"], "done", "{done:#}");
    wait_for("all running on the target", Duration::from_secs(60), || {
        let p = placed(&coordinator);
        data.keys()
            .all(|t| p[t] == (target.clone(), "running".to_string()))
            .then_some(())
    });
    for m in done["moves"].as_array().unwrap() {
        let tenant = m["tenant_id"].as_str().unwrap();
        assert_eq!(m["phase"], "restored", "{m}");
        assert_eq!(m["restored"]["short_id"], snapshots[tenant].as_str(), "{m}");
        assert!(
            m["error"].as_str().unwrap().starts_with(&format!(
                "{src} was lost: restored on {target} from snapshot "
            )),
            "the recovery point is reported: {m}"
        );
    }
    for (tenant, digest) in &data {
        let volume = hosts[1].volume(tenant);
        assert_eq!(
            sha256_file(&volume.join("data.bin")),
            *digest,
            "{tenant}: moved in time with its data, or restored from its backup"
        );
        assert!(!volume.join("after-backup.txt").exists(), "{tenant}");
    }

    // The lost host comes back: fenced (none of the tenants that left runs there again), and
    // the copies it still holds of them are deleted.
    assert_eq!(
        done["stale_copies"],
        serde_json::json!(stranded),
        "{done:#}"
    );
    for tenant in &stranded {
        assert!(hosts[0].volume(tenant).join("data.bin").exists());
    }
    hosts[0].agent.start_with_docker(true);
    wait_for(
        "the old copies on the host that came back deleted",
        Duration::from_secs(60),
        || {
            stranded
                .iter()
                .all(|t| !hosts[0].volume(t).exists())
                .then_some(())
        },
    );
    wait_for("the old copies struck off", Duration::from_secs(10), || {
        drain_status(&coordinator, &src)["stale_copies"]
            .is_null()
            .then_some(())
    });
    assert!(
        running().iter().all(|(_, h)| *h != src),
        "nothing runs on the host that came back"
    );
    // Its agent waited for the coordinator's word instead of enforcing the state it had
    // before it was lost: it never even tried to start the tenants that left.
    let log = hosts[0].agent.log();
    let back = &log[log.rfind("berth-agent starting").unwrap()..];
    let tried: Vec<&str> = back
        .lines()
        .filter(|l| l.contains("tenant container started") || l.contains("tenant not running"))
        .collect();
    assert!(
        tried.is_empty(),
        "the returning agent tried:\n{}",
        tried.join("\n")
    );
    for tenant in data.keys() {
        assert!(
            hosts[1].volume(tenant).is_dir(),
            "{tenant} kept on the target"
        );
    }
}

#[test]
fn a_tenant_that_never_turns_healthy_on_its_target_rolls_back_to_its_source() {
    let Some((_net, coordinator, hosts)) =
        fleet_configured(2, true, "drain_start_timeout = \"3s\"\n")
    else {
        return;
    };
    let (src, target) = (
        hosts[0].agent.host_id.clone(),
        hosts[1].agent.host_id.clone(),
    );
    // Its gateway port is 18789 but it listens on 18790: it runs, and no check ever passes.
    let data = tenants_on_with(
        &coordinator,
        &hosts[0],
        &[&target],
        1,
        4,
        "[env]\nPORT = \"18790\"\n",
    );
    let tenant = data.keys().next().unwrap().clone();
    let watcher = Watcher::start(data.keys().cloned().collect());

    json(&coordinator, &["drain", &src, "--max-parallel", "1"]);
    let ended = wait_for("the drain ended", Duration::from_secs(60), || {
        let s = drain_status(&coordinator, &src);
        (s["phase"] != "running").then_some(s)
    });
    assert_eq!(ended["phase"], "incomplete", "{ended:#}");
    let m = &ended["moves"][0];
    assert_eq!(m["phase"], "rolled_back", "{m}");
    let error = m["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "not healthy on {target} within 3s: running but not healthy"
        )),
        "{error}"
    );

    // Back on its source with its data; the target kept nothing.
    let by_id: BTreeMap<String, &Host> =
        hosts.iter().map(|h| (h.agent.host_id.clone(), h)).collect();
    wait_for("back on its source", Duration::from_secs(30), || {
        (placed(&coordinator)[&tenant].0 == src).then_some(())
    });
    assert_consistent(&coordinator, &by_id, &data);
    assert!(
        !hosts[1].volume(&tenant).exists(),
        "the target deleted what it received"
    );
    let (polls, doubles) = watcher.finish();
    assert!(polls > 20, "the watcher kept watching: {polls} polls");
    assert_eq!(doubles, Vec::<String>::new(), "a tenant ran twice");
}

#[test]
fn a_compaction_empties_the_host_it_names_with_every_tenant_running_once_and_its_data_intact() {
    let Some((_net, coordinator, hosts)) = fleet(3, true) else {
        return;
    };
    let by_id: BTreeMap<String, &Host> =
        hosts.iter().map(|h| (h.agent.host_id.clone(), h)).collect();
    let names: Vec<&str> = hosts.iter().map(|h| h.agent.host_id.as_str()).collect();
    // Three tenants on each of two hosts, two on the third: with at most three moves, only
    // the third can be emptied.
    // The third host's tenants have their nightly restarts in a window that opens in 3 hours.
    let now = jiff::Timestamp::now();
    let opens = now + jiff::SignedDuration::from_hours(3);
    let window = format!(
        "[restart]\nwindow = \"{}-{}\"\ntime_zone = \"UTC\"\n",
        opens.strftime("%H:%M"),
        (opens + jiff::SignedDuration::from_hours(1)).strftime("%H:%M")
    );
    let mut data = BTreeMap::new();
    for (i, count) in [(0, 3), (1, 3), (2, 2)] {
        let others: Vec<&str> = names.iter().copied().filter(|h| *h != names[i]).collect();
        let tables = if i == 2 { window.as_str() } else { "" };
        data.extend(tenants_on_with(
            &coordinator,
            &hosts[i],
            &others,
            count,
            2,
            tables,
        ));
    }
    let light = names[2];

    // The dry run names the host and what it saves (every agent here says 4.51 EUR/month),
    // and changes nothing.
    let (ok, out, err) = coordinator.berthctl(&["compact", "--dry-run", "--max-moves", "3"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(
            "1 host can be returned: {light} — saves 4.51 EUR/month — 2 moves"
        )),
        "{out}"
    );
    assert!(
        out.contains("emptying it takes 3 moves, more than the 1 left of max_moves"),
        "{out}"
    );
    let plan = json(&coordinator, &["compact", "--dry-run", "--max-moves", "3"]);
    assert_eq!(plan["phase"], "planned");
    assert_eq!(plan["saving"], 4.51);
    let moves = plan["emptied"][0]["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 2);
    assert!(moves.iter().all(|m| m["target_host_id"] != light));
    // By default each tenant moves in its own window, before its nightly restart there (its
    // host reports the restart; the move starts 10 minutes before it).
    for m in moves {
        let from: jiff::Timestamp = m["not_before"].as_str().unwrap().parse().unwrap();
        assert!(
            from >= opens - jiff::SignedDuration::from_mins(1)
                && from < opens + jiff::SignedDuration::from_hours(1),
            "{m}"
        );
    }
    assert_eq!(coordinator.host_state(light).as_deref(), Some("ready"));

    // Carried out: both tenants move with their volumes, never running twice, and the host
    // is left cordoned and empty, listed as ready to return.
    let watcher = Watcher::start(data.keys().cloned().collect());
    let (ok, out, err) = coordinator.berthctl(&["compact", "--max-moves", "3", "--now", "--wait"]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains(&format!("emptied and cordoned, ready to return: {light}")),
        "{out}"
    );
    assert_consistent(&coordinator, &by_id, &data);
    let placements = placed(&coordinator);
    assert!(
        placements.values().all(|(h, _)| h != light),
        "{placements:?}"
    );
    assert_eq!(coordinator.host_state(light).as_deref(), Some("cordoned"));
    assert!(running().iter().all(|(_, h)| h != light));
    let after = json(&coordinator, &["compact", "--dry-run", "--max-moves", "3"]);
    assert_eq!(after["returnable"][0]["host_id"], light, "{after:#}");
    let (polls, doubles) = watcher.finish();
    // The two moves take a few seconds; each poll lists every container.
    assert!(polls > 5, "the watcher kept watching: {polls} polls");
    assert_eq!(doubles, Vec::<String>::new(), "a tenant ran twice");
    drop(hosts);
}
