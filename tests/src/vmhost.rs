//! Production-shaped hosts in qemu: Debian 12 booted from a disk under
//! `qemu-system-x86_64 -accel tcg` with Debian's kernel and initramfs, systemd as PID 1, the
//! unified cgroup hierarchy (v2), docker.io, nftables, cryptsetup and sshd. A test drives a host
//! as an operator would, over ssh.
//!
//! [`HostImage::build`] makes the shared base disk once: the test command's Debian root, the
//! kernel's modules, DHCP on the virtio network card and a login key of the test's own.
//! [`VmHost::boot`] starts one host on a copy-on-write overlay of it (its own disk, qcow2), with
//! qemu user networking: the host alias `10.0.2.2` in the guest reaches this machine's loopback
//! (where a test's coordinator listens), and one loopback port here forwards to the guest's
//! sshd. Nothing in the guest dials anywhere else. Dropping a host kills its qemu.
//!
//! Ensures: a host is ready when its sshd answers; every boot is timed; a disk is only ever
//! read by this process after its qemu has exited.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::vm::Kernel;

/// The guest's address for this machine's loopback (qemu user networking).
pub const HOST_ALIAS: &str = "10.0.2.2";

/// The guest's own address on its user network.
pub const GUEST_ADDRESS: &str = "10.0.2.15";

/// How long a boot may take under software emulation before it is a failure.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

/// Programs in the Debian root a host needs (the test command's debootstrap installs them).
const NEEDED: [&str; 6] = [
    "usr/sbin/sshd",
    "usr/sbin/cryptsetup",
    "usr/sbin/dockerd",
    "usr/sbin/nft",
    "lib/systemd/systemd",
    "usr/bin/systemd-analyze",
];

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The base disk every host boots from (read-only to them), with what boots it.
#[derive(Debug)]
pub struct HostImage {
    dir: tempfile::TempDir,
    kernel: Kernel,
    initrd: PathBuf,
    /// The raw ext4 root filesystem.
    pub base: PathBuf,
    /// The private half of the guests' root login key.
    ssh_key: PathBuf,
    /// How long building it took.
    pub built_in: Duration,
}

impl HostImage {
    /// Builds the base disk from `root` (a Debian 12 root made by the test command); `Err`
    /// says what is missing.
    pub fn build(root: &Path) -> Result<Self, String> {
        let started = Instant::now();
        let kernel = Kernel::find()?;
        let initrd = PathBuf::from(format!("/boot/initrd.img-{}", kernel.version));
        if !initrd.exists() {
            return Err(format!("{} is missing", initrd.display()));
        }
        for program in NEEDED {
            if !root.join(program).exists() {
                return Err(format!(
                    "{} has no /{program} (the test command's debootstrap installs it)",
                    root.display()
                ));
            }
        }
        output(Command::new("ssh").arg("-V")).map_err(|e| format!("ssh: {e}"))?;
        output(Command::new("qemu-img").arg("--version")).map_err(|e| format!("qemu-img: {e}"))?;
        let dir = tempfile::Builder::new()
            .prefix("berth-vmhost")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let ssh_key = dir.path().join("id_ed25519");
        output(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "berth-test", "-f"])
                .arg(&ssh_key),
        )?;
        let staging = dir.path().join("root");
        output(Command::new("cp").arg("-a").arg(root).arg(&staging))?;
        let modules = staging.join("usr/lib/modules");
        std::fs::create_dir_all(&modules).map_err(|e| e.to_string())?;
        output(
            Command::new("cp")
                .arg("-a")
                .arg(Path::new("/lib/modules").join(&kernel.version))
                .arg(&modules),
        )?;
        let write = |path: &str, text: &str, mode: u32| -> Result<(), String> {
            let file = staging.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).map_err(|e| e.to_string())?;
            std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .map_err(|e| e.to_string())
        };
        let public =
            std::fs::read_to_string(ssh_key.with_extension("pub")).map_err(|e| e.to_string())?;
        write("root/.ssh/authorized_keys", &public, 0o600)?;
        write("etc/hostname", "berth-vm\n", 0o644)?;
        write(
            "etc/hosts",
            "127.0.0.1 localhost\n127.0.1.1 berth-vm\n",
            0o644,
        )?;
        write(
            "etc/fstab",
            "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
            0o644,
        )?;
        write(
            "etc/systemd/network/20-wired.network",
            "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n",
            0o644,
        )?;
        output(
            Command::new("systemctl")
                .arg(format!("--root={}", staging.display()))
                .args(["enable", "systemd-networkd.service"]),
        )?;
        let base = dir.path().join("base.img");
        std::fs::File::create(&base)
            .and_then(|f| f.set_len(4 << 30))
            .map_err(|e| e.to_string())?;
        output(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "berth-root", "-d"])
                .arg(&staging)
                .arg(&base),
        )?;
        std::fs::remove_dir_all(&staging).map_err(|e| e.to_string())?;
        Ok(Self {
            dir,
            kernel,
            initrd,
            base,
            ssh_key,
            built_in: started.elapsed(),
        })
    }
}

/// One booted host: its qemu, its disk, its ssh port.
#[derive(Debug)]
pub struct VmHost {
    pub name: String,
    /// Its own disk: a qcow2 overlay of the base disk.
    pub disk: PathBuf,
    /// The serial console, as a file.
    pub console: PathBuf,
    ssh_port: u16,
    ssh_key: PathBuf,
    /// Guest TCP port → the loopback port here that reaches it.
    forwards: Vec<(u16, u16)>,
    qemu: Option<Child>,
    /// How long its last boot took, until sshd answered.
    pub booted_in: Duration,
    /// Scripts whose output is printed when a test fails while the host runs.
    pub diagnostics: Vec<String>,
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl VmHost {
    /// Boots host `name` on its own overlay of `image`, with `memory_mib` of RAM and a loopback
    /// port here forwarded to each of the guest's TCP ports `forwarded` ([`VmHost::port`]);
    /// returns once its sshd answers.
    pub fn boot(
        image: &HostImage,
        name: &str,
        memory_mib: u32,
        forwarded: &[u16],
    ) -> Result<Self, String> {
        let dir = image.dir.path();
        let disk = dir.join(format!("{name}.qcow2"));
        output(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&image.base)
                .arg(&disk),
        )?;
        let console = dir.join(format!("{name}.console"));
        let ssh_port = free_port();
        let forwards: Vec<(u16, u16)> = forwarded.iter().map(|&g| (g, free_port())).collect();
        let mut netdev =
            format!("user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-{GUEST_ADDRESS}:22");
        for (guest, here) in &forwards {
            netdev.push_str(&format!(
                ",hostfwd=tcp:127.0.0.1:{here}-{GUEST_ADDRESS}:{guest}"
            ));
        }
        // qemu dies with the thread that booted it, even when the test process is killed.
        let qemu = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "qemu-system-x86_64"])
            .args(["-accel", "tcg", "-smp", "2", "-m", &memory_mib.to_string()])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&image.kernel.image)
            .arg("-initrd")
            .arg(&image.initrd)
            .args([
                "-append",
                "root=/dev/vda rw console=ttyS0 systemd.show_status=0 panic=-1",
            ])
            .arg("-drive")
            .arg(format!("file={},format=qcow2,if=virtio", disk.display()))
            .arg("-netdev")
            .arg(netdev)
            .args(["-device", "virtio-net-pci,netdev=net0"])
            .args(["-device", "virtio-rng-pci"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("qemu-system-x86_64: {e}"))?;
        let mut host = Self {
            name: name.into(),
            disk,
            console,
            ssh_port,
            ssh_key: image.ssh_key.clone(),
            forwards,
            qemu: Some(qemu),
            booted_in: Duration::ZERO,
            diagnostics: Vec::new(),
        };
        let started = Instant::now();
        host.wait_for_ssh(None)?;
        host.booted_in = started.elapsed();
        Ok(host)
    }

    /// The loopback port here that reaches the guest's TCP port `guest` (given at boot).
    pub fn port(&self, guest: u16) -> Option<u16> {
        self.forwards
            .iter()
            .find_map(|&(g, here)| (g == guest).then_some(here))
    }

    /// The kernel's id of the running boot.
    pub fn boot_id(&self) -> Result<String, String> {
        self.try_ssh("cat /proc/sys/kernel/random/boot_id")
            .map(|id| id.trim().to_string())
    }

    /// Waits until sshd answers on a boot other than `not_boot`.
    fn wait_for_ssh(&mut self, not_boot: Option<&str>) -> Result<(), String> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(qemu) = self.qemu.as_mut()
                && let Ok(Some(status)) = qemu.try_wait()
            {
                return Err(format!(
                    "qemu of {} exited with {status}; console:\n{}",
                    self.name,
                    self.console_tail()
                ));
            }
            match self.boot_id() {
                Ok(id) if Some(id.as_str()) != not_boot => return Ok(()),
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not answer on ssh within {BOOT_TIMEOUT:?}; console:\n{}",
                    self.name,
                    self.console_tail()
                ));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// The last lines of the serial console.
    pub fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    fn ssh_command(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-q", "-i"])
            .arg(&self.ssh_key)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "ServerAliveInterval=10",
                "-p",
            ])
            .arg(self.ssh_port.to_string())
            .arg("root@127.0.0.1");
        cmd
    }

    /// Runs `script` (sh) in the guest as root: its stdout, or `Err` with its output.
    pub fn try_ssh(&self, script: &str) -> Result<String, String> {
        output(self.ssh_command().arg(script))
    }

    /// Runs `script` in the guest as root; panics with its output if it fails.
    pub fn ssh(&self, script: &str) -> String {
        self.try_ssh(script)
            .unwrap_or_else(|e| panic!("on {}: {script}: {e}", self.name))
    }

    /// Copies the local file `from` to `to` in the guest.
    pub fn copy_in(&self, from: &Path, to: &str) {
        let file = std::fs::File::open(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        let out = self
            .ssh_command()
            .arg(format!("cat > '{to}'"))
            .stdin(file)
            .output()
            .expect("ssh");
        assert!(
            out.status.success(),
            "copying {} to {}:{to}: {}",
            from.display(),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `systemctl reboot`, then waits for the new boot to answer; returns how long it took.
    pub fn reboot(&mut self) -> Result<Duration, String> {
        let before = self.boot_id()?;
        let started = Instant::now();
        // The connection may drop before ssh hears the answer.
        let _ = self.try_ssh("systemctl reboot");
        self.wait_for_ssh(Some(&before))?;
        self.booted_in = started.elapsed();
        Ok(self.booted_in)
    }

    /// Powers the guest off and waits for its qemu to exit (killed after `within`), so its disk
    /// can be read.
    pub fn power_off(&mut self, within: Duration) {
        let _ = self.try_ssh("systemctl poweroff");
        let deadline = Instant::now() + within;
        if let Some(mut qemu) = self.qemu.take() {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = qemu.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
    }

    /// The whole disk as the guest saw it (base and overlay), as a raw file in `to`.
    pub fn raw_disk(&self, to: &Path) -> Result<PathBuf, String> {
        assert!(
            self.qemu.is_none(),
            "power the host off before reading its disk"
        );
        let raw = to.join(format!("{}.raw", self.name));
        output(
            Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(&self.disk)
                .arg(&raw),
        )?;
        Ok(raw)
    }
}

impl Drop for VmHost {
    fn drop(&mut self) {
        if std::thread::panicking() && self.qemu.is_some() {
            for script in &self.diagnostics {
                let said = self.try_ssh(script).unwrap_or_else(|e| e);
                eprintln!("----- {} on {} -----\n{said}", script, self.name);
            }
        }
        if let Some(mut qemu) = self.qemu.take() {
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- console of {} -----\n{}",
                self.name,
                self.console_tail()
            );
        }
    }
}
