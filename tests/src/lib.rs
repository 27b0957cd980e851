//! Harness for berth's cross-process tests: real `berth-coordinator`, `berth-agent` and
//! `berthctl` processes, optionally each in its own network namespace.
//!
//! Ensures: a test that cannot get a real component fails when `BERTH_REQUIRE_REAL=1` instead
//! of passing silently; every process, namespace and temp directory a test made is removed
//! when the test ends; logs of the processes are printed when a test fails.

pub mod clients;
pub mod debroot;
pub mod docker;
pub mod etcd;
pub mod fleet;
pub mod keyscan;
pub mod multihost;
pub mod netns;
pub mod procs;
pub mod vm;
pub mod vmhost;

/// openssl's arguments for a new P-256 key (`req -newkey`): what every test certificate uses.
pub const OPENSSL_NEW_EC_KEY: [&str; 4] =
    ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

/// True when the README's test command runs us: missing components are failures.
pub fn require_real() -> bool {
    std::env::var("BERTH_REQUIRE_REAL").is_ok_and(|v| v == "1")
}

/// Call when a real component is missing. Panics under `BERTH_REQUIRE_REAL=1`; otherwise
/// prints why the test is skipped and returns, so the caller returns too.
pub fn missing_component(component: &str, why: &str) {
    assert!(
        !require_real(),
        "{component} is required (BERTH_REQUIRE_REAL=1) but unavailable: {why}"
    );
    eprintln!("SKIPPED: {component} unavailable: {why}");
}

/// Runs a `curl` command given `-sS -w "\n%{http_code}"` (added here): (HTTP status, body).
/// A curl that fails to talk HTTP at all fails the test, saying why.
pub fn curl_status(mut curl: std::process::Command) -> (u16, String) {
    curl.args(["-sS", "-w", "\n%{http_code}"]);
    let out = curl.output().expect("curl (the test command installs it)");
    assert!(
        out.status.success(),
        "{curl:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.trim()));
    (
        code.trim().parse().expect("an HTTP status"),
        body.to_string(),
    )
}

/// Whether we run as root (namespaces, nft, docker need it).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
