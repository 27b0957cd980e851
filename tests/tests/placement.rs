//! The placement API against real processes: delivery to the agent, concurrency, durability
//! under SIGKILL (invariant 2), capacity (invariant 3) and bad input (invariant 7).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use berth_shared::proto;
use berth_shared::tls::ClientIdentity;
use berth_tests::procs::{AgentProc, CoordinatorProc};
use berth_tests::wait_for;

const GIB: u64 = 1 << 30;

fn ready_agents(coordinator: &CoordinatorProc, ids: &[&str]) -> Vec<AgentProc> {
    let agents: Vec<AgentProc> = ids
        .iter()
        .map(|id| {
            let mut a = AgentProc::enroll(coordinator, id, None);
            a.start();
            a
        })
        .collect();
    wait_for("agents ready", Duration::from_secs(15), || {
        let hosts = coordinator.hosts();
        (hosts.iter().filter(|h| h["state"] == "ready").count() == ids.len()).then_some(())
    });
    agents
}

fn write_spec(coordinator: &CoordinatorProc, name: &str, text: &str) -> String {
    let path = coordinator.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

fn tenants(coordinator: &CoordinatorProc) -> Vec<serde_json::Value> {
    let (ok, out, err) = coordinator.berthctl(&["tenants", "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// An operator identity for in-process clients: a certificate from `operator-cert create`.
fn operator_identity(coordinator: &CoordinatorProc) -> ClientIdentity {
    let (dir, _) = coordinator.operator_cert("loadtest");
    berth_tests::clients::operator_identity_in(&dir)
}

fn small_spec(id: &str, memory: u64) -> proto::TenantSpec {
    proto::TenantSpec {
        tenant_id: id.into(),
        image: "localhost:1/openclaw/gateway:1".into(),
        resources: Some(proto::Resources {
            memory_bytes: memory,
            cpu_millicores: 1,
            cpu_limit_millicores: 0,
            volume_bytes: 64 << 20,
        }),
        volume: Some(proto::VolumeSpec {
            size_bytes: 0,
            encrypted: false,
            mount_path: String::new(),
        }),
        ..Default::default()
    }
}

#[test]
fn a_placed_tenant_reaches_its_agent_within_a_second() {
    berth_shared::tls::install_crypto_provider();
    let coordinator = CoordinatorProc::start(None, "");
    let agents = ready_agents(&coordinator, &["host-a"]);
    let spec = write_spec(
        &coordinator,
        "acme.toml",
        "tenant_id = \"acme-dental\"\nimage = \"localhost:1/openclaw/gateway:2026.11\"\ntier = \"business\"\negress = [\"api.anthropic.com:443\"]\n[volume]\nencrypted = false\n",
    );
    let (ok, out, err) = coordinator.berthctl(&["place", &spec, "--json"]);
    let replied = Instant::now();
    assert!(ok, "{err}");
    let placement: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(placement["host_id"], "host-a");
    assert_eq!(placement["state"], "pending");
    let generation = placement["generation"].as_u64().unwrap();
    // Delivered: the agent acknowledged a desired state containing the tenant.
    let tenant = wait_for("delivery to the agent", Duration::from_secs(3), || {
        tenants(&coordinator)
            .into_iter()
            .find(|t| t["delivered"] == true)
    });
    let took = replied.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "delivered {took:?} after the reply (berthctl polling included)"
    );
    assert_eq!(tenant["host_id"], "host-a");
    assert_eq!(tenant["generation"].as_u64(), Some(generation));
    assert_eq!(
        tenant["memory_cap_bytes"].as_u64(),
        Some(GIB),
        "tier business"
    );
    assert!(
        agents[0].log().contains(&format!(
            "desired state accepted generation={generation} tenants=1"
        )),
        "{}",
        agents[0].log()
    );
    // This agent has no Docker engine (deliberately: nothing may be pulled): its report says so.
    let reported = wait_for(
        "the agent's report of the tenant",
        Duration::from_secs(4),
        || {
            tenants(&coordinator)
                .into_iter()
                .find(|t| t["message"].as_str().is_some_and(|m| !m.is_empty()))
        },
    );
    assert_eq!(reported["state"], "failed");
    assert!(
        reported["message"].as_str().unwrap().starts_with("docker:"),
        "{reported}"
    );
    // Hosts show the tenant count.
    assert_eq!(coordinator.hosts()[0]["tenant_count"], 1);

    // The same spec again: the same placement. Remove: the agent is told.
    let (ok, out, _) = coordinator.berthctl(&["place", &spec, "--json"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["generation"].as_u64(),
        Some(generation)
    );
    let (ok, _, err) = coordinator.berthctl(&["remove", "acme-dental"]);
    assert!(ok, "{err}");
    wait_for("the removal at the agent", Duration::from_secs(2), || {
        agents[0].log().contains("tenants=0\n").then_some(())
    });
    assert!(tenants(&coordinator).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_clients_never_double_book_a_host() {
    berth_shared::tls::install_crypto_provider();
    let coordinator = CoordinatorProc::start(None, "");
    let _agents = ready_agents(&coordinator, &["host-a", "host-b"]);
    let per_tenant = 4 * GIB;
    let hosts = coordinator.hosts();
    let capacity: BTreeMap<String, u64> = hosts
        .iter()
        .map(|h| {
            (
                h["host_id"].as_str().unwrap().to_string(),
                h["memory_total_bytes"].as_u64().unwrap()
                    - h["memory_reserved_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    let fit: u64 = capacity.values().map(|c| c / per_tenant).sum();

    let mut tasks = Vec::new();
    for client_no in 0..32 {
        let mut client = berth_tests::clients::operator_client(
            &coordinator,
            Some(operator_identity(&coordinator)),
        );
        tasks.push(tokio::spawn(async move {
            let mut placed = Vec::new();
            for i in 0..2 {
                let id = format!("c{client_no}-t{i}");
                match client
                    .place_tenant(proto::PlaceTenantRequest {
                        spec: Some(small_spec(&id, per_tenant)),
                    })
                    .await
                {
                    Ok(p) => placed.push(p.into_inner()),
                    Err(s) => assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}"),
                }
            }
            placed
        }));
    }
    let mut placed = Vec::new();
    for t in tasks {
        placed.extend(t.await.unwrap());
    }
    assert_eq!(placed.len() as u64, fit, "exactly as many as fit");
    let listed = tenants(&coordinator);
    assert_eq!(listed.len(), placed.len());
    for (host, cap) in &capacity {
        let committed: u64 = listed
            .iter()
            .filter(|t| t["host_id"] == host.as_str())
            .map(|t| t["memory_cap_bytes"].as_u64().unwrap())
            .sum();
        assert!(
            committed <= *cap,
            "{host}: {committed} committed > {cap} allocatable"
        );
    }
    let generations: BTreeSet<u64> = placed.iter().map(|p| p.generation).collect();
    assert_eq!(
        generations.len(),
        placed.len(),
        "every placement has its own generation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_a_burst_loses_no_acknowledged_placement() {
    berth_shared::tls::install_crypto_provider();
    let mut coordinator = CoordinatorProc::start(None, "");
    let _agents = ready_agents(&coordinator, &["host-a", "host-b"]);
    let identity = operator_identity(&coordinator);
    let mut tasks = Vec::new();
    for client_no in 0..16 {
        let mut client = berth_tests::clients::operator_client(
            &coordinator,
            Some(ClientIdentity {
                chain: identity.chain.clone(),
                key: identity.key.clone_key(),
            }),
        );
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..10_000 {
                let id = format!("b{client_no}-{i}");
                match client
                    .place_tenant(proto::PlaceTenantRequest {
                        spec: Some(small_spec(&id, 64 << 20)),
                    })
                    .await
                {
                    Ok(p) => acknowledged.push(p.into_inner()),
                    Err(_) => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    coordinator.kill9();
    let mut acknowledged = Vec::new();
    for t in tasks {
        acknowledged.extend(t.await.unwrap());
    }
    assert!(
        acknowledged.len() > 50,
        "the burst was under way: {} acknowledged",
        acknowledged.len()
    );
    coordinator.restart();
    let listed = tenants(&coordinator);
    let room: u64 = coordinator
        .hosts()
        .iter()
        .map(|h| {
            (h["memory_total_bytes"].as_u64().unwrap()
                - h["memory_reserved_bytes"].as_u64().unwrap())
                / (64 << 20)
        })
        .sum();
    assert!(
        (listed.len() as u64) < room,
        "killed mid-burst, not after the fleet filled up ({} of {room})",
        listed.len()
    );
    let by_id: BTreeMap<&str, &serde_json::Value> = listed
        .iter()
        .map(|t| (t["tenant_id"].as_str().unwrap(), t))
        .collect();
    assert_eq!(by_id.len(), listed.len(), "no tenant listed twice");
    for p in &acknowledged {
        let t = by_id
            .get(p.tenant_id.as_str())
            .unwrap_or_else(|| panic!("acknowledged {} lost", p.tenant_id));
        assert_eq!(
            t["host_id"].as_str(),
            Some(p.host_id.as_str()),
            "{} moved",
            p.tenant_id
        );
        assert_eq!(t["generation"].as_u64(), Some(p.generation));
    }
    // After the restart, new placements get higher generations than anything before.
    let max_before = listed
        .iter()
        .map(|t| t["generation"].as_u64().unwrap())
        .max()
        .unwrap();
    let mut client = berth_tests::clients::operator_client(&coordinator, Some(identity));
    // The burst may have filled the fleet: free one tenant's room first.
    let freed = &acknowledged[0].tenant_id;
    client
        .remove_tenant(proto::RemoveTenantRequest {
            tenant_id: freed.clone(),
            purge: false,
        })
        .await
        .unwrap();
    let after = client
        .place_tenant(proto::PlaceTenantRequest {
            spec: Some(small_spec("after-restart", 64 << 20)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(after.generation > max_before);
    eprintln!(
        "{} placements acknowledged before SIGKILL, {} listed after restart",
        acknowledged.len(),
        listed.len()
    );
}

/// Refusals name each field as the spec file spells it (`resources.memory`), not as the
/// message underneath does (`resources.memory_bytes`).
#[test]
fn bad_placement_requests_name_the_field_and_persist_nothing() {
    let coordinator = CoordinatorProc::start(None, "");
    let _agents = ready_agents(&coordinator, &["host-a"]);
    let base = "tenant_id = \"acme\"\nimage = \"localhost:1/openclaw/gateway:1\"\n";
    let cases = [
        (
            format!("{base}tier = \"gold\""),
            "InvalidArgument: invalid tier: unknown tier \"gold\" (known: individual, business, pro)",
        ),
        (
            format!("{base}[resources]\nmemory = \"32MiB\"\ncpu_millicores = 100"),
            "InvalidArgument: invalid resources.memory: 33554432 bytes is below the minimum of 64 MiB",
        ),
        (
            format!(
                "{base}[resources]\nmemory = \"4096GiB\"\ncpu_millicores = 100\nvolume = \"1GiB\""
            ),
            "InvalidArgument: invalid resources.memory: 4194304 MiB is larger than the largest host",
        ),
        (
            format!("{base}[resources]\nmemory = \"1GiB\"\ncpu_millicores = 100"),
            "InvalidArgument: invalid resources.volume: required when no tier is given",
        ),
        (
            format!("{base}tier = \"business\"\n[volume]\nsize = \"1MiB\""),
            "InvalidArgument: invalid volume.size: 1048576 bytes; a volume is from 16 MiB to 64 TiB",
        ),
        (
            "tenant_id = \"Acme/../x\"\nimage = \"i\"\ntier = \"business\"".to_string(),
            "InvalidArgument: invalid tenant_id: invalid tenant id",
        ),
        (
            format!("{base}tier = \"business\"\n[constraints]\nproviders = [\"gcp\"]"),
            "InvalidArgument: invalid constraints.providers: unknown provider \"gcp\"",
        ),
        (
            format!("{base}tier = \"business\"\n[constraints]\nregions = [\"mars-1\"]"),
            "InvalidArgument: invalid constraints.regions: unknown region \"mars-1\"",
        ),
        (
            format!("{base}tier = \"business\"\negress = [\"api.anthropic.com\"]"),
            "invalid egress[0]: \"api.anthropic.com\": expected destination:port",
        ),
        (
            format!("{base}tier = \"business\"\negress = [\"10.0.0.0/8:99999\"]"),
            "invalid egress[0].port: 99999 is not a port",
        ),
        (
            format!("{base}tier = \"business\"\negress = [\"0.0.0.0/0:443\"]"),
            "InvalidArgument: invalid egress[0].destination: \"0.0.0.0/0\" allows the whole Internet",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = write_spec(&coordinator, &format!("bad{i}.toml"), text);
        let (ok, _, err) = coordinator.berthctl(&["place", &path]);
        assert!(!ok);
        assert!(
            err.contains(expected),
            "{text:?}\n  got: {err}\n  expected: {expected}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert!(tenants(&coordinator).is_empty(), "nothing persisted");
    // Encrypted volumes need dm-crypt, which this machine's kernel lacks: an explained refusal.
    let path = write_spec(
        &coordinator,
        "enc.toml",
        &format!("{base}tier = \"business\""),
    );
    let (ok, _, err) = coordinator.berthctl(&["place", &path]);
    assert!(!ok);
    assert!(
        err.contains(
            "ResourceExhausted: no host fits (1 considered): capability: 1 host without dm-crypt"
        ),
        "{err}"
    );
}

/// Disk is a placement dimension: a tenant whose volume does not fit what the host's disk
/// leaves for volumes (nine tenths of it, as the agent reports it) is refused, and the refusal
/// says the disk is what is short; the same tenant with a volume that fits is placed.
#[test]
fn a_volume_larger_than_the_hosts_disk_is_refused_and_the_refusal_says_so() {
    berth_shared::tls::install_crypto_provider();
    let coordinator = CoordinatorProc::start(None, "");
    let _agents = ready_agents(&coordinator, &["host-a"]);
    let spec = |volume: &str| {
        write_spec(
            &coordinator,
            "big.toml",
            &format!(
                "tenant_id = \"big-volume\"\nimage = \"localhost:1/openclaw/gateway:1\"\ntier = \"individual\"\n[volume]\nencrypted = false\nsize = \"{volume}\"\n"
            ),
        )
    };
    let (ok, _, err) = coordinator.berthctl(&["place", &spec("60TiB")]);
    assert!(!ok, "a 60 TiB volume was placed");
    assert!(
        err.starts_with(
            "error: ResourceExhausted: no host fits (1 considered): disk: 1 host short, closest by "
        ),
        "{err}"
    );
    assert!(
        !err.contains("host type"),
        "no host type of the catalog is known to hold it: {err}"
    );
    assert!(tenants(&coordinator).is_empty(), "nothing placed");
    let (ok, _, err) = coordinator.berthctl(&["place", &spec("1GiB")]);
    assert!(ok, "{err}");
}
