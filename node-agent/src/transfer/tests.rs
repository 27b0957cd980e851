use std::os::unix::fs::MetadataExt;

use super::*;

fn at(root: &Path, tenant: &str) -> VolumeLocation {
    VolumeLocation {
        root: root.to_path_buf(),
        tenant: TenantId::new(tenant).unwrap(),
    }
}

/// Exports `from` and imports the chunks into `to`; returns what each end reported.
fn copy(from: &VolumeLocation, to: &VolumeLocation) -> ((u64, String), (u64, String)) {
    let mut chunks = Vec::new();
    let sent = export(from, 7, |c| {
        chunks.push(c);
        Ok(())
    })
    .unwrap();
    let mut importer = Importer::new(to.clone(), 7).unwrap();
    for c in chunks {
        importer.accept(c).unwrap();
    }
    (sent, importer.finish().unwrap())
}

fn chunks_of(from: &VolumeLocation) -> Vec<proto::VolumeChunk> {
    let mut chunks = Vec::new();
    export(from, 7, |c| {
        chunks.push(c);
        Ok(())
    })
    .unwrap();
    chunks
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
    assert_eq!(sent, received);
    assert!(
        sent.0 < 8 << 20,
        "only the data extents travel, not 64 MiB: {}",
        sent.0
    );
    assert!(sent.0 >= (3 << 20) + 16);
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
        let mut importer = Importer::new(to.clone(), 7).unwrap();
        for c in chunks {
            if let Err(e) = importer.accept(c) {
                return e.to_string();
            }
        }
        importer.finish().unwrap_err().to_string()
    };
    let flipped = run(&|c| {
        if let Some(Body::Data(d)) = &mut c[2].body {
            d.data[0] ^= 1;
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
    let mut importer = Importer::new(at(dst.path(), "acme"), 7).unwrap();
    importer.accept(chunks.remove(0)).unwrap();
    assert_eq!(
        importer.accept(chunks.remove(0)).unwrap_err().to_string(),
        "volume stream: a LUKS volume is the one file acme.img, not \"other.img\""
    );
    // Mounted (its mount point holds the filesystem): refused before anything is sent.
    std::fs::create_dir_all(src.path().join("mnt/acme/lost+found")).unwrap();
    let mut sent = 0;
    let err = export(&from, 7, |_| {
        sent += 1;
        Ok(())
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the volume of acme is attached (open or mounted): it is read only once closed"
    );
    assert_eq!(sent, 0);
    let none = export(&at(src.path(), "nobody"), 7, |_| Ok(())).unwrap_err();
    assert_eq!(none.to_string(), "nobody has no volume on this host");
}
