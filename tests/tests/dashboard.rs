//! The dashboard and `/metrics` of real processes: a coordinator whose HTTP port is not on
//! loopback (a test namespace's address) speaks TLS and asks for a read token; agents serve
//! their own metrics; and
//! headless Chromium screenshots of each page of a seeded fleet, left under
//! `target/dashboard-screenshots/` for review.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_shared::metrics::testing::value;
use berth_tests::netns::TestNet;
use berth_tests::procs::{AgentProc, CoordinatorProc, bin};
use berth_tests::{missing_component, wait_for};

/// `curl` inside `netns` (trusting `ca`, for https): (HTTP status, body).
fn curl_with_ca(
    netns: &str,
    ca: Option<&std::path::Path>,
    url: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "curl", url]);
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    berth_tests::curl_status(cmd)
}

fn curl(netns: &str, url: &str, token: Option<&str>) -> (u16, String) {
    curl_with_ca(netns, None, url, token)
}

#[test]
fn off_loopback_the_dashboard_needs_tls_and_a_read_token_and_shows_the_real_fleet() {
    if let Err(why) = berth_tests::netns::available() {
        return missing_component("network namespaces", &why);
    }
    let mut net = TestNet::new().expect("test network");
    let coordinator_host = net.add_host(1).expect("coordinator namespace");
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) =
        berth_tests::procs::server_cert_files(certs.path(), &coordinator_host.address);
    let coordinator = CoordinatorProc::start_with_http_at(
        Some(&coordinator_host),
        &coordinator_host.address,
        &format!("http_tls_cert = {cert:?}\nhttp_tls_key = {key:?}"),
    );
    let ns = coordinator_host.netns.clone();
    let https = |url: &str, token: Option<&str>| {
        curl_with_ca(&ns, Some(&cert), &url.replace("http://", "https://"), token)
    };
    let http = coordinator.endpoints.http;
    assert_eq!(http.ip().to_string(), "10.77.0.1", "not loopback");
    let mut agents = Vec::new();
    for (i, id) in [(2u8, "hetzner-fsn1-07"), (3, "aws-euc1-02")] {
        let host = net.add_host(i).expect("agent namespace");
        let mut agent = AgentProc::enroll(&coordinator, id, Some(&host));
        agent.start();
        agents.push((agent, host));
    }
    wait_for("two ready hosts", Duration::from_secs(20), || {
        let hosts = coordinator.hosts();
        (hosts.len() == 2 && hosts.iter().all(|h| h["state"] == "ready")).then_some(())
    });

    for path in ["/", "/hosts/hetzner-fsn1-07", "/metrics"] {
        let (code, body) = https(&format!("http://{http}{path}"), None);
        assert_eq!(code, 401, "{path}: {body}");
    }
    let (code, _) = https(&format!("http://{http}/healthz"), None);
    assert_eq!(code, 200, "health stays open");
    // An admin token never works here; a read token does.
    let admin = std::fs::read_to_string(coordinator.operator_token_file()).unwrap();
    let (code, body) = https(&format!("http://{http}/metrics"), Some(admin.trim()));
    assert_eq!(code, 403, "{body}");
    let token = coordinator.operator_token("scraper", "read", "1h");
    let token = token.as_str();
    let (code, page) = https(&format!("http://{http}/"), Some(token));
    assert_eq!(code, 200);
    assert!(
        page.contains(
            "<small>hosts</small><b>2</b><small>2 ready · 0 cordoned · 0 draining · 0 down</small>"
        ),
        "{page}"
    );
    for id in ["hetzner-fsn1-07", "aws-euc1-02"] {
        assert!(
            page.contains(&format!("<a href=\"/hosts/{id}\">{id}</a>")),
            "{id}"
        );
    }
    let (code, host_page) = https(&format!("http://{http}/hosts/aws-euc1-02"), Some(token));
    assert_eq!(code, 200);
    assert!(host_page.contains("<b>ready</b>"), "{host_page}");
    let (code, metrics) = https(&format!("http://{http}/metrics"), Some(token));
    assert_eq!(code, 200);
    assert_eq!(value(&metrics, "berth_hosts", &[("state", "ready")]), 2.0);
    let total = value(
        &metrics,
        "berth_host_memory_bytes",
        &[("host", "aws-euc1-02"), ("kind", "total")],
    );
    assert!(total > f64::from(1u32 << 30), "real RAM: {total}");
    assert!(
        value(
            &metrics,
            "berth_host_report_age_seconds",
            &[("host", "aws-euc1-02")]
        ) < 5.0
    );

    // Each agent's own /metrics, on loopback in its namespace.
    for (agent, host) in &agents {
        let url = agent.metrics_url();
        let text = wait_for(
            "the agent's first report in its metrics",
            Duration::from_secs(10),
            || {
                let (code, text) = curl(&host.netns, &url, None);
                assert_eq!(code, 200);
                (value(&text, "berth_agent_connected", &[]) == 1.0
                    && text.contains("\nberth_agent_report_age_seconds "))
                .then_some(text)
            },
        );
        let memory = value(&text, "berth_agent_host_memory_bytes", &[("kind", "total")]);
        assert!(memory > f64::from(1u32 << 30), "real RAM: {memory}");
        assert!(value(&text, "berth_agent_report_age_seconds", &[]) < 5.0);
    }
}

/// The repository's `target/` directory.
fn target_dir() -> PathBuf {
    let bench = bin("berth-bench");
    bench.parent().unwrap().parent().unwrap().to_path_buf()
}

#[test]
fn screenshots_of_each_page_of_a_seeded_fleet() {
    if Command::new("chromium").arg("--version").output().is_err() {
        return missing_component("chromium", "not installed (the test command installs it)");
    }
    let mut server = Command::new(bin("berth-bench"))
        .args([
            "dashboard",
            "--hosts",
            "60",
            "--tenants",
            "1200",
            "--serve",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("berth-bench");
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("serving ")
        .expect("the serving line")
        .to_string();
    let dir = target_dir().join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let profile = tempfile::tempdir().unwrap();
    for (name, path, height) in [
        ("fleet", "", 2400),
        ("host", "hosts/hetzner-fsn1-007", 1000),
    ] {
        let png = dir.join(format!("{name}.png"));
        let _ = std::fs::remove_file(&png);
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--window-size=1400,{height}"))
            .arg(format!("--screenshot={}", png.display()))
            .arg(format!("{base}{path}"))
            .output()
            .expect("chromium");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&png).expect("a screenshot");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name}.png is a PNG");
        assert!(
            bytes.len() > 30_000,
            "{name}.png holds a rendered page ({} bytes)",
            bytes.len()
        );
        eprintln!("screenshot: {}", png.display());
    }
    let _ = server.kill();
    let _ = server.wait();
}
