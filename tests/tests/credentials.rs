//! Invariant 9: every operator credential can be revoked and expires, and a revocation takes
//! effect on every port at once; a `read` credential changes nothing; the HTTP port never sees
//! a credential that could. Real coordinator processes, real curl, in-process gRPC clients.

use std::process::Command;
use std::time::{Duration, Instant};

use berth_shared::proto;
use berth_tests::clients::{operator_client, operator_identity_in, with_token};
use berth_tests::procs::{CoordinatorProc, run, server_cert_files};

/// `curl` against `url` with `token` (and `ca` trusted): (HTTP status, body).
fn curl(ca: &std::path::Path, method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-X", method, "--cacert"]).arg(ca).arg(url);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if method != "GET" {
        cmd.args(["-H", "Content-Type: application/json", "--data", "{}"]);
    }
    berth_tests::curl_status(cmd)
}

/// A gRPC `ListHosts` with `token`: its status code.
async fn list_hosts_with(coordinator: &CoordinatorProc, token: &str) -> tonic::Code {
    let request = with_token(proto::ListHostsRequest {}, token);
    match operator_client(coordinator, None).list_hosts(request).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

/// Every route that changes the fleet refuses a read token (403 / PermissionDenied) before it
/// looks at its arguments; the reads take it.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_token_reads_and_changes_nothing() {
    berth_shared::tls::install_crypto_provider();
    let coordinator = CoordinatorProc::start(None, "");
    let read = coordinator.operator_token("viewer", "read", "1h");
    let ca = coordinator.ca_cert();
    let base = coordinator.operator_url();
    for (method, path) in [
        ("POST", "/v1/tenants"),
        ("DELETE", "/v1/tenants/acme"),
        ("DELETE", "/v1/tenants/acme?purge=true"),
        ("PUT", "/v1/tenants/acme/egress"),
        ("POST", "/v1/tenants/acme/restart"),
        ("POST", "/v1/hosts/host-a/cordon"),
        ("POST", "/v1/hosts/host-a/uncordon"),
        ("POST", "/v1/hosts/host-a/drain"),
        ("POST", "/v1/hosts/host-a/drain/abort"),
    ] {
        let (code, body) = curl(&ca, method, &format!("{base}{path}"), Some(&read));
        assert_eq!(code, 403, "{method} {path}: {body}");
        assert!(body.contains("holds a read token"), "{body}");
    }
    for path in ["/v1/hosts", "/v1/tenants"] {
        let (code, body) = curl(&ca, "GET", &format!("{base}{path}"), Some(&read));
        assert_eq!(code, 200, "{path}: {body}");
    }

    let mut client = operator_client(&coordinator, None);
    let host = || proto::HostRef {
        host_id: "host-a".into(),
    };
    let tenant = || proto::TenantRef {
        tenant_id: "acme".into(),
    };
    let refused = [
        client
            .place_tenant(with_token(proto::PlaceTenantRequest::default(), &read))
            .await
            .map(drop),
        client
            .remove_tenant(with_token(
                proto::RemoveTenantRequest {
                    tenant_id: "acme".into(),
                    purge: true,
                },
                &read,
            ))
            .await
            .map(drop),
        client
            .restart_tenant(with_token(proto::RestartTenantRequest::default(), &read))
            .await
            .map(drop),
        client
            .set_egress(with_token(proto::SetEgressRequest::default(), &read))
            .await
            .map(drop),
        client
            .cordon_host(with_token(host(), &read))
            .await
            .map(drop),
        client
            .uncordon_host(with_token(host(), &read))
            .await
            .map(drop),
        client
            .drain_host(with_token(proto::DrainRequest::default(), &read))
            .await
            .map(drop),
        client
            .abort_drain(with_token(host(), &read))
            .await
            .map(drop),
    ];
    for (i, result) in refused.into_iter().enumerate() {
        let status = result.expect_err("a read token may change nothing");
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "call {i}: {status:?}"
        );
    }
    assert_eq!(list_hosts_with(&coordinator, &read).await, tonic::Code::Ok);
    let missing = client
        .get_tenant(with_token(tenant(), &read))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "a read, answered");
    assert!(coordinator.hosts().is_empty(), "nothing was created");
}

/// `operator-token revoke` refuses the operator's tokens on gRPC, REST, the dashboard and
/// `/metrics` at once, with no restart; an expired token is refused likewise; `list` shows
/// each token's scope, expiry and last use but never the token.
#[tokio::test(flavor = "multi_thread")]
async fn revoked_and_expired_tokens_are_refused_on_every_port() {
    berth_shared::tls::install_crypto_provider();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = server_cert_files(certs.path(), "127.0.0.1");
    // The HTTP port off loopback (every address), so it asks for tokens; with TLS.
    let coordinator = CoordinatorProc::start_with_http_at(
        None,
        "0.0.0.0",
        &format!("http_tls_cert = {cert:?}\nhttp_tls_key = {key:?}"),
    );
    let ca = coordinator.ca_cert();
    let rest = format!("{}/v1/hosts", coordinator.operator_url());
    let port = coordinator.endpoints.http.port();
    let page = |path: &str, token: &str| {
        curl(
            &cert,
            "GET",
            &format!("https://127.0.0.1:{port}{path}"),
            Some(token),
        )
        .0
    };
    let admin = coordinator.operator_token("ops", "admin", "1h");
    let scraper = coordinator.operator_token("scraper", "read", "1h");
    let short_read = coordinator.operator_token("brief", "read", "2s");
    let short_admin = coordinator.operator_token("brief", "admin", "2s");
    let issued = Instant::now();

    assert_eq!(list_hosts_with(&coordinator, &admin).await, tonic::Code::Ok);
    assert_eq!(curl(&ca, "GET", &rest, Some(&admin)).0, 200);
    for path in ["/", "/metrics"] {
        assert_eq!(page(path, &scraper), 200, "{path}");
        assert_eq!(page(path, &short_read), 200, "{path}");
        assert_eq!(
            page(path, &admin),
            403,
            "{path}: admin tokens stay off this port"
        );
    }

    let (ok, out, err) = run(coordinator.admin_command(&["--json", "operator-token", "list"]));
    assert!(ok, "{err}");
    for token in [&admin, &scraper, &short_read, &short_admin] {
        assert!(!out.contains(token.as_str()), "list never shows a token");
    }
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let ops = listed
        .iter()
        .find(|t| t["name"] == "ops")
        .expect("ops listed");
    assert_eq!(ops["scope"], "admin");
    assert!(ops["last_used_unix_ms"].as_i64().unwrap() > 0, "{ops}");
    let expires = ops["expires_unix_ms"].as_i64().unwrap() - berth_tests::clients::now_ms();
    assert!(
        (3_500_000..=3_600_000).contains(&expires),
        "1h: {expires} ms"
    );
    assert_eq!(listed.iter().filter(|t| t["name"] == "brief").count(), 2);

    // Revoked: refused everywhere at once.
    let (ok, out, err) =
        run(coordinator.admin_command(&["operator-token", "revoke", "--name", "ops"]));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "revoked 1 token(s) of operator ops");
    assert_eq!(
        list_hosts_with(&coordinator, &admin).await,
        tonic::Code::Unauthenticated
    );
    let (code, body) = curl(&ca, "GET", &rest, Some(&admin));
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("invalid, revoked or expired"), "{body}");
    let (ok, _, err) =
        run(coordinator.admin_command(&["operator-token", "revoke", "--name", "scraper"]));
    assert!(ok, "{err}");
    for path in ["/", "/metrics"] {
        assert_eq!(page(path, &scraper), 401, "{path}");
    }
    let (ok, _, err) =
        run(coordinator.admin_command(&["operator-token", "revoke", "--name", "nobody"]));
    assert!(!ok);
    assert!(err.contains("operator \"nobody\" has no tokens"), "{err}");

    // Expired: refused everywhere too.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(issued.elapsed()));
    assert_eq!(page("/metrics", &short_read), 401);
    assert_eq!(
        list_hosts_with(&coordinator, &short_admin).await,
        tonic::Code::Unauthenticated
    );
    assert_eq!(curl(&ca, "GET", &rest, Some(&short_admin)).0, 401);
}

/// Off loopback the HTTP port needs TLS or the explicit insecure flag, and says which.
#[test]
fn the_http_port_refuses_plain_http_off_loopback_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "state_dir = {:?}\nagent_listen = \"127.0.0.1:0\"\noperator_listen = \"127.0.0.1:0\"\nhttp_listen = \"0.0.0.0:0\"\n{extra}",
                dir.path().join("state")
            ),
        )
        .unwrap();
    };
    write("");
    let coordinator = |args: &[&str]| {
        let mut cmd = Command::new(berth_tests::procs::bin("berth-coordinator"));
        cmd.arg("--config").arg(&config).args(args);
        cmd
    };
    let (ok, _, err) = run(coordinator(&["ca", "init"]));
    assert!(ok, "{err}");
    let (ok, _, err) = run(coordinator(&["serve"]));
    assert!(!ok, "plain HTTP off loopback must not start");
    assert!(
        err.contains("http_listen = 0.0.0.0:0 is not loopback: give the HTTP port a certificate (http_tls_cert and http_tls_key), or set http_insecure_listen = true"),
        "{err}"
    );
    assert!(
        !dir.path().join("state/endpoints.json").exists(),
        "nothing served"
    );
    // Told explicitly: it starts, and says so in its log.
    write("http_insecure_listen = true\n");
    let log = dir.path().join("serve.log");
    let mut child = coordinator(&["serve"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    within(Duration::from_secs(20), "the coordinator serving", || {
        dir.path().join("state/endpoints.json").exists()
    });
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("without TLS (http_insecure_listen = true)"),
        "{text}"
    );
}

/// Waits until `check` holds, and says how long it took.
fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let began = Instant::now();
    while !check() {
        assert!(began.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    began.elapsed()
}

/// `operator-cert create` records the certificate: `revoke --serial` refuses it on the
/// operator port's gRPC and REST within a second.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_operator_certificate_is_refused_within_a_second() {
    berth_shared::tls::install_crypto_provider();
    let coordinator = CoordinatorProc::start(None, "");
    let (out_dir, serial) = coordinator.operator_cert("alice");
    let identity = || operator_identity_in(&out_dir);
    let curl_cert = || {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(coordinator.ca_cert())
            .arg("--cert")
            .arg(out_dir.join("operator.crt"))
            .arg("--key")
            .arg(out_dir.join("operator.key"))
            .arg(format!("{}/v1/hosts", coordinator.operator_url()))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // One connection kept open across the revocation, as a long-lived client's would be.
    let mut client = operator_client(&coordinator, Some(identity()));
    client
        .list_hosts(proto::ListHostsRequest {})
        .await
        .expect("the new certificate works");
    assert_eq!(curl_cert(), "200");

    let (ok, _, err) = run(coordinator.admin_command(&["revoke", "--serial", &serial]));
    assert!(ok, "revoke --serial of an operator certificate: {err}");
    let revoked_at = Instant::now();
    let on_grpc = client
        .list_hosts(proto::ListHostsRequest {})
        .await
        .expect_err("refused on the open connection");
    assert_eq!(on_grpc.code(), tonic::Code::Unauthenticated, "{on_grpc:?}");
    assert_eq!(on_grpc.message(), "certificate revoked");
    let fresh = operator_client(&coordinator, Some(identity()))
        .list_hosts(proto::ListHostsRequest {})
        .await;
    assert!(fresh.is_err(), "refused on a new connection");
    // curl's handshake is refused (the deny-list is checked there): no HTTP status at all.
    assert_eq!(curl_cert(), "000");
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
}
