//! Disaster recovery of the embedded store through the real binaries: `berth-coordinator
//! backup` while it serves, the state directory lost, `berth-coordinator restore` into a fresh
//! one with only the master key kept apart; the fleet, its tokens, revocations, placements and
//! keys are back, the agents reconnect on their own and an encrypted tenant's host gets the
//! same key as before.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use berth_tests::clients::{
    agent_client, agent_identity, delivered_volume_key, hello, hello_with_disk, open_session,
    session_error, volume_key_for,
};
use berth_tests::procs::{AgentProc, CoordinatorProc, run};
use berth_tests::wait_for;

fn tenants(coordinator: &CoordinatorProc) -> serde_json::Value {
    let (ok, out, err) = coordinator.berthctl(&["--json", "tenants"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn host_ids(coordinator: &CoordinatorProc) -> Vec<String> {
    let mut ids: Vec<String> = coordinator
        .hosts()
        .iter()
        .map(|h| h["host_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_restored_from_a_snapshot_on_a_new_state_directory_runs_the_same_fleet() {
    berth_shared::tls::install_crypto_provider();
    let mut coordinator = CoordinatorProc::start(None, "");
    let mut plain = AgentProc::enroll(&coordinator, "plain-host", None);
    plain.start();
    let crypt = AgentProc::enroll(&coordinator, "crypt-host", None);
    let gone = AgentProc::enroll(&coordinator, "gone-host", None);
    wait_for("plain-host ready", Duration::from_secs(10), || {
        (coordinator.host_state("plain-host").as_deref() == Some("ready")).then_some(())
    });
    let mut client = agent_client(&coordinator, Some(agent_identity(&crypt.state_dir())));
    let mut session = open_session(&mut client, hello_with_disk("crypt-host", true))
        .await
        .unwrap();
    let spec = coordinator.dir.path().join("sealed.toml");
    std::fs::write(
        &spec,
        "tenant_id = \"sealed\"\nimage = \"ghcr.io/openclaw/gateway:1\"\ntier = \"individual\"\n",
    )
    .unwrap();
    let (ok, out, err) = coordinator.berthctl(&["--json", "place", spec.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["host_id"],
        "crypt-host"
    );
    let key = volume_key_for(&mut session.inbound, "sealed", Duration::from_secs(10))
        .await
        .expect("the key reaches the tenant's host");
    drop(session);
    // A revoked host, an operator token and an enrollment token not redeemed yet.
    let (ok, _, err) = run(coordinator.admin_command(&["revoke", "--host-id", "gone-host"]));
    assert!(ok, "{err}");
    let reader = coordinator.operator_token("auditor", "read", "30d");
    let later = coordinator.token("later-host", "1h");
    let before = (host_ids(&coordinator), tenants(&coordinator));

    // Online: through the running coordinator.
    let snapshot = coordinator.dir.path().join("coordinator.snapshot");
    let (ok, out, err) =
        run(coordinator.admin_command(&["backup", "--out", snapshot.to_str().unwrap()]));
    assert!(ok, "backup: {err}");
    assert!(
        out.contains("3 hosts, 1 tenants, 1 volume keys, 0 backup keys"),
        "{out}"
    );
    assert!(
        out.contains("is not in it"),
        "the master key reminder: {out}"
    );
    let mode = std::fs::metadata(&snapshot).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (ok, _, err) =
        run(coordinator.admin_command(&["backup", "--out", snapshot.to_str().unwrap()]));
    assert!(!ok && err.contains("never replaces a file"), "{err}");
    let text = std::fs::read_to_string(&snapshot).unwrap();
    let ca_key = std::fs::read_to_string(coordinator.state_dir().join("ca/ca.key")).unwrap();
    assert!(
        !text.contains(ca_key.lines().nth(1).unwrap()),
        "the CA key is sealed"
    );

    // The machine is lost; the master key was kept apart.
    coordinator.kill9();
    let master = std::fs::read(coordinator.state_dir().join("master.key")).unwrap();
    std::fs::remove_dir_all(coordinator.state_dir()).unwrap();
    std::fs::create_dir_all(coordinator.state_dir()).unwrap();
    let (ok, _, err) = run(coordinator.admin_command(&["restore", snapshot.to_str().unwrap()]));
    assert!(!ok && err.contains("no master key at"), "{err}");
    let master_file = coordinator.state_dir().join("master.key");
    std::fs::write(&master_file, &master).unwrap();
    std::fs::set_permissions(&master_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, out, err) = run(coordinator.admin_command(&["restore", snapshot.to_str().unwrap()]));
    assert!(ok, "restore: {err}");
    assert!(out.contains("3 hosts, 1 tenants, 1 volume keys"), "{out}");
    let (ok, _, err) = run(coordinator.admin_command(&["restore", snapshot.to_str().unwrap()]));
    assert!(
        !ok && err.contains("state directory without state"),
        "{err}"
    );

    coordinator.restart();
    assert_eq!((host_ids(&coordinator), tenants(&coordinator)).0, before.0);
    // The agent that was running reconnects on its own.
    wait_for("plain-host ready again", Duration::from_secs(30), || {
        (coordinator.host_state("plain-host").as_deref() == Some("ready")).then_some(())
    });
    let after = tenants(&coordinator);
    assert_eq!(after[0]["tenant_id"], before.1[0]["tenant_id"]);
    assert_eq!(after[0]["host_id"], "crypt-host");
    // The encrypted tenant's host gets the very key it had.
    let again =
        delivered_volume_key(&coordinator, &crypt.state_dir(), "crypt-host", "sealed").await;
    assert!(again == key, "the same volume key after the restore");
    // The revocation holds.
    let mut client = agent_client(&coordinator, Some(agent_identity(&gone.state_dir())));
    let log_before = coordinator.log().len();
    let refused = match open_session(&mut client, hello("gone-host")).await {
        Ok(mut s) => session_error(&mut s.inbound).await,
        Err(status) => status,
    };
    // Refused in the TLS handshake (the deny-list is loaded from the restored revocations):
    // the client sees the alert or only the connection closing, depending on timing.
    let _ = refused;
    wait_for(
        "the revoked certificate refused",
        Duration::from_secs(5),
        || {
            coordinator.log()[log_before..]
                .contains("invalid peer certificate: Revoked")
                .then_some(())
        },
    );
    // The read token still reads; the enrollment token still enrolls, once.
    let (code, _) = {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["--cacert"])
            .arg(coordinator.ca_cert())
            .args(["-H", &format!("Authorization: Bearer {reader}")])
            .arg(format!("{}/v1/hosts", coordinator.operator_url()));
        berth_tests::curl_status(cmd)
    };
    assert_eq!(code, 200);
    let newcomer = AgentProc::enroll_fresh(&coordinator, "later-host");
    let (ok, out, err) = run(newcomer.enroll_command(
        &coordinator.operator_url(),
        &later,
        &coordinator.endpoints.ca_fingerprint,
    ));
    assert!(
        ok,
        "the enrollment token made before the backup: {out}{err}"
    );

    // Offline: from the files of a stopped coordinator, the same fleet.
    coordinator.kill9();
    let offline = coordinator.dir.path().join("offline.snapshot");
    let (ok, out, err) =
        run(coordinator.admin_command(&["--json", "backup", "--out", offline.to_str().unwrap()]));
    assert!(ok, "offline backup: {err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["summary"]["hosts"], 4, "{out}");
    assert_eq!(summary["summary"]["volume_keys"], 1, "{out}");

    // A new master key: the same volume key reaches the host, wrapped anew.
    let (ok, out, err) = run(coordinator.admin_command(&["rotate-master-key"]));
    assert!(ok, "rotate-master-key: {err}");
    assert!(
        out.contains("wrapped 1 volume keys and 0 backup keys anew"),
        "{out}"
    );
    let rotated = std::fs::read(&master_file).unwrap();
    assert_ne!(rotated, master, "master.key replaced");
    assert_eq!(
        std::fs::metadata(&master_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(!coordinator.state_dir().join("master.key.next").exists());
    coordinator.restart();
    let rotated_key =
        delivered_volume_key(&coordinator, &crypt.state_dir(), "crypt-host", "sealed").await;
    assert!(rotated_key == key, "the same volume key after the rotation");
    let (ok, _, err) = run(coordinator.admin_command(&["rotate-master-key"]));
    assert!(!ok && err.contains("stop every coordinator"), "{err}");
    drop(plain);
}
