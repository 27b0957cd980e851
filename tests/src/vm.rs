//! A real kernel for what the host kernel here cannot do (device-mapper): Debian's
//! `linux-image-amd64` under `qemu-system-x86_64 -accel tcg`, booted with a small initramfs
//! holding busybox, cryptsetup, mke2fs, the given programs (each with its shared libraries) and
//! the kernel modules for virtio disks, dm-crypt and ext4. Its `/init` runs one command and
//! powers off; the serial console is the output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The kernel modules the guest loads (with their dependencies, in order).
const MODULES: [&str; 6] = [
    "virtio_pci",
    "virtio_blk",
    "dm-mod",
    "dm-crypt",
    "xts",
    "ext4",
];

#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    pub version: String,
}

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Kernel {
    /// The newest `/boot/vmlinuz-*` with its modules installed, and qemu; `Err` says what is
    /// missing.
    pub fn find() -> Result<Self, String> {
        output(Command::new("qemu-system-x86_64").arg("--version"))
            .map_err(|e| format!("qemu-system-x86_64: {e}"))?;
        let mut versions: Vec<String> = std::fs::read_dir("/boot")
            .map_err(|e| format!("/boot: {e}"))?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("vmlinuz-")
                    .map(String::from)
            })
            .filter(|v| {
                Path::new("/lib/modules")
                    .join(v)
                    .join("modules.dep")
                    .exists()
            })
            .collect();
        versions.sort();
        let version = versions
            .pop()
            .ok_or("no /boot/vmlinuz-* with its modules (apt-get install linux-image-amd64)")?;
        Ok(Self {
            image: PathBuf::from(format!("/boot/vmlinuz-{version}")),
            version,
        })
    }

    /// Module files to load, dependencies first.
    fn modules(&self) -> Result<Vec<PathBuf>, String> {
        let mut ordered: Vec<PathBuf> = Vec::new();
        for m in MODULES {
            let deps =
                output(Command::new("modprobe").args(["-S", &self.version, "--show-depends", m]))?;
            for path in deps
                .lines()
                .filter_map(|l| l.strip_prefix("insmod ").map(|p| PathBuf::from(p.trim())))
            {
                if !ordered.contains(&path) {
                    ordered.push(path);
                }
            }
        }
        Ok(ordered)
    }

    /// Builds an initramfs in `dir` holding `programs` (copied to `/bin`) whose `/init` runs
    /// `command` after loading the modules, then powers off.
    pub fn initramfs(
        &self,
        dir: &Path,
        programs: &[&Path],
        command: &str,
    ) -> Result<PathBuf, String> {
        let root = dir.join("initramfs");
        for sub in [
            "bin",
            "sbin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "mnt",
            "run/cryptsetup",
            "mods",
        ] {
            std::fs::create_dir_all(root.join(sub)).map_err(|e| e.to_string())?;
        }
        let copy = |from: &Path, to: &Path| -> Result<(), String> {
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::copy(from, to)
                .map(drop)
                .map_err(|e| format!("{}: {e}", from.display()))
        };
        copy(Path::new("/usr/bin/busybox"), &root.join("bin/busybox"))?;
        let mut binaries: Vec<(PathBuf, PathBuf)> = vec![
            (
                PathBuf::from("/usr/sbin/cryptsetup"),
                root.join("sbin/cryptsetup"),
            ),
            (PathBuf::from("/usr/sbin/mke2fs"), root.join("sbin/mke2fs")),
        ];
        for p in programs {
            binaries.push((
                p.to_path_buf(),
                root.join("bin").join(p.file_name().unwrap()),
            ));
        }
        for (from, to) in &binaries {
            copy(from, to)?;
            let libs = output(Command::new("ldd").arg(from))?;
            for lib in libs.split_whitespace().filter(|w| w.starts_with('/')) {
                let lib = Path::new(lib);
                let real = std::fs::canonicalize(lib).map_err(|e| e.to_string())?;
                copy(&real, &root.join(lib.strip_prefix("/").unwrap()))?;
            }
        }
        // ldd does not list it, but Rust programs load it to unwind.
        copy(
            Path::new("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
            &root.join("lib/x86_64-linux-gnu/libgcc_s.so.1"),
        )?;
        let mut order = String::new();
        for m in self.modules()? {
            let name = m.file_name().unwrap().to_string_lossy().into_owned();
            copy(&m, &root.join("mods").join(&name))?;
            order.push_str(&name);
            order.push('\n');
        }
        std::fs::write(root.join("mods/order"), order).map_err(|e| e.to_string())?;
        let init = format!(
            "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nmount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\nfor m in $(cat /mods/order); do insmod /mods/$m 2>/dev/null; done\nexport PATH=/sbin:/bin\necho BERTH-VM-BOOTED\n{command}\necho BERTH-VM-EXIT $?\npoweroff -f\n"
        );
        std::fs::write(root.join("init"), init).map_err(|e| e.to_string())?;
        output(Command::new("chmod").arg("755").arg(root.join("init")))?;
        let image = dir.join("initramfs.cpio.gz");
        output(Command::new("sh").arg("-c").arg(format!(
            "cd {} && find . | cpio -o -H newc 2>/dev/null | gzip -1 > {}",
            root.display(),
            image.display()
        )))?;
        Ok(image)
    }

    /// Boots `initramfs` with `disk` as `/dev/vda` (software emulation); returns the console.
    pub fn boot(&self, initramfs: &Path, disk: &Path, timeout: Duration) -> Result<String, String> {
        output(
            Command::new("timeout")
                .arg(timeout.as_secs().to_string())
                .args([
                    "qemu-system-x86_64",
                    "-accel",
                    "tcg",
                    "-m",
                    "512",
                    "-nographic",
                    "-no-reboot",
                ])
                .arg("-kernel")
                .arg(&self.image)
                .arg("-initrd")
                .arg(initramfs)
                .args(["-append", "console=ttyS0 quiet panic=-1"])
                .arg("-drive")
                .arg(format!("file={},format=raw,if=virtio", disk.display())),
        )
    }
}
