//! berth-vm-volume: runs inside the test VM (a real kernel with device-mapper), on `/dev/vda`,
//! through the agent's own cryptsetup layer: LUKS2 format, open, mkfs, mount, write, close,
//! reopen and read back; a wrong key refused; then luksErase, after which the old key opens
//! nothing. Prints `VOLUME-OK` (and the key, so the host can prove it is not on the disk), or
//! `VOLUME-FAIL step: error`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth_node_agent::cryptsetup::{Cryptsetup, CryptsetupCommand, KEY_BYTES, VolumeKey};

/// What the tenant writes; the host looks for it in the raw disk image.
const PLAINTEXT: &str = "berth-vm-plaintext-marker: customer chats live here";

fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn check(step: &str, ok: bool) -> Result<(), String> {
    ok.then_some(())
        .ok_or_else(|| format!("{step}: not as expected"))
}

fn run() -> Result<String, String> {
    let device = Path::new("/dev/vda");
    let mapped = "/dev/mapper/berth-vm";
    let c = CryptsetupCommand {
        program: "/sbin/cryptsetup".into(),
        timeout: Duration::from_secs(60),
    };
    let bytes: [u8; KEY_BYTES] = rand::random();
    let key = VolumeKey::from_bytes(&bytes).map_err(|e| e.to_string())?;
    let wrong =
        VolumeKey::from_bytes(&rand::random::<[u8; KEY_BYTES]>()).map_err(|e| e.to_string())?;
    let e = |step: &'static str| {
        move |err: berth_node_agent::cryptsetup::CryptError| format!("{step}: {err}")
    };

    check("not LUKS before", !c.is_luks(device).map_err(e("isLuks"))?)?;
    c.format(device, &key).map_err(e("format"))?;
    check("LUKS after", c.is_luks(device).map_err(e("isLuks"))?)?;
    c.open(device, "berth-vm", &key).map_err(e("open"))?;
    sh("/sbin/mke2fs", &["-q", "-t", "ext4", mapped])?;
    sh("mount", &[mapped, "/mnt"])?;
    std::fs::write("/mnt/data", PLAINTEXT).map_err(|e| format!("write: {e}"))?;
    sh("umount", &["/mnt"])?;
    c.close("berth-vm").map_err(e("close"))?;

    check(
        "the wrong key",
        !c.key_opens(device, &wrong).map_err(e("test wrong key"))?,
    )?;
    check(
        "open with the wrong key fails",
        c.open(device, "berth-vm", &wrong).is_err(),
    )?;
    c.open(device, "berth-vm", &key).map_err(e("reopen"))?;
    sh("mount", &[mapped, "/mnt"])?;
    let read = std::fs::read_to_string("/mnt/data").map_err(|e| format!("read: {e}"))?;
    check("read back", read == PLAINTEXT)?;
    sh("umount", &["/mnt"])?;
    c.close("berth-vm").map_err(e("close again"))?;

    c.erase(device).map_err(e("erase"))?;
    check(
        "no key after erase",
        !c.key_opens(device, &key).map_err(e("test after erase"))?,
    )?;
    check(
        "no open after erase",
        c.open(device, "berth-vm", &key).is_err(),
    )?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn main() {
    match run() {
        Ok(key) => {
            println!("KEY {key}");
            println!("VOLUME-OK");
        }
        Err(e) => {
            println!("VOLUME-FAIL {e}");
            std::process::exit(1);
        }
    }
}
