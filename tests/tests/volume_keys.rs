//! Volume-key custody through the real coordinator: an encrypted tenant's key is made at
//! placement, goes over the mTLS session to the one host the tenant is placed on (a host
//! without dm-crypt never gets the tenant, nor any key), and is nowhere in the coordinator's
//! state directory or log in plaintext, nor in any process's argv or environment meanwhile.

use std::time::Duration;

use berth_tests::clients::{
    agent_client, agent_identity, hello_with_disk, open_session, volume_key_for,
};
use berth_tests::keyscan::{ProcScan, files_holding, key_forms};
use berth_tests::procs::{AgentProc, CoordinatorProc};

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_key_reaches_only_the_host_its_tenant_is_placed_on() {
    berth_shared::tls::install_crypto_provider();
    let coordinator = CoordinatorProc::start(None, "");
    let crypt = AgentProc::enroll(&coordinator, "crypt-host", None);
    let plain = AgentProc::enroll(&coordinator, "plain-host", None);
    let mut client = agent_client(&coordinator, Some(agent_identity(&crypt.state_dir())));
    let mut crypt_session = open_session(&mut client, hello_with_disk("crypt-host", true))
        .await
        .unwrap();
    let mut client = agent_client(&coordinator, Some(agent_identity(&plain.state_dir())));
    let mut plain_session = open_session(&mut client, hello_with_disk("plain-host", false))
        .await
        .unwrap();

    let spec = coordinator.dir.path().join("sealed.toml");
    std::fs::write(
        &spec,
        "tenant_id = \"sealed\"\nimage = \"ghcr.io/openclaw/gateway:1\"\ntier = \"individual\"\n",
    )
    .unwrap();
    let scan = ProcScan::start();
    let (ok, out, err) = coordinator.berthctl(&["--json", "place", spec.to_str().unwrap()]);
    assert!(ok, "{err}");
    let placed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        placed["host_id"], "crypt-host",
        "only a dm-crypt host takes it"
    );

    let key = volume_key_for(
        &mut crypt_session.inbound,
        "sealed",
        Duration::from_secs(10),
    )
    .await
    .expect("the key arrives on the tenant's host");
    assert_eq!(key.len(), 32);
    assert!(
        volume_key_for(&mut plain_session.inbound, "sealed", Duration::from_secs(3))
            .await
            .is_none(),
        "the other host never gets it"
    );

    // Nowhere in plaintext: not in the store, the CA directory or the log, not in any
    // process's argv or environment while it was made, wrapped, unwrapped and sent.
    let forms = key_forms(&key);
    let seen = scan.finish();
    assert!(
        seen.count("berth-coordinat") > 0 && seen.count("berthctl") > 0,
        "the scan watched the coordinator and berthctl ({} passes)",
        seen.passes
    );
    assert_eq!(seen.holding(&forms), Vec::<String>::new());
    assert_eq!(
        files_holding(coordinator.dir.path(), &forms),
        Vec::<std::path::PathBuf>::new()
    );
    let log = coordinator.log();
    assert!(
        forms
            .iter()
            .all(|f| !log.contains(&*String::from_utf8_lossy(f)))
    );
    drop(crypt_session.outbound);
    drop(plain_session.outbound);
}
