//! The fleet store in a real etcd cluster (Debian's etcd-server, members on loopback): the
//! store's contract (atomic batches, snapshots at one revision, paging, oversized batches
//! refused), a sled fleet migrated to etcd and run on it, and what operators see when members
//! are lost: nothing with one of three, refused writes naming etcd with two (reads and agent
//! sessions going on), writes again once a quorum is back; a snapshot of it restored into
//! another prefix; a leader cut off from etcd stopping before another one leads.

use std::sync::Arc;
use std::time::Duration;

use berth_coordinator::etcd::{EtcdConfig, EtcdStore, LAZY_FLUSH_EVERY, MAX_TXN_OPS};
use berth_coordinator::keys::keyring::{Keyring, VOLUME_KEYS_PREFIX};
use berth_shared::store::{Durability, Store, Write};
use berth_tests::clients::{
    agent_client, agent_identity, delivered_volume_key, hello_with_disk, open_session,
    volume_key_for,
};
use berth_tests::etcd::{EtcdCluster, unavailable};
use berth_tests::missing_component;
use berth_tests::netns::RoutedNet;
use berth_tests::procs::{AgentProc, CoordinatorProc, run};
use berth_tests::wait_for;

fn store_on(cluster: &EtcdCluster, prefix: &str) -> EtcdStore {
    EtcdStore::connect(&EtcdConfig {
        endpoints: cluster.endpoints(),
        prefix: prefix.into(),
        tls: cluster.client_tls(),
        advertise: None,
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()))
}

fn put(key: &str, value: &str) -> Write {
    Write::Put(key.into(), value.as_bytes().to_vec())
}

#[test]
fn batches_are_whole_snapshots_are_at_one_revision_and_prefixes_are_apart() {
    if let Some(why) = unavailable() {
        return missing_component("etcd", &why);
    }
    let cluster = EtcdCluster::start(1);
    let store = Arc::new(store_on(&cluster, "/fleet-a/"));
    let other = store_on(&cluster, "/fleet-b/");
    store
        .apply(
            vec![
                put("host/a", "1"),
                put("host/b", "2"),
                put("hosts", "x"),
                put("token/z", "3"),
            ],
            Durability::Flushed,
        )
        .unwrap();
    other
        .apply(vec![put("host/a", "other")], Durability::Flushed)
        .unwrap();
    assert_eq!(
        store.scan_prefix("host/").unwrap(),
        vec![
            ("host/a".into(), b"1".to_vec()),
            ("host/b".into(), b"2".to_vec())
        ]
    );
    store
        .apply(vec![Write::Delete("host/a".into())], Durability::Lazy)
        .unwrap();
    assert_eq!(store.get("host/a").unwrap(), None);
    assert_eq!(other.get("host/a").unwrap(), Some(b"other".to_vec()));
    assert_eq!(store.snapshot().unwrap().len(), 3);

    // A batch larger than a transaction is refused whole, never split.
    let big: Vec<Write> = (0..=MAX_TXN_OPS)
        .map(|i| put(&format!("big/{i}"), "v"))
        .collect();
    let err = store.apply(big, Durability::Flushed).unwrap_err();
    assert!(
        err.to_string().contains("more than one transaction holds"),
        "{err}"
    );
    assert!(store.scan_prefix("big/").unwrap().is_empty());

    // More records than one page: read whole, in key order.
    let many: Vec<(String, Vec<u8>)> = (0..2_500)
        .map(|i| (format!("many/{i:05}"), vec![b'v'; 16]))
        .collect();
    let fresh = store_on(&cluster, "/fleet-c/");
    assert_eq!(fresh.fill(many.clone()).unwrap(), 2_500);
    assert_eq!(fresh.scan_prefix("many/").unwrap(), many);
    let err = fresh.fill(vec![]).unwrap_err();
    assert!(err.to_string().contains("holds records already"), "{err}");

    // Every batch moves one unit between two records: every snapshot sums to the total.
    let pair = |a: u32, b: u32| vec![put("a", &a.to_string()), put("b", &b.to_string())];
    let sums = store_on(&cluster, "/fleet-d/");
    sums.apply(pair(200, 0), Durability::Flushed).unwrap();
    let sums = Arc::new(sums);
    let writer = {
        let sums = sums.clone();
        std::thread::spawn(move || {
            for i in 1..=200 {
                sums.apply(pair(200 - i, i), Durability::Flushed).unwrap();
            }
        })
    };
    let mut snapshots = 0;
    while !writer.is_finished() || snapshots == 0 {
        let total: u32 = sums
            .snapshot()
            .unwrap()
            .iter()
            .map(|(_, v)| std::str::from_utf8(v).unwrap().parse::<u32>().unwrap())
            .sum();
        assert_eq!(total, 200);
        snapshots += 1;
    }
    writer.join().unwrap();
}

/// Batches applied `Lazy` are read at once by the store that applied them, and committed
/// together: one etcd transaction (one revision) for many batches, a batch never split, and
/// within the lazy flush interval when nobody flushes.
#[test]
fn lazy_batches_are_read_at_once_and_committed_together() {
    if let Some(why) = unavailable() {
        return missing_component("etcd", &why);
    }
    let mut cluster = EtcdCluster::start(1);
    let store = store_on(&cluster, "/lazy/");
    let other = store_on(&cluster, "/lazy/");
    let revision = || {
        range_at(&cluster, "/lazy/seq", 0)["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse::<i64>().ok())
            .expect("a revision")
    };
    let before = revision();
    for i in 0..50 {
        store
            .apply(
                vec![put(&format!("t/{i:02}"), "v"), put("seq", &i.to_string())],
                Durability::Lazy,
            )
            .unwrap();
    }
    assert_eq!(store.scan_prefix("t/").unwrap().len(), 50);
    assert_eq!(store.get("seq").unwrap(), Some(b"49".to_vec()));
    store.flush().unwrap();
    // 50 batches, 51 keys: one transaction (two if the lazy flusher took some first).
    let after = revision();
    assert!(
        (1..=2).contains(&(after - before)),
        "{} transactions for 50 batches",
        after - before
    );
    assert_eq!(other.scan_prefix("t/").unwrap().len(), 50);
    assert_eq!(other.get("seq").unwrap(), Some(b"49".to_vec()));
    // 130 one-key batches: more than one transaction holds, so two (or three).
    for i in 0..130 {
        store
            .apply(vec![put(&format!("u/{i:03}"), "v")], Durability::Lazy)
            .unwrap();
    }
    store.flush().unwrap();
    let last = revision();
    assert!(
        (2..=3).contains(&(last - after)),
        "{} transactions for 130 keys",
        last - after
    );
    assert_eq!(other.scan_prefix("u/").unwrap().len(), 130);
    // Nobody flushes: committed all the same, within the lazy flush interval.
    store
        .apply(vec![Write::Delete("seq".into())], Durability::Lazy)
        .unwrap();
    assert_eq!(store.get("seq").unwrap(), None);
    wait_for("the lazy delete in etcd", Duration::from_secs(3), || {
        other.get("seq").unwrap().is_none().then_some(())
    });
    // A `Flushed` batch whose commit fails is withdrawn: etcd never gets it, not even from
    // the lazy flusher once etcd is back.
    cluster.kill(0);
    store
        .apply(vec![put("refused", "x")], Durability::Flushed)
        .unwrap_err();
    cluster.restart(0);
    cluster.wait_healthy();
    std::thread::sleep(LAZY_FLUSH_EVERY * 3);
    assert_eq!(other.get("refused").unwrap(), None);
    assert_eq!(store.get("refused").unwrap(), None);
    store
        .apply(vec![put("after", "y")], Durability::Flushed)
        .unwrap();
    assert_eq!(other.get("after").unwrap(), Some(b"y".to_vec()));
}

/// `POST /v3/kv/range` on a member's HTTP gateway: the JSON answer for `key` at `revision`.
fn range_at(cluster: &EtcdCluster, key: &str, revision: i64) -> serde_json::Value {
    use base64::Engine;
    let body = serde_json::json!({
        "key": base64::engine::general_purpose::STANDARD.encode(key),
        "revision": revision.to_string(),
    });
    let out = std::process::Command::new("curl")
        .args(["-sS", "-m", "5", "-X", "POST", "--data"])
        .arg(body.to_string())
        .arg(format!("{}/v3/kv/range", cluster.endpoints()[0]))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

#[test]
fn a_key_destroyed_in_etcd_is_compacted_out_of_its_history() {
    if let Some(why) = unavailable() {
        return missing_component("etcd", &why);
    }
    let cluster = EtcdCluster::start(1);
    let store: Arc<dyn Store> = Arc::new(store_on(&cluster, "/keys-test/"));
    let keyring = Keyring::in_store(store.clone(), VOLUME_KEYS_PREFIX).unwrap();
    assert!(keyring.add("acme", vec![7; 61]).unwrap());
    assert!(!keyring.add("acme", vec![8; 61]).unwrap(), "kept");
    let key = "/keys-test/keys/volume/acme";
    let revision: i64 = range_at(&cluster, key, 0)["header"]["revision"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(range_at(&cluster, key, revision)["count"], "1");
    // Read back from etcd by a keyring opened afresh.
    let reopened = Keyring::in_store(store.clone(), VOLUME_KEYS_PREFIX).unwrap();
    assert_eq!(reopened.get("acme"), Some(vec![7; 61]));

    assert!(keyring.remove("acme").unwrap());
    assert_eq!(store.get("keys/volume/acme").unwrap(), None);
    let old = range_at(&cluster, key, revision);
    assert!(
        old.to_string()
            .contains("required revision has been compacted"),
        "the destroyed key is still in etcd's history: {old}"
    );
    // A replaced key's old value goes the same way.
    keyring.add("beta", vec![1; 61]).unwrap();
    let before: i64 = range_at(&cluster, "/keys-test/keys/volume/beta", 0)["header"]["revision"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    keyring.replace("beta", vec![2; 61]).unwrap();
    let old = range_at(&cluster, "/keys-test/keys/volume/beta", before);
    assert!(
        old.to_string()
            .contains("required revision has been compacted"),
        "{old}"
    );
}

fn place(coordinator: &CoordinatorProc, tenant: &str) -> (bool, String, String) {
    let spec = coordinator.dir.path().join(format!("{tenant}.toml"));
    std::fs::write(
        &spec,
        format!(
            "tenant_id = \"{tenant}\"\nimage = \"ghcr.io/openclaw/gateway:1\"\n[resources]\nmemory = \"64MiB\"\ncpu_millicores = 20\nvolume = \"64MiB\"\n[volume]\nencrypted = false\n"
        ),
    )
    .unwrap();
    coordinator.berthctl(&["--json", "place", spec.to_str().unwrap()])
}

fn tenant_ids(coordinator: &CoordinatorProc) -> Vec<String> {
    let (ok, out, err) = coordinator.berthctl(&["--json", "tenants"]);
    assert!(ok, "{err}");
    let mut ids: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .unwrap()
        .iter()
        .map(|t| t["tenant_id"].as_str().unwrap().to_string())
        // A placement refused for want of a quorum may still commit once etcd has one again
        // (it was never acknowledged, so either is right).
        .filter(|t| t != "no-quorum")
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sled_fleet_migrates_to_etcd_runs_on_it_and_survives_losing_a_member() {
    if let Some(why) = unavailable() {
        return missing_component("etcd", &why);
    }
    berth_shared::tls::install_crypto_provider();
    let mut cluster = EtcdCluster::start(3);
    let mut coordinator = CoordinatorProc::start(None, "");
    let mut agent = AgentProc::enroll(&coordinator, "host-a", None);
    agent.start();
    wait_for("host-a ready", Duration::from_secs(10), || {
        (coordinator.host_state("host-a").as_deref() == Some("ready")).then_some(())
    });
    let (ok, _, err) = place(&coordinator, "before");
    assert!(ok, "{err}");
    // An encrypted tenant, its key in the keyring file.
    let crypt = AgentProc::enroll(&coordinator, "crypt-host", None);
    let spec = coordinator.dir.path().join("sealed.toml");
    std::fs::write(
        &spec,
        "tenant_id = \"sealed\"\nimage = \"ghcr.io/openclaw/gateway:1\"\ntier = \"individual\"\n",
    )
    .unwrap();
    let key = {
        let mut client = agent_client(&coordinator, Some(agent_identity(&crypt.state_dir())));
        let mut session = open_session(&mut client, hello_with_disk("crypt-host", true))
            .await
            .unwrap();
        let (ok, _, err) = coordinator.berthctl(&["place", spec.to_str().unwrap()]);
        assert!(ok, "{err}");
        volume_key_for(&mut session.inbound, "sealed", Duration::from_secs(10))
            .await
            .expect("the key reaches the encrypted tenant's host")
    };
    let (ok, _, err) = run(coordinator.admin_command(&["migrate-store", "--to", "etcd"]));
    assert!(!ok && err.contains("needs an [etcd] table"), "{err}");
    coordinator.reconfigure(&cluster.config("/berth/"));
    let (ok, _, err) = run(coordinator.admin_command(&["migrate-store", "--to", "etcd"]));
    assert!(!ok && err.contains("stop it first"), "{err}");

    coordinator.kill9();
    let (ok, out, err) = run(coordinator.admin_command(&["migrate-store", "--to", "etcd"]));
    assert!(ok, "migrate-store: {err}");
    assert!(
        out.contains(
            "(1 of them wrapped keys, whose keyring files are removed) into etcd under /berth/"
        ),
        "{out}"
    );
    assert!(!coordinator.state_dir().join("volume-keys").exists());
    let (ok, _, err) = run(coordinator.admin_command(&["migrate-store", "--to", "etcd"]));
    assert!(!ok && err.contains("holds records already"), "{err}");
    // From now on the fleet lives in etcd alone: the embedded store goes.
    std::fs::remove_dir_all(coordinator.state_dir().join("db")).unwrap();
    coordinator.reconfigure(&format!("store = \"etcd\"\n{}", cluster.config("/berth/")));
    coordinator.restart();
    assert_eq!(tenant_ids(&coordinator), ["before", "sealed"]);
    assert!(
        delivered_volume_key(&coordinator, &crypt.state_dir(), "crypt-host", "sealed").await == key,
        "the same key, from etcd"
    );
    wait_for("host-a ready on etcd", Duration::from_secs(30), || {
        (coordinator.host_state("host-a").as_deref() == Some("ready")).then_some(())
    });
    let (ok, _, err) = place(&coordinator, "after");
    assert!(ok, "{err}");

    // One member of three lost: nothing to see.
    cluster.kill(2);
    let (ok, _, err) = place(&coordinator, "one-lost");
    assert!(ok, "with one member lost: {err}");
    // Two lost: no quorum. The leader cannot renew its leadership: a second before etcd could
    // let its lease go it stops acting. A write is refused, naming etcd; reads and the agent's
    // session go on.
    let sessions = |log: &str| {
        (
            log.matches("agent session opened").count(),
            log.matches("agent session closed").count(),
        )
    };
    // Counted once no session has opened or closed for 6 s (longer than one etcd request may
    // take with a member down), so a reconnection already under way is not counted as the
    // outage's doing.
    let mut before = sessions(&coordinator.log());
    let mut settled = std::time::Instant::now();
    wait_for(
        "the agents' sessions settled",
        Duration::from_secs(60),
        || {
            let now = sessions(&coordinator.log());
            if now != before {
                (before, settled) = (now, std::time::Instant::now());
            }
            (settled.elapsed() >= Duration::from_secs(6)).then_some(())
        },
    );
    cluster.kill(1);
    wait_for("the leader stops acting", Duration::from_secs(20), || {
        coordinator
            .log()
            .contains("leadership not renewed: stopped acting")
            .then_some(())
    });
    let (ok, _, err) = place(&coordinator, "no-quorum");
    assert!(!ok, "a placement without a quorum was acknowledged");
    assert!(
        err.contains("etcd has not renewed this coordinator's leadership")
            && err.contains("Unavailable"),
        "{err}"
    );
    assert_eq!(
        tenant_ids(&coordinator),
        ["after", "before", "one-lost", "sealed"],
        "reads go on without a quorum"
    );
    assert_eq!(coordinator.hosts().len(), 2, "hosts are read too");
    // Reports arrive meanwhile, one a second: the session is kept through them.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        sessions(&coordinator.log()),
        before,
        "{}",
        coordinator.log()
    );
    // A quorum again: the same leader renews its lease (etcd keeps leases while it has no
    // quorum) and acts again, without a restart; what was refused was not half done.
    cluster.restart(1);
    cluster.restart(2);
    cluster.wait_healthy();
    wait_for("the leader acts again", Duration::from_secs(20), || {
        coordinator
            .log()
            .contains("leadership renewed: acting again")
            .then_some(())
    });
    assert!(coordinator.exit_status().is_none(), "{}", coordinator.log());
    let (ok, _, err) = place(&coordinator, "back");
    assert!(ok, "{err}");
    assert_eq!(
        sessions(&coordinator.log()),
        before,
        "{}",
        coordinator.log()
    );
    let fleet = ["after", "back", "before", "one-lost", "sealed"];
    assert_eq!(tenant_ids(&coordinator), fleet);

    // A snapshot of the etcd store, restored on a new machine into another prefix.
    let snapshot = coordinator.dir.path().join("etcd.snapshot");
    let (ok, out, err) =
        run(coordinator.admin_command(&["backup", "--out", snapshot.to_str().unwrap()]));
    assert!(ok, "backup of the etcd store: {err}");
    assert!(out.contains("2 hosts, 5 tenants, 1 volume keys"), "{out}");
    coordinator.kill9();
    for lost in ["ca", "volume-keys", "backup-keys"] {
        let path = coordinator.state_dir().join(lost);
        let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
    }
    coordinator.reconfigure(&format!(
        "store = \"etcd\"\n{}",
        cluster.config("/restored/")
    ));
    let (ok, _, err) = run(coordinator.admin_command(&["restore", snapshot.to_str().unwrap()]));
    assert!(ok, "restore into etcd: {err}");
    let (ok, _, err) = run(coordinator.admin_command(&["restore", snapshot.to_str().unwrap()]));
    assert!(!ok && err.contains("exists"), "a second restore: {err}");
    coordinator.restart();
    assert_eq!(tenant_ids(&coordinator), fleet);
    wait_for(
        "host-a ready after the restore",
        Duration::from_secs(30),
        || (coordinator.host_state("host-a").as_deref() == Some("ready")).then_some(()),
    );
    drop(agent);
}

/// `POST /v3/lease/revoke` on a member's HTTP gateway: what etcd does to a leader's lease when
/// the leader is cut off from the cluster for longer than its lease.
fn revoke_lease(cluster: &EtcdCluster, lease: i64) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-m", "5", "-X", "POST", "--data"])
        .arg(serde_json::json!({ "ID": lease.to_string() }).to_string())
        .arg(format!("{}/v3/lease/revoke", cluster.endpoints()[0]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_deposed_leaders_late_write_is_refused_and_the_next_leader_takes_over() {
    if let Some(why) = unavailable() {
        return missing_component("etcd", &why);
    }
    let cluster = EtcdCluster::start(1);
    let first = Arc::new(store_on(&cluster, "/ha-unit/"));
    let (lost_tx, lost_rx) = std::sync::mpsc::channel();
    let leading = first
        .lead("first", move |reason| {
            let _ = lost_tx.send(reason);
        })
        .unwrap();
    first
        .apply(vec![put("host/a", "first")], Durability::Flushed)
        .unwrap();
    // A second candidate waits while the first leads.
    let second = Arc::new(store_on(&cluster, "/ha-unit/"));
    let (elected_tx, elected_rx) = std::sync::mpsc::channel();
    {
        let second = second.clone();
        std::thread::spawn(move || {
            let _ = elected_tx.send(second.lead("second", |_| {}));
        });
    }
    assert!(
        elected_rx.recv_timeout(Duration::from_secs(3)).is_err(),
        "a second leader while the first leads"
    );
    // The first is cut off: its lease ends.
    let cut_at = std::time::Instant::now();
    revoke_lease(&cluster, leading.lease);
    let next = elected_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the second leads once the first's lease ended")
        .unwrap();
    assert!(next.term > leading.term, "{next:?} after {leading:?}");
    let reason = lost_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the first learns it lost the lead");
    eprintln!(
        "the second led {:?} after the first's lease ended; the first heard: {reason}",
        cut_at.elapsed()
    );
    // The first's late write is refused, whole; the second's goes through.
    let err = first
        .apply(
            vec![put("host/a", "late"), put("host/b", "late")],
            Durability::Flushed,
        )
        .unwrap_err();
    assert!(
        matches!(err, berth_shared::store::StoreError::Fenced),
        "{err}"
    );
    assert_eq!(second.get("host/a").unwrap(), Some(b"first".to_vec()));
    assert_eq!(second.get("host/b").unwrap(), None);
    second
        .apply(vec![put("host/a", "second")], Durability::Flushed)
        .unwrap();
    assert_eq!(first.get("host/a").unwrap(), Some(b"second".to_vec()));
}

/// Host `host-a`, enrolled through `leader` and running, given both coordinators' addresses:
/// it talks to whichever serves.
fn agent_of_both(leader: &CoordinatorProc, standby: &CoordinatorProc) -> AgentProc {
    let mut agent = AgentProc::enroll(leader, "host-a", None);
    agent.extra_config = format!(
        "coordinator = \"{},{}\"\n",
        leader.agent_url(),
        standby.agent_url()
    );
    agent.start();
    wait_for("host-a ready", Duration::from_secs(10), || {
        (leader.host_state("host-a").as_deref() == Some("ready")).then_some(())
    });
    agent
}

#[test]
fn a_standby_coordinator_serves_the_fleet_once_its_leader_dies() {
    if let Some(why) = unavailable() {
        return missing_component("etcd", &why);
    }
    let cluster = EtcdCluster::start(3);
    let config = format!("store = \"etcd\"\n{}", cluster.config("/ha/"));
    let mut leader = CoordinatorProc::start(None, &config);
    let _ = leader.operator_token_file();
    let mut standby = CoordinatorProc::standby_of(&leader, &config);
    let agent = agent_of_both(&leader, &standby);
    let (ok, _, err) = place(&leader, "first");
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !standby.serving(),
        "a standby serves while the leader leads"
    );
    assert!(
        standby.log().contains("waiting to lead the fleet"),
        "{}",
        standby.log()
    );
    // The standby answers every request with where the leader is, and berth's clients follow
    // it: berthctl, enrollment and an agent given only the standby's address reach the leader.
    assert_eq!(tenant_ids(&standby), ["first"]);
    let mut only_standby = AgentProc::enroll_through(&leader, "host-b", &standby.operator_url());
    only_standby.extra_config = format!("coordinator = \"{}\"\n", standby.agent_url());
    only_standby.start();
    wait_for(
        "host-b ready through the standby",
        Duration::from_secs(10),
        || (leader.host_state("host-b").as_deref() == Some("ready")).then_some(()),
    );
    // An admin command on the standby's machine would go straight to etcd, past the leader
    // (whose deny-list a revocation must reach): refused, naming the leader; a snapshot, which
    // only reads, is taken.
    let (ok, _, err) = run(standby.admin_command(&["revoke", "--host-id", "host-b"]));
    assert!(!ok, "a revocation behind the leader's back went through");
    assert!(
        err.contains("a coordinator of this fleet is running (")
            && err.contains(&format!("at {}", leader.operator_url())),
        "{err}"
    );
    let snapshot = standby.dir.path().join("standby.snapshot");
    let (ok, _, err) = run(standby.admin_command(&["backup", "--out", snapshot.to_str().unwrap()]));
    assert!(ok, "{err}");
    let (code, body) = standby.rest("GET", "/v1/tenants", None, true);
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["leader"], leader.operator_url(), "{body}");
    let mut curl = std::process::Command::new("curl");
    curl.arg(format!("http://{}/healthz", standby.endpoints.http));
    let (code, body) = berth_tests::curl_status(curl);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        body["leader"],
        format!("http://{}", leader.endpoints.http),
        "{body}"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("this coordinator is a standby; the fleet's leader is"),
        "{body}"
    );
    // Its metrics say it waits (scrapers keep every coordinator); the leader's, that it leads.
    for (coordinator, leading) in [(&standby, 0), (&leader, 1)] {
        let mut curl = std::process::Command::new("curl");
        curl.arg(format!("http://{}/metrics", coordinator.endpoints.http));
        let (code, text) = berth_tests::curl_status(curl);
        assert_eq!(code, 200, "{text}");
        assert!(
            text.lines()
                .any(|l| l == format!("berth_coordinator_leading {leading}")),
            "{text}"
        );
    }

    leader.kill9();
    let killed = std::time::Instant::now();
    standby.await_endpoints(Duration::from_secs(20));
    let serving = killed.elapsed();
    assert_eq!(tenant_ids(&standby), ["first"]);
    let (ok, _, err) = place(&standby, "second");
    assert!(ok, "{err}");
    let placed = killed.elapsed();
    eprintln!("leader SIGKILLed: the standby served after {serving:?}, placed after {placed:?}");
    assert!(placed < Duration::from_secs(15), "{placed:?}");
    // The agent follows on its own.
    wait_for(
        "host-a ready on the new leader",
        Duration::from_secs(40),
        || (standby.host_state("host-a").as_deref() == Some("ready")).then_some(()),
    );
    eprintln!("the agent was back after {:?}", killed.elapsed());
    wait_for(
        "host-b, given only the standby's address, ready on it",
        Duration::from_secs(40),
        || (standby.host_state("host-b").as_deref() == Some("ready")).then_some(()),
    );

    // The old leader, started again, is a standby now.
    leader.launch();
    std::thread::sleep(Duration::from_secs(3));
    assert!(!leader.serving(), "two coordinators serve at once");
    let (ok, _, err) = place(&standby, "third");
    assert!(ok, "{err}");
    assert_eq!(tenant_ids(&standby), ["first", "second", "third"]);
    drop((agent, only_standby));
}

/// Reads every agent's accepted desired state (its records file) until stopped, recording a
/// tenant in two hosts' desired states at once and a generation older than one the same agent
/// accepted before. These agents run without Docker: what a host would run is what it accepted.
struct DesiredWatcher {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, usize, Vec<String>)>,
}

impl DesiredWatcher {
    fn start(agents: Vec<(String, std::path::PathBuf)>) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut polls, mut seen, mut faults) = (0u64, 0, Vec::new());
            let mut generations: std::collections::BTreeMap<String, u64> = Default::default();
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let mut hosts: std::collections::BTreeMap<String, String> = Default::default();
                for (host, state_dir) in &agents {
                    let Ok(bytes) = std::fs::read(state_dir.join("records.json")) else {
                        continue;
                    };
                    let records: serde_json::Value =
                        serde_json::from_slice(&bytes).expect("an agent's records file");
                    let desired = &records["desired"];
                    let generation = desired["generation"].as_u64().unwrap_or(0);
                    let before = generations.insert(host.clone(), generation).unwrap_or(0);
                    if generation < before {
                        faults.push(format!("{host}: generation {generation} after {before}"));
                    }
                    for tenant in desired["tenants"].as_array().into_iter().flatten() {
                        let id = tenant["tenant_id"].as_str().unwrap_or_default().to_string();
                        if let Some(other) = hosts.insert(id.clone(), host.clone()) {
                            faults.push(format!("{id} on {other} and {host}"));
                        }
                    }
                }
                polls += 1;
                seen = hosts.len();
                std::thread::sleep(Duration::from_millis(100));
            }
            (polls, seen, faults)
        });
        Self { stop, thread }
    }

    /// How many times it read them, how many tenants the last reading found, and the faults.
    fn finish(self) -> (u64, usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// 3 etcd members, 3 coordinators (a leader, two standbys), 6 agents that know every
/// coordinator; 5 clients place 2,000 tenants through berthctl given every coordinator's
/// address, each placement tried again until acknowledged (placing the same spec again is a
/// no-op). The leader is SIGKILLed once 500 are acknowledged.
#[test]
fn the_leader_killed_during_a_burst_of_placements_loses_none_and_the_fleet_follows() {
    if let Some(why) = unavailable() {
        return missing_component("etcd", &why);
    }
    const CLIENTS: usize = 5;
    const EACH: usize = 400;
    let cluster = EtcdCluster::start(3);
    let config = format!("store = \"etcd\"\n{}", cluster.config("/burst/"));
    let mut first = CoordinatorProc::start(None, &config);
    let token = first.operator_token_file();
    let standbys = [
        CoordinatorProc::standby_of(&first, &config),
        CoordinatorProc::standby_of(&first, &config),
    ];
    let all = || std::iter::once(&first).chain(standbys.iter());
    let agent_urls: Vec<String> = all().map(CoordinatorProc::agent_url).collect();
    let operator_urls: Vec<String> = all().map(CoordinatorProc::operator_url).collect();
    // Enrolled through every coordinator's address, the standbys' first (they name the
    // leader, which enrolls); on one machine the coordinators' ports differ, so the agents are given
    // every agent port too.
    let standbys_first: Vec<String> = operator_urls.iter().rev().cloned().collect();
    // 2,000 of the smallest tenants (64 MiB) need 125 GiB: six hosts of this machine's size.
    let agents: Vec<AgentProc> = (0..6)
        .map(|i| {
            let mut agent =
                AgentProc::enroll_through(&first, &format!("burst-{i}"), &standbys_first.join(","));
            agent.extra_config = format!(
                "coordinator = \"{}\"\nmemory_reserved = \"256MiB\"\n",
                agent_urls.join(",")
            );
            agent.start();
            agent
        })
        .collect();
    for agent in &agents {
        wait_for("every agent ready", Duration::from_secs(15), || {
            (first.host_state(&agent.host_id).as_deref() == Some("ready")).then_some(())
        });
    }

    let watcher = DesiredWatcher::start(
        agents
            .iter()
            .map(|a| (a.host_id.clone(), a.state_dir()))
            .collect(),
    );
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let specs = first.dir.path().join("burst");
    std::fs::create_dir_all(&specs).unwrap();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (acknowledged, specs) = (acknowledged.clone(), specs.clone());
            let (urls, ca, token) = (operator_urls.join(","), first.ca_cert(), token.clone());
            std::thread::spawn(move || {
                for j in 0..EACH {
                    let tenant = format!("b{c}-{j:04}");
                    let spec = specs.join(format!("{tenant}.toml"));
                    std::fs::write(
                        &spec,
                        format!(
                            "tenant_id = \"{tenant}\"\nimage = \"ghcr.io/openclaw/gateway:1\"\n[resources]\nmemory = \"64MiB\"\ncpu_millicores = 5\nvolume = \"16MiB\"\n[volume]\nencrypted = false\n"
                        ),
                    )
                    .unwrap();
                    let mut attempts = 0;
                    loop {
                        let mut cmd = std::process::Command::new(berth_tests::procs::bin("berthctl"));
                        cmd.args(["place", spec.to_str().unwrap()])
                            .env("BERTH_COORDINATOR", &urls)
                            .env("BERTH_CA_CERT", &ca)
                            .env("BERTH_TOKEN_FILE", &token)
                            .env_remove("BERTH_TOKEN");
                        let (ok, _, err) = run(cmd);
                        if ok {
                            acknowledged.lock().unwrap().push(tenant.clone());
                            break;
                        }
                        attempts += 1;
                        assert!(
                            attempts < 150 && !err.contains("InvalidArgument"),
                            "{tenant} never acknowledged: {err}"
                        );
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            })
        })
        .collect();
    wait_for(
        "500 placements acknowledged",
        Duration::from_secs(120),
        || (acknowledged.lock().unwrap().len() >= 500).then_some(()),
    );
    first.kill9();
    let killed = std::time::Instant::now();
    let leader = wait_for("a new leader serving", Duration::from_secs(20), || {
        standbys.iter().position(CoordinatorProc::serving)
    });
    let took_over = killed.elapsed();
    for client in clients {
        client.join().unwrap();
    }
    let mut standbys = standbys;
    let leader = &mut standbys[leader];
    leader.await_endpoints(Duration::from_secs(5));
    eprintln!(
        "a new leader served {took_over:?} after the SIGKILL; {} placements acknowledged",
        acknowledged.lock().unwrap().len()
    );
    assert!(took_over < Duration::from_secs(10), "{took_over:?}");

    // Every acknowledged placement is there, once.
    let (ok, out, err) = leader.berthctl(&["--json", "tenants"]);
    assert!(ok, "{err}");
    let tenants: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mut listed: Vec<&str> = tenants
        .iter()
        .map(|t| t["tenant_id"].as_str().unwrap())
        .collect();
    listed.sort();
    let mut acked = acknowledged.lock().unwrap().clone();
    acked.sort();
    assert_eq!(acked.len(), CLIENTS * EACH);
    assert_eq!(listed, acked);
    // Every agent reconnected and took its hosts' desired state.
    for agent in &agents {
        wait_for(
            "every agent ready on the new leader",
            Duration::from_secs(40),
            || (leader.host_state(&agent.host_id).as_deref() == Some("ready")).then_some(()),
        );
    }
    wait_for("every placement delivered", Duration::from_secs(60), || {
        let (_, out, _) = leader.berthctl(&["--json", "tenants"]);
        let tenants: Vec<serde_json::Value> = serde_json::from_str(&out).ok()?;
        tenants.iter().all(|t| t["delivered"] == true).then_some(())
    });
    // Throughout, no tenant was in two hosts' desired states and no agent went back a
    // generation.
    let (polls, seen, faults) = watcher.finish();
    eprintln!("the agents' desired states read {polls} times, {seen} tenants at last: {faults:?}");
    assert!(polls > 50, "{polls}");
    assert_eq!(seen, CLIENTS * EACH);
    assert!(faults.is_empty(), "{faults:?}");
}

/// When a coordinator logged `message` first: its log line's timestamp (RFC 3339, UTC, to the
/// microsecond: such timestamps sort as strings).
fn logged_at(log: &str, message: &str) -> String {
    log.lines()
        .find(|line| line.contains(message))
        .and_then(|line| line.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {message:?} in the log:\n{log}"))
        .to_string()
}

/// A leader cut off from etcd and from everyone (its network namespace's link down) stops
/// acting before etcd may let its lease go, so before a standby can lead: two coordinators
/// never act at once. Back on the network, it learns that its lease ended and exits; the new
/// leader has the fleet, without the write the cut-off leader refused.
#[test]
fn a_partitioned_leader_stops_acting_before_another_leads() {
    if let Some(why) = unavailable() {
        return missing_component("etcd", &why);
    }
    let net = match RoutedNet::new() {
        Ok(net) => net,
        Err(why) => return missing_component("network namespaces", &why),
    };
    let host_side = net.address(1);
    let cluster = EtcdCluster::start_reachable_at(3, &host_side);
    let mut leader = CoordinatorProc::start(
        Some(&net.host(2)),
        &format!(
            "store = \"etcd\"\n{}",
            cluster.config_at("/split/", &host_side)
        ),
    );
    let _ = leader.operator_token_file();
    let mut standby = CoordinatorProc::standby_on_loopback(
        &leader,
        &format!("store = \"etcd\"\n{}", cluster.config("/split/")),
    );
    // An agent on this side of the cut; every desired state it accepts is watched.
    let agent = agent_of_both(&leader, &standby);
    let watcher = DesiredWatcher::start(vec![(agent.host_id.clone(), agent.state_dir())]);
    let (ok, _, err) = place(&leader, "before");
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !standby.serving(),
        "a standby serves while the leader leads"
    );

    net.set_link(false).expect("link down");
    let cut = std::time::Instant::now();
    wait_for(
        "the cut-off leader stops acting",
        Duration::from_secs(15),
        || {
            leader
                .log()
                .contains("leadership not renewed: stopped acting")
                .then_some(())
        },
    );
    let stopped = cut.elapsed();
    standby.await_endpoints(Duration::from_secs(30));
    let led = cut.elapsed();
    // Asked on its own side of the cut, it answers that it cannot act (or cannot reach etcd
    // to look the caller up).
    let (ok, _, err) = place(&leader, "split");
    assert!(!ok, "a leader cut off from etcd acknowledged a placement");
    assert!(
        err.contains("Unavailable")
            && (err.contains("etcd has not renewed") || err.contains("store unreachable: etcd")),
        "{err}"
    );
    let (stopped_at, led_at) = (
        logged_at(&leader.log(), "leadership not renewed: stopped acting"),
        logged_at(&standby.log(), "leading the fleet"),
    );
    eprintln!(
        "link down: the old leader stopped acting after {stopped:?} ({stopped_at}), the standby led after {led:?} ({led_at})"
    );
    assert!(
        stopped_at < led_at,
        "the old leader stopped at {stopped_at}, the new one led at {led_at}"
    );
    let (ok, _, err) = place(&standby, "after");
    assert!(ok, "{err}");
    // The agent, cut off from its coordinator too, finds the new leader on its own.
    wait_for(
        "host-a's session on the new leader",
        Duration::from_secs(30),
        || {
            standby
                .log()
                .contains("agent session opened host=host-a")
                .then_some(())
        },
    );

    // Back on the network: etcd tells the old leader its lease ended, and it exits.
    net.set_link(true).expect("link up");
    let status = wait_for("the old leader exits", Duration::from_secs(30), || {
        leader.exit_status()
    });
    assert_eq!(status.code(), Some(75), "{}", leader.log());
    assert!(
        leader.log().contains("etcd says the lease expired"),
        "{}",
        leader.log()
    );
    assert_eq!(tenant_ids(&standby), ["after", "before"]);
    wait_for("host-a took both tenants", Duration::from_secs(30), || {
        let records = std::fs::read(agent.state_dir().join("records.json")).ok()?;
        let records: serde_json::Value = serde_json::from_slice(&records).ok()?;
        (records["desired"]["tenants"].as_array()?.len() == 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    // What the agent accepted went only forward, through both leaders.
    let (polls, seen, faults) = watcher.finish();
    assert!(faults.is_empty(), "{faults:?}");
    assert_eq!(seen, 2, "read {polls} times");
    drop(agent);
}

/// With mutual TLS on etcd's client ports, the store proves itself with its certificate and
/// checks the members': a client certificate another CA signed, or none, gets nothing; a
/// key file others can read is refused before any connection; a coordinator configured with
/// `https://` endpoints leads and serves over TLS.
#[test]
fn the_store_reaches_etcd_over_mutual_tls_and_strangers_get_nothing() {
    if let Some(why) = unavailable() {
        return missing_component("etcd", &why);
    }
    berth_shared::tls::install_crypto_provider();
    let cluster = EtcdCluster::start_tls(3);
    let store = store_on(&cluster, "/tls/");
    store
        .apply(vec![put("host/a", "over tls")], Durability::Flushed)
        .unwrap();
    assert_eq!(store.get("host/a").unwrap(), Some(b"over tls".to_vec()));

    let refused = |endpoints: Vec<String>, tls| {
        EtcdStore::connect(&EtcdConfig {
            endpoints,
            prefix: "/tls/".into(),
            tls,
            advertise: None,
        })
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let stranger = refused(cluster.endpoints(), cluster.stranger_tls());
    eprintln!("another CA's client certificate: {stranger}");
    assert!(stranger.contains("cannot open the store"), "{stranger}");
    let plain = cluster
        .endpoints()
        .iter()
        .map(|e| e.replacen("https://", "http://", 1))
        .collect();
    let without = refused(plain, None);
    eprintln!("no TLS: {without}");
    assert!(without.contains("cannot open the store"), "{without}");

    let mut careless = cluster.client_tls().unwrap();
    let copy = careless.key_file.with_file_name("careless.key");
    std::fs::copy(&careless.key_file, &copy).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    careless.key_file = copy;
    let err = refused(cluster.endpoints(), Some(careless));
    assert!(
        err.contains("etcd.key_file") && err.contains("readable by others (mode 644)"),
        "{err}"
    );

    let coordinator = CoordinatorProc::start(
        None,
        &format!("store = \"etcd\"\n{}", cluster.config("/tls-fleet/")),
    );
    assert!(
        coordinator.log().contains("leading the fleet"),
        "{}",
        coordinator.log()
    );
    let (ok, out, err) = coordinator.berthctl(&["--json", "tenants"]);
    assert!(ok && out.trim() == "[]", "{out} {err}");
}
