//! Failover benchmark: coordinators on a 3-member etcd cluster (loopback), one leading and one
//! waiting; the leader is SIGKILLed and the time until the standby serves and until its first
//! acknowledged placement is measured; the killed one comes back as the next standby, and the
//! next run kills the new leader. `berth-failover-bench [--runs 10]`; prints JSON. Needs
//! Debian's etcd-server.

use std::time::{Duration, Instant};

use berth_tests::etcd::{EtcdCluster, unavailable};
use berth_tests::procs::CoordinatorProc;

fn place(coordinator: &CoordinatorProc, tenant: &str) -> bool {
    let spec = coordinator.dir.path().join(format!("{tenant}.toml"));
    std::fs::write(
        &spec,
        format!(
            "tenant_id = \"{tenant}\"\nimage = \"ghcr.io/openclaw/gateway:1\"\n[resources]\nmemory = \"64MiB\"\ncpu_millicores = 5\nvolume = \"16MiB\"\n[volume]\nencrypted = false\n"
        ),
    )
    .expect("spec");
    coordinator
        .berthctl(&["place", spec.to_str().expect("path")])
        .0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(10);
    if let Some(why) = unavailable() {
        eprintln!("berth-failover-bench: {why}");
        std::process::exit(1);
    }
    berth_shared::tls::install_crypto_provider();
    let cluster = EtcdCluster::start(3);
    let config = format!("store = \"etcd\"\n{}", cluster.config("/failover/"));
    let mut leader = CoordinatorProc::start(None, &config);
    let _ = leader.operator_token_file();
    let mut standby = CoordinatorProc::standby_of(&leader, &config);
    // A host to place on, registered through the first leader: placements need one.
    let mut agent = berth_tests::procs::AgentProc::enroll(&leader, "failover-host", None);
    agent.extra_config = format!(
        "coordinator = \"{},{}\"\n",
        leader.agent_url(),
        standby.agent_url()
    );
    agent.start();
    berth_tests::wait_for("the host ready", Duration::from_secs(15), || {
        (leader.host_state("failover-host").as_deref() == Some("ready")).then_some(())
    });
    let (mut serving, mut placed) = (Vec::new(), Vec::new());
    for run in 0..runs {
        // The standby is waiting (its campaign is in etcd) before the leader goes.
        std::thread::sleep(Duration::from_secs(2));
        leader.kill9();
        let killed = Instant::now();
        standby.await_endpoints(Duration::from_secs(30));
        serving.push(killed.elapsed().as_secs_f64());
        let tenant = format!("run-{run}");
        while !place(&standby, &tenant) {
            assert!(killed.elapsed() < Duration::from_secs(60), "no placement");
            std::thread::sleep(Duration::from_millis(50));
        }
        placed.push(killed.elapsed().as_secs_f64());
        leader.launch();
        std::mem::swap(&mut leader, &mut standby);
    }
    drop(agent);
    for v in [&mut serving, &mut placed] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "{}",
        serde_json::json!({ "failover": {
            "runs": runs,
            "lease_seconds": berth_coordinator::etcd::LEADER_LEASE_SECONDS,
            "serving_p50_s": percentile(&serving, 0.5), "serving_max_s": percentile(&serving, 1.0),
            "first_placement_p50_s": percentile(&placed, 0.5), "first_placement_max_s": percentile(&placed, 1.0),
        } })
    );
}
