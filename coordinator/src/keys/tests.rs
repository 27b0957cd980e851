use base64::Engine;
use berth_shared::store::MemStore;

use super::keyring::Keyring;
use super::*;

fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

#[test]
fn keys_are_kept_only_wrapped_bound_to_their_tenant_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let ring = dir.path().join("volume-keys");
    let store = MemStore::default();
    let vault = KeyVault::open(&path, Keyring::open(&ring).unwrap(), &store).unwrap();
    for file in [&path, &ring] {
        let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    let (acme, beta) = (tenant("acme"), tenant("beta"));
    assert!(vault.get(&acme).unwrap().is_none());
    assert!(vault.ensure(&acme).unwrap(), "made");
    let key = vault.get(&acme).unwrap().unwrap();
    assert_eq!(key.len(), KEY_BYTES);
    assert!(!vault.ensure(&acme).unwrap(), "kept");
    assert_eq!(
        vault.get(&acme).unwrap().unwrap(),
        key,
        "ensure keeps a key"
    );
    vault.sync().unwrap();
    // The keyring holds ciphertext only; the store nothing at all.
    let text = std::fs::read_to_string(&ring).unwrap();
    let blob = vault.keyring.get("acme").unwrap();
    assert_eq!(blob.len(), 1 + NONCE_LEN + KEY_BYTES + 16);
    assert!(!blob.windows(KEY_BYTES).any(|w| w == &key[..]));
    assert!(text.starts_with("acme "), "{text}");
    assert!(store.scan_prefix("").unwrap().is_empty());
    // Moved to another tenant, the blob does not open.
    vault.keyring.add("beta", blob.clone()).unwrap();
    assert_eq!(
        vault.get(&beta).unwrap_err().to_string(),
        "the wrapped volume key of beta does not open with this master key"
    );
    // Another master key opens nothing.
    let other = KeyVault::new(
        MasterKey::create(&dir.path().join("other.key")).unwrap(),
        Keyring::open(&ring).unwrap(),
    );
    assert!(other.get(&acme).is_err());
    // Reopened: the same key.
    let again = KeyVault::open(&path, Keyring::open(&ring).unwrap(), &store).unwrap();
    assert_eq!(again.get(&acme).unwrap().unwrap(), key);
    // Destroyed: gone for good, from the file too.
    assert!(vault.destroy(&acme).unwrap());
    assert!(vault.get(&acme).unwrap().is_none());
    assert!(!vault.destroy(&acme).unwrap());
    let text = std::fs::read_to_string(&ring).unwrap();
    assert!(!text.contains("acme"), "{text}");
    assert_eq!(format!("{:?}", vault.master), "MasterKey(..)");
}

/// A line cut short by a crash mid-append (never acknowledged: a placement answers only after
/// the sync) is dropped; any other damage is an error.
#[test]
fn a_torn_last_line_is_dropped_and_damage_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("volume-keys");
    let keyring = Keyring::open(&ring).unwrap();
    keyring.add("acme", vec![1; 61]).unwrap();
    keyring.sync().unwrap();
    let mut text = std::fs::read_to_string(&ring).unwrap();
    text.push_str("beta AQID");
    std::fs::write(&ring, &text).unwrap();
    let reopened = Keyring::open(&ring).unwrap();
    assert_eq!(reopened.len(), 1);
    assert!(reopened.get("beta").is_none());
    std::fs::write(&ring, "acme not-base64!\n").unwrap();
    let err = Keyring::open(&ring).unwrap_err().to_string();
    assert!(err.ends_with("line 1: not `tenant base64`"), "{err}");
    std::fs::write(&ring, "../x AQID\n").unwrap();
    assert!(Keyring::open(&ring).is_err(), "a tenant id is checked");
}

/// Keys a store held from before the keyring move out of it, durably; a replaced key leaves
/// no trace of the old one in the file.
#[test]
fn keys_move_out_of_the_store_and_a_replaced_key_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let ring = dir.path().join("volume-keys");
    let store = MemStore::default();
    let vault = KeyVault::open(&path, Keyring::open(&ring).unwrap(), &store).unwrap();
    let acme = tenant("acme");
    let blob = vault.wrap(&acme, &[7u8; KEY_BYTES]).unwrap();
    store
        .apply(
            vec![Write::Put(format!("{PREFIX}acme"), blob.clone())],
            Durability::Flushed,
        )
        .unwrap();
    assert_eq!(vault.move_out_of(&store).unwrap(), 1);
    assert!(store.scan_prefix(PREFIX).unwrap().is_empty());
    assert_eq!(
        vault.get(&acme).unwrap().unwrap().as_slice(),
        &[7u8; KEY_BYTES]
    );
    let on_disk = Keyring::open(&ring).unwrap();
    assert_eq!(on_disk.get("acme"), Some(blob.clone()), "durable");
    vault.replace(&acme).unwrap();
    assert_ne!(
        vault.get(&acme).unwrap().unwrap().as_slice(),
        &[7u8; KEY_BYTES]
    );
    let text = std::fs::read_to_string(&ring).unwrap();
    let old = base64::engine::general_purpose::STANDARD.encode(&blob);
    assert!(!text.contains(&old), "the old wrapped key is in no file");
    assert_eq!(vault.move_out_of(&store).unwrap(), 0);
}

#[test]
fn a_bad_or_missing_master_key_is_refused_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let ring = dir.path().join("volume-keys");
    let store = MemStore::default();
    let vault = KeyVault::open(&path, Keyring::open(&ring).unwrap(), &store).unwrap();
    vault.ensure(&tenant("acme")).unwrap();
    vault.sync().unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = KeyVault::open(&path, Keyring::open(&ring).unwrap(), &store)
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("mode 644 lets others read it: chmod 600"),
        "{err}"
    );
    std::fs::remove_file(&path).unwrap();
    let err = KeyVault::open(&path, Keyring::open(&ring).unwrap(), &store)
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("is missing but 1 volume keys are wrapped with it: restore it"),
        "{err}"
    );
    assert!(!path.exists(), "no new master key was made");
    berth_shared::pki::write_file_atomic(&path, b"short", 0o600).unwrap();
    let err = KeyVault::open(&path, Keyring::open(&ring).unwrap(), &store)
        .unwrap_err()
        .to_string();
    assert!(err.ends_with("holds 5 bytes, not 32"), "{err}");
    assert!(
        MasterKey::create(&path)
            .unwrap_err()
            .to_string()
            .ends_with("exists already")
    );
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Whether any file under `dir` holds `key` raw, or a wrapped form of `tenant`'s key that
/// `vault`'s master key opens to it.
fn anywhere(dir: &Path, vault: &KeyVault, tenant: &TenantId, key: &[u8]) -> Vec<PathBuf> {
    let blob_len = 1 + NONCE_LEN + KEY_BYTES + 16;
    let mut found = Vec::new();
    for file in files_under(dir) {
        let bytes = std::fs::read(&file).unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let encoded = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let raw = bytes.windows(key.len()).any(|w| w == key)
            || text.contains(&encoded(key))
            || text.contains(&hex::encode(key));
        let wrapped = bytes.windows(blob_len).any(|w| {
            w[0] == FORMAT_V1
                && vault
                    .unwrap_blob(tenant, w)
                    .is_ok_and(|k| k.as_slice() == key)
        }) || text.split_whitespace().any(|word| {
            base64::engine::general_purpose::STANDARD
                .decode(word)
                .is_ok_and(|b| {
                    vault
                        .unwrap_blob(tenant, &b)
                        .is_ok_and(|k| k.as_slice() == key)
                })
        });
        if raw || wrapped {
            found.push(file);
        }
    }
    found
}

/// A purge is durable in the coordinator's own files: after it, no file under the state
/// directory holds the key in any form the master key (the same one a copy taken before the
/// purge holds) opens. Keys a store kept from before the keyring are moved out and the store
/// rewritten, so its old segment files do not keep them either; the copy taken before shows
/// what the scan finds when the key is there.
#[test]
fn a_purged_key_is_in_no_file_of_the_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (master, ring, db) = (
        state.join("master.key"),
        state.join("volume-keys"),
        state.join("db"),
    );
    let (old, new, kept) = (tenant("old"), tenant("new"), tenant("kept"));
    // A store from before the keyring, holding two tenants' wrapped keys.
    let store = berth_shared::store::SledStore::open(&db).unwrap();
    let vault = KeyVault::open(&master, Keyring::open(&ring).unwrap(), &store).unwrap();
    let old_key = [0x5au8; KEY_BYTES];
    let kept_key = [0xa5u8; KEY_BYTES];
    let writes = vec![
        Write::Put(format!("{PREFIX}old"), vault.wrap(&old, &old_key).unwrap()),
        Write::Put(
            format!("{PREFIX}kept"),
            vault.wrap(&kept, &kept_key).unwrap(),
        ),
    ];
    store.apply(writes, Durability::Flushed).unwrap();
    // Start-up: the keys move to the keyring, the store is rewritten.
    assert_eq!(vault.move_out_of(&store).unwrap(), 2);
    drop(store);
    berth_shared::store::SledStore::rewrite(&db).unwrap();
    let store = berth_shared::store::SledStore::reopen(&db).unwrap();
    assert!(store.scan_prefix(PREFIX).unwrap().is_empty());
    // A new tenant's key.
    assert!(vault.ensure(&new).unwrap());
    vault.sync().unwrap();
    let new_key = vault.get(&new).unwrap().unwrap().to_vec();
    store.flush().unwrap();

    // A copy of the state directory before the purge: the scan finds both keys in it.
    let copy = dir.path().join("copy");
    for file in files_under(&state) {
        let to = copy.join(file.strip_prefix(&state).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&file, &to).unwrap();
    }
    assert!(!anywhere(&copy, &vault, &old, &old_key).is_empty());
    assert!(!anywhere(&copy, &vault, &new, &new_key).is_empty());

    assert!(vault.destroy(&old).unwrap());
    assert!(vault.destroy(&new).unwrap());
    store.flush().unwrap();
    drop(store);
    assert_eq!(
        anywhere(&state, &vault, &old, &old_key),
        Vec::<PathBuf>::new()
    );
    assert_eq!(
        anywhere(&state, &vault, &new, &new_key),
        Vec::<PathBuf>::new()
    );
    // The scan does see a key that lives on.
    assert!(!anywhere(&state, &vault, &kept, &kept_key).is_empty());
}

/// The volume and backup keyrings live side by side and are rewritten at the same time (a
/// purge destroys both keys of a tenant while another purge runs): neither ever takes the
/// other's file.
#[test]
fn two_keyrings_in_one_directory_rewrite_concurrently_without_mixing() {
    let dir = tempfile::tempdir().unwrap();
    let rings: Vec<_> = ["volume-keys", "backup-keys"]
        .iter()
        .map(|name| std::sync::Arc::new(Keyring::open(&dir.path().join(name)).unwrap()))
        .collect();
    let writers: Vec<_> = rings
        .iter()
        .zip(["vol", "bak"])
        .map(|(ring, prefix)| {
            let ring = ring.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    ring.replace(&format!("{prefix}{}", i % 7), vec![i as u8; 61])
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    for (name, prefix) in [("volume-keys", "vol"), ("backup-keys", "bak")] {
        let reopened = Keyring::open(&dir.path().join(name)).unwrap();
        let tenants: Vec<_> = reopened.entries().into_iter().map(|(t, _)| t).collect();
        assert_eq!(tenants.len(), 7, "{name}: {tenants:?}");
        assert!(
            tenants.iter().all(|t| t.starts_with(prefix)),
            "{name}: {tenants:?}"
        );
    }
}

#[test]
fn sealed_secrets_open_only_under_their_key_and_context() {
    let (one, other) = (
        MasterKey::generate().unwrap(),
        MasterKey::generate().unwrap(),
    );
    let blob = one.seal(b"berth CA key", b"secret").unwrap();
    assert_eq!(&one.open(b"berth CA key", &blob).unwrap()[..], b"secret");
    assert!(one.open(b"another context", &blob).is_none());
    assert!(other.open(b"berth CA key", &blob).is_none());
    let mut damaged = blob.clone();
    *damaged.last_mut().unwrap() ^= 1;
    assert!(one.open(b"berth CA key", &damaged).is_none());
    assert!(one.open(b"berth CA key", &[]).is_none());
}

#[test]
fn a_keyring_made_from_restored_keys_is_durable_and_never_replaces_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volume-keys");
    let entries = vec![
        ("acme".to_string(), vec![1; 61]),
        ("beta".to_string(), vec![2; 61]),
    ];
    Keyring::create_with(&path, entries.clone()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(Keyring::open(&path).unwrap().entries(), entries);
    let err = Keyring::create_with(&path, vec![]).unwrap_err();
    assert!(err.to_string().ends_with("exists already"), "{err}");
    assert_eq!(Keyring::open(&path).unwrap().len(), 2);
}

#[test]
fn a_rotation_wraps_every_key_anew_and_can_be_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("volume-keys");
    let store = MemStore::default();
    let old_path = dir.path().join("master.key");
    let vault = KeyVault::open(&old_path, Keyring::open(&ring).unwrap(), &store).unwrap();
    let (acme, beta) = (tenant("acme"), tenant("beta"));
    vault.ensure(&acme).unwrap();
    vault.ensure(&beta).unwrap();
    vault.sync().unwrap();
    let keys = [
        vault.get(&acme).unwrap().unwrap(),
        vault.get(&beta).unwrap().unwrap(),
    ];
    let before = std::fs::read_to_string(&ring).unwrap();

    let old = MasterKey::load(&old_path).unwrap();
    let new = MasterKey::create(&dir.path().join("master.key.next")).unwrap();
    let keyring = Keyring::open(&ring).unwrap();
    assert_eq!(rewrap(&keyring, &old, &new).unwrap(), 2);
    assert_ne!(std::fs::read_to_string(&ring).unwrap(), before);
    // Run again (a rotation cut short): nothing left to do.
    assert_eq!(
        rewrap(&Keyring::open(&ring).unwrap(), &old, &new).unwrap(),
        0
    );
    // The same keys, opened with the new master key only.
    let rotated = KeyVault::new(
        MasterKey::load(&dir.path().join("master.key.next")).unwrap(),
        Keyring::open(&ring).unwrap(),
    );
    assert_eq!(rotated.get(&acme).unwrap().unwrap(), keys[0]);
    assert_eq!(rotated.get(&beta).unwrap().unwrap(), keys[1]);
    let stale = KeyVault::new(old, Keyring::open(&ring).unwrap());
    assert!(stale.get(&acme).is_err());
    // A key neither master key opens: refused, nothing changed.
    let keyring = Keyring::open(&ring).unwrap();
    keyring.add("zeta", vec![9; 61]).unwrap();
    keyring.sync().unwrap();
    let text = std::fs::read_to_string(&ring).unwrap();
    let other = MasterKey::generate().unwrap();
    let err = rewrap(&keyring, &other, &MasterKey::generate().unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("acme")
            || err.to_string().contains("beta")
            || err.to_string().contains("zeta"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&ring).unwrap(), text);
}
