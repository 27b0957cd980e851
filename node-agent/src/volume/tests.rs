use std::collections::BTreeSet;
use std::sync::Mutex;

use berth_shared::proto;

use super::*;
use crate::volume::cryptsetup::KEY_BYTES;

/// Records every call; LUKS-ness, filesystems and mounts live in sets.
#[derive(Debug, Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
    luks: Mutex<BTreeSet<PathBuf>>,
    filesystems: Mutex<BTreeSet<PathBuf>>,
    mounted: Mutex<BTreeSet<PathBuf>>,
    /// What each filesystem made from a directory was made with: that directory's names.
    made_from: Mutex<Vec<(PathBuf, Vec<String>)>>,
    free: u64,
    format_fails: bool,
}

impl Fake {
    fn with_free(free: u64) -> Self {
        Self {
            free,
            ..Default::default()
        }
    }
    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
    fn volumes(&self) -> Volumes<'_> {
        Volumes {
            crypt: self,
            mounter: self,
        }
    }
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

impl Cryptsetup for Fake {
    fn format(&self, device: &Path, _: &VolumeKey) -> Result<(), CryptError> {
        self.log(format!("format {}", name(device)));
        if self.format_fails {
            return Err(CryptError::KeyLength(0));
        }
        self.luks.lock().unwrap().insert(device.to_path_buf());
        Ok(())
    }
    fn is_luks(&self, device: &Path) -> Result<bool, CryptError> {
        self.log(format!("isLuks {}", name(device)));
        Ok(self.luks.lock().unwrap().contains(device))
    }
    fn dump(&self, _: &Path) -> Result<String, CryptError> {
        unreachable!("not used by volumes")
    }
    fn key_opens(&self, _: &Path, _: &VolumeKey) -> Result<bool, CryptError> {
        unreachable!("not used by volumes")
    }
    fn open(&self, device: &Path, mapper: &str, _: &VolumeKey) -> Result<(), CryptError> {
        self.log(format!("open {} {mapper}", name(device)));
        Ok(())
    }
    fn close(&self, mapper: &str) -> Result<(), CryptError> {
        self.log(format!("close {mapper}"));
        Ok(())
    }
    fn erase(&self, device: &Path) -> Result<(), CryptError> {
        self.log(format!("erase {}", name(device)));
        Ok(())
    }
}

impl Mounter for Fake {
    fn has_filesystem(&self, device: &Path) -> Result<bool, VolumeError> {
        self.log(format!("hasFs {}", name(device)));
        if device.is_file() {
            return holds_ext4(device);
        }
        Ok(self.filesystems.lock().unwrap().contains(device))
    }
    fn make_filesystem(
        &self,
        device: &Path,
        owner: u32,
        contents: Option<&Path>,
    ) -> Result<(), VolumeError> {
        assert_eq!(owner, TENANT_ID, "the tenant owns its volume's root");
        match contents {
            None => self.log(format!("mkfs {}", name(device))),
            Some(dir) => {
                self.log(format!("mkfs {} from {}", name(device), name(dir)));
                let mut names: Vec<String> = std::fs::read_dir(dir)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                self.made_from
                    .lock()
                    .unwrap()
                    .push((device.to_path_buf(), names));
            }
        }
        if device.is_file() {
            // Like mke2fs, in the file itself: it travels with renames.
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(device)
                .unwrap();
            file.write_all_at(&[0x53, 0xEF], EXT4_MAGIC_AT).unwrap();
        } else {
            self.filesystems
                .lock()
                .unwrap()
                .insert(device.to_path_buf());
        }
        Ok(())
    }
    fn is_mounted(&self, target: &Path) -> Result<bool, VolumeError> {
        Ok(self.mounted.lock().unwrap().contains(target))
    }
    fn mount(&self, device: &Path, target: &Path) -> Result<(), VolumeError> {
        self.log(format!("mount {} {}", name(device), name(target)));
        // Like the system mounter, which makes the mount point.
        std::fs::create_dir_all(target).unwrap();
        self.mounted.lock().unwrap().insert(target.to_path_buf());
        Ok(())
    }
    fn unmount(&self, target: &Path) -> Result<(), VolumeError> {
        self.log(format!("umount {}", name(target)));
        self.mounted.lock().unwrap().remove(target);
        Ok(())
    }
    fn free_bytes(&self, _: &Path) -> Result<u64, VolumeError> {
        Ok(self.free)
    }
    fn reserve(&self, file: &Path, size: u64) -> Result<(), VolumeError> {
        assert_eq!(std::fs::metadata(file).unwrap().len(), size);
        self.log(format!("reserve {}", name(file)));
        Ok(())
    }
}

fn key() -> VolumeKey {
    VolumeKey::from_bytes(&[3; KEY_BYTES]).unwrap()
}

fn paths(root: &Path) -> VolumePaths {
    VolumePaths::file(root, &TenantId::new("acme").unwrap())
}

#[test]
fn a_new_volume_is_made_formatted_and_mounted_then_only_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::with_free(10 << 30);
    let p = paths(dir.path());
    assert_eq!(
        p.mapped().as_deref(),
        Some(Path::new("/dev/mapper/berth-acme"))
    );
    assert_eq!(
        fake.volumes().attach(&p, 1 << 30, Some(&key())).unwrap(),
        Attached::Created
    );
    assert_eq!(
        fake.calls(),
        [
            "format acme.img",
            "open acme.img berth-acme",
            "mkfs berth-acme",
            "reserve acme.img",
            "mount berth-acme acme"
        ]
    );
    assert_eq!(std::fs::metadata(&p.backing).unwrap().len(), 1 << 30);
    // Mounted: nothing to do.
    assert_eq!(
        fake.volumes().attach(&p, 1 << 30, Some(&key())).unwrap(),
        Attached::AlreadyMounted
    );
    assert!(fake.calls().is_empty());
    // Closed (the container stopped), then back: opened, never formatted again.
    fake.volumes().detach(&p).unwrap();
    assert_eq!(
        fake.calls(),
        ["umount acme"],
        "/dev/mapper/berth-acme is not there to close"
    );
    assert_eq!(
        fake.volumes().attach(&p, 1 << 30, Some(&key())).unwrap(),
        Attached::Opened
    );
    assert_eq!(
        fake.calls(),
        [
            "isLuks acme.img",
            "open acme.img berth-acme",
            "hasFs berth-acme",
            "reserve acme.img",
            "mount berth-acme acme"
        ]
    );
}

#[test]
fn bad_input_is_refused_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::with_free(1 << 30);
    let p = paths(dir.path());
    let err = fake.volumes().attach(&p, 0, Some(&key())).unwrap_err();
    assert_eq!(err.to_string(), "volume size: must be greater than 0");
    let err = fake
        .volumes()
        .attach(&p, 2 << 30, Some(&key()))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("volume size: 2147483648 bytes is more than the 1073741824 bytes free on "),
        "{err}"
    );
    assert!(!p.backing.exists(), "nothing made");
    assert!(fake.calls().is_empty());
    // An existing file that is not LUKS (someone's data): refused, never formatted.
    std::fs::write(&p.backing, b"precious").unwrap();
    let err = fake
        .volumes()
        .attach(&p, 1 << 20, Some(&key()))
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("acme.img: exists and is not a LUKS volume; refusing to format it"),
        "{err}"
    );
    assert_eq!(fake.calls(), ["isLuks acme.img"]);
    assert_eq!(std::fs::read(&p.backing).unwrap(), b"precious");
    // A block device that is not there.
    let missing = VolumePaths::block_device(
        dir.path(),
        &TenantId::new("acme").unwrap(),
        Path::new("/dev/disk/by-id/scsi-0HC_Volume_404"),
    );
    let err = fake
        .volumes()
        .attach(&missing, 1 << 30, Some(&key()))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "/dev/disk/by-id/scsi-0HC_Volume_404: the block device does not exist"
    );
    assert!(fake.calls().is_empty());
}

#[test]
fn a_failed_format_leaves_no_file_and_a_purge_erases_before_deleting() {
    let dir = tempfile::tempdir().unwrap();
    let failing = Fake {
        format_fails: true,
        ..Fake::with_free(1 << 30)
    };
    let p = paths(dir.path());
    failing
        .volumes()
        .attach(&p, 1 << 20, Some(&key()))
        .unwrap_err();
    assert!(!p.backing.exists());

    let fake = Fake::with_free(1 << 30);
    fake.volumes().attach(&p, 1 << 20, Some(&key())).unwrap();
    fake.calls();
    fake.volumes().purge(&p).unwrap();
    assert_eq!(
        fake.calls(),
        ["umount acme", "isLuks acme.img", "erase acme.img"]
    );
    assert!(!p.backing.exists(), "the ciphertext is gone too");
    // Again: nothing left to do, and no error.
    fake.volumes().purge(&p).unwrap();
}

/// Holds one key, for any tenant.
#[derive(Debug)]
struct OneKey;

impl KeySource for OneKey {
    fn volume_key(&self, _: &TenantId) -> Option<VolumeKey> {
        Some(key())
    }
}

fn host_volumes(root: &Path, fake: &Arc<Fake>) -> HostVolumes {
    HostVolumes {
        root: root.to_path_buf(),
        crypt: fake.clone(),
        mounter: fake.clone(),
        keys: Arc::new(OneKey),
        dm_crypt: true,
    }
}

fn tenant_spec(id: &str, encrypted: bool) -> TenantSpec {
    TenantSpec::from_resolved(proto::TenantSpec {
        tenant_id: id.into(),
        image: "ghcr.io/openclaw/gateway:1".into(),
        resources: Some(proto::Resources {
            memory_bytes: 128 << 20,
            cpu_millicores: 100,
            cpu_limit_millicores: 0,
            volume_bytes: 1 << 20,
        }),
        volume: Some(proto::VolumeSpec {
            size_bytes: 1 << 20,
            encrypted,
            mount_path: String::new(),
        }),
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test]
async fn a_host_purge_shreds_an_encrypted_volume_and_deletes_a_plain_one() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::with_free(1 << 30));
    let host = host_volumes(dir.path(), &fake);
    let sealed = TenantId::new("sealed").unwrap();
    let mount = host.prepare(&tenant_spec("sealed", true)).await.unwrap();
    assert_eq!(mount, dir.path().join("mnt/sealed"));
    fake.calls();
    assert_eq!(
        host.purge(&sealed).await.unwrap(),
        Purged {
            erased: true,
            deleted: true
        }
    );
    assert_eq!(
        fake.calls(),
        ["umount sealed", "isLuks sealed.img", "erase sealed.img"]
    );
    assert!(!dir.path().join("volumes/sealed.img").exists());

    let plain = host.prepare(&tenant_spec("open", false)).await.unwrap();
    std::fs::write(plain.join("chat.log"), "hello").unwrap();
    assert_eq!(
        host.purge(&TenantId::new("open").unwrap()).await.unwrap(),
        Purged {
            erased: false,
            deleted: true
        }
    );
    assert!(!plain.exists());
    // Nothing left: a second purge finds nothing and is no error.
    assert_eq!(host.purge(&sealed).await.unwrap(), Purged::default());
}

fn plain_paths(root: &Path) -> VolumePaths {
    VolumePaths::plain(root, &TenantId::new("open").unwrap())
}

#[test]
fn an_unencrypted_volume_is_an_image_of_its_size_made_once_and_never_over_other_data() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::with_free(10 << 30);
    let p = plain_paths(dir.path());
    assert_eq!(p.backing, dir.path().join("volumes/open.ext4"));
    assert_eq!(p.mount, dir.path().join("plain/open"));
    assert_eq!(
        fake.volumes().attach(&p, 64 << 20, None).unwrap(),
        Attached::Created
    );
    assert_eq!(
        fake.calls(),
        [
            "mkfs open.ext4",
            "reserve open.ext4",
            "mount open.ext4 open"
        ],
        "no LUKS step; its blocks allocated before the tenant can write"
    );
    assert_eq!(std::fs::metadata(&p.backing).unwrap().len(), 64 << 20);
    fake.volumes().detach(&p).unwrap();
    assert_eq!(fake.calls(), ["umount open"]);
    assert_eq!(
        fake.volumes().attach(&p, 64 << 20, None).unwrap(),
        Attached::Opened
    );
    assert_eq!(
        fake.calls(),
        [
            "hasFs open.ext4",
            "reserve open.ext4",
            "mount open.ext4 open"
        ]
    );
    // A key for an unencrypted volume, or none for an encrypted one: refused.
    fake.volumes().detach(&p).unwrap();
    fake.calls();
    for (paths, key) in [(&p, Some(key())), (&paths(dir.path()), None)] {
        let err = fake
            .volumes()
            .attach(paths, 64 << 20, key.as_ref())
            .unwrap_err();
        assert!(
            err.to_string()
                .ends_with(": an encrypted volume needs its key, an unencrypted one takes none"),
            "{err}"
        );
    }
    assert!(fake.calls().iter().all(|c| !c.starts_with("mkfs")));
    // An existing file that is not ext4: refused, never formatted.
    let other = VolumePaths::plain(dir.path(), &TenantId::new("other").unwrap());
    std::fs::write(&other.backing, b"precious").unwrap();
    let err = fake
        .volumes()
        .attach(&other, 64 << 20, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("other.ext4: exists and is not an ext4 filesystem; refusing to format it"),
        "{err}"
    );
    assert_eq!(fake.calls(), ["hasFs other.ext4"]);
    assert_eq!(std::fs::read(&other.backing).unwrap(), b"precious");
    // Bigger than the disk's free space: nothing made.
    let small = Fake::with_free(1 << 20);
    let third = VolumePaths::plain(dir.path(), &TenantId::new("third").unwrap());
    small.volumes().attach(&third, 64 << 20, None).unwrap_err();
    assert!(!third.backing.exists());
}

/// A volume from before volumes had sizes: files in the directory at the mount point.
fn legacy_directory(p: &VolumePaths) {
    std::fs::create_dir_all(p.mount.join("chats")).unwrap();
    std::fs::write(p.mount.join("chats/today.log"), "hello").unwrap();
    std::fs::write(p.mount.join("credentials.json"), "{}").unwrap();
}

#[test]
fn a_directory_volume_moves_into_an_image_and_is_emptied_only_once_the_image_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::with_free(10 << 30);
    let p = plain_paths(dir.path());
    legacy_directory(&p);
    assert!(fake.volumes().adopt_directory(&p, 64 << 20).unwrap());
    assert_eq!(fake.calls(), ["mkfs open.ext4.partial from open"]);
    assert_eq!(
        fake.made_from.lock().unwrap().clone(),
        [(
            dir.path().join("volumes/open.ext4.partial"),
            vec!["chats".to_string(), "credentials.json".to_string()]
        )],
        "made from the directory's files"
    );
    assert!(p.backing.is_file(), "the image is in place");
    assert!(!dir.path().join("volumes/open.ext4.partial").exists());
    assert_eq!(std::fs::read_dir(&p.mount).unwrap().count(), 0, "emptied");
    // Done: nothing more to move, and the image mounts there.
    assert!(!fake.volumes().adopt_directory(&p, 64 << 20).unwrap());
    assert_eq!(
        fake.volumes().attach(&p, 64 << 20, None).unwrap(),
        Attached::Opened
    );
}

#[test]
fn a_directory_move_cut_short_resumes_and_one_that_cannot_fit_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::with_free(10 << 30);
    let p = plain_paths(dir.path());
    let partial = dir.path().join("volumes/open.ext4.partial");
    // Cut short while the image was made: the directory still holds the files; it is made
    // again from them.
    legacy_directory(&p);
    std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
    std::fs::write(&partial, b"half").unwrap();
    assert!(fake.volumes().adopt_directory(&p, 64 << 20).unwrap());
    assert_eq!(fake.calls(), ["mkfs open.ext4.partial from open"]);
    assert_eq!(std::fs::metadata(&p.backing).unwrap().len(), 64 << 20);

    // Cut short after the directory was emptied: the image aside is complete and goes in.
    std::fs::rename(&p.backing, &partial).unwrap();
    assert!(fake.volumes().adopt_directory(&p, 64 << 20).unwrap());
    assert!(fake.calls().is_empty(), "nothing made again");
    assert!(p.backing.is_file() && !partial.exists());

    // Files in the directory while the image exists: which is newer is not known; refused.
    std::fs::write(p.mount.join("stray"), "x").unwrap();
    let err = fake.volumes().adopt_directory(&p, 64 << 20).unwrap_err();
    assert!(
        err.to_string()
            .contains("holds files while the volume's image"),
        "{err}"
    );
    assert!(p.mount.join("stray").exists());

    // More data than the volume's size: refused before anything is made.
    let big = VolumePaths::plain(dir.path(), &TenantId::new("big").unwrap());
    std::fs::create_dir_all(&big.mount).unwrap();
    std::fs::write(big.mount.join("data"), vec![1u8; 256 << 10]).unwrap();
    let err = fake.volumes().adopt_directory(&big, 64 << 10).unwrap_err();
    assert!(
        err.to_string().ends_with(
            "more than the volume's size of 65536 bytes; raise the tenant's volume size"
        ),
        "{err}"
    );
    assert!(fake.calls().is_empty());
    assert!(!big.backing.exists() && big.mount.join("data").exists());
}
