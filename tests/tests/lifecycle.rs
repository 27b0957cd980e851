//! Enrollment, certificate renewal, the registry's durability across SIGKILL (invariant 2)
//! and down/ready detection, with real processes on loopback.

use std::time::{Duration, Instant};

use berth_tests::procs::{AgentProc, CoordinatorProc, run};
use berth_tests::wait_for;

fn meminfo_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    kib * 1024
}

#[test]
fn an_enrolled_agent_reports_real_figures() {
    let coordinator = CoordinatorProc::start(None, "");
    let mut agent = AgentProc::enroll(&coordinator, "host-a", None);
    // The private key was made on the host and is private to it.
    let mode = std::fs::metadata(agent.state_dir().join("host.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    // The real Docker socket, to see its version probed (no tenant is placed).
    agent.start_with_docker(true);
    wait_for("host-a ready", Duration::from_secs(10), || {
        (coordinator.host_state("host-a").as_deref() == Some("ready")).then_some(())
    });
    let host = coordinator
        .hosts()
        .into_iter()
        .find(|h| h["host_id"] == "host-a")
        .unwrap();
    assert_eq!(host["provider"], "hetzner");
    assert_eq!(host["region"], "fsn1");
    assert_eq!(
        host["memory_total_bytes"].as_u64(),
        Some(meminfo_total_bytes()),
        "sysinfo's figure is the kernel's"
    );
    let used = host["memory_used_bytes"].as_u64().unwrap();
    assert!(used > 0 && used < meminfo_total_bytes(), "{used}");
    assert!(host["last_report_age_ms"].as_i64().unwrap() < 3000);
    let cgroup = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else {
        "v1"
    };
    assert_eq!(host["capabilities"]["cgroup"], cgroup);
    let nft_present = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert_eq!(host["capabilities"]["nftables"], nft_present);
    let docker = std::process::Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output();
    match docker {
        Ok(o) if o.status.success() => {
            let version = String::from_utf8_lossy(&o.stdout).trim().to_string();
            assert_eq!(
                host["capabilities"]["docker_version"],
                version.as_str(),
                "the agent asked the real engine"
            );
        }
        _ => berth_tests::missing_component("Docker engine", "`docker version` did not answer"),
    }
    // The human table says the same.
    let (ok, out, _) = coordinator.berthctl(&["hosts"]);
    assert!(ok);
    assert!(
        out.lines()
            .any(|l| l.starts_with("host-a") && l.contains("ready")),
        "{out}"
    );
}

#[test]
fn an_enrollment_token_works_once_and_not_after_expiry() {
    let coordinator = CoordinatorProc::start(None, "");
    let fp = coordinator.endpoints.ca_fingerprint.clone();
    let url = coordinator.operator_url();
    let token = coordinator.token("host-a", "10m");
    let first = AgentProc::enroll_fresh(&coordinator, "host-a");
    let (ok, _, err) = run(first.enroll_command(&url, &token, &fp));
    assert!(ok, "{err}");
    let second = AgentProc::enroll_fresh(&coordinator, "host-a2");
    let (ok, _, err) = run(second.enroll_command(&url, &token, &fp));
    assert!(!ok);
    assert!(
        err.contains("enrollment token is invalid, used or expired"),
        "{err}"
    );
    assert!(
        !second.state_dir().exists(),
        "a refused enrollment writes nothing"
    );

    let short = coordinator.token("host-b", "1s");
    std::thread::sleep(Duration::from_millis(1500));
    let late = AgentProc::enroll_fresh(&coordinator, "host-b");
    let (ok, _, err) = run(late.enroll_command(&url, &short, &fp));
    assert!(!ok);
    assert!(
        err.contains("enrollment token is invalid, used or expired"),
        "{err}"
    );
    assert!(
        coordinator.host_state("host-b").is_none(),
        "the expired token registered nothing"
    );
}

#[test]
fn enroll_refuses_a_coordinator_whose_ca_does_not_match_the_fingerprint() {
    let coordinator = CoordinatorProc::start(None, "");
    let token = coordinator.token("host-a", "10m");
    let agent = AgentProc::enroll_fresh(&coordinator, "host-a");
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let (ok, _, err) = run(agent.enroll_command(&coordinator.operator_url(), &token, &wrong));
    assert!(!ok);
    assert!(
        err.contains("does not match the pinned fingerprint"),
        "{err}"
    );
    assert!(!agent.state_dir().exists(), "nothing written");
    // The token was not spent on the impostor check: it still works with the right pin.
    let (ok, _, err) = run(agent.enroll_command(
        &coordinator.operator_url(),
        &token,
        &coordinator.endpoints.ca_fingerprint,
    ));
    assert!(ok, "{err}");

    for (bad, expected) in [
        ("sha256:xyz", "expected 64 hex digits"),
        (&"zz".repeat(32)[..], "not hexadecimal"),
    ] {
        let (ok, _, err) = run(agent.enroll_command(&coordinator.operator_url(), &token, bad));
        assert!(!ok);
        assert!(
            err.starts_with("error: --ca-fingerprint: invalid CA fingerprint"),
            "{err}"
        );
        assert!(err.contains(expected), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn the_agent_renews_its_certificate_at_two_thirds_of_its_life() {
    // 9 s certificates: renewal after 6 s, well before expiry.
    let coordinator = CoordinatorProc::start(None, "agent_cert_ttl = \"9s\"");
    let mut agent = AgentProc::enroll(&coordinator, "host-a", None);
    let serial = |a: &AgentProc| {
        let identity = berth_tests::clients::agent_identity(&a.state_dir());
        berth_shared::pki::parse_peer_cert(&identity.chain[0])
            .unwrap()
            .serial
    };
    let first = serial(&agent);
    let started = Instant::now();
    agent.start();
    let second = wait_for("a renewed certificate", Duration::from_secs(12), || {
        Some(serial(&agent)).filter(|s| *s != first)
    });
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(4),
        "renewed too early: {elapsed:?}"
    );
    // Through two more lifetimes the host keeps reporting with fresh certificates.
    std::thread::sleep(Duration::from_secs(10));
    let third = serial(&agent);
    assert_ne!(third, second, "renewed again");
    assert_eq!(
        coordinator.host_state("host-a").as_deref(),
        Some("ready"),
        "{}",
        agent.log()
    );
    assert!(coordinator.log().contains("certificate renewed"));
    // Once a session ran on a renewed certificate, the ones before it were revoked.
    let log = coordinator.log();
    for old in [&first, &second] {
        assert!(
            log.lines()
                .any(|l| l.contains("older certificates revoked") && l.contains(old.as_str())),
            "{old} revoked after its renewal worked: {log}"
        );
    }
}

/// A host may not renew again within a tenth of its certificate's life.
#[tokio::test(flavor = "multi_thread")]
async fn renewals_are_rate_limited_per_host() {
    berth_shared::tls::install_crypto_provider();
    let coordinator = CoordinatorProc::start(None, "agent_cert_ttl = \"1h\"");
    let agent = AgentProc::enroll(&coordinator, "host-a", None);
    let identity = berth_tests::clients::agent_identity(&agent.state_dir());
    let mut client = berth_tests::clients::agent_client(&coordinator, Some(identity));
    let key = berth_shared::pki::generate_key().unwrap();
    let csr_pem = berth_shared::pki::make_csr(&key).unwrap();
    let refused = client
        .renew_certificate(berth_shared::proto::RenewCertificateRequest { csr_pem })
        .await
        .expect_err("enrolled a moment ago");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().starts_with(
            "host host-a renewed its certificate 0 s ago; the next renewal is allowed in 36"
        ),
        "{}",
        refused.message()
    );
}

#[test]
fn sigkill_loses_no_host_and_no_token() {
    let mut coordinator = CoordinatorProc::start(None, "");
    let mut a = AgentProc::enroll(&coordinator, "host-a", None);
    let _b = AgentProc::enroll(&coordinator, "host-b", None);
    a.start();
    wait_for("host-a ready", Duration::from_secs(10), || {
        (coordinator.host_state("host-a").as_deref() == Some("ready")).then_some(())
    });
    let pending = coordinator.token("host-c", "10m");
    let (ok, _, err) = coordinator.berthctl(&["cordon", "host-a"]);
    assert!(ok, "{err}");

    coordinator.kill9();
    coordinator.restart();

    let hosts = coordinator.hosts();
    let ids: Vec<&str> = hosts
        .iter()
        .map(|h| h["host_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["host-a", "host-b"]);
    let never_reported = hosts.iter().find(|h| h["host_id"] == "host-b").unwrap();
    assert_eq!(never_reported["state"], "down");
    // host-a's agent reconnects to the restarted coordinator by itself, and its cordon survived.
    wait_for(
        "host-a reconnected, still cordoned",
        Duration::from_secs(20),
        || {
            let sessions = coordinator
                .log()
                .matches("agent session opened host=host-a")
                .count();
            (sessions >= 2 && coordinator.host_state("host-a").as_deref() == Some("cordoned"))
                .then_some(())
        },
    );
    // The token created before the kill still works, exactly once.
    let c = AgentProc::enroll_fresh(&coordinator, "host-c");
    let (ok, _, err) = run(c.enroll_command(
        &coordinator.operator_url(),
        &pending,
        &coordinator.endpoints.ca_fingerprint,
    ));
    assert!(ok, "{err}");
    // The operator token made before the kill still authenticates (berthctl above used it).
}

#[test]
fn a_silent_host_is_down_within_the_deadline_and_ready_when_it_returns() {
    let coordinator = CoordinatorProc::start(None, "");
    let mut agent = AgentProc::enroll(&coordinator, "host-a", None);
    agent.start();
    wait_for("host-a ready", Duration::from_secs(10), || {
        (coordinator.host_state("host-a").as_deref() == Some("ready")).then_some(())
    });
    let pid = nix::unistd::Pid::from_raw(agent.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    // Default deadline 15 s, reports every 1 s: down within 16 s (plus polling slack).
    wait_for("host-a down", Duration::from_secs(18), || {
        (coordinator.host_state("host-a").as_deref() == Some("down")).then_some(())
    });
    let took = stopped.elapsed();
    assert!(took >= Duration::from_secs(13), "down too early: {took:?}");
    assert!(took <= Duration::from_secs(17), "down too late: {took:?}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_for("host-a ready again", Duration::from_secs(10), || {
        (coordinator.host_state("host-a").as_deref() == Some("ready")).then_some(())
    });
}
