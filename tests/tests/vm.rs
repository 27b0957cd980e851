//! The agent's volume code in a real kernel (the host kernel here has no device-mapper):
//! qemu in software emulation boots Debian's kernel with an initramfs holding
//! `berth-vm-volume`, which drives the agent's `Volumes` (cryptsetup, mke2fs, mount) through a
//! whole cycle on a virtio disk: attach, write, detach, wrong key refused, reattach and read
//! back, purge. The host then reads the raw disk: neither the plaintext nor the key is in it.

use std::time::{Duration, Instant};

use berth_tests::missing_component;
use berth_tests::procs::bin;
use berth_tests::vm::Kernel;

#[test]
fn a_luks2_volume_cycle_in_a_real_kernel_leaves_no_plaintext_and_no_key_on_disk() {
    let kernel = match Kernel::find() {
        Ok(k) => k,
        Err(why) => return missing_component("a kernel for qemu", &why),
    };
    let dir = tempfile::tempdir().unwrap();
    let program = bin("berth-vm-volume");
    let initramfs = kernel
        .initramfs(dir.path(), &[program.as_path()], "/bin/berth-vm-volume")
        .unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let started = Instant::now();
    let console = kernel
        .boot(&initramfs, &disk, Duration::from_secs(110))
        .unwrap();
    let took = started.elapsed();
    eprintln!("VM run: {took:?}");
    assert!(console.contains("BERTH-VM-BOOTED"), "{console}");
    assert!(console.contains("VOLUME-OK"), "{console}");
    let scan = console
        .lines()
        .find(|l| l.trim().starts_with("SCAN "))
        .expect("the key scan's summary");
    eprintln!("{}", scan.trim());
    assert!(took < Duration::from_secs(120), "{took:?}");
    let key_hex = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("KEY "))
        .expect("the key line");
    let key: Vec<u8> = (0..key_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&key_hex[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(key.len(), 32);
    let raw = std::fs::read(&disk).unwrap();
    let marker = b"berth-vm-plaintext-marker";
    assert!(
        !raw.windows(marker.len()).any(|w| w == marker),
        "plaintext on the disk"
    );
    assert!(
        !raw.windows(key.len()).any(|w| w == key.as_slice()),
        "the key on the disk"
    );
    // No log line shows it either (the KEY line is the test's own, printed for this check).
    let leaked: Vec<&str> = console
        .lines()
        .filter(|l| !l.trim().starts_with("KEY ") && l.contains(key_hex))
        .collect();
    assert!(leaked.is_empty(), "the key in the console log: {leaked:?}");
}
