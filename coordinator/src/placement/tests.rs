use std::collections::{BTreeMap, BTreeSet};

use berth_shared::host::Provider;
use berth_shared::spec::{Resources, Tier};
use berth_shared::store::MemStore;

use super::*;

const GIB: u64 = 1 << 30;

fn policy() -> PlacementPolicy {
    PlacementPolicy {
        spec: SpecPolicy {
            tiers: vec![Tier {
                name: "business".into(),
                resources: Resources {
                    memory_bytes: GIB,
                    cpu_millicores: 1000,
                    cpu_limit_millicores: 0,
                    volume_bytes: GIB,
                },
            }],
            allow_unrestricted_egress: false,
            reach: Some(berth_shared::reach::ReachPolicy::default()),
        },
        strategy: Strategy::Binpack,
        tier_strategy: HashMap::new(),
        catalog: vec![CatalogEntry {
            provider: Provider::Hetzner,
            instance_type: "ccx33".into(),
            memory_bytes: 32 * GIB,
            cpus: 8,
            monthly_cost_cents: 4849,
            regions: vec!["fsn1".into()],
        }],
    }
}

fn host(id: &str, mem_gib: u64) -> HostInfo {
    HostInfo {
        id: HostId::new(id).unwrap(),
        provider: Provider::Hetzner,
        region: "fsn1".into(),
        labels: BTreeMap::new(),
        dm_crypt: false,
        monthly_cost_cents: 1000,
        allocatable: Vec3 {
            mem: mem_gib * GIB,
            cpu: 64_000,
            disk: 1000 * GIB,
        },
        schedulable: true,
    }
}

fn spec(id: &str) -> proto::TenantSpec {
    proto::TenantSpec {
        tenant_id: id.into(),
        image: "ghcr.io/openclaw/gateway:1".into(),
        tier: "business".into(),
        volume: Some(proto::VolumeSpec {
            size_bytes: 0,
            encrypted: false,
            mount_path: String::new(),
        }),
        ..Default::default()
    }
}

fn placements(hosts: &[HostInfo]) -> (Placements, Arc<MemStore>) {
    let store = Arc::new(MemStore::default());
    (
        Placements::load(store.clone(), policy(), hosts).unwrap(),
        store,
    )
}

#[test]
fn a_placement_reaches_its_host_only_once_durable() {
    let (p, _) = placements(&[host("h1", 8)]);
    let h1 = HostId::new("h1").unwrap();
    let mut desired = p.subscribe(&h1);
    assert_eq!(*desired.borrow_and_update(), 0);
    assert!(p.desired_state(&h1).tenants.is_empty());
    let applied = p.place(spec("acme"), 1).unwrap();
    assert_eq!(applied.placement.host_id, "h1");
    assert!(
        !desired.has_changed().unwrap(),
        "not published before the flush"
    );
    p.make_durable(applied.seq).unwrap();
    assert!(desired.has_changed().unwrap());
    assert_eq!(*desired.borrow_and_update(), applied.placement.generation);
    let state = p.desired_state(&h1);
    assert_eq!(state.generation, applied.placement.generation);
    assert_eq!(state.tenants[0].tenant_id, "acme");
    assert_eq!(
        state.tenants[0].resources.unwrap().memory_bytes,
        GIB,
        "the tier is resolved for the agent"
    );
}

#[test]
fn placing_is_idempotent_and_a_different_spec_is_a_conflict() {
    let (p, _) = placements(&[host("h1", 8), host("h2", 8)]);
    let first = p.place(spec("acme"), 1).unwrap();
    let again = p.place(spec("acme"), 2).unwrap();
    assert_eq!(first.placement, again.placement);
    let mut other = spec("acme");
    other.image = "ghcr.io/openclaw/gateway:2".into();
    let err = p.place(other, 3).unwrap_err().to_string();
    assert_eq!(
        err,
        "tenant acme already exists with a different image; remove it first or send the same spec"
    );
    let mut other = spec("acme");
    other.backup = Some(proto::BackupPolicy {
        interval_ms: 6 * 3_600_000,
        ..Default::default()
    });
    let err = p.place(other, 3).unwrap_err().to_string();
    assert_eq!(
        err,
        "tenant acme already exists with a different backup; remove it first or send the same spec"
    );
    // A restore is the coordinator's to ask, never a spec's; the same spec again is no
    // conflict with one the coordinator recorded.
    let mut asking = spec("acme");
    asking.restore = Some(proto::RestoreRequest {
        restore_id: 9,
        snapshot_id: String::new(),
    });
    let err = p.place(asking, 3).unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid restore: set by `berthctl restore` and by drains, never in a spec"
    );
    let tenant = TenantId::new("acme").unwrap();
    p.set_restore(&tenant, None).unwrap();
    assert!(p.place(spec("acme"), 4).is_ok());
    assert_eq!(p.tenants(None).len(), 1);
}

#[test]
fn removal_frees_capacity_and_raises_the_generation() {
    let (p, _) = placements(&[host("h1", 2)]);
    let a = p.place(spec("a"), 1).unwrap();
    p.make_durable(a.seq).unwrap();
    // h1 has 2 GiB: a second 1 GiB tenant fits, a third does not.
    p.place(spec("b"), 1).unwrap();
    let refusal = p.place(spec("c"), 1).unwrap_err().to_string();
    assert!(refusal.contains("memory: 1 host short"), "{refusal}");
    assert!(
        refusal
            .contains("cheapest host type that would take it: hetzner ccx33 in fsn1 (48.49/month)"),
        "{refusal}"
    );
    let removed = p.remove(&TenantId::new("a").unwrap()).unwrap();
    assert!(removed.placement.generation > a.placement.generation);
    p.make_durable(removed.seq).unwrap();
    let desired = p.desired_state(&HostId::new("h1").unwrap());
    assert_eq!(desired.generation, removed.placement.generation);
    assert_eq!(
        desired
            .tenants
            .iter()
            .map(|t| t.tenant_id.as_str())
            .collect::<Vec<_>>(),
        ["b"]
    );
    assert!(p.place(spec("c"), 1).is_ok(), "a's capacity is free again");
    assert!(matches!(
        p.remove(&TenantId::new("zz").unwrap()),
        Err(PlaceError::UnknownTenant(_))
    ));
}

#[test]
fn a_removed_tenant_comes_back_to_the_host_that_keeps_its_volume_until_it_is_purged() {
    let (p, store) = placements(&[host("h1", 2), host("h2", 8)]);
    let id = TenantId::new("a").unwrap();
    let h1 = HostId::new("h1").unwrap();
    // Binpack puts the first tenant on the fullest host that fits: h1.
    let placed = p.place(spec("a"), 1).unwrap();
    assert_eq!(placed.placement.host_id, "h1");
    p.remove(&id).unwrap();
    assert_eq!(p.retained(&id), Some(h1.clone()));
    // Reloaded from the store, the volume's host is still known.
    let reloaded =
        Placements::load(store.clone(), policy(), &[host("h1", 2), host("h2", 8)]).unwrap();
    assert_eq!(reloaded.retained(&id), Some(h1.clone()));
    // Back on h1, even with h1 filled meanwhile by a tenant that leaves exactly its room.
    p.place(spec("b"), 1).unwrap();
    assert_eq!(p.place(spec("a"), 2).unwrap().placement.host_id, "h1");
    assert_eq!(p.retained(&id), None, "placed again: nothing retained");
    p.remove(&id).unwrap();
    // h1 full now: refused, naming the host and why, rather than placed on an empty volume.
    p.place(spec("c"), 1).unwrap();
    let err = p.place(spec("a"), 3).unwrap_err().to_string();
    assert_eq!(
        err,
        "tenant a was removed with its volume kept on host h1, which cannot take it back: short of memory; free that host or purge the volume (berthctl remove a --purge)"
    );
    p.forget_retained(&id).unwrap();
    assert_eq!(p.place(spec("a"), 4).unwrap().placement.host_id, "h2");
    assert!(store.scan_prefix(RETAINED_PREFIX).unwrap().is_empty());
}

#[test]
fn bad_requests_are_refused_and_persist_nothing() {
    let (p, store) = placements(&[host("h1", 4)]);
    let before = store.scan_prefix("").unwrap();
    let mut big = spec("big");
    big.tier.clear();
    big.resources = Some(proto::Resources {
        memory_bytes: 64 * GIB,
        cpu_millicores: 1000,
        cpu_limit_millicores: 0,
        volume_bytes: GIB,
    });
    let err = p.place(big, 1).unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid resources.memory_bytes: 65536 MiB is larger than the largest host (4096 MiB allocatable)"
    );
    let mut unknown = spec("x");
    unknown.tier = "gold".into();
    assert!(
        p.place(unknown, 1)
            .unwrap_err()
            .to_string()
            .starts_with("invalid tier")
    );
    assert!(
        p.place(spec("Bad/Id"), 1)
            .unwrap_err()
            .to_string()
            .starts_with("invalid tenant_id")
    );
    assert_eq!(store.scan_prefix("").unwrap(), before);
}

#[test]
fn reload_keeps_every_placement_and_generations_keep_growing() {
    let store = Arc::new(MemStore::default());
    let hosts = [host("h1", 8), host("h2", 8)];
    let last = {
        let p = Placements::load(store.clone(), policy(), &hosts).unwrap();
        let mut last = 0;
        for i in 0..10 {
            let a = p.place(spec(&format!("t{i}")), 1).unwrap();
            p.make_durable(a.seq).unwrap();
            last = a.placement.generation;
        }
        last
    };
    let p = Placements::load(store, policy(), &hosts).unwrap();
    assert_eq!(p.tenants(None).len(), 10);
    let (count, used) = p.host_usage(&HostId::new("h1").unwrap());
    assert_eq!(u64::from(count) * GIB, used.mem);
    let next = p.place(spec("after"), 1).unwrap();
    assert!(next.placement.generation > last);
    assert!(
        next.placement.generation > GENERATION_BLOCK,
        "new generations start above the old ceiling, beyond any issued before"
    );
}

#[test]
fn concurrent_placements_never_double_book() {
    // 6 hosts of 8 GiB: exactly 48 one-GiB tenants fit.
    let hosts: Vec<HostInfo> = (0..6).map(|i| host(&format!("h{i}"), 8)).collect();
    let (p, _) = placements(&hosts);
    let p = Arc::new(p);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut placed = 0;
                for i in 0..20 {
                    if let Ok(a) = p.place(spec(&format!("t{t}-{i}")), 1) {
                        p.make_durable(a.seq).unwrap();
                        placed += 1;
                    }
                }
                placed
            })
        })
        .collect();
    let placed: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(placed, 48);
    for h in &hosts {
        let (count, used) = p.host_usage(&h.id);
        assert_eq!(count, 8);
        assert!(used.mem <= h.allocatable.mem);
    }
}

#[test]
fn statuses_count_only_for_the_host_a_tenant_is_placed_on() {
    let (p, _) = placements(&[host("h1", 8), host("h2", 8)]);
    p.set_schedulable(&HostId::new("h2").unwrap(), false);
    let a = p.place(spec("acme"), 1).unwrap();
    assert_eq!(a.placement.host_id, "h1");
    let running = proto::TenantStatus {
        tenant_id: "acme".into(),
        state: proto::TenantState::Running as i32,
        generation: a.placement.generation,
        ..Default::default()
    };
    p.record_statuses(&HostId::new("h2").unwrap(), vec![running.clone()]);
    let view = p.tenant(&TenantId::new("acme").unwrap()).unwrap();
    assert_eq!(
        view.placement.unwrap().state,
        proto::TenantState::Pending as i32,
        "h2 cannot speak for acme"
    );
    p.record_statuses(&HostId::new("h1").unwrap(), vec![running]);
    assert_eq!(
        p.tenant(&TenantId::new("acme").unwrap())
            .unwrap()
            .placement
            .unwrap()
            .state,
        proto::TenantState::Running as i32
    );
    p.record_ack(
        &HostId::new("h1").unwrap(),
        proto::DesiredStateAck {
            generation: a.placement.generation,
            accepted: false,
            error: "image: cannot pull".into(),
        },
    );
    let status = p
        .tenant(&TenantId::new("acme").unwrap())
        .unwrap()
        .status
        .unwrap();
    assert_eq!(
        (status.state, status.message.as_str()),
        (proto::TenantState::Failed as i32, "image: cannot pull")
    );
}

fn rule(destination: &str, port: u32) -> proto::EgressRule {
    proto::EgressRule {
        destination: destination.into(),
        protocol: "tcp".into(),
        port,
    }
}

#[test]
fn an_allowlist_update_reaches_the_same_host_with_a_new_generation() {
    let (p, store) = placements(&[host("h1", 8), host("h2", 8)]);
    let placed = p.place(spec("acme"), 1).unwrap();
    p.make_durable(placed.seq).unwrap();
    let host_id = HostId::new(&placed.placement.host_id).unwrap();
    let acme = TenantId::new("acme").unwrap();
    let updated = p
        .set_egress(&acme, vec![rule("api.anthropic.com", 443)])
        .unwrap();
    assert_eq!(updated.placement.host_id, placed.placement.host_id);
    assert!(updated.placement.generation > placed.placement.generation);
    p.make_durable(updated.seq).unwrap();
    let desired = p.desired_state(&host_id);
    assert_eq!(desired.generation, updated.placement.generation);
    assert_eq!(
        desired.tenants[0].egress,
        vec![rule("api.anthropic.com", 443)]
    );
    let (count, _) = p.host_usage(&host_id);
    assert_eq!(count, 1, "capacity is booked once");
    // The same list again changes nothing.
    let same = p
        .set_egress(&acme, vec![rule("api.anthropic.com", 443)])
        .unwrap();
    assert_eq!(same.placement.generation, updated.placement.generation);
    // Bad entries are refused by name and persist nothing.
    let before = store.scan_prefix("").unwrap();
    for (entries, expected) in [
        (
            vec![rule("api.anthropic.com", 443), rule("10.0.0.0/33", 443)],
            "invalid egress[1].destination",
        ),
        (vec![rule("203.0.113.0/24", 0)], "invalid egress[0].port"),
        (
            vec![rule("203.0.113.0/24", 65536)],
            "invalid egress[0].port",
        ),
        (vec![rule("0.0.0.0/0", 443)], "allows the whole Internet"),
        (
            vec![rule("bad_name!", 443)],
            "invalid egress[0].destination",
        ),
    ] {
        let err = p.set_egress(&acme, entries).unwrap_err().to_string();
        assert!(err.contains(expected), "{expected}: {err}");
    }
    assert_eq!(
        p.set_egress(&TenantId::new("nobody").unwrap(), vec![])
            .unwrap_err()
            .to_string(),
        "unknown tenant \"nobody\""
    );
    assert_eq!(store.scan_prefix("").unwrap(), before);
}

/// Places `id` (1 GiB) on the one schedulable host among `hosts` by cordoning the others.
fn place_on(p: &Placements, id: &str, host: &str, all: &[&str]) {
    for h in all {
        p.set_schedulable(&HostId::new(*h).unwrap(), *h == host);
    }
    let applied = p.place(spec(id), 1).unwrap();
    assert_eq!(applied.placement.host_id, host);
    p.make_durable(applied.seq).unwrap();
    for h in all {
        p.set_schedulable(&HostId::new(*h).unwrap(), true);
    }
}

#[test]
fn a_drain_plan_names_every_tenant_that_cannot_move_and_changes_nothing() {
    let all = ["src", "big", "small"];
    let (p, store) = placements(&[host("src", 8), host("big", 2), host("small", 1)]);
    for t in ["a", "b", "c", "d"] {
        place_on(&p, t, "src", &all);
    }
    let before = store.scan_prefix("").unwrap();
    let refusals = p
        .plan_drain(&HostId::new("src").unwrap(), true)
        .unwrap_err();
    // 3 GiB of room elsewhere for 4 GiB of tenants: the last one in the order cannot move.
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(
        refusals[0].starts_with("d: no host fits (2 considered)")
            && refusals[0].contains("memory: 2 hosts short")
            && !refusals[0].contains("not ready"),
        "the source is not counted: {refusals:?}"
    );
    assert_eq!(store.scan_prefix("").unwrap(), before, "nothing written");
    // Nothing reserved: the smallest host's whole room is still free for binpack.
    let e = p.place(spec("e"), 1).unwrap();
    assert_eq!(e.placement.host_id, "small");
    // And the source still takes tenants.
    place_on(&p, "f", "src", &all);

    // A fleet of one host: no other host, and the refusal says only that.
    let (alone, _) = placements(&[host("only", 8)]);
    alone.place(spec("g"), 1).unwrap();
    let refusals = alone
        .plan_drain(&HostId::new("only").unwrap(), false)
        .unwrap_err();
    assert_eq!(refusals, ["g: no other host in the fleet to move to"]);
}

/// Tenants a and b on host src, planned to move to t1 and t2 (one fits on each).
fn two_tenants_planned_off_src() -> (Placements, HostId, Vec<crate::placement::PlannedMove>) {
    let all = ["src", "t1", "t2"];
    let (p, _) = placements(&[host("src", 8), host("t1", 1), host("t2", 1)]);
    place_on(&p, "a", "src", &all);
    place_on(&p, "b", "src", &all);
    let src = HostId::new("src").unwrap();
    let plan = p.plan_drain(&src, true).unwrap();
    (p, src, plan)
}

#[test]
fn a_drain_reserves_its_targets_and_a_move_fences_the_source_then_delivers_the_target() {
    let (p, src, plan) = two_tenants_planned_off_src();
    let targets: BTreeSet<String> = plan.iter().map(|m| m.target.to_string()).collect();
    assert_eq!(targets, BTreeSet::from(["t1".into(), "t2".into()]));
    // The targets' room is reserved and the source takes nothing new: no host fits.
    assert!(matches!(p.place(spec("x"), 1), Err(PlaceError::NoFit(_))));

    let a = TenantId::new("a").unwrap();
    let target = plan.iter().find(|m| m.tenant == a).unwrap().target.clone();
    let before = p.tenant_record(&a).unwrap().generation;
    // Held on the target: the source loses it at a higher generation, the target does not
    // get it yet.
    let held = p.relocate(&a, &target, true).unwrap();
    p.make_durable(held.seq).unwrap();
    assert!(held.placement.generation > before);
    let names = |h: &HostId| -> Vec<String> {
        p.desired_state(h)
            .tenants
            .iter()
            .map(|t| t.tenant_id.clone())
            .collect()
    };
    assert_eq!(names(&src), ["b"]);
    assert!(p.desired_state(&src).generation >= held.placement.generation);
    assert!(names(&target).is_empty());
    // Released: delivered to the target.
    let delivered = p.relocate(&a, &target, false).unwrap();
    p.make_durable(delivered.seq).unwrap();
    assert_eq!(names(&target), ["a"]);
    // b's move is given up: its reservation is freed, a tenant fits there again.
    let b = TenantId::new("b").unwrap();
    assert_eq!(p.release_reservation(&b).unwrap(), None, "never staged");
    p.place(spec("x"), 1).unwrap();
}

#[test]
fn a_move_stages_its_tenant_on_the_target_while_it_runs_and_a_given_up_move_unstages_it() {
    let (p, src, plan) = two_tenants_planned_off_src();
    let target_of = |t: &TenantId| plan.iter().find(|m| m.tenant == *t).unwrap().target.clone();
    let names = |h: &HostId| -> (Vec<String>, Vec<String>) {
        let d = p.desired_state(h);
        let ids = |specs: &[proto::TenantSpec]| specs.iter().map(|t| t.tenant_id.clone()).collect();
        (ids(&d.tenants), ids(&d.staged))
    };
    let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
    let (ta, tb) = (target_of(&a), target_of(&b));

    // Staged on its target at a new generation, while it still runs on the source.
    let before = p.desired_state(&ta).generation;
    let seq = p.prestage(&a).unwrap().expect("staged");
    p.make_durable(seq).unwrap();
    assert_eq!(names(&ta), (vec![], vec!["a".into()]));
    assert!(p.desired_state(&ta).generation > before);
    assert_eq!(names(&src), (vec!["a".into(), "b".into()], vec![]));
    assert_eq!(p.tenant_record(&a).unwrap().host_id, src);
    assert_eq!(p.prestage(&a).unwrap(), None, "staged once");
    // Its move goes on: held, then delivered, on the target; nothing is left to unstage.
    let held = p.relocate(&a, &ta, true).unwrap();
    p.make_durable(held.seq).unwrap();
    assert_eq!(names(&ta), (vec![], vec!["a".into()]));
    assert_eq!(names(&src), (vec!["b".into()], vec![]));
    let delivered = p.relocate(&a, &ta, false).unwrap();
    p.make_durable(delivered.seq).unwrap();
    assert_eq!(names(&ta), (vec!["a".into()], vec![]));
    assert_eq!(p.release_reservation(&a).unwrap(), None);
    assert_eq!(names(&ta), (vec!["a".into()], vec![]));

    // b's move is given up after it was staged: unstaged there, still running on the source.
    let seq = p.prestage(&b).unwrap().expect("staged");
    p.make_durable(seq).unwrap();
    assert_eq!(names(&tb).1, ["b"]);
    let seq = p.release_reservation(&b).unwrap().expect("unstaged");
    p.make_durable(seq).unwrap();
    assert!(!names(&tb).1.contains(&"b".to_string()), "{:?}", names(&tb));
    assert_eq!(names(&src), (vec!["b".into()], vec![]));
    assert_eq!(
        p.prestage(&b).unwrap(),
        None,
        "no reservation, nothing to stage"
    );
}

#[tokio::test]
async fn a_wait_for_a_report_wakes_on_the_acknowledgement_and_gives_up_at_its_deadline() {
    let (p, _) = placements(&[host("h1", 8)]);
    let p = Arc::new(p);
    let h1 = HostId::new("h1").unwrap();
    let long = std::time::Duration::from_secs(60);
    let far = tokio::time::Instant::now() + long;
    let waiter = {
        let (p, h1) = (p.clone(), h1.clone());
        tokio::spawn(async move {
            let began = tokio::time::Instant::now();
            let answer = p
                .wait_for_report(far, long, || p.delivered(&h1, 7).then_some("delivered"))
                .await;
            (answer, began.elapsed())
        })
    };
    // The waiter is waiting by now (an ack before its first check would also answer it).
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    p.record_ack(
        &h1,
        proto::DesiredStateAck {
            generation: 6,
            accepted: true,
            error: String::new(),
        },
    );
    p.record_ack(
        &h1,
        proto::DesiredStateAck {
            generation: 7,
            accepted: true,
            error: String::new(),
        },
    );
    let (answer, took) = waiter.await.unwrap();
    assert_eq!(answer, Some("delivered"));
    assert!(
        took < std::time::Duration::from_secs(5),
        "woken by the ack, not the recheck: {took:?}"
    );
    // Nothing answers: `None` at the deadline.
    let soon = tokio::time::Instant::now() + std::time::Duration::from_millis(50);
    let none: Option<()> = p
        .wait_for_report(soon, long, || p.delivered(&h1, 8).then_some(()))
        .await;
    assert_eq!(none, None);
    assert!(tokio::time::Instant::now() >= soon);
}

/// On the built-in tiers a host fills by its RAM, as gateways' hosts are sized, not by CPU
/// requests: an 8-vCPU, 32 GiB host with 1 GiB reserved takes 31 business tenants (1 GiB
/// each), where a CPU request of a whole core would have stopped it at 8.
#[test]
fn on_the_default_tiers_a_host_fills_by_its_memory_not_its_cpus() {
    let mut ccx33 = host("ccx33", 31);
    ccx33.allocatable.cpu = 8_000;
    ccx33.allocatable.disk = 10_000 * GIB;
    let store = Arc::new(MemStore::default());
    let policy = crate::config::CoordinatorConfig::default().placement_policy();
    let p = Placements::load(store, policy, &[ccx33]).unwrap();
    let mut placed = 0;
    let refusal = loop {
        match p.place(spec(&format!("gw-{placed}")), 1) {
            Ok(_) => placed += 1,
            Err(e) => break e.to_string(),
        }
    };
    assert_eq!(placed, 31, "{refusal}");
    assert!(refusal.contains("memory"), "the memory binds: {refusal}");
}

/// A host's `cpu_overcommit` is what placement offers of its CPUs: with 1.0 (the default)
/// CPU requests stop at its cores; at 2.0 twice that many tenants of a CPU-heavy tier fit.
#[test]
fn a_hosts_cpu_overcommit_bounds_the_cpu_requests_placed_on_it() {
    let placed_on = |percent: u32| {
        let id = HostId::new("h1").unwrap();
        let mut facts = crate::testing::seed::facts(&id, Provider::Hetzner, "fsn1", 64, 2);
        facts.cpu_overcommit_percent = percent;
        let record = crate::registry::HostRecord {
            host_id: id,
            enrolled_unix_ms: 1,
            admin: Default::default(),
            facts: Some(facts),
            last_report_unix_ms: 1,
            memory_available_bytes: 0,
            disk_available_bytes: 0,
        };
        let info = host_info(&record, true).unwrap();
        assert_eq!(info.allocatable.cpu, u64::from(percent) * 20);
        let store = Arc::new(MemStore::default());
        let p = Placements::load(store, policy(), &[info]).unwrap();
        let mut placed = 0;
        loop {
            // 500 mCPU requested, 256 MiB: the CPU binds on this 2-CPU, 64 GiB host.
            let s = proto::TenantSpec {
                resources: Some(proto::Resources {
                    memory_bytes: 256 << 20,
                    cpu_millicores: 500,
                    volume_bytes: GIB,
                    cpu_limit_millicores: 0,
                }),
                ..spec(&format!("t{placed}"))
            };
            match p.place(s, 1) {
                Ok(_) => placed += 1,
                Err(e) => {
                    assert!(e.to_string().contains("cpu: 1 host short"), "{e}");
                    break placed;
                }
            }
        }
    };
    assert_eq!(placed_on(100), 4);
    assert_eq!(placed_on(200), 8);
}
