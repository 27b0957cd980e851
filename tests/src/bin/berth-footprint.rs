//! Agent footprint benchmark: resident memory and CPU of `berth-agent` with N idle tenants on
//! the real Docker engine. `berth-footprint [--tenants 50] [--seconds 60] [--agent PATH]`;
//! prints JSON. It measures the agent as the packages ship it, built with the `agent` profile
//! (`target/agent/berth-agent`), unless `--agent` names another build.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use berth_tests::docker::test_tenant_image;
use berth_tests::procs::{AgentProc, CoordinatorProc};
use berth_tests::wait_for;

fn proc_field(pid: u32, file: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default()
}

fn rss_kib(pid: u32) -> u64 {
    proc_field(pid, "status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = proc_field(pid, "stat");
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
}

/// `target/agent/berth-agent`, beside this benchmark's own `target/<profile>/`.
fn shipped_agent() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let target = exe
        .parent()
        .and_then(|profile| profile.parent())
        .expect("target directory");
    target.join("agent").join("berth-agent")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(default)
    };
    let (tenants, seconds) = (arg("--tenants", 50) as usize, arg("--seconds", 60));
    let program = match args.iter().position(|a| a == "--agent") {
        Some(i) => PathBuf::from(args.get(i + 1).expect("--agent needs a path")),
        None => shipped_agent(),
    };
    assert!(
        program.is_file(),
        "{} is missing: build it with `cargo build --profile agent -p berth-node-agent --bin berth-agent`, or name another build with --agent",
        program.display()
    );
    berth_tests::docker::available().expect("a Docker engine");
    let image = test_tenant_image();
    let coordinator = CoordinatorProc::start(None, "");
    let host = format!("fp{}", std::process::id());
    let mut agent = AgentProc::enroll(&coordinator, &host, None);
    agent.program = program.clone();
    agent.start_with_docker(true);
    wait_for("the agent ready", Duration::from_secs(10), || {
        (coordinator.host_state(&host).as_deref() == Some("ready")).then_some(())
    });
    for i in 0..tenants {
        let spec = format!(
            "tenant_id = \"fp{i}-{host}\"\nimage = \"{image}\"\n[resources]\nmemory = \"64MiB\"\ncpu_millicores = 20\nvolume = \"64MiB\"\n[volume]\nencrypted = false\n"
        );
        let path = coordinator.dir.path().join(format!("t{i}.toml"));
        std::fs::write(&path, spec).unwrap();
        let (ok, _, err) = coordinator.berthctl(&["place", path.to_str().unwrap()]);
        assert!(ok, "{err}");
    }
    wait_for("every tenant running", Duration::from_secs(120), || {
        let (_, out, _) = coordinator.berthctl(&["tenants", "--json"]);
        (out.matches("\"state\": \"running\"").count() == tenants).then_some(())
    });
    // Let startup work settle, then measure idle enforcement.
    std::thread::sleep(Duration::from_secs(10));
    let pid = agent.pid().expect("agent pid");
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    let mut max_rss = 0;
    while t0.elapsed() < Duration::from_secs(seconds) {
        max_rss = max_rss.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(500));
    }
    let cpu_seconds = (cpu_ticks(pid) - c0) as f64 / 100.0;
    let cpu_percent = 100.0 * cpu_seconds / t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({ "agent_footprint": { "agent": program, "tenants": tenants, "seconds": seconds, "max_rss_mib": max_rss as f64 / 1024.0, "cpu_percent_of_one_core": cpu_percent } })
    );
}
