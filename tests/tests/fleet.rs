//! Several hosts: a coordinator and three agents, each in its own network namespace with its
//! own address, joined by a bridge that only this test can reach.

use std::time::Duration;

use berth_tests::netns::TestNet;
use berth_tests::procs::{AgentProc, CoordinatorProc};
use berth_tests::{missing_component, wait_for};

#[test]
fn three_agents_in_their_own_namespaces_enroll_and_report() {
    if let Err(why) = berth_tests::netns::available() {
        return missing_component("network namespaces", &why);
    }
    let mut net = TestNet::new().expect("test network");
    let coordinator_host = net.add_host(1).expect("coordinator namespace");
    let coordinator = CoordinatorProc::start(Some(&coordinator_host), "");
    assert_eq!(coordinator.endpoints.operator.ip().to_string(), "10.77.0.1");

    let mut agents = Vec::new();
    for (i, id) in [
        (2u8, "hetzner-fsn1-01"),
        (3, "hetzner-nbg1-01"),
        (4, "aws-euc1-01"),
    ] {
        let host = net.add_host(i).expect("agent namespace");
        let mut agent = AgentProc::enroll(&coordinator, id, Some(&host));
        agent.start();
        agents.push((agent, host));
    }
    let hosts = wait_for("three ready hosts", Duration::from_secs(20), || {
        let hosts = coordinator.hosts();
        (hosts.len() == 3 && hosts.iter().all(|h| h["state"] == "ready")).then_some(hosts)
    });
    for host in &hosts {
        assert!(
            host["memory_total_bytes"].as_u64().unwrap() > 1 << 30,
            "real RAM figures: {host}"
        );
        assert!(host["memory_used_bytes"].as_u64().unwrap() > 0, "{host}");
        assert!(host["cpu_count"].as_u64().unwrap() >= 1);
    }
    // Each agent's session comes from its own namespace's address.
    let log = coordinator.log();
    for addr in ["10.77.0.2", "10.77.0.3", "10.77.0.4"] {
        assert!(log.contains(addr), "an enrollment from {addr} is logged");
    }

    // Pull one host's cable: it goes down; plug it back: ready again.
    let (_, cut) = &agents[1];
    net.set_link(cut, false).unwrap();
    wait_for("hetzner-nbg1-01 down", Duration::from_secs(25), || {
        (coordinator.host_state("hetzner-nbg1-01").as_deref() == Some("down")).then_some(())
    });
    assert_eq!(
        coordinator.host_state("hetzner-fsn1-01").as_deref(),
        Some("ready"),
        "the others are unaffected"
    );
    net.set_link(cut, true).unwrap();
    wait_for(
        "hetzner-nbg1-01 ready again",
        Duration::from_secs(45),
        || (coordinator.host_state("hetzner-nbg1-01").as_deref() == Some("ready")).then_some(()),
    );
}
