use super::*;
use crate::placement::scheduler::HostInfo;

const GIB: u64 = 1 << 30;

fn id(s: &str) -> HostId {
    HostId::new(s).unwrap()
}

fn host(name: &str, provider: Provider, mem_gib: u64, cost_cents: u64) -> HostInfo {
    HostInfo {
        id: id(name),
        provider,
        region: "fsn1".into(),
        labels: BTreeMap::new(),
        dm_crypt: true,
        monthly_cost_cents: cost_cents,
        allocatable: Vec3 {
            mem: mem_gib * GIB,
            cpu: 8000,
            disk: 200 * GIB,
        },
        schedulable: true,
    }
}

fn tenant(name: &str, mem_gib: u64) -> Movable {
    Movable {
        tenant: TenantId::new(name).unwrap(),
        need: Vec3 {
            mem: mem_gib * GIB,
            cpu: 250,
            disk: GIB,
        },
        encrypted: false,
        constraints: Constraints::default(),
        strategy: Strategy::Binpack,
        volume_bytes: GIB,
    }
}

/// A fleet: each host with the tenants placed on it (committed to the scheduler).
fn fleet(hosts: Vec<(HostInfo, Vec<Movable>)>) -> (Scheduler, BTreeMap<HostId, Vec<Movable>>) {
    let mut s = Scheduler::new();
    let mut tenants = BTreeMap::new();
    for (info, placed) in hosts {
        let host = info.id.clone();
        s.upsert_host(info);
        for t in &placed {
            s.commit(&host, t.need, t.constraints.anti_affinity_group.as_deref());
        }
        tenants.insert(host, placed);
    }
    (s, tenants)
}

fn names(plan: &CompactionPlan) -> Vec<&str> {
    plan.emptied.iter().map(|h| h.host.as_str()).collect()
}

#[test]
fn the_emptiest_host_is_emptied_onto_the_others_within_their_headroom() {
    let (s, t) = fleet(vec![
        (
            host("a", Provider::Hetzner, 32, 4849),
            vec![tenant("t1", 8), tenant("t2", 8)],
        ),
        (
            host("b", Provider::Hetzner, 32, 4849),
            vec![tenant("t3", 8), tenant("t4", 8)],
        ),
        (
            host("c", Provider::Hetzner, 32, 4849),
            vec![tenant("t5", 4), tenant("t6", 4)],
        ),
    ]);
    let plan = plan(&s, &t, &BTreeSet::new(), &CompactOptions::default());
    assert_eq!(names(&plan), ["c"]);
    assert_eq!(plan.saving_cents(), 4849);
    assert_eq!(plan.moves(), 2);
    for m in &plan.emptied[0].moves {
        assert_ne!(m.target.as_str(), "c");
    }
    // a and b each keep 10 % free: 28.8 GiB usable, 16 GiB used; c's 8 GiB fit, but neither
    // of the others could then be emptied too.
    assert_eq!(plan.kept.len(), 2, "{:?}", plan.kept);
}

#[test]
fn no_host_is_emptied_when_the_others_would_pass_their_headroom() {
    let (s, t) = fleet(vec![
        (
            host("a", Provider::Hetzner, 32, 4849),
            vec![tenant("t1", 16)],
        ),
        (
            host("b", Provider::Hetzner, 32, 4849),
            vec![tenant("t2", 14)],
        ),
    ]);
    // 16 + 14 = 30 GiB fit in 32 GiB but not in 90 % of it.
    let p = plan(&s, &t, &BTreeSet::new(), &CompactOptions::default());
    assert!(p.emptied.is_empty(), "{p:?}");
    assert!(
        p.kept
            .iter()
            .all(|k| k.reason.contains("fits on no other host")),
        "{p:?}"
    );
    let p = plan(
        &s,
        &t,
        &BTreeSet::new(),
        &CompactOptions {
            headroom_percent: 0,
            ..CompactOptions::default()
        },
    );
    assert_eq!(names(&p), ["b"]);
}

#[test]
fn the_most_money_per_move_goes_first_and_an_empty_host_costs_no_move() {
    let (s, t) = fleet(vec![
        (
            host("cheap", Provider::Hetzner, 32, 1000),
            vec![tenant("t1", 1)],
        ),
        (
            host("dear", Provider::Aws, 32, 20000),
            vec![tenant("t2", 1), tenant("t3", 1)],
        ),
        (host("idle", Provider::Hetzner, 32, 500), vec![]),
        (
            host("big", Provider::Hetzner, 64, 9000),
            vec![tenant("t4", 30)],
        ),
    ]);
    let p = plan(&s, &t, &BTreeSet::new(), &CompactOptions::default());
    // idle: 5 EUR for no move; dear: 100 EUR per move; cheap: 10 per move; big: 90 per
    // move, but it received dear's tenants.
    assert_eq!(names(&p), ["idle", "dear", "cheap"]);
    assert_eq!(p.saving_cents(), 21500);
    assert_eq!(p.moves(), 3);
    assert!(
        p.emptied
            .iter()
            .all(|h| h.moves.iter().all(|m| m.target.as_str() == "big"))
    );
    assert_eq!(p.kept.len(), 1);
    assert!(p.kept[0].reason.contains("receives tenants"), "{p:?}");
}

#[test]
fn max_moves_providers_and_unknown_costs_bound_the_plan() {
    let hosts = || {
        fleet(vec![
            (
                host("h1", Provider::Hetzner, 32, 4000),
                vec![tenant("t1", 2), tenant("t2", 2)],
            ),
            (
                host("a1", Provider::Aws, 32, 9000),
                vec![tenant("t3", 2), tenant("t4", 2), tenant("t5", 2)],
            ),
            (host("o1", Provider::Other, 16, 0), vec![]),
            (
                host("h2", Provider::Hetzner, 64, 8000),
                vec![tenant("t6", 40)],
            ),
        ])
    };
    let (s, t) = hosts();
    let p = plan(
        &s,
        &t,
        &BTreeSet::new(),
        &CompactOptions {
            max_moves: 2,
            ..CompactOptions::default()
        },
    );
    assert_eq!(names(&p), ["h1"]);
    assert!(p.moves() <= 2);
    let a1 = p.kept.iter().find(|k| k.host.as_str() == "a1").unwrap();
    assert_eq!(
        a1.reason,
        "emptying it takes 3 moves, more than the 2 left of max_moves"
    );
    let o1 = p.kept.iter().find(|k| k.host.as_str() == "o1").unwrap();
    assert!(o1.reason.contains("cost is unknown"));

    let p = plan(
        &s,
        &t,
        &BTreeSet::new(),
        &CompactOptions {
            providers: [Provider::Hetzner].into(),
            ..CompactOptions::default()
        },
    );
    assert!(
        p.emptied.iter().all(|h| h.provider == Provider::Hetzner),
        "{p:?}"
    );
    assert!(
        p.kept.iter().all(|k| k.host.as_str() != "a1"),
        "a1 is no candidate"
    );
}

#[test]
fn constraints_hold_for_every_move_and_a_host_is_emptied_whole_or_not_at_all() {
    let grouped = |name: &str| {
        let mut t = tenant(name, 2);
        t.constraints.anti_affinity_group = Some("replicas".into());
        t
    };
    let mut locked = tenant("locked", 2);
    locked.encrypted = true;
    let mut plain = host("plain", Provider::Hetzner, 64, 1000);
    plain.dm_crypt = false;
    let (s, t) = fleet(vec![
        (
            host("x", Provider::Hetzner, 32, 5000),
            vec![grouped("r1"), locked],
        ),
        (host("y", Provider::Hetzner, 32, 5000), vec![grouped("r2")]),
        (plain, vec![]),
    ]);
    let p = plan(&s, &t, &BTreeSet::new(), &CompactOptions::default());
    // x: r1 cannot join r2 on y and `locked` needs dm-crypt, which `plain` lacks but y has;
    // r1 could go to `plain`. y: r2 can go to `plain` or x.
    for h in &p.emptied {
        for m in &h.moves {
            let moved = t[&h.host].iter().find(|x| x.tenant == m.tenant).unwrap();
            if moved.encrypted {
                assert_ne!(m.target.as_str(), "plain", "{p:?}");
            }
        }
        assert_eq!(
            h.moves.len(),
            t[&h.host].len(),
            "a host is emptied whole: {p:?}"
        );
    }
    let groups_on = |host: &str| {
        let mut n = 0;
        for (from, moved) in &t {
            for m in moved {
                let target = p
                    .emptied
                    .iter()
                    .flat_map(|h| &h.moves)
                    .find(|x| x.tenant == m.tenant)
                    .map_or(from.as_str(), |x| x.target.as_str());
                if target == host && m.constraints.anti_affinity_group.is_some() {
                    n += 1;
                }
            }
        }
        n
    };
    for h in ["x", "y", "plain"] {
        assert!(groups_on(h) <= 1, "two replicas on {h}: {p:?}");
    }
    assert!(!p.emptied.is_empty(), "{p:?}");
}
