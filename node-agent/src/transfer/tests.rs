use std::os::unix::fs::MetadataExt;

use super::*;

fn at(root: &Path, tenant: &str) -> VolumeLocation {
    VolumeLocation {
        root: root.to_path_buf(),
        tenant: TenantId::new(tenant).unwrap(),
    }
}

/// Exports `from` as transfer `id` (a pre-copy, or building on `base`); returns the chunks and
/// what the sender reported.
fn stream(
    from: &VolumeLocation,
    id: u64,
    precopy: bool,
    base: Option<&Base>,
) -> (Vec<proto::VolumeChunk>, Copied) {
    let mut chunks = Vec::new();
    let sent = export(from, id, precopy, base, |c| {
        chunks.push(c);
        Ok(())
    })
    .unwrap();
    (chunks, sent)
}

/// Imports `chunks` of transfer `id` into `to`, holding `base`; `keep_aside` for a pre-copy.
fn import(
    to: &VolumeLocation,
    id: u64,
    base: Option<Base>,
    chunks: Vec<proto::VolumeChunk>,
    keep_aside: bool,
) -> Result<Copied, TransferError> {
    let mut importer = Importer::new(to.clone(), id, base);
    for c in chunks {
        importer.accept(c)?;
    }
    importer.finish(keep_aside)
}

/// Exports `from` and imports the chunks into `to`; returns what each end reported.
fn copy(from: &VolumeLocation, to: &VolumeLocation) -> (Copied, Copied) {
    let (chunks, sent) = stream(from, 7, false, None);
    (sent, import(to, 7, None, chunks, false).unwrap())
}

/// Both ends report the same copy and hold the same base (the sender's stamps aside).
fn agree(sent: &Copied, received: &Copied) {
    let without_stamps = |c: &Copied| Copied {
        base: Base {
            stamps: BTreeMap::new(),
            ..c.base.clone()
        },
        ..c.clone()
    };
    assert_eq!(without_stamps(sent), without_stamps(received));
}

fn chunks_of(from: &VolumeLocation) -> Vec<proto::VolumeChunk> {
    stream(from, 7, false, None).0
}

#[test]
fn a_sparse_luks_file_arrives_identical_with_its_holes_and_only_its_data_is_sent() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let from = at(src.path(), "acme");
    std::fs::create_dir_all(src.path().join("volumes")).unwrap();
    let image = src.path().join("volumes/acme.img");
    let file = File::create(&image).unwrap();
    file.set_len(64 << 20).unwrap();
    file.write_all_at(b"LUKS\xba\xbe header", 0).unwrap();
    file.write_all_at(&[7u8; 3 << 20], 20 << 20).unwrap();
    file.write_all_at(b"tail", (64 << 20) - 4).unwrap();
    drop(file);
    let to = at(dst.path(), "acme");
    let (sent, received) = copy(&from, &to);
    agree(&sent, &received);
    assert!(
        sent.data_bytes < 8 << 20,
        "only the data extents travel, not 64 MiB: {}",
        sent.data_bytes
    );
    assert!(sent.data_bytes >= (3 << 20) + 16);
    let copied = dst.path().join("volumes/acme.img");
    assert_eq!(
        std::fs::read(&copied).unwrap(),
        std::fs::read(&image).unwrap()
    );
    let blocks = std::fs::metadata(&copied).unwrap().blocks() * 512;
    assert!(
        blocks < 16 << 20,
        "the holes stay holes: {blocks} bytes allocated"
    );
    assert!(
        !dst.path().join("incoming/acme").exists(),
        "staging cleaned up"
    );
}

#[test]
fn a_plain_directory_arrives_with_its_tree_links_and_modes_owned_by_the_tenant() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let from = at(src.path(), "open");
    let plain = src.path().join("plain/open");
    std::fs::create_dir_all(plain.join("chats/2026")).unwrap();
    std::fs::write(plain.join("chats/2026/nov.log"), "hello").unwrap();
    std::fs::write(plain.join("empty"), "").unwrap();
    std::fs::set_permissions(plain.join("empty"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", plain.join("link")).unwrap();
    let to = at(dst.path(), "open");
    // Something an earlier attempt left is replaced.
    std::fs::create_dir_all(dst.path().join("plain/open/stale")).unwrap();
    copy(&from, &to);
    let got = dst.path().join("plain/open");
    assert_eq!(
        std::fs::read_to_string(got.join("chats/2026/nov.log")).unwrap(),
        "hello"
    );
    assert!(!got.join("stale").exists());
    let empty = std::fs::metadata(got.join("empty")).unwrap();
    assert_eq!(empty.mode() & 0o777, 0o640);
    assert_eq!((empty.uid(), empty.gid()), (65534, 65534));
    assert_eq!(
        std::fs::read_link(got.join("link")).unwrap(),
        Path::new("/etc/shadow"),
        "recreated as a link, never followed"
    );
    assert_eq!(
        std::fs::symlink_metadata(got.join("link")).unwrap().uid(),
        65534
    );
    assert_eq!(std::fs::metadata(&got).unwrap().uid(), 65534);
}

#[test]
fn a_damaged_or_hostile_stream_is_refused_and_nothing_is_put_in_place() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let from = at(src.path(), "open");
    std::fs::create_dir_all(src.path().join("plain/open")).unwrap();
    std::fs::write(src.path().join("plain/open/data"), "customer data").unwrap();
    let to = at(dst.path(), "open");
    let run = |mutate: &dyn Fn(&mut Vec<proto::VolumeChunk>)| -> String {
        let mut chunks = chunks_of(&from);
        mutate(&mut chunks);
        import(&to, 7, None, chunks, false).unwrap_err().to_string()
    };
    let flipped = run(&|c| {
        if let Some(Body::Data(d)) = &mut c[2].body {
            let mut data = d.data.to_vec();
            data[0] ^= 1;
            d.data = data.into();
        }
    });
    assert!(
        flipped.starts_with("volume stream: checksum mismatch"),
        "{flipped}"
    );
    let escape = run(&|c| {
        if let Some(Body::Entry(e)) = &mut c[1].body {
            e.path = "../../etc/cron.d/x".into();
        }
    });
    assert_eq!(
        escape,
        "volume stream: entry path \"../../etc/cron.d/x\" is not a plain relative path"
    );
    let absolute = run(&|c| {
        if let Some(Body::Entry(e)) = &mut c[1].body {
            e.path = "/etc/passwd".into();
        }
    });
    assert!(
        absolute.contains("is not a plain relative path"),
        "{absolute}"
    );
    let other_tenant = run(&|c| {
        if let Some(Body::Header(h)) = &mut c[0].body {
            h.tenant_id = "acme".into();
        }
    });
    assert_eq!(
        other_tenant,
        "volume stream: the stream is acme's volume, not open's"
    );
    let cut = run(&|c| {
        c.pop();
    });
    assert_eq!(cut, "the volume stream ended early");
    let overlong = run(&|c| {
        if let Some(Body::Data(d)) = &mut c[2].body {
            d.offset = 1 << 40;
        }
    });
    assert!(
        overlong.contains("beyond the file's 13 bytes"),
        "{overlong}"
    );
    assert!(!dst.path().join("plain/open").exists(), "nothing in place");
}

#[test]
fn a_luks_stream_holds_exactly_the_tenants_image_and_an_attached_volume_is_not_read() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let from = at(src.path(), "acme");
    std::fs::create_dir_all(src.path().join("volumes")).unwrap();
    std::fs::write(src.path().join("volumes/acme.img"), "ciphertext").unwrap();
    let mut chunks = chunks_of(&from);
    if let Some(Body::Entry(e)) = &mut chunks[1].body {
        e.path = "other.img".into();
    }
    let mut importer = Importer::new(at(dst.path(), "acme"), 7, None);
    importer.accept(chunks.remove(0)).unwrap();
    assert_eq!(
        importer.accept(chunks.remove(0)).unwrap_err().to_string(),
        "volume stream: a volume of this layout is the one file acme.img, not \"other.img\""
    );
    // Mounted (its mount point holds the filesystem): refused before anything is sent.
    std::fs::create_dir_all(src.path().join("mnt/acme/lost+found")).unwrap();
    let mut sent = 0;
    let err = export(&from, 7, false, None, |_| {
        sent += 1;
        Ok(())
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the volume of acme is attached (open or mounted): it is read only once closed"
    );
    assert_eq!(sent, 0);
    let none = export(&at(src.path(), "nobody"), 7, false, None, |_| Ok(())).unwrap_err();
    assert_eq!(none.to_string(), "nobody has no volume on this host");
}

/// Every entry under `dir`: its path, and its content, link target or `dir`, and mode.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let rel = rel.join(name);
            let path = dir.join(&rel);
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let content = if meta.file_type().is_symlink() {
                std::fs::read_link(&path)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if meta.is_dir() {
                stack.push(rel.clone());
                b"dir".to_vec()
            } else {
                std::fs::read(&path).unwrap()
            };
            out.push((
                rel.to_string_lossy().into_owned(),
                content,
                meta.mode() & 0o777,
            ));
        }
    }
    out.sort();
    out
}

/// Bytes that differ from block to block.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i / 4096) as u8 ^ (i as u8) ^ seed)
        .collect()
}

#[test]
fn after_a_precopy_only_changed_blocks_travel_and_the_volume_arrives_as_it_is_now() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (from, to) = (at(src.path(), "open"), at(dst.path(), "open"));
    let plain = src.path().join("plain/open");
    std::fs::create_dir_all(plain.join("chats")).unwrap();
    std::fs::write(plain.join("chats/big.db"), pattern(5 << 20, 1)).unwrap();
    std::fs::write(plain.join("gone.txt"), "deleted after the pre-copy").unwrap();
    std::fs::write(plain.join("becomes-dir"), "a file, then a directory").unwrap();
    std::fs::write(plain.join("same.txt"), "unchanged").unwrap();

    // The pre-copy, while the tenant runs: kept aside on the receiver, nothing in place.
    let (chunks, pre_sent) = stream(&from, 1, true, None);
    let pre = import(&to, 1, None, chunks, true).unwrap();
    agree(&pre_sent, &pre);
    assert!(
        !dst.path().join("plain/open").exists(),
        "a pre-copy is never put in place"
    );
    assert!(dst.path().join("incoming/open/chats/big.db").is_file());

    // The tenant writes on: one block of the big file, a deletion, a new file, a type change,
    // a mode change.
    let big = File::options()
        .write(true)
        .open(plain.join("chats/big.db"))
        .unwrap();
    big.write_all_at(&[0xee; 100], (3 << 20) + 17).unwrap();
    big.set_len((5 << 20) - 10).unwrap();
    drop(big);
    std::fs::remove_file(plain.join("gone.txt")).unwrap();
    std::fs::write(plain.join("new.txt"), "written after the pre-copy").unwrap();
    std::fs::remove_file(plain.join("becomes-dir")).unwrap();
    std::fs::create_dir(plain.join("becomes-dir")).unwrap();
    std::fs::set_permissions(
        plain.join("same.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    let (chunks, sent) = stream(&from, 2, false, Some(&pre_sent.base));
    let received = import(&to, 2, Some(pre.base.clone()), chunks, false).unwrap();
    agree(&sent, &received);
    assert_eq!(
        sent.data_bytes,
        (1 << 20) + ((1 << 20) - 10) + 26,
        "the rewritten block, the truncated last one and the new file, not 5 MiB"
    );
    assert_eq!(tree(&dst.path().join("plain/open")), tree(&plain));
    assert!(
        !dst.path().join("incoming/open").exists(),
        "staging cleaned up"
    );
    // The digest is that of the volume, however it travelled.
    let (_, whole) = stream(&from, 3, false, None);
    assert_eq!(whole.volume_sha256, received.volume_sha256);
    assert_eq!(whole.base.files, received.base.files);
}

#[test]
fn a_precopied_sparse_file_keeps_its_unchanged_blocks_and_loses_data_punched_out_since() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (from, to) = (at(src.path(), "acme"), at(dst.path(), "acme"));
    std::fs::create_dir_all(src.path().join("volumes")).unwrap();
    let image = src.path().join("volumes/acme.img");
    let file = File::create(&image).unwrap();
    file.set_len(32 << 20).unwrap();
    file.write_all_at(&pattern(4 << 20, 9), 0).unwrap();
    file.write_all_at(&pattern(2 << 20, 3), 20 << 20).unwrap();
    let (chunks, pre_sent) = stream(&from, 1, true, None);
    let pre = import(&to, 1, None, chunks, true).unwrap();
    // Block 1 rewritten, block 21 made a hole again, block 30 written for the first time.
    file.write_all_at(&[1; 512], (1 << 20) + 512).unwrap();
    nix::fcntl::fallocate(
        &file,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        21 << 20,
        1 << 20,
    )
    .unwrap();
    file.write_all_at(b"late", 30 << 20).unwrap();
    drop(file);
    let (chunks, sent) = stream(&from, 2, false, Some(&pre_sent.base));
    let Some(Body::Entry(entry)) = &chunks[1].body else {
        panic!("an entry second")
    };
    assert!(entry.from_base);
    assert_eq!(entry.changed_blocks, [1, 21, 30]);
    let received = import(&to, 2, Some(pre.base), chunks, false).unwrap();
    assert_eq!(sent.volume_sha256, received.volume_sha256);
    assert_eq!(
        sent.data_bytes,
        (1 << 20) + 4096,
        "block 1 whole and the filesystem block holding the late bytes"
    );
    assert_eq!(
        std::fs::read(dst.path().join("volumes/acme.img")).unwrap(),
        std::fs::read(&image).unwrap()
    );
}

#[test]
fn a_stream_that_does_not_fit_the_precopy_held_here_is_refused() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (from, to) = (at(src.path(), "open"), at(dst.path(), "open"));
    std::fs::create_dir_all(src.path().join("plain/open")).unwrap();
    let data = src.path().join("plain/open/data");
    std::fs::write(&data, pattern(3 << 20, 5)).unwrap();
    let (chunks, pre_sent) = stream(&from, 1, true, None);
    let pre = import(&to, 1, None, chunks, true).unwrap();
    let file = File::options().write(true).open(&data).unwrap();
    file.write_all_at(&[9; 10], 2 << 20).unwrap();
    let (delta, _) = stream(&from, 2, false, Some(&pre_sent.base));
    let Some(Body::Entry(entry)) = &delta[1].body else {
        panic!("an entry second")
    };
    assert_eq!(entry.changed_blocks, [2]);

    // The two ends disagree on what the pre-copy held: the whole volume's digest differs.
    let mut wrong = pre.base.clone();
    wrong.files.get_mut("data").unwrap()[0] = [0; 32];
    let err = import(&to, 2, Some(wrong), delta.clone(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("checksum mismatch: the volume's SHA-256"),
        "{err}"
    );
    // The receiver lost its pre-copy (a restart).
    let lost = import(&to, 2, None, delta.clone(), false)
        .unwrap_err()
        .to_string();
    assert_eq!(
        lost,
        "volume stream: the stream builds on pre-copy 1, which this host does not hold"
    );
    // Data for a block the stream says is kept.
    let mut kept = delta.clone();
    if let Some(Body::Entry(e)) = &mut kept[1].body {
        e.changed_blocks.clear();
    }
    let err = import(&to, 2, Some(pre.base.clone()), kept, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("for a block kept from the pre-copy"), "{err}");
    // A file the pre-copy never had.
    let mut foreign = delta;
    if let Some(Body::Entry(e)) = &mut foreign[1].body {
        e.path = "other".into();
    }
    let err = import(&to, 2, Some(pre.base), foreign, false)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "volume stream: \"other\" is not a file of the pre-copy"
    );
    assert!(!dst.path().join("plain/open").exists(), "nothing in place");
}

#[test]
fn a_file_settled_before_its_precopy_and_unchanged_since_is_not_read_again() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (from, to) = (at(src.path(), "calm"), at(dst.path(), "calm"));
    let plain = src.path().join("plain/calm");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("old.db"), pattern(3 << 20, 4)).unwrap();
    std::fs::write(plain.join("busy.db"), pattern(2 << 20, 5)).unwrap();
    // Both settle; then busy.db is written just before the pre-copy reads it.
    std::thread::sleep(STAMP_SETTLED + Duration::from_millis(100));
    File::options()
        .write(true)
        .open(plain.join("busy.db"))
        .unwrap()
        .write_all_at(&[7; 10], 5)
        .unwrap();
    let (chunks, pre_sent) = stream(&from, 1, true, None);
    let pre = import(&to, 1, None, chunks, true).unwrap();
    assert_eq!(
        pre_sent.base.stamps.keys().collect::<Vec<_>>(),
        ["old.db"],
        "a file changed less than {STAMP_SETTLED:?} ago has no stamp"
    );
    assert!(pre.base.stamps.is_empty(), "stamps are the sender's only");

    // The sender's base says every block of both files differs from what is on disk now.
    let mut wrong = pre_sent.base.clone();
    for blocks in wrong.files.values_mut() {
        blocks.iter_mut().for_each(|b| *b = [0; 32]);
    }
    let changed_blocks = |base: &Base| -> Vec<(String, Vec<u64>)> {
        stream(&from, 2, false, Some(base))
            .0
            .into_iter()
            .filter_map(|c| match c.body {
                Some(Body::Entry(e)) => Some((e.path, e.changed_blocks)),
                _ => None,
            })
            .collect()
    };
    // old.db's stamp is as it was: its base is taken on trust, unread; busy.db is read.
    assert_eq!(
        changed_blocks(&wrong),
        [("busy.db".into(), vec![0, 1]), ("old.db".into(), vec![])]
    );
    // Without the stamp, old.db is read and found to differ.
    wrong.stamps.clear();
    assert_eq!(
        changed_blocks(&wrong),
        [
            ("busy.db".into(), vec![0, 1]),
            ("old.db".into(), vec![0, 1, 2])
        ]
    );
    // Any write changes the stamp (even one that leaves size and mtime as they were).
    let old = plain.join("old.db");
    let mtime = std::fs::metadata(&old).unwrap().modified().unwrap();
    let file = File::options().write(true).open(&old).unwrap();
    file.write_all_at(&[1; 4], 1 << 20).unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);
    let (chunks, sent) = stream(&from, 3, false, Some(&pre_sent.base));
    assert_eq!(sent.data_bytes, 1 << 20, "old.db's block 1 only");
    let received = import(&to, 3, Some(pre.base), chunks, false).unwrap();
    assert_eq!(tree(&dst.path().join("plain/calm")), tree(&plain));
    assert_eq!(sent.volume_sha256, received.volume_sha256);
    assert_eq!(
        stream(&from, 4, false, None).1.volume_sha256,
        received.volume_sha256
    );
}

/// Whether any data chunk of `chunks` holds `marker`.
fn carries(chunks: &[proto::VolumeChunk], marker: &[u8]) -> bool {
    chunks.iter().any(|c| match &c.body {
        Some(Body::Data(d)) => d.data.windows(marker.len()).any(|w| w == marker),
        Some(Body::Entry(e)) => e
            .symlink
            .as_bytes()
            .windows(marker.len())
            .any(|w| w == marker),
        _ => false,
    })
}

/// A running tenant swaps a directory of its volume for a link to a host directory, over and
/// over, while its volume is pre-copied: no pre-copy ever carries the host file's contents (a
/// walk that meets the link fails or sends the link as a link).
#[test]
fn a_tenant_swapping_a_directory_for_a_link_never_gets_a_host_file_read() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("agent");
    std::fs::create_dir_all(&host).unwrap();
    let marker = b"HOST-SECRET-4f1c9e";
    std::fs::write(host.join("host.pem"), marker).unwrap();
    let from = at(dir.path(), "acme");
    let plain = from.plain();
    std::fs::create_dir_all(plain.join("d")).unwrap();
    std::fs::write(plain.join("d/host.pem"), b"the tenant's own file").unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (plain, host, stop) = (plain.clone(), host.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::rename(plain.join("d"), plain.join("d.real"));
                let _ = std::os::unix::fs::symlink(&host, plain.join("d"));
                let _ = std::fs::remove_file(plain.join("d"));
                let _ = std::fs::rename(plain.join("d.real"), plain.join("d"));
                swaps += 1;
            }
            swaps
        })
    };
    let (mut sent, mut failed) = (0, 0);
    for id in 0..2000 {
        let mut chunks = Vec::new();
        match export(&from, id, true, None, |c| {
            chunks.push(c);
            Ok(())
        }) {
            Ok(_) => sent += 1,
            Err(_) => failed += 1,
        }
        assert!(
            !carries(&chunks, marker),
            "pre-copy {id} read the host file"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 100, "the link was swapped in {swaps} times");
    assert!(sent > 0, "some pre-copies went through ({failed} failed)");

    // The link itself, standing still: sent as a link, the file behind it never read.
    std::fs::remove_dir_all(plain.join("d")).unwrap();
    std::os::unix::fs::symlink(&host, plain.join("d")).unwrap();
    std::os::unix::fs::symlink(host.join("host.pem"), plain.join("pem")).unwrap();
    let chunks = chunks_of(&from);
    let links: Vec<_> = chunks
        .iter()
        .filter_map(|c| match &c.body {
            Some(Body::Entry(e)) if !e.symlink.is_empty() => Some(e.path.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(links, vec!["d", "pem"]);
    let data: Vec<u8> = chunks
        .iter()
        .filter_map(|c| match &c.body {
            Some(Body::Data(d)) => Some(d.data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(!data.windows(marker.len()).any(|w| w == marker));
}

/// A LUKS copy kept aside (or cut short) is erased before it is deleted: its header and keyslot
/// area are zeros on the disk, the rest of its blocks untouched; other files just go.
#[test]
fn a_luks_copy_is_erased_before_it_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("incoming/acme");
    std::fs::create_dir_all(&staging).unwrap();
    let mut image = b"LUKS\xba\xbe".to_vec();
    image.extend(pattern((17 << 20) - 6, 3));
    std::fs::write(staging.join("acme.img"), &image).unwrap();
    std::fs::write(staging.join("notes"), b"LUKS? no").unwrap();
    // The same inode, seen from outside the directory: what stays on the disk.
    let blocks = dir.path().join("blocks");
    std::fs::hard_link(staging.join("acme.img"), &blocks).unwrap();
    assert!(shred_copy(&staging).unwrap(), "a LUKS copy was erased");
    assert!(!staging.exists());
    let left = std::fs::read(&blocks).unwrap();
    assert_eq!(left.len(), image.len());
    assert!(
        left[..16 << 20].iter().all(|b| *b == 0),
        "header and keyslots zeroed"
    );
    assert_eq!(
        left[16 << 20..],
        image[16 << 20..],
        "the data area as it was"
    );
    // Nothing there: nothing to do. A plain copy: deleted, nothing erased.
    assert!(!shred_copy(&staging).unwrap());
    std::fs::create_dir_all(staging.join("sub")).unwrap();
    std::fs::write(staging.join("sub/file"), b"x").unwrap();
    assert!(!shred_copy(&staging).unwrap());
    assert!(!staging.exists());
}

/// Writes the unencrypted image of `tenant` under `root`: 3 MiB with data in its first and
/// last pages; its middle either a hole or zeros written out.
fn image_with_middle(root: &Path, tenant: &str, zeros_written: bool) -> PathBuf {
    let path = root.join("volumes").join(format!("{tenant}.ext4"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = File::create(&path).unwrap();
    file.set_len(3 << 20).unwrap();
    file.write_all_at(b"superblock", 0).unwrap();
    if zeros_written {
        file.write_all_at(&vec![0u8; 2 << 20], 512 << 10).unwrap();
    }
    file.write_all_at(b"last", (3 << 20) - 4).unwrap();
    file.sync_all().unwrap();
    path
}

#[test]
fn an_all_zero_page_travels_as_a_hole_and_the_digest_does_not_depend_on_how_it_is_held() {
    let (a, b, dst) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let holed = image_with_middle(a.path(), "open", false);
    assert!(
        std::fs::metadata(&holed).unwrap().blocks() * 512 < 1 << 20,
        "the middle is a hole"
    );
    let written = image_with_middle(b.path(), "open", true);
    assert!(
        std::fs::metadata(&written).unwrap().blocks() * 512 >= 2 << 20,
        "the zeros are on disk"
    );
    assert_eq!(
        at(a.path(), "open").layout(),
        Some(proto::VolumeLayout::PlainImage)
    );
    let (_, from_holes) = stream(&at(a.path(), "open"), 7, false, None);
    let (chunks, from_zeros) = stream(&at(b.path(), "open"), 7, false, None);
    assert_eq!(from_zeros.volume_sha256, from_holes.volume_sha256);
    assert_eq!(from_zeros.base.files, from_holes.base.files);
    assert_eq!(
        from_zeros.data_bytes,
        2 * PAGE,
        "only the two pages with data travel"
    );
    let received = import(&at(dst.path(), "open"), 7, None, chunks, false).unwrap();
    agree(&from_zeros, &received);
    let placed = dst.path().join("volumes/open.ext4");
    assert_eq!(
        std::fs::read(&placed).unwrap(),
        std::fs::read(&written).unwrap()
    );
    assert!(
        std::fs::metadata(&placed).unwrap().blocks() * 512 < 1 << 20,
        "the zeros arrive as a hole"
    );
}

#[test]
fn a_stream_of_another_format_is_refused_before_anything_is_written() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    image_with_middle(src.path(), "open", false);
    let (mut chunks, _) = stream(&at(src.path(), "open"), 7, false, None);
    if let Some(Body::Header(h)) = &mut chunks[0].body {
        h.stream_format = 0;
    }
    let err = import(&at(dst.path(), "open"), 7, None, chunks, false)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "volume stream: stream format 0 (from an agent of another version); this agent reads \
         format 2: run the same berth-agent version on both hosts of a move"
    );
    assert!(!dst.path().join("incoming").exists() && !dst.path().join("volumes").exists());
}
