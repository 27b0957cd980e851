//! berth-vm-volume: runs inside the test VM (a real kernel with device-mapper) the agent's own
//! volume code on `/dev/vda` as a tenant's block device: attach (LUKS2 format, open, mkfs,
//! mount), write, detach (unmount, close), a wrong key refused, reattach and read back, then
//! purge (luksErase), after which the old key opens nothing. All the while it scans every
//! process's argv and environment, and the files under /var/lib/berth, for the key. Prints
//! `VOLUME-OK` (and the key, so the host can prove it is not on the disk), or
//! `VOLUME-FAIL step: error`.

use std::path::Path;
use std::time::Duration;

use berth_node_agent::volume::cryptsetup::{Cryptsetup, CryptsetupCommand, KEY_BYTES, VolumeKey};
use berth_node_agent::volume::{
    Attached, MountNamespace, SystemMounter, VolumeError, VolumePaths, Volumes,
};
use berth_shared::ids::TenantId;
use berth_tests::keyscan::{ProcScan, files_holding, key_forms};

/// The agent's volume root, as on a host.
const ROOT: &str = "/var/lib/berth";

/// What the tenant writes; the host looks for it in the raw disk image.
const PLAINTEXT: &str = "berth-vm-plaintext-marker: customer chats live here";

fn check(step: &str, ok: bool) -> Result<(), String> {
    ok.then_some(())
        .ok_or_else(|| format!("{step}: not as expected"))
}

fn run() -> Result<String, String> {
    let device = Path::new("/dev/vda");
    let crypt = CryptsetupCommand {
        program: "/sbin/cryptsetup".into(),
        timeout: Duration::from_secs(60),
    };
    let mounter = SystemMounter {
        mke2fs: "/sbin/mke2fs".into(),
        timeout: Duration::from_secs(60),
        namespace: MountNamespace::Own,
    };
    let volumes = Volumes {
        crypt: &crypt,
        mounter: &mounter,
    };
    let tenant = TenantId::new("vm-tenant").map_err(|e| e.to_string())?;
    let paths = VolumePaths::block_device(Path::new(ROOT), &tenant, device);
    let bytes: [u8; KEY_BYTES] = rand::random();
    let key = VolumeKey::from_bytes(&bytes).map_err(|e| e.to_string())?;
    let forms = key_forms(&bytes);
    let scan = ProcScan::start();
    let wrong =
        VolumeKey::from_bytes(&rand::random::<[u8; KEY_BYTES]>()).map_err(|e| e.to_string())?;
    let step = |name: &'static str| move |e: VolumeError| format!("{name}: {e}");

    let first = volumes
        .attach(&paths, 0, Some(&key))
        .map_err(step("attach"))?;
    check("made on first use", first == Attached::Created)?;
    check("LUKS", crypt.is_luks(device).map_err(|e| e.to_string())?)?;
    std::fs::write(paths.mount.join("data"), PLAINTEXT).map_err(|e| format!("write: {e}"))?;
    let files = files_holding(Path::new(ROOT), &forms);
    check(
        &format!("no file under {ROOT} holds the key while mounted: {files:?}"),
        files.is_empty(),
    )?;
    let again = volumes
        .attach(&paths, 0, Some(&key))
        .map_err(step("attach again"))?;
    check(
        "attaching twice changes nothing",
        again == Attached::AlreadyMounted,
    )?;
    volumes.detach(&paths).map_err(step("detach"))?;
    check(
        "closed",
        paths.mapped().is_some_and(|mapped| !mapped.exists()),
    )?;

    check(
        "the wrong key",
        !crypt.key_opens(device, &wrong).map_err(|e| e.to_string())?,
    )?;
    check(
        "attach with the wrong key fails",
        volumes.attach(&paths, 0, Some(&wrong)).is_err(),
    )?;
    let reopened = volumes
        .attach(&paths, 0, Some(&key))
        .map_err(step("reopen"))?;
    check("reopened, not formatted", reopened == Attached::Opened)?;
    let read =
        std::fs::read_to_string(paths.mount.join("data")).map_err(|e| format!("read: {e}"))?;
    check("read back", read == PLAINTEXT)?;

    volumes.purge(&paths).map_err(step("purge"))?;
    check(
        "no key after purge",
        !crypt.key_opens(device, &key).map_err(|e| e.to_string())?,
    )?;
    check(
        "no attach after purge",
        volumes.attach(&paths, 0, Some(&key)).is_err(),
    )?;
    let files = files_holding(Path::new(ROOT), &forms);
    check(
        &format!("no file under {ROOT} holds the key after: {files:?}"),
        files.is_empty(),
    )?;
    let seen = scan.finish();
    let holding = seen.holding(&forms);
    check(
        &format!("no process's argv or environment holds the key: {holding:?}"),
        holding.is_empty(),
    )?;
    // The scan must have watched cryptsetup at work, or it proved nothing.
    let cryptsetups = seen.count("cryptsetup");
    println!("SCAN passes={} cryptsetup={cryptsetups}", seen.passes);
    check("the scan saw cryptsetup run", cryptsetups > 0)?;
    // Only for the host to search the raw disk with: the key is never written anywhere.
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
