//! Per-container memory and CPU figures from the cgroup filesystem, v1 and v2, with the cgroup
//! root as a parameter (tests use fixture trees).
//!
//! v1 (cgroupfs driver): `<root>/memory/docker/<id>/memory.{usage,limit}_in_bytes`, OOM kills
//! from `memory.oom_control`, CPU time from `<root>/cpuacct/docker/<id>/cpuacct.usage`. v2:
//! `<root>/system.slice/docker-<id>.scope/` (systemd driver) or `<root>/docker/<id>/` (cgroupfs
//! driver): `memory.current`, `memory.max`, `memory.events`, `cpu.stat`'s `usage_usec`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use berth_shared::host::CgroupVersion;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryFigures {
    pub used_bytes: u64,
    /// `None` when unlimited.
    pub cap_bytes: Option<u64>,
    pub oom_kills: u64,
}

#[derive(Debug, Clone)]
pub struct CgroupReader {
    root: PathBuf,
    version: CgroupVersion,
    /// Each container's CPU time at its last read, and when: a CPU figure is a rate.
    cpu_samples: Arc<Mutex<HashMap<String, (u64, Instant)>>>,
}

/// Containers whose last CPU read is kept (more: the oldest reads are forgotten).
const CPU_SAMPLES: usize = 4_096;

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `key value` lines (memory.events, memory.oom_control).
fn keyed(path: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

impl CgroupReader {
    pub fn new(root: &Path, version: CgroupVersion) -> Self {
        Self {
            root: root.to_path_buf(),
            version,
            cpu_samples: Arc::default(),
        }
    }

    /// The CPU time the container used so far, in nanoseconds.
    pub fn cpu_usage_ns(&self, container_id: &str) -> Option<u64> {
        if container_id.is_empty() || !container_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        match self.version {
            CgroupVersion::V1 => read_u64(
                &self
                    .root
                    .join("cpuacct/docker")
                    .join(container_id)
                    .join("cpuacct.usage"),
            ),
            CgroupVersion::V2 => keyed(&self.dir(container_id)?.join("cpu.stat"), "usage_usec ")
                .map(|us| us.saturating_mul(1000)),
        }
    }

    /// The CPU the container used since the previous call for it, in millicores (1,000 a
    /// core); `None` at the first call, or when its cgroup is not there.
    pub fn cpu_millicores(&self, container_id: &str) -> Option<u32> {
        self.cpu_millicores_at(container_id, Instant::now())
    }

    fn cpu_millicores_at(&self, container_id: &str, now: Instant) -> Option<u32> {
        let used = self.cpu_usage_ns(container_id)?;
        let mut samples = self.cpu_samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() >= CPU_SAMPLES && !samples.contains_key(container_id) {
            let oldest = samples
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                samples.remove(&oldest);
            }
        }
        let (before, then) = samples.insert(container_id.to_string(), (used, now))?;
        let wall = now.checked_duration_since(then)?.as_nanos();
        // A restarted container starts its count again: no figure for that interval.
        let spent = u128::from(used.checked_sub(before)?);
        (wall > 0).then(|| u32::try_from(spent * 1000 / wall).unwrap_or(u32::MAX))
    }

    fn dir(&self, container_id: &str) -> Option<PathBuf> {
        let candidates = match self.version {
            CgroupVersion::V1 => vec![self.root.join("memory/docker").join(container_id)],
            CgroupVersion::V2 => vec![
                self.root
                    .join("system.slice")
                    .join(format!("docker-{container_id}.scope")),
                self.root.join("docker").join(container_id),
            ],
        };
        candidates.into_iter().find(|d| d.is_dir())
    }

    /// The container's memory figures, or `None` when its cgroup is not there (not running).
    pub fn memory(&self, container_id: &str) -> Option<MemoryFigures> {
        // Container ids are hex; anything else never reaches the filesystem.
        if container_id.is_empty() || !container_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let dir = self.dir(container_id)?;
        Some(match self.version {
            CgroupVersion::V1 => MemoryFigures {
                used_bytes: read_u64(&dir.join("memory.usage_in_bytes"))?,
                // v1 reports "unlimited" as a huge page-aligned number.
                cap_bytes: read_u64(&dir.join("memory.limit_in_bytes")).filter(|l| *l < (1 << 62)),
                oom_kills: keyed(&dir.join("memory.oom_control"), "oom_kill ").unwrap_or(0),
            },
            CgroupVersion::V2 => MemoryFigures {
                used_bytes: read_u64(&dir.join("memory.current"))?,
                cap_bytes: read_u64(&dir.join("memory.max")),
                oom_kills: keyed(&dir.join("memory.events"), "oom_kill ").unwrap_or(0),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const ID: &str = "0123456789abcdef";

    #[test]
    fn v1_fixture() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("memory/docker").join(ID);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("memory.usage_in_bytes"), "1048576\n").unwrap();
        fs::write(dir.join("memory.limit_in_bytes"), "268435456\n").unwrap();
        fs::write(
            dir.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        let r = CgroupReader::new(root.path(), CgroupVersion::V1);
        assert_eq!(
            r.memory(ID),
            Some(MemoryFigures {
                used_bytes: 1 << 20,
                cap_bytes: Some(256 << 20),
                oom_kills: 2
            })
        );
        fs::write(dir.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(r.memory(ID).unwrap().cap_bytes, None, "unlimited");
        assert_eq!(r.memory("not-hex/../x"), None);
        assert_eq!(r.memory("fedcba"), None, "no such cgroup");
    }

    #[test]
    fn cpu_use_is_the_rate_between_two_reads_on_v1_and_v2() {
        let v1 = tempfile::tempdir().unwrap();
        let v1_dir = v1.path().join("cpuacct/docker").join(ID);
        fs::create_dir_all(&v1_dir).unwrap();
        let v2 = tempfile::tempdir().unwrap();
        let v2_dir = v2.path().join("docker").join(ID);
        fs::create_dir_all(&v2_dir).unwrap();
        let readers = [
            (
                CgroupReader::new(v1.path(), CgroupVersion::V1),
                Box::new(move |ns: u64| {
                    fs::write(v1_dir.join("cpuacct.usage"), format!("{ns}\n")).unwrap()
                }) as Box<dyn Fn(u64)>,
            ),
            (
                CgroupReader::new(v2.path(), CgroupVersion::V2),
                Box::new(move |ns: u64| {
                    fs::write(
                        v2_dir.join("cpu.stat"),
                        format!("usage_usec {}\nuser_usec 0\nsystem_usec 0\n", ns / 1000),
                    )
                    .unwrap()
                }),
            ),
        ];
        for (reader, set) in readers {
            let start = Instant::now();
            set(5_000_000_000);
            assert_eq!(reader.cpu_usage_ns(ID), Some(5_000_000_000));
            assert_eq!(reader.cpu_millicores_at(ID, start), None, "a first read");
            // 3 s of CPU in 2 s: a core and a half.
            set(8_000_000_000);
            let later = start + std::time::Duration::from_secs(2);
            assert_eq!(reader.cpu_millicores_at(ID, later), Some(1_500));
            // Restarted: its count starts again, no figure for that interval.
            set(1_000_000);
            let after = later + std::time::Duration::from_secs(1);
            assert_eq!(reader.cpu_millicores_at(ID, after), None);
            assert_eq!(reader.cpu_usage_ns("not-hex/.."), None);
            assert_eq!(reader.cpu_usage_ns("abcdef"), None, "no such cgroup");
        }
    }

    #[test]
    fn v2_fixture_both_drivers() {
        for systemd in [true, false] {
            let root = tempfile::tempdir().unwrap();
            let dir = if systemd {
                root.path().join(format!("system.slice/docker-{ID}.scope"))
            } else {
                root.path().join("docker").join(ID)
            };
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("memory.current"), "4096\n").unwrap();
            fs::write(dir.join("memory.max"), "max\n").unwrap();
            fs::write(
                dir.join("memory.events"),
                "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
            )
            .unwrap();
            let r = CgroupReader::new(root.path(), CgroupVersion::V2);
            assert_eq!(
                r.memory(ID),
                Some(MemoryFigures {
                    used_bytes: 4096,
                    cap_bytes: None,
                    oom_kills: 1
                })
            );
            fs::write(dir.join("memory.max"), "1073741824\n").unwrap();
            assert_eq!(r.memory(ID).unwrap().cap_bytes, Some(1 << 30));
        }
    }
}
