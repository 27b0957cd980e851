use berth_shared::store::MemStore;

use super::*;

fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

#[test]
fn keys_are_stored_only_wrapped_and_bound_to_their_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let store: Arc<dyn Store> = Arc::new(MemStore::default());
    let vault = KeyVault::open(&path, store.clone()).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (acme, beta) = (tenant("acme"), tenant("beta"));
    assert!(vault.get(&acme).unwrap().is_none());
    assert!(vault.ensure(&acme, Durability::Flushed).unwrap(), "made");
    let key = vault.get(&acme).unwrap().unwrap();
    assert_eq!(key.len(), KEY_BYTES);
    assert!(!vault.ensure(&acme, Durability::Flushed).unwrap(), "kept");
    assert_eq!(
        vault.get(&acme).unwrap().unwrap(),
        key,
        "ensure keeps an existing key"
    );
    // The store holds ciphertext only: the key bytes are nowhere in it.
    let (_, blob) = store.scan_prefix(PREFIX).unwrap().remove(0);
    assert_eq!(blob.len(), 1 + NONCE_LEN + KEY_BYTES + 16);
    assert!(!blob.windows(KEY_BYTES).any(|w| w == &key[..]));
    // Moved to another tenant, the blob does not open.
    store
        .apply(
            vec![Write::Put(format!("{PREFIX}beta"), blob.clone())],
            Durability::Flushed,
        )
        .unwrap();
    assert_eq!(
        vault.get(&beta).unwrap_err().to_string(),
        "the wrapped volume key of beta does not open with this master key"
    );
    // Another master key opens nothing.
    let other = KeyVault::new(
        MasterKey::create(&dir.path().join("other.key")).unwrap(),
        store.clone(),
    );
    assert!(other.get(&acme).is_err());
    // Reopened with the same file: the same key.
    let again = KeyVault::open(&path, store.clone()).unwrap();
    assert_eq!(again.get(&acme).unwrap().unwrap(), key);
    // Destroyed: gone for good.
    assert!(vault.destroy(&acme).unwrap());
    assert!(vault.get(&acme).unwrap().is_none());
    assert!(!vault.destroy(&acme).unwrap());
    assert_eq!(format!("{:?}", vault.master), "MasterKey(..)");
}

#[test]
fn a_bad_or_missing_master_key_is_refused_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let store: Arc<dyn Store> = Arc::new(MemStore::default());
    KeyVault::open(&path, store.clone())
        .unwrap()
        .ensure(&tenant("acme"), Durability::Flushed)
        .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = KeyVault::open(&path, store.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("mode 644 lets others read it: chmod 600"),
        "{err}"
    );
    std::fs::remove_file(&path).unwrap();
    let err = KeyVault::open(&path, store.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("is missing but 1 volume keys are wrapped with it: restore it"),
        "{err}"
    );
    assert!(!path.exists(), "no new master key was made");
    berth_shared::pki::write_file_atomic(&path, b"short", 0o600).unwrap();
    let err = KeyVault::open(&path, store).unwrap_err().to_string();
    assert!(err.ends_with("holds 5 bytes, not 32"), "{err}");
    assert!(
        MasterKey::create(&path)
            .unwrap_err()
            .to_string()
            .ends_with("exists already")
    );
}
