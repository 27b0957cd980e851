//! Real Docker for tests: availability, the test tenant image (built `FROM scratch` from the
//! `berth-test-tenant` binary and the shared libraries it needs; no registry is reachable), and
//! `docker inspect`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::procs::{bin, run};

/// Whether a Docker engine answers; the error says why not.
pub fn available() -> Result<(), String> {
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .map_err(|e| format!("docker CLI: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn copy_with_path(file: &Path, context: &Path) {
    let target = context.join(file.strip_prefix("/").unwrap_or(file));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(file, &target).unwrap_or_else(|e| panic!("copy {}: {e}", file.display()));
}

/// Builds (once per test process) and returns the test tenant image's tag.
pub fn test_tenant_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let binary = bin("berth-test-tenant");
            let bytes = std::fs::read(&binary).unwrap();
            let tag = format!("berth-test-tenant:{:016x}", fxhash(&bytes));
            let (present, _, _) = run({
                let mut c = Command::new("docker");
                c.args(["image", "inspect", &tag]);
                c
            });
            if present {
                return tag;
            }
            let context = tempfile::tempdir().unwrap();
            std::fs::copy(&binary, context.path().join("berth-test-tenant")).unwrap();
            let ldd = Command::new("ldd").arg(&binary).output().expect("ldd");
            let mut libs: Vec<PathBuf> = String::from_utf8_lossy(&ldd.stdout)
                .lines()
                .filter_map(|l| {
                    l.split_whitespace()
                        .find(|w| w.starts_with('/'))
                        .map(PathBuf::from)
                })
                .collect();
            // ldd misses libgcc_s (loaded for unwinding when a thread panics).
            if let Some(gcc) = [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
            ]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            {
                libs.push(gcc);
            }
            for lib in &libs {
                copy_with_path(&std::fs::canonicalize(lib).unwrap(), context.path());
                if std::fs::canonicalize(lib).unwrap() != *lib {
                    // Keep the name the loader asks for.
                    let target = context.path().join(lib.strip_prefix("/").unwrap());
                    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                    let _ = std::fs::copy(lib, &target);
                }
            }
            std::fs::write(
                context.path().join("Dockerfile"),
                "FROM scratch\nCOPY . /\nUSER 65534:65534\nENTRYPOINT [\"/berth-test-tenant\"]\n",
            )
            .unwrap();
            let mut build = Command::new("docker");
            build
                .args(["build", "-q", "-t", &tag])
                .arg(context.path())
                .env("DOCKER_BUILDKIT", "0");
            let (ok, _, err) = run(build);
            assert!(ok, "docker build of the test tenant image failed: {err}");
            tag
        })
        .clone()
}

fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// The name of `tenant`'s container on `host`.
pub fn container_name(host: &str, tenant: &str) -> String {
    berth_node_agent::runtime::container_spec::container_name(
        &berth_shared::ids::HostId::new(host).expect("a host id"),
        &berth_shared::ids::TenantId::new(tenant).expect("a tenant id"),
    )
}

/// `docker container inspect`, parsed.
pub fn inspect(container: &str) -> Option<serde_json::Value> {
    inspect_kind("container", container)
}

/// When the container last started (Docker's `State.StartedAt`); empty if it does not exist.
pub fn started_at(container: &str) -> String {
    inspect(container)
        .and_then(|c| c["State"]["StartedAt"].as_str().map(String::from))
        .unwrap_or_default()
}

/// `docker network inspect`, parsed.
pub fn inspect_network(network: &str) -> Option<serde_json::Value> {
    inspect_kind("network", network)
}

fn inspect_kind(kind: &str, what: &str) -> Option<serde_json::Value> {
    let out = Command::new("docker")
        .args([kind, "inspect", what])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v[0].take())
}

/// Removes every container and network labelled for `host` (test cleanup).
pub fn remove_host_objects(host: &str) {
    let filter = format!("label=berth.host={host}");
    if let Ok(out) = Command::new("docker")
        .args(["ps", "-aq", "--filter", &filter])
        .output()
    {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
    if let Ok(out) = Command::new("docker")
        .args(["network", "ls", "-q", "--filter", &filter])
        .output()
    {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("docker").args(["network", "rm", id]).output();
        }
    }
}
