//! Egress update latency with a full table: 200 tenants × 20 allowlist entries loaded into the
//! real nft (in a network namespace made for the run), then one tenant's allowlist changed
//! again and again (one entry out, one in), timing `NftEgress::apply` (diff + the one nft
//! transaction that puts the update in force), the clean-up that follows it off the update path
//! (`sweep`: deleting the withdrawn element, which costs the kernel an RCU grace period), and a
//! full table read (`refresh`: list as JSON + parse; at most every 4 s in the agent). Target: an
//! update applies in ≤ 20 ms. Run as root: `cargo bench -p berth-node-agent --bench egress`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_node_agent::command::CommandError;
use berth_node_agent::egress::dns::{Answer, DnsError, Resolve};
use berth_node_agent::egress::guard::ForwardGuard;
use berth_node_agent::egress::nft::NftCommand;
use berth_node_agent::egress::{EgressSettings, EgressStep, NftEgress};
use berth_shared::clock::SystemClock;
use berth_shared::proto;
use berth_shared::spec::TenantSpec;

const TENANTS: usize = 200;
const ENTRIES: usize = 20;
const UPDATES: usize = 200;

/// Every entry is an address, so nothing is resolved.
#[derive(Debug)]
struct NoDns;

#[tonic::async_trait]
impl Resolve for NoDns {
    async fn resolve(&self, _: &str) -> Result<Answer, DnsError> {
        Err(DnsError::NxDomain)
    }
}

/// The namespace made for the run has no Docker chain to guard; the guard's own cost (one
/// `iptables -C` per table read) is not part of this measure.
#[derive(Debug)]
struct NoGuard;

impl ForwardGuard for NoGuard {
    fn ensure(&self) -> Result<bool, CommandError> {
        Ok(false)
    }
}

fn spec(tenant: usize, first_entry: usize) -> TenantSpec {
    TenantSpec::from_resolved(proto::TenantSpec {
        tenant_id: format!("t{tenant}"),
        image: "img:1".into(),
        resources: Some(proto::Resources {
            memory_bytes: 256 << 20,
            cpu_millicores: 100,
            cpu_limit_millicores: 0,
            volume_bytes: 0,
        }),
        egress: (first_entry..first_entry + ENTRIES)
            .map(|e| proto::EgressRule {
                destination: format!("198.{}.{}.{}/32", 18 + tenant % 2, e / 250, e % 250 + 1),
                protocol: "tcp".into(),
                port: 443,
            })
            .collect(),
        ..Default::default()
    })
    .expect("a valid spec")
}

fn subnet(tenant: usize) -> String {
    let base = u32::from(std::net::Ipv4Addr::new(10, 213, 0, 0)) + (tenant as u32) * 16;
    format!("{}/28", std::net::Ipv4Addr::from(base))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(what: &str, mut samples: Vec<Duration>, limit: Option<Duration>) {
    samples.sort();
    let (p50, p99, max) = (
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
    );
    let ratio = limit.map_or(String::new(), |l| {
        format!("  p99/limit = {:.2}", p99.as_secs_f64() / l.as_secs_f64())
    });
    println!("{what:<40} p50 {p50:>9.2?}  p99 {p99:>9.2?}  max {max:>9.2?}{ratio}");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("the egress benchmark needs root (nft in a network namespace)");
        std::process::exit(1);
    }
    // A network namespace of the process's own, before any thread exists, so every nft it
    // runs works there (as the agent's would on the host) and it vanishes with the process.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

async fn run() {
    let egress = NftEgress::new(
        Arc::new(NftCommand::default()),
        Arc::new(NoGuard),
        Arc::new(NoDns),
        Arc::new(SystemClock),
        EgressSettings {
            tenant_resolvers: BTreeSet::from(["192.0.2.53".parse().expect("address")]),
            // Every refresh re-reads the table, so its cost is measured too.
            relist_interval: Duration::ZERO,
            ..EgressSettings::default()
        },
    );
    egress.refresh().await.expect("refresh");
    let load = Instant::now();
    for t in 0..TENANTS {
        egress.apply(&spec(t, 0), &subnet(t)).await.expect("load");
    }
    println!(
        "loaded {TENANTS} tenants × {ENTRIES} entries in {:.2?}",
        load.elapsed()
    );
    let (mut refreshes, mut updates, mut cleanups) = (Vec::new(), Vec::new(), Vec::new());
    let everyone: BTreeSet<_> = (0..TENANTS).map(|t| spec(t, 0).tenant_id).collect();
    for i in 0..UPDATES {
        let t = i % TENANTS;
        let started = Instant::now();
        egress.refresh().await.expect("refresh");
        refreshes.push(started.elapsed());
        let started = Instant::now();
        egress
            .apply(&spec(t, 1 + i / TENANTS), &subnet(t))
            .await
            .expect("update");
        updates.push(started.elapsed());
        let started = Instant::now();
        egress.sweep(&everyone).await.expect("clean-up");
        cleanups.push(started.elapsed());
    }
    report(
        "update one tenant (apply: in force)",
        updates,
        Some(Duration::from_millis(20)),
    );
    report("clean-up of the withdrawn entry (sweep)", cleanups, None);
    report("read the whole table (refresh)", refreshes, None);
}
