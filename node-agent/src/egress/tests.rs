use std::sync::Mutex as StdMutex;

use berth_shared::clock::ManualClock;
use berth_shared::proto;

use super::*;
use crate::command::CommandError;
use crate::egress::dns::{Answer, DnsError};

/// Records scripts; lists nothing (each test works within one pass); can refuse.
#[derive(Debug, Default)]
struct FakeNft {
    scripts: StdMutex<Vec<String>>,
    refuse: StdMutex<bool>,
}

impl FakeNft {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.scripts.lock().unwrap())
    }
}

impl Nft for FakeNft {
    fn apply(&self, script: &str) -> Result<(), CommandError> {
        if *self.refuse.lock().unwrap() {
            return Err(CommandError::Failed {
                program: "nft".into(),
                status: "exit status: 1".into(),
                stderr: "Error: Could not process rule: No buffer space available".into(),
            });
        }
        self.scripts.lock().unwrap().push(script.to_string());
        Ok(())
    }
    fn list(&self, _: &str) -> Result<Option<String>, CommandError> {
        Ok(None)
    }
}

/// Answers from a table the test changes; counts questions.
#[derive(Debug, Default)]
struct FakeResolver {
    answers: StdMutex<HashMap<String, Result<Answer, DnsError>>>,
    asked: StdMutex<Vec<String>>,
}

impl FakeResolver {
    fn set(&self, name: &str, answer: Result<(&[[u8; 4]], u32), DnsError>) {
        let answer = answer.map(|(addrs, ttl_secs)| Answer {
            addresses: addrs.iter().map(|a| Ipv4Addr::from(*a)).collect(),
            ttl_secs,
        });
        self.answers.lock().unwrap().insert(name.into(), answer);
    }
    fn asked(&self) -> usize {
        self.asked.lock().unwrap().len()
    }
}

#[tonic::async_trait]
impl Resolve for FakeResolver {
    async fn resolve(&self, name: &str) -> Result<Answer, DnsError> {
        self.asked.lock().unwrap().push(name.into());
        self.answers
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or(Err(DnsError::NxDomain))
    }
}

/// Counts checks; adds the rule the first time, or fails as a host without Docker's chain.
#[derive(Debug, Default)]
struct FakeGuard {
    checks: StdMutex<u32>,
    no_chain: StdMutex<bool>,
}

impl ForwardGuard for FakeGuard {
    fn ensure(&self) -> Result<bool, CommandError> {
        let mut checks = self.checks.lock().unwrap();
        *checks += 1;
        if *self.no_chain.lock().unwrap() {
            return Err(CommandError::Failed {
                program: "iptables".into(),
                status: "exit status: 1".into(),
                stderr: "iptables: No chain/target/match by that name.".into(),
            });
        }
        Ok(*checks == 1)
    }
}

struct Rig {
    nft: Arc<FakeNft>,
    guard: Arc<FakeGuard>,
    dns: Arc<FakeResolver>,
    clock: Arc<ManualClock>,
    egress: NftEgress,
}

fn rig() -> Rig {
    let nft = Arc::new(FakeNft::default());
    let guard = Arc::new(FakeGuard::default());
    let dns = Arc::new(FakeResolver::default());
    let clock = Arc::new(ManualClock::at(1_700_000_000_000));
    let egress = NftEgress::new(
        nft.clone(),
        guard.clone(),
        dns.clone(),
        clock.clone(),
        EgressSettings {
            tenant_resolvers: BTreeSet::from([Ipv4Addr::new(192, 0, 2, 53)]),
            ..EgressSettings::default()
        },
    );
    Rig {
        nft,
        guard,
        dns,
        clock,
        egress,
    }
}

fn spec(id: &str, egress: &[&str]) -> TenantSpec {
    TenantSpec::from_resolved(proto::TenantSpec {
        tenant_id: id.into(),
        image: "img:1".into(),
        resources: Some(proto::Resources {
            memory_bytes: 128 << 20,
            cpu_millicores: 100,
            cpu_limit_millicores: 0,
            volume_bytes: 0,
        }),
        egress: egress
            .iter()
            .enumerate()
            .map(|(i, e)| {
                berth_shared::spec::EgressFile::Short((*e).into())
                    .to_proto(i)
                    .unwrap()
            })
            .collect(),
        ..Default::default()
    })
    .unwrap()
}

const SUBNET: &str = "10.213.0.0/28";

#[tokio::test]
async fn the_table_is_made_then_a_tenant_gets_its_rules_in_one_script() {
    let r = rig();
    r.dns.set(
        "api.example.test",
        Ok((&[[198, 51, 100, 4], [198, 51, 100, 5]], 300)),
    );
    r.egress.refresh().await.unwrap();
    let base = r.nft.take();
    assert_eq!(base.len(), 1);
    assert!(base[0].contains("add element inet berth resolvers { 192.0.2.53 }"));
    let s = spec(
        "acme",
        &[
            "api.example.test:443",
            "203.0.113.0/24:8443",
            "192.0.2.1:123/udp",
        ],
    );
    let report = r.egress.apply(&s, SUBNET).await.unwrap();
    let scripts = r.nft.take();
    assert_eq!(scripts.len(), 1, "one transaction");
    let c = chain(&s.tenant_id);
    assert!(scripts[0].contains(&format!(
        "add element inet berth {c}_allow {{ 192.0.2.1 . udp . 123, 198.51.100.4 . tcp . 443, 198.51.100.5 . tcp . 443, 203.0.113.0/24 . tcp . 8443 }}"
    )), "{}", scripts[0]);
    assert!(report.problems.is_empty());
    assert_eq!(report.entries.len(), 3);
    assert_eq!(
        report.entries[0].addresses,
        vec!["198.51.100.4", "198.51.100.5"]
    );
    assert_eq!(
        report.entries[0].rule.as_ref().unwrap().destination,
        "api.example.test"
    );
    assert_eq!(report.entries[2].rule.as_ref().unwrap().protocol, "udp");
    // Same spec again: nothing to do, no nft call, no DNS question (TTL not run out).
    r.egress.apply(&s, SUBNET).await.unwrap();
    assert!(r.nft.take().is_empty());
    assert_eq!(r.dns.asked(), 1);
}

#[tokio::test]
async fn ttls_are_clamped_and_dropped_addresses_stay_for_the_grace_period() {
    let r = rig();
    r.egress.refresh().await.unwrap();
    r.nft.take();
    // TTL 5 s is below the 30 s floor.
    r.dns.set("api.example.test", Ok((&[[198, 51, 100, 4]], 5)));
    let s = spec("acme", &["api.example.test:443"]);
    r.egress.apply(&s, SUBNET).await.unwrap();
    r.clock.advance_ms(10_000);
    r.egress.apply(&s, SUBNET).await.unwrap();
    assert_eq!(r.dns.asked(), 1, "not asked again before the floor");
    // The name moves to another address.
    r.dns
        .set("api.example.test", Ok((&[[198, 51, 100, 9]], 7200)));
    r.clock.advance_ms(21_000);
    let report = r.egress.apply(&s, SUBNET).await.unwrap();
    assert_eq!(r.dns.asked(), 2);
    r.nft.take();
    assert_eq!(
        report.entries[0].addresses,
        vec!["198.51.100.4", "198.51.100.9"],
        "the old address stays during the grace period"
    );
    // The old address was valid until 30 s after its answer, plus 10 min of grace.
    r.clock.advance_ms(600_000);
    let report = r.egress.apply(&s, SUBNET).await.unwrap();
    assert_eq!(report.entries[0].addresses, vec!["198.51.100.9"]);
    let c = chain(&s.tenant_id);
    assert_eq!(
        r.nft.take(),
        vec![format!(
            "add element inet berth {c}_deny {{ 198.51.100.4 . tcp . 443 }}\n"
        )],
        "withdrawn in one fast transaction"
    );
    // The clean-up at the end of the pass deletes it from both sets, once.
    r.egress
        .sweep(&BTreeSet::from([s.tenant_id.clone()]))
        .await
        .unwrap();
    r.egress
        .sweep(&BTreeSet::from([s.tenant_id.clone()]))
        .await
        .unwrap();
    assert_eq!(
        r.nft.take(),
        vec![format!(
            "delete element inet berth {c}_allow {{ 198.51.100.4 . tcp . 443 }}\ndelete element inet berth {c}_deny {{ 198.51.100.4 . tcp . 443 }}\n"
        )]
    );
    // TTL 7200 s is above the 1 h ceiling: asked again after an hour, not two.
    let asked = r.dns.asked();
    r.clock.advance_ms(3_600_000 - 600_000 - 1);
    r.egress.apply(&s, SUBNET).await.unwrap();
    assert_eq!(r.dns.asked(), asked);
    r.clock.advance_ms(1);
    r.egress.apply(&s, SUBNET).await.unwrap();
    assert_eq!(r.dns.asked(), asked + 1);
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_reported_and_allows_nothing() {
    let r = rig();
    r.egress.refresh().await.unwrap();
    r.nft.take();
    let s = spec("acme", &["nosuch.example.test:443", "203.0.113.7:443"]);
    let report = r.egress.apply(&s, SUBNET).await.unwrap();
    assert_eq!(
        report.problems,
        vec!["egress nosuch.example.test:443/tcp: does not resolve (NXDOMAIN)"]
    );
    assert_eq!(report.entries[0].error, "does not resolve (NXDOMAIN)");
    assert!(report.entries[0].addresses.is_empty());
    let script = r.nft.take().concat();
    assert!(script.contains("{ 203.0.113.7 . tcp . 443 }"), "{script}");
}

#[tokio::test]
async fn a_refused_update_keeps_the_previous_rules_and_is_retried() {
    let r = rig();
    r.egress.refresh().await.unwrap();
    r.nft.take();
    let before = spec("acme", &["203.0.113.7:443"]);
    r.egress.apply(&before, SUBNET).await.unwrap();
    r.nft.take();
    *r.nft.refuse.lock().unwrap() = true;
    let after = spec("acme", &["203.0.113.7:443", "203.0.113.8:443"]);
    let err = r.egress.apply(&after, SUBNET).await.unwrap_err();
    assert!(matches!(err, EgressError::Refused(_)), "{err}");
    let err = err.to_string();
    assert!(err.contains("the previous rules stay"), "{err}");
    assert!(
        err.contains("No buffer space available"),
        "nft's message: {err}"
    );
    *r.nft.refuse.lock().unwrap() = false;
    r.egress.apply(&after, SUBNET).await.unwrap();
    let c = chain(&after.tenant_id);
    assert_eq!(
        r.nft.take(),
        vec![format!(
            "add element inet berth {c}_allow {{ 203.0.113.8 . tcp . 443 }}\n"
        )],
        "the model was not changed by the refused script"
    );
}

#[tokio::test]
async fn release_and_sweep_remove_only_other_tenants() {
    let r = rig();
    r.egress.refresh().await.unwrap();
    r.nft.take();
    for (id, subnet) in [
        ("acme", "10.213.0.0/28"),
        ("beta", "10.213.0.16/28"),
        ("gone", "10.213.0.32/28"),
    ] {
        r.egress
            .apply(&spec(id, &["203.0.113.7:443"]), subnet)
            .await
            .unwrap();
    }
    r.nft.take();
    let acme = TenantId::new("acme").unwrap();
    r.egress.release(&acme).await.unwrap();
    let removed = r.nft.take().concat();
    assert!(removed.contains(&format!("delete chain inet berth {}\n", chain(&acme))));
    r.egress.release(&acme).await.unwrap();
    assert!(r.nft.take().is_empty(), "releasing twice is a no-op");
    r.egress
        .sweep(&BTreeSet::from([TenantId::new("beta").unwrap()]))
        .await
        .unwrap();
    let swept = r.nft.take().concat();
    let gone = chain(&TenantId::new("gone").unwrap());
    let beta = chain(&TenantId::new("beta").unwrap());
    assert!(
        swept.contains(&format!("delete set inet berth {gone}_allow")),
        "{swept}"
    );
    assert!(!swept.contains(&beta), "{swept}");
}

#[tokio::test]
async fn without_a_listing_nothing_is_applied() {
    #[derive(Debug)]
    struct Broken;
    impl Nft for Broken {
        fn apply(&self, _: &str) -> Result<(), CommandError> {
            unreachable!("nothing is applied without a listing")
        }
        fn list(&self, _: &str) -> Result<Option<String>, CommandError> {
            Err(CommandError::Spawn {
                program: "nft".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        }
    }
    let r = rig();
    let egress = NftEgress::new(
        Arc::new(Broken),
        r.guard.clone(),
        r.dns.clone(),
        r.clock.clone(),
        EgressSettings::default(),
    );
    let err = egress.refresh().await.unwrap_err();
    assert!(matches!(err, EgressError::List(_)), "{err}");
    assert!(err.to_string().starts_with("cannot run nft"), "{err}");
    let err = egress.apply(&spec("acme", &[]), SUBNET).await.unwrap_err();
    assert!(matches!(err, EgressError::Unread), "{err}");
}

/// A name whose answer is the cloud metadata service (or loopback) opens nothing, and says
/// why; its other addresses still count. An entry stored before the coordinator refused such
/// ranges is not enforced.
#[tokio::test]
async fn addresses_no_tenant_may_reach_are_never_enforced() {
    let r = rig();
    r.dns
        .set("metadata.example.test", Ok((&[[169, 254, 169, 254]], 300)));
    r.dns.set(
        "mixed.example.test",
        Ok((&[[127, 0, 0, 1], [198, 51, 100, 9]], 300)),
    );
    r.egress.refresh().await.unwrap();
    r.nft.take();
    let s = spec(
        "acme",
        &[
            "metadata.example.test:80",
            "mixed.example.test:443",
            "169.254.0.0/16:80",
        ],
    );
    let report = r.egress.apply(&s, SUBNET).await.unwrap();
    let scripts = r.nft.take().join("\n");
    assert!(!scripts.contains("169.254"), "{scripts}");
    assert!(!scripts.contains("127.0.0.1"), "{scripts}");
    assert!(scripts.contains("198.51.100.9 . tcp . 443"), "{scripts}");
    assert!(report.entries[0].addresses.is_empty());
    assert_eq!(
        report.entries[0].error,
        "metadata.example.test resolves to 169.254.169.254, which is link-local (the cloud metadata service is 169.254.169.254): never allowed"
    );
    assert_eq!(report.entries[1].addresses, vec!["198.51.100.9"]);
    assert!(
        report.entries[1]
            .error
            .contains("resolves to 127.0.0.1, which is loopback")
    );
    assert!(report.entries[2].addresses.is_empty());
    assert!(report.entries[2].error.contains("link-local"));
    assert_eq!(report.problems.len(), 3, "{:?}", report.problems);
}

/// The forward guard is checked whenever the table is read again; a host without Docker's
/// chain still gets its table (berth's rules alone fence its tenants, and the log says so).
#[tokio::test]
async fn the_forward_guard_is_checked_with_every_read_of_the_table() {
    let r = rig();
    r.egress.refresh().await.unwrap();
    r.egress.refresh().await.unwrap();
    assert_eq!(
        *r.guard.checks.lock().unwrap(),
        1,
        "within the re-read interval"
    );
    r.clock.advance_ms(4_000);
    r.egress.refresh().await.unwrap();
    assert_eq!(*r.guard.checks.lock().unwrap(), 2);
    *r.guard.no_chain.lock().unwrap() = true;
    r.clock.advance_ms(4_000);
    r.egress.refresh().await.unwrap();
    assert_eq!(*r.guard.checks.lock().unwrap(), 3);
    // What a tenant's forward rules let through carries the mark the guard looks for.
    r.nft.take();
    let s = spec("acme", &["203.0.113.0/24:443"]);
    r.egress.apply(&s, SUBNET).await.unwrap();
    let rules = r.nft.take().join("\n");
    let c = chain(&s.tenant_id);
    assert!(
        rules.contains(&format!(
            "add rule inet berth {c} ip daddr . meta l4proto . th dport @{c}_allow meta mark set meta mark | 0x10000000 accept"
        )),
        "{rules}"
    );
}
