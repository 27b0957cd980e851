//! What the agent learns about its host: measured figures (sysinfo) and capabilities probed
//! from the filesystem and the tools present. Every probe takes its root paths as parameters so
//! tests run on fixture trees.

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_shared::host::CgroupVersion;
use berth_shared::proto;

use crate::command::run_command;
use crate::config::AgentConfig;

/// Where the probes look. Production uses the real roots; tests point them at fixtures.
#[derive(Debug, Clone)]
pub struct ProbeRoots {
    pub cgroup: PathBuf,
    pub proc: PathBuf,
    pub sys: PathBuf,
    pub dev: PathBuf,
    pub modules: PathBuf,
}

impl ProbeRoots {
    pub fn system(cgroup_root: &Path) -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Self {
            cgroup: cgroup_root.to_path_buf(),
            proc: "/proc".into(),
            sys: "/sys".into(),
            dev: "/dev".into(),
            modules: Path::new("/lib/modules").join(release.trim()),
        }
    }
}

/// cgroup v2 when the unified hierarchy is mounted at the root, v1 when a memory controller
/// directory is there.
pub fn probe_cgroup(roots: &ProbeRoots) -> Option<CgroupVersion> {
    if roots.cgroup.join("cgroup.controllers").is_file() {
        Some(CgroupVersion::V2)
    } else if roots.cgroup.join("memory").is_dir() {
        Some(CgroupVersion::V1)
    } else {
        None
    }
}

/// dm-crypt is usable when the kernel has device-mapper (its control node and an entry in
/// /proc/misc) and the crypt target is loaded or loadable as a module.
pub fn probe_dm_crypt(roots: &ProbeRoots) -> bool {
    let misc = std::fs::read_to_string(roots.proc.join("misc")).unwrap_or_default();
    let device_mapper = roots.dev.join("mapper/control").exists()
        && misc
            .lines()
            .any(|l| l.trim_end().ends_with("device-mapper"));
    if !device_mapper {
        return false;
    }
    if roots.sys.join("module/dm_crypt").exists() {
        return true;
    }
    let module_dir = roots.modules.join("kernel/drivers/md");
    std::fs::read_dir(module_dir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("dm-crypt.ko"))
        })
        .unwrap_or(false)
}

/// The nft binary's version, when it runs.
pub fn probe_nft() -> Option<String> {
    let out = run_command("nft", &["--version"], Duration::from_secs(3)).ok()?;
    Some(out.trim().to_string())
}

/// The Docker engine's version, when one answers on `socket`.
pub async fn probe_docker(socket: &Path) -> Option<String> {
    let docker = bollard::Docker::connect_with_socket(
        &socket.to_string_lossy(),
        3,
        bollard::API_DEFAULT_VERSION,
    )
    .ok()?;
    let version = tokio::time::timeout(Duration::from_secs(3), docker.version())
        .await
        .ok()?
        .ok()?;
    version.version
}

/// Memory and disk figures, refreshed for every report.
#[derive(Debug)]
pub struct Meter {
    system: Option<sysinfo::System>,
    state_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_available_bytes: u64,
}

impl Meter {
    pub fn new(state_dir: &Path) -> Self {
        let system = sysinfo::System::new()
            .map_err(|e| tracing::error!(error = %e, "cannot read memory figures"))
            .ok();
        Self {
            system,
            state_dir: state_dir.to_path_buf(),
        }
    }

    pub fn measure(&mut self) -> Measured {
        if let Some(system) = &mut self.system {
            system.refresh_memory();
        }
        // The filesystem holding the state directory, asked directly: a mount table can miss it
        // (in a chroot or a container the table lists only what is mounted below the root).
        let disk = nix::sys::statvfs::statvfs(&self.state_dir)
            .map_err(|e| tracing::warn!(path = %self.state_dir.display(), error = %e, "cannot read disk figures"))
            .ok()
            .map(|v| {
                let unit = v.fragment_size();
                (v.blocks() * unit, v.blocks_available() * unit)
            });
        Measured {
            memory_total_bytes: self.system.as_ref().map(|s| s.total_memory()).unwrap_or(0),
            memory_available_bytes: self
                .system
                .as_ref()
                .map(|s| s.available_memory())
                .unwrap_or(0),
            disk_total_bytes: disk.map_or(0, |d| d.0),
            disk_available_bytes: disk.map_or(0, |d| d.1),
        }
    }
}

/// Everything for the hello: configured facts, measured figures, probed capabilities.
pub async fn host_facts(config: &AgentConfig, meter: &mut Meter) -> proto::HostFacts {
    let measured = meter.measure();
    let roots = ProbeRoots::system(&config.cgroup_root);
    let nft = tokio::task::spawn_blocking(probe_nft).await.ok().flatten();
    let cgroup = probe_cgroup(&roots);
    proto::HostFacts {
        provider: config.provider.as_str().into(),
        region: config.region.clone(),
        instance_type: config.instance_type.clone(),
        labels: config.labels.clone().into_iter().collect(),
        memory_total_bytes: measured.memory_total_bytes,
        memory_available_bytes: measured.memory_available_bytes,
        cpu_count: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        disk_total_bytes: measured.disk_total_bytes,
        disk_available_bytes: measured.disk_available_bytes,
        memory_reserved_bytes: config
            .memory_reserved_bytes
            .min(measured.memory_total_bytes.saturating_sub(1)),
        monthly_cost_cents: config.monthly_cost_cents,
        cpu_overcommit_percent: config.cpu_overcommit_percent,
        currency: config.currency.clone(),
        capabilities: Some(proto::Capabilities {
            cgroup_version: match cgroup {
                None => proto::CgroupVersion::Unspecified,
                Some(CgroupVersion::V1) => proto::CgroupVersion::V1,
                Some(CgroupVersion::V2) => proto::CgroupVersion::V2,
            } as i32,
            dm_crypt: probe_dm_crypt(&roots),
            nftables: nft.is_some(),
            nft_version: nft.unwrap_or_default(),
            docker_version: probe_docker(&config.docker_socket)
                .await
                .unwrap_or_default(),
        }),
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        kernel_version: sysinfo::System::kernel_version().unwrap_or_default(),
        os_version: sysinfo::System::long_os_version().unwrap_or_default(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn fixture() -> (tempfile::TempDir, ProbeRoots) {
        let dir = tempfile::tempdir().unwrap();
        let roots = ProbeRoots {
            cgroup: dir.path().join("cgroup"),
            proc: dir.path().join("proc"),
            sys: dir.path().join("sys"),
            dev: dir.path().join("dev"),
            modules: dir.path().join("modules"),
        };
        for d in [
            &roots.cgroup,
            &roots.proc,
            &roots.sys,
            &roots.dev,
            &roots.modules,
        ] {
            fs::create_dir_all(d).unwrap();
        }
        (dir, roots)
    }

    #[test]
    fn cgroup_versions() {
        let (_d, roots) = fixture();
        assert_eq!(probe_cgroup(&roots), None);
        fs::create_dir(roots.cgroup.join("memory")).unwrap();
        assert_eq!(probe_cgroup(&roots), Some(CgroupVersion::V1));
        fs::write(roots.cgroup.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert_eq!(probe_cgroup(&roots), Some(CgroupVersion::V2));
    }

    #[test]
    fn dm_crypt_needs_device_mapper_and_the_crypt_target() {
        let (_d, roots) = fixture();
        fs::write(roots.proc.join("misc"), "229 fuse\n").unwrap();
        assert!(
            !probe_dm_crypt(&roots),
            "no device-mapper: like this build machine's kernel"
        );
        fs::create_dir_all(roots.dev.join("mapper")).unwrap();
        fs::write(roots.dev.join("mapper/control"), "").unwrap();
        fs::write(roots.proc.join("misc"), "229 fuse\n236 device-mapper\n").unwrap();
        assert!(
            !probe_dm_crypt(&roots),
            "device-mapper without the crypt target"
        );
        fs::create_dir_all(roots.modules.join("kernel/drivers/md")).unwrap();
        fs::write(roots.modules.join("kernel/drivers/md/dm-crypt.ko.xz"), "").unwrap();
        assert!(probe_dm_crypt(&roots), "loadable module");
        fs::remove_file(roots.modules.join("kernel/drivers/md/dm-crypt.ko.xz")).unwrap();
        fs::create_dir_all(roots.sys.join("module/dm_crypt")).unwrap();
        assert!(probe_dm_crypt(&roots), "loaded module");
    }

    #[test]
    fn meter_reads_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let measured = Meter::new(dir.path()).measure();
        assert!(measured.memory_total_bytes > 0);
        assert!(measured.memory_available_bytes <= measured.memory_total_bytes);
        assert!(
            measured.disk_total_bytes > 0,
            "the temp dir sits on some disk"
        );
    }
}
