//! The README's two commands: CI runs exactly the test command, and the main-job command brings
//! up a coordinator and an enrolled agent, as a new user would see it.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The shell commands in the README's ```sh blocks under `heading`.
fn commands_under(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("README has no ## {heading}"));
    let mut out = Vec::new();
    let mut inside = false;
    for line in section.lines() {
        match (inside, line.trim()) {
            (false, "```sh") => inside = true,
            (true, "```") => inside = false,
            (true, l) if !l.is_empty() => out.push(l.to_string()),
            _ => {}
        }
    }
    out
}

#[test]
fn ci_runs_exactly_the_readme_test_command() {
    let test_command = commands_under("Run the tests");
    assert_eq!(test_command.len(), 1, "{test_command:?}");
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == test_command[0]),
        "CI runs exactly the README's test command {:?}",
        test_command[0]
    );
    let script = std::fs::read_to_string(repo().join("tests/run.sh")).unwrap();
    assert!(script.contains("BERTH_REQUIRE_REAL=1 cargo test --workspace"));
    assert_eq!(commands_under("Try it"), ["bash packaging/quickstart.sh"]);
}

#[test]
fn the_main_job_command_brings_up_a_coordinator_and_an_enrolled_agent() {
    if !berth_tests::is_root() {
        return berth_tests::missing_component("root", "the quickstart needs root");
    }
    let state = tempfile::tempdir().unwrap();
    let bin_dir = berth_tests::procs::bin("berth-coordinator")
        .parent()
        .unwrap()
        .to_path_buf();
    let out = Command::new("bash")
        .arg(repo().join("packaging/quickstart.sh"))
        .env("BERTH_BIN_DIR", &bin_dir)
        .env("BERTH_QUICKSTART_DIR", state.path())
        .env("BERTH_QUICKSTART_EXIT", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs = std::fs::read_to_string(state.path().join("coordinator.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "quickstart failed:\n{stdout}\n{stderr}\n{logs}"
    );
    assert!(
        stdout.contains("operator API (gRPC, TLS): https://127.0.0.1:7444"),
        "{stdout}"
    );
    let table = stdout
        .lines()
        .find(|l| l.starts_with("local-"))
        .unwrap_or_else(|| panic!("no host row:\n{stdout}"));
    assert!(table.contains(" ready "), "{table}");
    assert!(
        logs.contains("host enrolled"),
        "enrolled over the enrollment service"
    );
    assert!(
        logs.contains("agent session opened"),
        "the agent holds an mTLS session"
    );
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(
        !tables.contains("berth_quickstart"),
        "the quickstart removes its table when it stops: {tables}"
    );
    for listing in [&["ps", "-a"][..], &["network", "ls"]] {
        let left = Command::new("docker")
            .args(listing)
            .args(["-q", "--filter", "label=berth.tenant=sample"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&left.stdout).trim(),
            "",
            "the quickstart's sample tenant is gone when it stops ({listing:?})"
        );
    }
}
