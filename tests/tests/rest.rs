//! The REST/JSON API on the operator port has the gRPC API's semantics: same operations, same
//! authentication, same errors (as HTTP statuses), same JSON shapes as `berthctl --json`.
//! Driven with curl, as an operator's script would.

use std::process::Command;
use std::time::Duration;

use berth_tests::procs::{AgentProc, CoordinatorProc};
use berth_tests::wait_for;

#[test]
fn rest_has_the_grpc_semantics() {
    if Command::new("curl").arg("--version").output().is_err() {
        return berth_tests::missing_component("curl", "not installed");
    }
    let coordinator = CoordinatorProc::start(None, "");
    let mut agent = AgentProc::enroll(&coordinator, "host-a", None);
    agent.start();
    wait_for("host-a ready", Duration::from_secs(10), || {
        (coordinator.host_state("host-a").as_deref() == Some("ready")).then_some(())
    });

    let (code, body) = coordinator.rest("GET", "/v1/hosts", None, false);
    assert_eq!(code, 401, "{body}");
    assert_eq!(body["code"], "Unauthenticated");

    let (code, hosts) = coordinator.rest("GET", "/v1/hosts", None, true);
    assert_eq!(code, 200);
    let mut from_rest = hosts[0].clone();
    let mut from_cli = coordinator.hosts()[0].clone();
    // Report ages differ by the time between the two calls; everything else is the same.
    from_rest["last_report_age_ms"] = serde_json::Value::Null;
    from_cli["last_report_age_ms"] = serde_json::Value::Null;
    from_rest["memory_used_bytes"] = serde_json::Value::Null;
    from_cli["memory_used_bytes"] = serde_json::Value::Null;
    assert_eq!(
        from_rest, from_cli,
        "same shape and figures as berthctl hosts --json"
    );
    assert_eq!(hosts[0]["host_id"], "host-a");

    let spec = r#"{"tenant_id":"rest-one","image":"localhost:1/openclaw/gateway:1","tier":"individual","volume":{"encrypted":false}}"#;
    let (code, placed) = coordinator.rest("POST", "/v1/tenants", Some(spec), true);
    assert_eq!(code, 200, "{placed}");
    assert_eq!(placed["host_id"], "host-a");
    let (code, again) = coordinator.rest("POST", "/v1/tenants", Some(spec), true);
    assert_eq!(
        (code, &again["generation"]),
        (200, &placed["generation"]),
        "idempotent"
    );
    let changed = spec.replace("gateway:1", "gateway:2");
    let (code, conflict) = coordinator.rest("POST", "/v1/tenants", Some(&changed), true);
    assert_eq!(code, 409);
    assert_eq!(
        conflict["error"],
        "tenant rest-one already exists with a different image; remove it first or send the same spec"
    );
    let (code, bad) = coordinator.rest(
        "POST",
        "/v1/tenants",
        Some(r#"{"tenant_id":"x","image":"i","tier":"gold"}"#),
        true,
    );
    assert_eq!((code, bad["code"].as_str()), (400, Some("InvalidArgument")));
    assert!(bad["error"].as_str().unwrap().starts_with("invalid tier"));
    // The JSON body is the spec file's format: its field names come back as it spells them.
    let (code, bad) = coordinator.rest(
        "POST",
        "/v1/tenants",
        Some(
            r#"{"tenant_id":"x","image":"i","resources":{"memory":"32MiB","cpu_millicores":100,"volume":"1GiB"}}"#,
        ),
        true,
    );
    assert_eq!(code, 400);
    assert_eq!(
        bad["error"],
        "invalid resources.memory: 33554432 bytes is below the minimum of 64 MiB"
    );
    let (code, bad) = coordinator.rest(
        "POST",
        "/v1/tenants",
        Some(r#"{"tenant_id":"x","nonsense":1}"#),
        true,
    );
    assert_eq!(code, 400);
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `nonsense`"),
        "{bad}"
    );
    let (code, no_fit) = coordinator.rest(
        "POST",
        "/v1/tenants",
        Some(r#"{"tenant_id":"enc","image":"i","tier":"individual"}"#),
        true,
    );
    assert_eq!(code, 422, "{no_fit}");
    assert!(
        no_fit["error"]
            .as_str()
            .unwrap()
            .contains("without dm-crypt")
    );

    let (code, tenant) = coordinator.rest("GET", "/v1/tenants/rest-one", None, true);
    assert_eq!(code, 200);
    let (ok, out, _) = coordinator.berthctl(&["tenants", "--json"]);
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["tenant_id"], tenant["tenant_id"]);
    assert_eq!(listed[0]["generation"], tenant["generation"]);
    // The allowlist of a placed tenant, replaced over REST; a bad entry names its field.
    let (code, set) = coordinator.rest(
        "PUT",
        "/v1/tenants/rest-one/egress",
        Some(r#"{"egress": ["api.anthropic.com:443", "192.0.2.10:123/udp"]}"#),
        true,
    );
    assert_eq!(code, 200, "{set}");
    assert!(set["generation"].as_u64() > tenant["generation"].as_u64());
    let (_, shown) = coordinator.rest("GET", "/v1/tenants/rest-one", None, true);
    let entries: Vec<&str> = shown["egress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["entry"].as_str().unwrap())
        .collect();
    assert_eq!(entries, ["api.anthropic.com:443/tcp", "192.0.2.10:123/udp"]);
    let (code, bad) = coordinator.rest(
        "PUT",
        "/v1/tenants/rest-one/egress",
        Some(r#"{"egress": ["203.0.113.1:0"]}"#),
        true,
    );
    assert_eq!(code, 400, "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("egress[0].port"),
        "{bad}"
    );
    let (code, _) = coordinator.rest("DELETE", "/v1/tenants/rest-one", None, true);
    assert_eq!(code, 200);
    let (code, gone) = coordinator.rest("GET", "/v1/tenants/rest-one", None, true);
    assert_eq!((code, gone["code"].as_str()), (404, Some("NotFound")));
    let (code, _) = coordinator.rest("GET", "/v1/tenants/Bad..Id", None, true);
    assert_eq!(code, 400);
    // A compaction's plan: the idle host is given back for no move (the agent says it costs
    // 4.51 a month); a bad option names its field.
    let (code, plan) = coordinator.rest("POST", "/v1/compact", Some(r#"{"dry_run": true}"#), true);
    assert_eq!(code, 200, "{plan}");
    assert_eq!(
        (
            &plan["phase"],
            &plan["emptied"][0]["host_id"],
            &plan["saving"],
            &plan["moves"]
        ),
        (&"planned".into(), &"host-a".into(), &4.51.into(), &0.into()),
        "{plan}"
    );
    let (code, bad) = coordinator.rest(
        "POST",
        "/v1/compact",
        Some(r#"{"dry_run": true, "providers": ["gcp"]}"#),
        true,
    );
    assert_eq!(code, 400, "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("providers[0]"),
        "{bad}"
    );
    let (code, bad) = coordinator.rest("POST", "/v1/compact", Some(r#"{"headroom": 95}"#), true);
    assert_eq!(code, 400, "{bad}");
    assert_eq!(
        coordinator.host_state("host-a").as_deref(),
        Some("ready"),
        "nothing changed"
    );
    let (code, cordoned) = coordinator.rest("POST", "/v1/hosts/host-a/cordon", None, true);
    assert_eq!((code, cordoned["state"].as_str()), (200, Some("cordoned")));
}
