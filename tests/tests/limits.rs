//! Bounded inputs against real processes: a host filled with the largest specs allowed still
//! receives its desired state (over the 4 MiB gRPC default), and a thousand idle connections
//! stop neither operators nor agents.

use std::net::TcpStream;
use std::time::Duration;

use berth_shared::proto;
use berth_tests::clients::{operator_client, with_token};
use berth_tests::procs::{AgentProc, CoordinatorProc};
use berth_tests::wait_for;

/// A spec as large as validation lets a placeable one be: 64 environment variables of 16 KiB
/// together, 64 egress entries, a long image name, the smallest memory.
fn largest_spec(id: &str) -> proto::TenantSpec {
    let env = (0..64)
        .map(|i| (format!("V{i:02}"), "x".repeat(16 * 1024 / 64 - 3)))
        .collect();
    let egress = (0..64)
        .map(|i| proto::EgressRule {
            destination: format!("198.51.{i}.0/24"),
            protocol: "tcp".into(),
            port: 443,
        })
        .collect();
    proto::TenantSpec {
        tenant_id: id.into(),
        image: format!("registry.example.com/{}:1", "g".repeat(200)),
        resources: Some(proto::Resources {
            memory_bytes: 64 << 20,
            cpu_millicores: 1,
            cpu_limit_millicores: 0,
            volume_bytes: berth_shared::spec::MIN_VOLUME_BYTES,
        }),
        volume: Some(proto::VolumeSpec {
            size_bytes: 0,
            encrypted: false,
            mount_path: String::new(),
        }),
        egress,
        env,
        constraints: Some(proto::PlacementConstraints {
            regions: vec!["fsn1".into()],
            // One group per tenant: the longest name, and no tenant keeps another away.
            anti_affinity_group: format!("{}-{id}", "a".repeat(62 - id.len())),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_full_of_the_largest_specs_receives_its_desired_state() {
    berth_shared::tls::install_crypto_provider();
    let coordinator = CoordinatorProc::start(None, "");
    let mut agent = AgentProc::enroll(&coordinator, "host-a", None);
    agent.start();
    wait_for("host-a ready", Duration::from_secs(10), || {
        (coordinator.host_state("host-a").as_deref() == Some("ready")).then_some(())
    });
    let admin = coordinator.operator_token("filler", "admin", "1h");
    let client = operator_client(&coordinator, None);
    let one = prost::Message::encoded_len(&largest_spec("t-000"));
    assert!(
        one > 16 << 10 && one <= berth_shared::spec::MAX_SPEC_BYTES,
        "{one} bytes"
    );

    // Place until the host is full (the test machine's RAM, 64 MiB each).
    let mut placed = 0usize;
    'fill: for batch in 0.. {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..16 {
            let mut client = client.clone();
            let request = with_token(
                proto::PlaceTenantRequest {
                    spec: Some(largest_spec(&format!("t-{:03}", batch * 16 + i))),
                },
                &admin,
            );
            calls.spawn(async move { client.place_tenant(request).await });
        }
        let mut full = false;
        while let Some(result) = calls.join_next().await {
            match result.unwrap() {
                Ok(_) => placed += 1,
                Err(status) if status.code() == tonic::Code::ResourceExhausted && placed > 0 => {
                    full = true;
                }
                Err(status) => panic!("placement refused: {status:?}"),
            }
        }
        if full {
            break 'fill;
        }
    }
    let desired_bytes = placed * one;
    assert!(
        desired_bytes > 4 << 20,
        "{placed} tenants, {desired_bytes} bytes: more than tonic's 4 MiB default"
    );
    wait_for(
        "every placement delivered to the host",
        Duration::from_secs(60),
        || {
            let (ok, out, err) = coordinator.berthctl(&["tenants", "--json"]);
            assert!(ok, "{err}");
            let tenants: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
            (tenants.len() == placed && tenants.iter().all(|t| t["delivered"] == true))
                .then_some(())
        },
    );
    assert!(
        !agent.log().contains("message length too large"),
        "{}",
        agent.log()
    );
}

/// With the shell's soft limit of 1,024 open files, 1,100 connections that never finish a
/// handshake on each of the operator and agent ports leave `berthctl hosts` and an agent's
/// reconnect working (the coordinator raises its limit to the hard one at start).
#[test]
fn a_thousand_idle_connections_stop_neither_operators_nor_agents() {
    let mut coordinator = CoordinatorProc::start(None, "");
    coordinator.restart_with_open_files(1024);
    let mut agent = AgentProc::enroll(&coordinator, "host-a", None);
    agent.start();
    wait_for("host-a ready", Duration::from_secs(10), || {
        (coordinator.host_state("host-a").as_deref() == Some("ready")).then_some(())
    });
    let mut idle = Vec::new();
    for port in [coordinator.endpoints.operator, coordinator.endpoints.agent] {
        for _ in 0..1100 {
            idle.push(TcpStream::connect(port).expect("the listener accepts"));
        }
    }
    let (ok, out, err) = coordinator.berthctl(&["hosts"]);
    assert!(ok, "berthctl hosts beside 2,200 idle connections: {err}");
    assert!(out.contains("host-a"), "{out}");
    let sessions = |a: &AgentProc| a.log().matches("session accepted").count();
    let before = sessions(&agent);
    agent.kill9();
    agent.start();
    wait_for(
        "the agent back after its restart",
        Duration::from_secs(8),
        || (sessions(&agent) > before).then_some(()),
    );
    assert!(
        !coordinator.log().contains("Too many open files"),
        "{}",
        coordinator.log()
    );
    drop(idle);
}
