use super::*;
use proptest::prelude::{
    Just, ProptestConfig, any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest,
};
use proptest::strategy::Strategy as Gen;

const GIB: u64 = 1 << 30;

fn host(id: &str, provider: Provider, region: &str, mem_gib: u64, cpus: u64) -> HostInfo {
    HostInfo {
        id: HostId::new(id).unwrap(),
        provider,
        region: region.into(),
        labels: BTreeMap::new(),
        dm_crypt: true,
        monthly_cost_cents: mem_gib * 150,
        allocatable: Vec3 {
            mem: mem_gib * GIB,
            cpu: cpus * 1000,
            disk: 100 * GIB,
        },
        schedulable: true,
    }
}

fn need(mem_gib: u64, cpu: u64) -> Vec3 {
    Vec3 {
        mem: mem_gib * GIB,
        cpu,
        disk: GIB,
    }
}

fn req(need: Vec3, constraints: &Constraints) -> Request<'_> {
    Request {
        need,
        encrypted: false,
        constraints,
        strategy: Strategy::Binpack,
    }
}

#[test]
fn binpack_fills_the_fuller_host_and_spread_the_emptier() {
    let mut s = Scheduler::new();
    s.upsert_host(host("a", Provider::Hetzner, "fsn1", 16, 8));
    s.upsert_host(host("b", Provider::Hetzner, "fsn1", 16, 8));
    s.commit(&HostId::new("a").unwrap(), need(8, 1000), None);
    let any = Constraints::default();
    assert_eq!(s.choose(&req(need(1, 500), &any)).unwrap().as_str(), "a");
    let spread = Request {
        strategy: Strategy::Spread,
        ..req(need(1, 500), &any)
    };
    assert_eq!(s.choose(&spread).unwrap().as_str(), "b");
}

#[test]
fn equal_choices_go_to_the_cheaper_host_per_gib() {
    let mut s = Scheduler::new();
    let mut expensive = host("aws-1", Provider::Aws, "eu-central-1", 16, 4);
    expensive.monthly_cost_cents = 10_000;
    let mut cheap = host("hz-1", Provider::Hetzner, "fsn1", 16, 4);
    cheap.monthly_cost_cents = 4_000;
    s.upsert_host(expensive);
    s.upsert_host(cheap);
    assert_eq!(
        s.choose(&req(need(1, 500), &Constraints::default()))
            .unwrap()
            .as_str(),
        "hz-1"
    );
}

#[test]
fn filters_and_their_explanation() {
    let mut s = Scheduler::new();
    s.upsert_host(host("us-1", Provider::Aws, "us-east-1", 64, 16));
    let mut small = host("eu-1", Provider::Hetzner, "fsn1", 4, 2);
    small.labels.insert("zone".into(), "a".into());
    s.upsert_host(small);
    let mut cordoned = host("eu-2", Provider::Hetzner, "nbg1", 64, 16);
    cordoned.schedulable = false;
    s.upsert_host(cordoned);
    let mut no_crypt = host("eu-3", Provider::Hetzner, "hel1", 64, 16);
    no_crypt.dm_crypt = false;
    s.upsert_host(no_crypt);

    let c = Constraints {
        regions: vec!["fsn1".into(), "nbg1".into(), "hel1".into()],
        ..Default::default()
    };
    let r = Request {
        encrypted: true,
        ..req(need(8, 1000), &c)
    };
    let refusal = s.choose(&r).unwrap_err();
    let text = refusal.to_string();
    assert_eq!(
        text,
        "no host fits (4 considered): state: 1 host not ready (cordoned, draining or down); region: 1 host outside fsn1,nbg1,hel1; \
         capability: 1 host without dm-crypt (the volume is encrypted); memory: 1 host short, closest by 4.0 GiB"
    );
    // Labels and anti-affinity.
    let labelled = Constraints {
        labels: [("zone".to_string(), "b".to_string())].into(),
        ..Default::default()
    };
    assert!(
        s.choose(&req(need(1, 100), &labelled))
            .unwrap_err()
            .to_string()
            .contains("labels: 3 hosts without zone=b")
    );
    let group = Constraints {
        anti_affinity_group: Some("acme".into()),
        ..Default::default()
    };
    let first = s.choose(&req(need(1, 100), &group)).unwrap();
    s.commit(&first, need(1, 100), Some("acme"));
    let second = s.choose(&req(need(1, 100), &group)).unwrap();
    assert_ne!(
        first, second,
        "anti-affinity puts the group on another host"
    );
}

#[test]
fn recommendation_is_the_cheapest_type_that_takes_the_tenant_in_an_allowed_region() {
    let catalog = vec![
        CatalogEntry {
            provider: Provider::Hetzner,
            instance_type: "cx22".into(),
            memory_bytes: 4 * GIB,
            cpus: 2,
            monthly_cost_cents: 379,
            regions: vec!["fsn1".into()],
        },
        CatalogEntry {
            provider: Provider::Hetzner,
            instance_type: "cx42".into(),
            memory_bytes: 16 * GIB,
            cpus: 8,
            monthly_cost_cents: 1640,
            regions: vec!["fsn1".into()],
        },
        CatalogEntry {
            provider: Provider::Aws,
            instance_type: "t3.xlarge".into(),
            memory_bytes: 16 * GIB,
            cpus: 4,
            monthly_cost_cents: 14_000,
            regions: vec!["eu-central-1".into()],
        },
    ];
    let any = Constraints::default();
    let r = explain::recommend(&catalog, need(8, 1000), GIB, &any).unwrap();
    assert_eq!(
        (r.instance_type.as_str(), r.region.as_str()),
        ("cx42", "fsn1")
    );
    let aws_only = Constraints {
        providers: vec![Provider::Aws],
        ..Default::default()
    };
    assert_eq!(
        explain::recommend(&catalog, need(8, 1000), GIB, &aws_only)
            .unwrap()
            .instance_type,
        "t3.xlarge"
    );
    assert!(explain::recommend(&catalog, need(64, 1000), GIB, &any).is_none());
}

#[test]
fn the_fast_path_never_causes_a_false_refusal() {
    // Many hosts that fit by memory but fail a label: the scan limit is hit, the exhaustive
    // pass finds the one host that fits.
    let mut s = Scheduler::new();
    for i in 0..(SCAN_LIMIT + 100) {
        s.upsert_host(host(&format!("h{i}"), Provider::Hetzner, "fsn1", 16, 8));
    }
    let mut special = host("zz-special", Provider::Hetzner, "fsn1", 64, 8);
    special.labels.insert("gpu".into(), "yes".into());
    s.upsert_host(special);
    let c = Constraints {
        labels: [("gpu".to_string(), "yes".to_string())].into(),
        ..Default::default()
    };
    assert_eq!(
        s.choose(&req(need(1, 100), &c)).unwrap().as_str(),
        "zz-special"
    );
}

// --- properties ---

#[derive(Debug, Clone)]
enum Op {
    Place {
        mem_gib: u64,
        cpu: u64,
        provider: Option<Provider>,
        region: Option<usize>,
        label: bool,
        group: Option<u8>,
        encrypted: bool,
    },
    Remove(usize),
    Cordon(usize, bool),
}

const REGIONS: [&str; 3] = ["fsn1", "nbg1", "eu-central-1"];

fn op() -> impl Gen<Value = Op> {
    prop_oneof![
        4 => (1u64..24, 100u64..8000, prop::option::of(prop_oneof![Just(Provider::Hetzner), Just(Provider::Aws)]), prop::option::of(0usize..3), any::<bool>(), prop::option::of(0u8..3), any::<bool>())
            .prop_map(|(mem_gib, cpu, provider, region, label, group, encrypted)| Op::Place { mem_gib, cpu, provider, region, label, group, encrypted }),
        1 => (0usize..64).prop_map(Op::Remove),
        1 => (0usize..12, any::<bool>()).prop_map(|(h, c)| Op::Cordon(h, c)),
    ]
}

fn fleet() -> impl Gen<Value = Vec<HostInfo>> {
    prop::collection::vec(
        (
            4u64..64,
            1u64..16,
            any::<bool>(),
            0usize..3,
            any::<bool>(),
            any::<bool>(),
        ),
        1..12,
    )
    .prop_map(|hosts| {
        hosts
            .into_iter()
            .enumerate()
            .map(|(i, (mem, cpus, aws, region, label, crypt))| {
                let provider = if aws {
                    Provider::Aws
                } else {
                    Provider::Hetzner
                };
                let mut h = host(&format!("h{i}"), provider, REGIONS[region], mem, cpus);
                h.dm_crypt = crypt;
                if label {
                    h.labels.insert("tier".into(), "gold".into());
                }
                h
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn caps_never_exceed_capacity_constraints_hold_and_refusals_are_exact(hosts in fleet(), ops in prop::collection::vec(op(), 1..80)) {
        let mut s = Scheduler::new();
        for h in &hosts {
            s.upsert_host(h.clone());
        }
        let mut placed: Vec<(HostId, Vec3, Option<String>)> = Vec::new();
        for op in ops {
            match op {
                Op::Place { mem_gib, cpu, provider, region, label, group, encrypted } => {
                    let constraints = Constraints {
                        providers: provider.into_iter().collect(),
                        regions: region.map(|r| vec![REGIONS[r].to_string()]).unwrap_or_default(),
                        labels: if label { [("tier".to_string(), "gold".to_string())].into() } else { BTreeMap::new() },
                        anti_affinity_group: group.map(|g| format!("g{g}")),
                    };
                    let r = Request { need: need(mem_gib, cpu), encrypted, constraints: &constraints, strategy: Strategy::Binpack };
                    // Brute-force oracle over the scheduler's own view.
                    let fits = |info: &HostInfo, used: Vec3| {
                        info.schedulable
                            && constraints.provider_allowed(info.provider)
                            && constraints.region_allowed(&info.region)
                            && constraints.labels.iter().all(|(k, v)| info.labels.get(k) == Some(v))
                            && (!encrypted || info.dm_crypt)
                            && constraints.anti_affinity_group.as_ref().is_none_or(|g| !placed.iter().any(|(h, _, pg)| *h == info.id && pg.as_ref() == Some(g)))
                            && r.need.fits_in(&info.allocatable.saturating_sub(&used))
                    };
                    let any_fits = s.hosts().any(|(info, used)| fits(info, used));
                    match s.choose(&r) {
                        Ok(id) => {
                            let (info, used) = s.host(&id).unwrap();
                            prop_assert!(fits(info, used), "chose a host that does not fit: {id}");
                            s.commit(&id, r.need, constraints.anti_affinity_group.as_deref());
                            placed.push((id, r.need, constraints.anti_affinity_group.clone()));
                        }
                        Err(refusal) => {
                            prop_assert!(!any_fits, "refused although a host fits: {refusal}");
                            let removed: u32 = refusal.removed.iter().map(|c| c.hosts).sum();
                            prop_assert_eq!(removed, hosts.len() as u32, "every host is accounted for");
                        }
                    }
                }
                Op::Remove(i) if !placed.is_empty() => {
                    let (id, n, g) = placed.remove(i % placed.len());
                    s.release(&id, n, g.as_deref());
                }
                Op::Remove(_) => {}
                Op::Cordon(h, cordoned) => {
                    if let Some(info) = hosts.get(h) {
                        s.set_schedulable(&info.id, !cordoned);
                    }
                }
            }
            for (info, used) in s.hosts() {
                prop_assert!(used.mem <= info.allocatable.mem, "memory over capacity on {}", info.id);
                prop_assert!(used.cpu <= info.allocatable.cpu);
                prop_assert!(used.disk <= info.allocatable.disk);
            }
        }
    }

    #[test]
    fn decisions_are_deterministic(hosts in fleet(), mem in 1u64..16) {
        let build = || {
            let mut s = Scheduler::new();
            for h in &hosts {
                s.upsert_host(h.clone());
            }
            s
        };
        let any = Constraints::default();
        let r = req(need(mem, 500), &any);
        prop_assert_eq!(build().choose(&r).ok(), build().choose(&r).ok());
    }
}
