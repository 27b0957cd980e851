//! Looks for a secret where it must never be: in any process's argv or environment while an
//! operation runs, in files, in logs.
//!
//! The process scan records what it sees (each distinct argv and environment, per process)
//! and is searched afterwards, so it also works when the secret is only known at the end
//! (a key made by the coordinator and learned from its delivery).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// What one process showed: its name, argv and environment as raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sighting {
    pub pid: u32,
    pub comm: String,
    pub cmdline: Vec<u8>,
    pub environ: Vec<u8>,
}

/// Everything a [`ProcScan`] saw.
#[derive(Debug, Default)]
pub struct Sightings {
    /// How many full passes over /proc were made.
    pub passes: u64,
    pub seen: Vec<Sighting>,
}

impl Sightings {
    /// Processes whose argv or environment holds any of `needles`.
    pub fn holding(&self, needles: &[Vec<u8>]) -> Vec<String> {
        self.seen
            .iter()
            .filter(|s| {
                needles
                    .iter()
                    .any(|n| contains(&s.cmdline, n) || contains(&s.environ, n))
            })
            .map(|s| {
                format!(
                    "pid {} ({}): {}",
                    s.pid,
                    s.comm,
                    String::from_utf8_lossy(&s.cmdline)
                )
            })
            .collect()
    }

    /// How many distinct processes named `comm` were seen.
    pub fn count(&self, comm: &str) -> usize {
        let mut pids: Vec<u32> = self
            .seen
            .iter()
            .filter(|s| s.comm == comm)
            .map(|s| s.pid)
            .collect();
        pids.dedup();
        pids.len()
    }
}

/// Scans /proc in a loop on its own thread until [`ProcScan::finish`].
#[derive(Debug)]
pub struct ProcScan {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Sightings>,
}

impl ProcScan {
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut found: BTreeMap<(u32, Vec<u8>, Vec<u8>), String> = BTreeMap::new();
            let mut passes = 0;
            // One more pass after the stop, so the state at the end is seen too.
            loop {
                let last = flag.load(Ordering::Relaxed);
                for s in snapshot() {
                    found.entry((s.pid, s.cmdline, s.environ)).or_insert(s.comm);
                }
                passes += 1;
                if last {
                    break;
                }
            }
            Sightings {
                passes,
                seen: found
                    .into_iter()
                    .map(|((pid, cmdline, environ), comm)| Sighting {
                        pid,
                        comm,
                        cmdline,
                        environ,
                    })
                    .collect(),
            }
        });
        Self { stop, thread }
    }

    pub fn finish(self) -> Sightings {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the /proc scan thread")
    }
}

/// One pass over every process in /proc (processes that end meanwhile are skipped).
fn snapshot() -> Vec<Sighting> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let dir = e.path();
            Some(Sighting {
                pid,
                comm: std::fs::read_to_string(dir.join("comm"))
                    .ok()?
                    .trim()
                    .to_string(),
                cmdline: std::fs::read(dir.join("cmdline")).ok()?,
                environ: std::fs::read(dir.join("environ")).unwrap_or_default(),
            })
        })
        .collect()
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The forms a 32-byte key could be leaked in: raw, lowercase and uppercase hex, base64.
pub fn key_forms(key: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        key.to_vec(),
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(key)
            .into_bytes(),
    ]
}

/// Files under `dir` (recursively, not following links) that hold any of `needles`.
pub fn files_holding(dir: &Path, needles: &[Vec<u8>]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return hits;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            hits.extend(files_holding(&path, needles));
        } else if kind.is_file()
            && let Ok(bytes) = std::fs::read(&path)
            && needles.iter().any(|n| contains(&bytes, n))
        {
            hits.push(path);
        }
    }
    hits
}

/// Where in the file at `path` (a disk image: read in chunks, never whole) any of `needles`
/// occurs: (index of the needle, byte offset), in file order.
pub fn occurrences_in_file(path: &Path, needles: &[Vec<u8>]) -> std::io::Result<Vec<(usize, u64)>> {
    use std::io::Read;
    const CHUNK: usize = 16 << 20;
    let longest = needles.iter().map(Vec::len).max().unwrap_or(0);
    let mut starts = [false; 256];
    for n in needles.iter().filter(|n| !n.is_empty()) {
        starts[usize::from(n[0])] = true;
    }
    let mut file = std::fs::File::open(path)?;
    let mut hits = Vec::new();
    // The last `longest - 1` bytes of the previous chunk, then the new one.
    let mut window: Vec<u8> = Vec::with_capacity(CHUNK + longest);
    let mut window_at = 0u64;
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let read = file.read(&mut chunk)?;
        if read == 0 {
            break;
        }
        window.extend_from_slice(&chunk[..read]);
        for (i, &b) in window.iter().enumerate() {
            if !starts[usize::from(b)] {
                continue;
            }
            for (n, needle) in needles.iter().enumerate() {
                if !needle.is_empty() && window[i..].starts_with(needle) {
                    let at = window_at + i as u64;
                    if !hits.contains(&(n, at)) {
                        hits.push((n, at));
                    }
                }
            }
        }
        let keep = longest.saturating_sub(1).min(window.len());
        window_at += (window.len() - keep) as u64;
        window.drain(..window.len() - keep);
    }
    Ok(hits)
}
