//! Invariant 7: bad input (config files, CLI arguments, ids) gets a precise one-line error
//! naming the field, a non-zero exit, and changes nothing.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use berth_coordinator::registry::Registry;
use berth_shared::clock::SystemClock;
use berth_shared::store::SledStore;
use berth_tests::procs::{bin, run};

fn one_line_error(out: (bool, String, String), expected: &[&str]) {
    let (ok, stdout, stderr) = out;
    assert!(!ok, "should fail: {stdout}");
    let err = stderr.trim();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for e in expected {
        assert!(err.contains(e), "{err:?} should contain {e:?}");
    }
}

fn coordinator(state: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(bin("berth-coordinator"));
    cmd.arg("--state-dir").arg(state).args(args);
    run(cmd)
}

#[test]
fn bad_host_ids_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (ok, _, err) = coordinator(&state, &["ca", "init"]);
    assert!(ok, "{err}");
    let long = "a".repeat(64);
    for (bad, reason) in [
        ("Host-A", "must start with a lowercase letter"),
        ("host-A", "must be lowercase"),
        ("a/b", "may contain only"),
        ("..", "must start with a lowercase letter"),
        ("", "must not be empty"),
        (long.as_str(), "at most 63 characters"),
    ] {
        one_line_error(
            coordinator(&state, &["token", "create", "--host-id", bad]),
            &["--host-id", "invalid host id", reason],
        );
        one_line_error(
            coordinator(&state, &["revoke", "--host-id", bad]),
            &["--host-id", "invalid host id"],
        );
    }
    one_line_error(
        coordinator(
            &state,
            &["token", "create", "--host-id", "ok", "--ttl", "0s"],
        ),
        &["invalid --ttl"],
    );
    one_line_error(
        coordinator(&state, &["operator-token", "create", "--name", "Bad Name"]),
        &["--name", "invalid operator name"],
    );
    // Nothing reached the store (it may not even exist yet).
    if state.join("db").exists() {
        let registry = Registry::new(
            Arc::new(SledStore::open(&state.join("db")).unwrap()),
            Arc::new(SystemClock),
        );
        assert!(
            registry.counts().unwrap().values().all(|n| *n == 0),
            "{:?}",
            registry.counts()
        );
    }
    // A second `ca init` never overwrites the fleet CA.
    let before = std::fs::read(state.join("ca/ca.key")).unwrap();
    one_line_error(coordinator(&state, &["ca", "init"]), &["already exists"]);
    assert_eq!(std::fs::read(state.join("ca/ca.key")).unwrap(), before);
}

#[test]
fn malformed_coordinator_configs_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        ("down_afterr = \"1s\"", "unknown field `down_afterr`"),
        ("down_after = \"soon\"", "invalid down_after \"soon\""),
        ("agent_listen = \"everywhere\"", "agent_listen"),
        ("report_interval = 5", "report_interval"),
        ("\u{7}\u{0}[[[", "coordinator.toml"),
    ] {
        let path = dir.path().join("coordinator.toml");
        std::fs::write(&path, text).unwrap();
        let mut cmd = Command::new(bin("berth-coordinator"));
        cmd.arg("--config").arg(&path).args(["ca", "init"]);
        one_line_error(run(cmd), &["coordinator.toml", expected]);
        assert!(!dir.path().join("var").exists());
    }
}

#[test]
fn malformed_agent_configs_and_arguments_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    for (text, expected) in [
        (
            "provider = \"gcp\"\nregion = \"x\"",
            "invalid provider: unknown provider \"gcp\"",
        ),
        ("provider = \"aws\"", "missing field `region`"),
        (
            "provider = \"aws\"\nregion = \"x\"\nmemory_reserved = \"a lot\"",
            "invalid memory_reserved",
        ),
        (
            "provider = \"aws\"\nregion = \"x\"\nstate_dirr = \"/tmp\"",
            "unknown field `state_dirr`",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let mut cmd = Command::new(bin("berth-agent"));
        cmd.arg("run").arg("--config").arg(&path);
        one_line_error(run(cmd), &["agent.toml", expected]);
    }
    // A valid config but no enrollment: says what to do.
    std::fs::write(
        &path,
        format!(
            "state_dir = {:?}\nprovider = \"aws\"\nregion = \"eu-central-1\"\n",
            dir.path().join("none").display().to_string()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("berth-agent"));
    cmd.arg("run").arg("--config").arg(&path);
    one_line_error(run(cmd), &["not enrolled", "berth-agent enroll"]);

    let enroll = |coordinator: &str, fingerprint: &str| {
        let mut cmd = Command::new(bin("berth-agent"));
        cmd.args([
            "enroll",
            "--coordinator",
            coordinator,
            "--token",
            "bte_x",
            "--ca-fingerprint",
            fingerprint,
        ])
        .arg("--state-dir")
        .arg(dir.path().join("enroll"));
        run(cmd)
    };
    let fp = format!("sha256:{}", "00".repeat(32));
    one_line_error(
        enroll("http://127.0.0.1:1", &fp),
        &["invalid --coordinator", "https://"],
    );
    one_line_error(
        enroll("https://127.0.0.1", &fp),
        &["invalid --coordinator", "missing port"],
    );
    one_line_error(
        enroll("https://127.0.0.1:1", "sha1:abc"),
        &["--ca-fingerprint"],
    );
    assert!(!dir.path().join("enroll").exists(), "nothing written");
}

#[test]
fn berthctl_refuses_unusable_arguments() {
    let mut cmd = Command::new(bin("berthctl"));
    cmd.args([
        "--coordinator",
        "ftp://x:1",
        "--ca-fingerprint",
        &"00".repeat(32),
        "hosts",
    ])
    .env("BERTH_TOKEN", "t");
    one_line_error(run(cmd), &["invalid --coordinator"]);
    let mut cmd = Command::new(bin("berthctl"));
    cmd.args(["--coordinator", "https://127.0.0.1:1", "hosts"])
        .env_remove("BERTH_CA_CERT")
        .env_remove("BERTH_CA_FINGERPRINT");
    one_line_error(run(cmd), &["--ca-cert", "--ca-fingerprint"]);
    let mut cmd = Command::new(bin("berthctl"));
    cmd.args([
        "--coordinator",
        "https://127.0.0.1:1",
        "--ca-fingerprint",
        &"00".repeat(32),
        "hosts",
    ])
    .env_remove("BERTH_TOKEN")
    .env_remove("BERTH_TOKEN_FILE");
    one_line_error(run(cmd), &["no operator credential"]);
}
