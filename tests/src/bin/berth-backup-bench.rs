//! berth-backup-bench: a tenant volume's backups and restore through the agent's restic
//! engine, against the volume's size, the bytes changed and the disk's own speed.
//!
//! A `--volume-mib` volume (files of 16 MiB of random data, as incompressible as a
//! customer's files can be) is backed up whole into a local repository, then `--changed`
//! percent of it is changed and it is backed up again, twice over: once the change is new
//! files (chats, uploads), once it is edits of 256 KiB in place inside existing files (restic
//! cuts files into content-defined chunks of 1 MiB on average, so an edit uploads the chunks
//! around it again). Then the last snapshot is restored into an empty directory, and dumped
//! as the tar an export streams. Printed, as JSON: each backup's seconds and bytes added, those
//! bytes against the volume and against the bytes changed, the restore's and the export's
//! throughput, and the disk's sequential write throughput (a file of the volume's size written
//! and synced) as the restore's baseline.
//!
//! Run after `cargo build --release -p berth-tests --bins`, with Debian's restic installed:
//! `target/release/berth-backup-bench --volume-mib 1024 --changed 1 --dir /var/tmp`

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use berth_node_agent::backup::restic::Restic;
use berth_node_agent::backup::{BackupEngine, BackupKey};
use rand::RngCore;

const FILE_MIB: u64 = 16;
const EDIT_BYTES: u64 = 256 << 10;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    match args.iter().position(|a| a == name) {
        None => default,
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                eprintln!("{name}: a number");
                std::process::exit(2)
            }),
    }
}

fn random(n: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; n as usize];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    (bytes as f64 / (1 << 20) as f64) / seconds
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let volume_mib: u64 = arg(&args, "--volume-mib", 1024);
    let changed_percent: f64 = arg(&args, "--changed", 1.0);
    let base = std::path::PathBuf::from(arg(&args, "--dir", String::from("/var/tmp")));
    anyhow::ensure!(
        volume_mib >= FILE_MIB && changed_percent > 0.0 && changed_percent <= 50.0,
        "--volume-mib at least {FILE_MIB}, --changed between 0 and 50"
    );
    let work = tempfile::Builder::new()
        .prefix("berth-backup-bench")
        .tempdir_in(&base)?;
    let volume = work.path().join("volume");
    std::fs::create_dir_all(&volume)?;
    let volume_bytes = volume_mib << 20;
    let files = volume_mib / FILE_MIB;
    for i in 0..files {
        std::fs::write(
            volume.join(format!("file-{i:04}.bin")),
            random(FILE_MIB << 20),
        )?;
    }

    // The disk's sequential write throughput, synced: the restore's baseline.
    let probe = work.path().join("disk-probe");
    let started = Instant::now();
    {
        let mut f = std::fs::File::create(&probe)?;
        let block = random(8 << 20);
        for _ in 0..(volume_bytes / block.len() as u64) {
            f.write_all(&block)?;
        }
        f.sync_all()?;
    }
    let disk_s = started.elapsed().as_secs_f64();
    std::fs::remove_file(&probe)?;

    let engine = Restic::new(&work.path().join("cache"), None);
    let repository = work.path().join("repository").display().to_string();
    let key = BackupKey::new(random(32));
    engine.ensure_repository(&repository, &key)?;
    let whole = engine.backup(&repository, &key, &volume)?;

    let changed_bytes = (volume_bytes as f64 * changed_percent / 100.0) as u64;
    // New files.
    std::fs::write(volume.join("new-files.bin"), random(changed_bytes))?;
    let added = engine.backup(&repository, &key, &volume)?;
    // Edits in place, spread over the files.
    let edits = changed_bytes.div_ceil(EDIT_BYTES);
    let mut rng = rand::rng();
    for _ in 0..edits {
        let file = volume.join(format!("file-{:04}.bin", rng.next_u64() % files));
        let at = rng.next_u64() % ((FILE_MIB << 20) - EDIT_BYTES);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)?
            .write_all_at(&random(EDIT_BYTES), at)?;
    }
    let edited = engine.backup(&repository, &key, &volume)?;

    let snapshots = engine.snapshots(&repository, &key)?;
    let last = snapshots
        .last()
        .ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
    let target = work.path().join("restored");
    std::fs::create_dir(&target)?;
    let started = Instant::now();
    engine.restore(&repository, &key, &last.id, &target)?;
    let restore_s = started.elapsed().as_secs_f64();
    let restored_bytes = dir_bytes(&target)?;

    // An export of the last snapshot: the tar `berthctl export --snapshot` streams, counted.
    struct Counted(u64);
    impl Write for Counted {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let started = Instant::now();
    let mut tar = Counted(0);
    engine.dump(&repository, &key, &last.id, &mut tar)?;
    let export_s = started.elapsed().as_secs_f64();

    let report = |s: &berth_node_agent::backup::BackupSummary, changed: u64| {
        serde_json::json!({
            "seconds": s.duration_ms as f64 / 1000.0,
            "bytes_added": s.bytes_added,
            "added_per_volume": s.bytes_added as f64 / volume_bytes as f64,
            "added_per_changed": if changed == 0 { serde_json::Value::Null } else { (s.bytes_added as f64 / changed as f64).into() },
        })
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "volume_bytes": volume_bytes,
            "changed_bytes": changed_bytes,
            "first_backup": report(&whole, 0),
            "new_files_backup": report(&added, changed_bytes),
            "edits_in_place_backup": report(&edited, edits * EDIT_BYTES),
            "restore": {
                "seconds": restore_s,
                "bytes": restored_bytes,
                "mib_per_s": mib_per_s(restored_bytes, restore_s),
            },
            "export": {
                "seconds": export_s,
                "tar_bytes": tar.0,
                "mib_per_s": mib_per_s(tar.0, export_s),
            },
            "disk_write_mib_per_s": mib_per_s(volume_bytes, disk_s),
            "restore_per_disk": mib_per_s(restored_bytes, restore_s) / mib_per_s(volume_bytes, disk_s),
        }))?
    );
    Ok(())
}

fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
