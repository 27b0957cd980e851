//! Per-container memory figures from the cgroup filesystem, v1 and v2, with the cgroup root as
//! a parameter (tests use fixture trees).
//!
//! v1 (cgroupfs driver): `<root>/memory/docker/<id>/memory.{usage,limit}_in_bytes`, OOM kills
//! from `memory.oom_control`. v2: `<root>/system.slice/docker-<id>.scope/` (systemd driver) or
//! `<root>/docker/<id>/` (cgroupfs driver): `memory.current`, `memory.max`, `memory.events`.

use std::path::{Path, PathBuf};

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
}

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
        }
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
