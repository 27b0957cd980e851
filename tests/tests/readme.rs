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

/// `docker inspect` of the sample tenant's container: whether it is running (`None` once
/// it is gone).
fn running(container: &str) -> Option<bool> {
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Running}}", container])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim() == "true")
}

fn quickstart_table() -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "table", "inet", "berth_quickstart"])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The quickstart in a terminal, as a new user runs it: up with an enrolled agent and the
/// sample tenant; then Ctrl-C (SIGINT to the terminal's whole foreground process group), after
/// which no container, network or table of it remains, and at no moment in between does the
/// container run without its rules.
#[test]
fn the_main_job_command_brings_up_a_coordinator_and_an_enrolled_agent_and_ctrl_c_removes_all() {
    if !berth_tests::is_root() {
        return berth_tests::missing_component("root", "the quickstart needs root");
    }
    let state = tempfile::tempdir().unwrap();
    let bin_dir = berth_tests::procs::bin("berth-coordinator")
        .parent()
        .unwrap()
        .to_path_buf();
    // util-linux `script` gives the quickstart a pseudo-terminal; a 0x03 written to it is the
    // terminal's Ctrl-C. `script` runs the command through `$SHELL -c`; `exec` leaves bash
    // alone in the foreground, as when a user types the command (dash would stay as its parent
    // and die of the Ctrl-C itself, with status 130, before the quickstart's cleanup ends).
    let command = format!(
        "exec bash {}",
        repo().join("packaging/quickstart.sh").display()
    );
    let mut terminal = Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .env("SHELL", "/bin/sh")
        .env("BERTH_BIN_DIR", &bin_dir)
        .env("BERTH_QUICKSTART_DIR", state.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = terminal.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut shown = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    while !shown.contains("Ctrl-C stops both.") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                shown.push_str(&line);
                shown.push('\n');
            }
            Err(_) => {
                let _ = terminal.kill();
                let logs = std::fs::read_to_string(state.path().join("coordinator.log"))
                    .unwrap_or_default();
                panic!("the quickstart did not come up:\n{shown}\n{logs}");
            }
        }
    }
    let logs = std::fs::read_to_string(state.path().join("coordinator.log")).unwrap_or_default();
    assert!(
        shown.contains("operator API (gRPC, TLS): https://127.0.0.1:7444"),
        "{shown}"
    );
    let table = shown
        .lines()
        .find(|l| l.starts_with("local-"))
        .unwrap_or_else(|| panic!("no host row:\n{shown}"));
    assert!(table.contains(" ready "), "{table}");
    assert!(
        logs.contains("host enrolled"),
        "enrolled over the enrollment service"
    );
    assert!(
        logs.contains("agent session opened"),
        "the agent holds an mTLS session"
    );
    let ps = Command::new("docker")
        .args(["ps", "-q", "--filter", "label=berth.tenant=sample"])
        .output()
        .unwrap();
    let container = String::from_utf8_lossy(&ps.stdout).trim().to_string();
    assert!(!container.is_empty(), "the sample tenant runs:\n{shown}");
    assert_eq!(running(&container), Some(true));
    assert!(quickstart_table().is_some(), "its rules are in force");
    assert_eq!(
        std::fs::metadata(state.path().join("volumes/volumes/sample.ext4"))
            .map(|m| m.len())
            .ok(),
        Some(256 << 20),
        "its volume is an image of its size under the quickstart's directory"
    );

    // Ctrl-C, watched: while the container runs, its table must be there.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (container, stop) = (container.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut samples, mut unfenced) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // The table first: a container seen running after its table was seen missing
                // ran unfenced at that moment.
                let table = quickstart_table().is_some();
                let state = running(&container);
                samples += 1;
                if state == Some(true) && !table {
                    unfenced.push(samples);
                }
                if state.is_none() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            (samples, unfenced)
        })
    };
    use std::io::Write;
    let mut keys = terminal.stdin.take().unwrap();
    keys.write_all(b"\x03").unwrap();
    keys.flush().unwrap();
    let exited = berth_tests::wait_for(
        "the quickstart to stop after Ctrl-C",
        std::time::Duration::from_secs(60),
        || terminal.try_wait().unwrap(),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, unfenced) = watcher.join().unwrap();
    drop(keys);
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(exited.success(), "exit {exited}:\n{}", rest.join("\n"));
    assert!(samples > 1, "the teardown was watched ({samples} samples)");
    assert!(
        unfenced.is_empty(),
        "the container ran without its rules at samples {unfenced:?}"
    );
    assert_eq!(running(&container), None, "the container is gone");
    assert!(
        quickstart_table().is_none(),
        "the quickstart removes its table when it stops"
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
    // Its volume purged: nothing mounted or kept under the quickstart's directory.
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&state.path().display().to_string()),
        "no volume left mounted"
    );
    assert!(
        !state.path().join("volumes/volumes/sample.ext4").exists(),
        "the sample's volume is purged"
    );
    // Both daemons stopped with it.
    let left = Command::new("pgrep")
        .args(["-f", &state.path().display().to_string()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "",
        "no daemon left"
    );
}
