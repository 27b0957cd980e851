//! A throwaway Debian 12 root for package tests: a copy of the root the test command made with
//! debootstrap, with /proc, /sys, /dev and the host's Docker socket bound in, so packages are
//! installed with dpkg and their daemons run from the installed files (in a chroot, sharing the
//! host's network and Docker engine). Dropping it kills what it started and unmounts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use tempfile::TempDir;

/// Where the test command keeps its debootstrap root.
pub fn cached_root() -> PathBuf {
    std::env::var_os("BERTH_DEBIAN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/berth-test/bookworm"))
}

/// The packages the test command built (`target/packages`).
pub fn packages_dir() -> PathBuf {
    let bin = crate::procs::bin("berth-agent");
    bin.parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join("packages")
}

#[derive(Debug)]
pub struct DebianRoot {
    /// `None` once leaked (a mount could not be undone).
    dir: Option<TempDir>,
    mounts: Vec<PathBuf>,
    /// Directories bound in at their own path: what is mounted under them is unmounted first.
    shared: Vec<PathBuf>,
    children: std::sync::Mutex<Vec<Child>>,
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl DebianRoot {
    /// A fresh copy of the cached root; `Err` says why there is none.
    pub fn new() -> Result<Self, String> {
        let cached = cached_root();
        if !cached.join("usr/bin/dpkg").exists() {
            return Err(format!(
                "no Debian root at {} (the test command makes it with debootstrap)",
                cached.display()
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("berth-debroot")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let root = dir.path().join("root");
        run_ok(Command::new("cp").arg("-a").arg(&cached).arg(&root));
        let mut me = Self {
            dir: Some(dir),
            mounts: Vec::new(),
            shared: Vec::new(),
            children: Default::default(),
        };
        for (what, ro) in [("/proc", false), ("/sys", true), ("/dev", false)] {
            me.bind(what, what, ro);
        }
        let socket = me.path("/run/docker.sock");
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        std::fs::write(&socket, b"").unwrap();
        me.bind("/var/run/docker.sock", "/run/docker.sock", false);
        Ok(me)
    }

    fn bind(&mut self, source: &str, inside: &str, read_only: bool) {
        let target = self.path(inside);
        let mut cmd = Command::new("mount");
        cmd.arg("--bind");
        if read_only {
            cmd.arg("-o").arg("ro");
        }
        run_ok(cmd.arg(source).arg(&target));
        self.mounts.push(target);
    }

    /// A directory at the same absolute path on the host and in the root (a host directory
    /// bound in): a path a program in the root hands to the host's Docker engine, such as a
    /// volume root, means the same files to both, so the test sees what a tenant sees.
    pub fn shared_dir(&mut self) -> PathBuf {
        let host = self.dir.as_ref().expect("the root").path().join("shared");
        std::fs::create_dir_all(&host).unwrap();
        let inside = host.to_string_lossy().into_owned();
        std::fs::create_dir_all(self.path(&inside)).unwrap();
        self.bind(&inside, &inside, false);
        self.shared.push(host.clone());
        host
    }

    fn root(&self) -> PathBuf {
        self.dir.as_ref().expect("the root").path().join("root")
    }

    /// `inside` (an absolute path in the root) as a path on the host.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    /// A command run in the root.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("chroot");
        cmd.arg(self.root()).arg(program);
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        cmd
    }

    /// Runs `args` in the root; panics with its output when it fails; returns stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..]);
        run_ok(&mut cmd)
    }

    /// Starts `args` in the root in the background, its output in `log` (a host path).
    pub fn spawn(&self, args: &[&str], log: &Path) -> u32 {
        let file = std::fs::File::create(log).expect("log file");
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..])
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = cmd.spawn().expect("spawn in the root");
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// Stops a process started with [`DebianRoot::spawn`] with SIGTERM (as systemd does).
    pub fn terminate(&self, pid: u32) {
        let mut children = self.children.lock().unwrap();
        if let Some(i) = children.iter().position(|c| c.id() == pid) {
            let mut child = children.remove(i);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}

impl Drop for DebianRoot {
    fn drop(&mut self) {
        for child in self
            .children
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Tenant volumes a program in the root mounted (through the engine) under a shared
        // directory, deepest first.
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<&str> = table
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| {
                self.shared
                    .iter()
                    .any(|s| Path::new(p).starts_with(s) && Path::new(p) != s.as_path())
            })
            .collect();
        under.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in under {
            let _ = Command::new("umount").arg(point).output();
        }
        for target in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(target).output();
        }
        // Never delete through a mount that is still there (it could be the host's /dev).
        let root = self.root();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if mounts.contains(&*root.to_string_lossy()) {
            eprintln!("{} still has mounts: left in place", root.display());
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
            }
        }
    }
}
