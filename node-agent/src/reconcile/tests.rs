use std::time::Duration;

use berth_shared::proto;

use super::*;
use crate::testing::runtime::FakeRuntime;

/// Records the order of volume and egress steps into the runtime's call log; volumes are
/// directories under the path given (or named under `/vol` without one).
#[derive(Debug)]
struct RecordingSteps(Arc<FakeRuntime>, Option<std::path::PathBuf>);

#[tonic::async_trait]
impl VolumeStep for RecordingSteps {
    async fn prepare(&self, s: &TenantSpec) -> Result<std::path::PathBuf, PrepareError> {
        if *self.0.volume_key_missing.lock().unwrap() {
            return Err(PrepareError::WaitingForKey);
        }
        self.0.record(format!("volume {}", s.tenant_id));
        match &self.1 {
            Some(root) => {
                let volume = root.join(s.tenant_id.as_str());
                std::fs::create_dir_all(&volume).unwrap();
                Ok(volume)
            }
            None => Ok(format!("/vol/{}", s.tenant_id).into()),
        }
    }
    async fn release(&self, t: &str) -> Result<(), VolumeError> {
        self.0.record(format!("rm-volume {t}"));
        Ok(())
    }
    async fn purge(&self, t: &TenantId) -> Result<crate::volume::Purged, VolumeError> {
        self.0.record(format!("purge-volume {t}"));
        Ok(crate::volume::Purged {
            erased: true,
            deleted: true,
        })
    }
}

/// Records applies that change something (a new tenant or subnet), releases and sweeps;
/// refuses everything while `egress_broken` is set.
#[tonic::async_trait]
impl EgressStep for RecordingSteps {
    async fn refresh(&self) -> Result<(), EgressError> {
        match *self.0.egress_broken.lock().unwrap() {
            true => Err(EgressError::List(crate::command::CommandError::Spawn {
                program: "nft".into(),
                source: std::io::Error::from_raw_os_error(2),
            })),
            false => Ok(()),
        }
    }
    async fn apply(&self, s: &TenantSpec, subnet: &str) -> Result<EgressReport, EgressError> {
        self.refresh().await?;
        let mut applied = self.0.egress_applied.lock().unwrap();
        let entry = format!("{} {subnet}", s.tenant_id);
        if !applied.contains(&entry) {
            applied.push(entry.clone());
            self.0.record(format!("egress {entry}"));
        }
        Ok(EgressReport {
            denied_packets: 3,
            problems: vec!["egress x.test:443/tcp: does not resolve (NXDOMAIN)".into()],
            ..Default::default()
        })
    }
    async fn release(&self, t: &TenantId) -> Result<(), EgressError> {
        self.0
            .egress_applied
            .lock()
            .unwrap()
            .retain(|e| !e.starts_with(&format!("{t} ")));
        self.0.record(format!("rm-egress {t}"));
        Ok(())
    }
    async fn sweep(&self, keep: &BTreeSet<TenantId>) -> Result<(), EgressError> {
        let mut applied = self.0.egress_applied.lock().unwrap();
        let before = applied.len();
        applied.retain(|e| keep.iter().any(|t| e.starts_with(&format!("{t} "))));
        if applied.len() != before {
            self.0.record("sweep".into());
        }
        Ok(())
    }
}

/// Tenant `a` (on host `h1`) torn down: container, then egress, volume, network.
const TEARDOWN_OF_A: [&str; 6] = [
    "stop 0001",
    "rm-egress a",
    "rm-volume a",
    "remove 0001",
    "rm-network berth-a-33112ee1",
    "rm-network berth-a",
];

fn spec(id: &str, image: &str) -> TenantSpec {
    TenantSpec::from_resolved(proto::TenantSpec {
        tenant_id: id.into(),
        image: image.into(),
        resources: Some(proto::Resources {
            memory_bytes: 128 << 20,
            cpu_millicores: 100,
            cpu_limit_millicores: 0,
            volume_bytes: 0,
        }),
        ..Default::default()
    })
    .unwrap()
}

/// A fake engine holding the image `img:1`, and a reconciler over it.
fn with_image() -> (Arc<FakeRuntime>, Arc<Reconciler>) {
    let fake = Arc::new(FakeRuntime::default());
    fake.images.lock().unwrap().push("img:1".into());
    let r = reconciler(&fake);
    (fake, r)
}

/// Tenant a running (its container 0001), placed at generation 1.
async fn with_a_running() -> (Arc<FakeRuntime>, Arc<Reconciler>) {
    let (fake, r) = with_image();
    r.reconcile(&Desired {
        generation: 1,
        tenants: vec![spec("a", "img:1")],
        staged: vec![],
    })
    .await;
    (fake, r)
}

fn reconciler(fake: &Arc<FakeRuntime>) -> Arc<Reconciler> {
    let restores = Restorer {
        engine: Arc::new(crate::testing::backup::FakeEngine::default()),
        source: Arc::new(crate::testing::backup::FakeBackupSource::default()),
        locks: Default::default(),
    };
    reconciler_with(fake, restores, None)
}

fn reconciler_with(
    fake: &Arc<FakeRuntime>,
    restores: Restorer,
    volumes: Option<std::path::PathBuf>,
) -> Arc<Reconciler> {
    let steps = Arc::new(RecordingSteps(fake.clone(), volumes));
    Arc::new(Reconciler {
        host: HostId::new("h1").unwrap(),
        runtime: fake.clone(),
        volumes: steps.clone(),
        restores,
        egress: steps,
        cgroups: None,
        oom_events: Arc::default(),
        port_free: |_| true,
        subnets: crate::runtime::subnets::SubnetPool::default(),
        restarting: Arc::default(),
        passes: Arc::default(),
        health: HealthWatch::new(
            fake.clone(),
            Arc::new(crate::testing::runtime::FakeProbe::default()),
            crate::restarts::HealthGate::new(Duration::from_secs(300)),
            Arc::default(),
        ),
        creations: Mutex::default(),
        removals: Mutex::default(),
        wake: Arc::default(),
    })
}

#[tokio::test]
async fn creates_in_order_adopts_without_restart_and_tears_down_in_reverse() {
    let (fake, r) = with_image();
    let desired = Desired {
        generation: 3,
        tenants: vec![spec("a", "img:1")],
        staged: vec![],
    };
    let statuses = r.reconcile(&desired).await;
    assert_eq!(
        fake.calls(),
        [
            "volume a",
            "network berth-a-33112ee1 10.213.0.0/28",
            "egress a 10.213.0.0/28",
            "create berth-a-33112ee1"
        ]
    );
    assert_eq!(statuses[0].state, proto::TenantState::Running as i32);
    assert_eq!(statuses[0].egress_denied_packets, 3);
    assert_eq!(
        statuses[0].message,
        "egress x.test:443/tcp: does not resolve (NXDOMAIN)"
    );
    assert_eq!(statuses[0].published_port, 20000);
    assert_eq!(statuses[0].restarts, 2);
    assert_eq!(
        statuses[0].last_restart_unix_ms, 0,
        "never started per Docker"
    );

    // A second pass (or an agent restart) changes nothing: adopted, not restarted.
    fake.calls.lock().unwrap().clear();
    r.reconcile(&desired).await;
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());

    // A container stopped in the middle of a restart is left to the restart.
    fake.containers.lock().unwrap()[0].state = "exited".into();
    r.restarting.lock().unwrap().insert("a".into());
    r.reconcile(&desired).await;
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    // Otherwise a stopped container is started again, its volume attached first.
    r.restarting.lock().unwrap().clear();
    r.reconcile(&desired).await;
    assert_eq!(fake.calls(), ["volume a", "start 0001"]);

    // Removed from the desired state: container, then egress, volume, network.
    fake.calls.lock().unwrap().clear();
    let statuses = r
        .reconcile(&Desired {
            generation: 4,
            tenants: vec![],
            staged: vec![],
        })
        .await;
    assert!(statuses.is_empty());
    assert_eq!(fake.calls(), TEARDOWN_OF_A);
}

#[tokio::test]
async fn a_changed_spec_recreates_and_an_unpullable_image_fails_with_the_reason() {
    let (fake, r) = with_a_running().await;
    fake.calls.lock().unwrap().clear();
    let statuses = r
        .reconcile(&Desired {
            generation: 2,
            tenants: vec![spec("a", "localhost:1/absent:2")],
            staged: vec![],
        })
        .await;
    assert_eq!(
        fake.calls(),
        [TEARDOWN_OF_A.as_slice(), &["pull localhost:1/absent:2"]].concat()
    );
    assert_eq!(statuses[0].state, proto::TenantState::Failed as i32);
    assert_eq!(
        statuses[0].message,
        "image localhost:1/absent:2 is not present and cannot be pulled: connection refused"
    );
    assert!(
        fake.containers.lock().unwrap().is_empty(),
        "nothing half-made"
    );
}

#[tokio::test]
async fn ports_skip_those_in_use_and_duplicates_are_removed() {
    let fake = Arc::new(FakeRuntime::default());
    fake.images.lock().unwrap().push("img:1".into());
    let mut r = Arc::into_inner(reconciler(&fake)).unwrap();
    r.port_free = |p| p != 20000;
    let r = Arc::new(r);
    // Published by a container berth does not own.
    fake.foreign_ports.lock().unwrap().push(20001);
    let desired = Desired {
        generation: 1,
        tenants: vec![spec("a", "img:1"), spec("b", "img:1")],
        staged: vec![],
    };
    let statuses = r.reconcile(&desired).await;
    let ports: Vec<u32> = statuses.iter().map(|s| s.published_port).collect();
    assert_eq!(ports, [20002, 20003]);
    assert!(
        fake.calls()
            .contains(&"network berth-b-33112ee1 10.213.0.16/28".to_string()),
        "each tenant its own /28: {:?}",
        fake.calls()
    );
    // A stray second container of tenant a (same labels) is removed, the first kept, and
    // a's rules, volume and network, which the first one uses, are left alone.
    let mut dup = fake.containers.lock().unwrap()[0].clone();
    dup.id = format!("{:064x}", 99);
    fake.containers.lock().unwrap().push(dup);
    fake.calls.lock().unwrap().clear();
    r.reconcile(&desired).await;
    assert_eq!(fake.calls(), ["remove 0063"]);
    assert_eq!(fake.containers.lock().unwrap().len(), 2);
    assert!(
        fake.egress_applied
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.starts_with("a ")),
        "a keeps its rules"
    );
}

#[tokio::test]
async fn gateway_ports_go_round_the_range_so_a_freed_port_is_the_last_given_again() {
    let (fake, r) = with_image();
    let only = |tenant: &str, generation| Desired {
        generation,
        tenants: vec![spec(tenant, "img:1")],
        staged: vec![],
    };
    assert_eq!(r.reconcile(&only("a", 1)).await[0].published_port, 20000);
    // a leaves and frees 20000; b, c and d still get the ports after it.
    for (generation, tenant, port) in [(2, "b", 20001), (3, "c", 20002), (4, "d", 20003)] {
        let statuses = r.reconcile(&only(tenant, generation)).await;
        assert_eq!(statuses[0].published_port, port, "{tenant}");
    }
    // At the end of the range the search starts again from its beginning.
    r.creations().next_port = *PORT_RANGE.end();
    assert_eq!(r.reconcile(&only("e", 5)).await[0].published_port, 29999);
    assert_eq!(r.reconcile(&only("f", 6)).await[0].published_port, 20000);
    assert_eq!(fake.containers.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_creation_takes_its_port_from_a_listing_made_then_not_from_its_pass() {
    let (fake, r) = with_image();
    // Claimed after any pass listed the ports (a creation waits for its slot meanwhile), by a
    // container that is down this moment, so nothing listens on it.
    fake.foreign_ports.lock().unwrap().push(20000);
    r.create(&spec("a", "img:1"), 1, &HashMap::new())
        .await
        .unwrap();
    let ports: Vec<u16> = fake
        .containers
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.port)
        .collect();
    assert_eq!(ports, vec![20001]);
}

/// A restore asked of a running tenant: its container goes, and a new one starts only on the
/// restored volume (waiting, stopped, until the backup access came); later passes leave it
/// be, and its status names the snapshot restored.
#[tokio::test]
async fn a_restore_asked_of_a_running_tenant_replaces_its_volume_once_before_it_starts_again() {
    use crate::backup::Snapshot;
    use crate::testing::backup::{FakeBackupSource, FakeEngine};
    use std::sync::atomic::Ordering;
    let volumes = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::default());
    fake.images.lock().unwrap().push("img:1".into());
    let engine = Arc::new(FakeEngine {
        files: vec![("notes.txt", "from the backup")],
        snapshots: vec![Snapshot {
            id: "ab".repeat(32),
            short_id: "abababab".into(),
            time: "2026-12-06T03:00:00Z".into(),
        }],
        ..FakeEngine::default()
    });
    let source = Arc::new(FakeBackupSource::default());
    let restores = Restorer {
        engine: engine.clone(),
        source: source.clone(),
        locks: Default::default(),
    };
    let r = reconciler_with(&fake, restores, Some(volumes.path().into()));
    let mut a = spec("a", "img:1");
    r.reconcile(&Desired {
        generation: 1,
        tenants: vec![a.clone()],
        staged: vec![],
    })
    .await;
    let notes = volumes.path().join("a/notes.txt");
    std::fs::write(&notes, "written since").unwrap();
    fake.calls.lock().unwrap().clear();

    a.restore = Some(berth_shared::spec::Restore {
        id: 2,
        snapshot: None,
    });
    let desired = Desired {
        generation: 2,
        tenants: vec![a],
        staged: vec![],
    };
    let statuses = r.reconcile(&desired).await;
    assert_eq!(fake.calls()[..6], TEARDOWN_OF_A);
    assert_eq!(statuses[0].state, proto::TenantState::WaitingForKey as i32);
    assert_eq!(
        statuses[0].message,
        "waiting for its backup access from the coordinator, to restore its volume"
    );
    assert!(fake.containers.lock().unwrap().is_empty(), "not started");
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "written since");

    source.access.store(true, Ordering::SeqCst);
    r.reconcile(&desired).await;
    let statuses = r.reconcile(&desired).await;
    assert_eq!(statuses[0].state, proto::TenantState::Running as i32);
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "from the backup");
    assert_eq!(statuses[0].restore_id, 2);
    assert_eq!(
        statuses[0].restored.as_ref().map(|s| s.time.as_str()),
        Some("2026-12-06T03:00:00Z")
    );
    fake.calls.lock().unwrap().clear();
    r.reconcile(&desired).await;
    assert!(
        !fake
            .calls()
            .iter()
            .any(|c| c.starts_with("stop") || c.starts_with("create")),
        "{:?}",
        fake.calls()
    );
    let restores = engine.calls.lock().unwrap().clone();
    assert_eq!(
        restores,
        [format!(
            "restore /repo/a {} {}",
            "ab".repeat(32),
            volumes.path().join("a/.berth-restore").display()
        )]
    );
}

#[tokio::test]
async fn without_its_volume_key_a_tenant_waits_and_its_container_never_starts() {
    let (fake, r) = with_image();
    let desired = Desired {
        generation: 1,
        tenants: vec![spec("a", "img:1")],
        staged: vec![],
    };
    *fake.volume_key_missing.lock().unwrap() = true;
    let statuses = r.reconcile(&desired).await;
    assert_eq!(statuses[0].state, proto::TenantState::WaitingForKey as i32);
    assert_eq!(
        statuses[0].message,
        "waiting for its volume key from the coordinator"
    );
    assert!(
        !fake.calls().iter().any(|c| c.starts_with("create")),
        "{:?}",
        fake.calls()
    );
    // The key came: made and started, its volume bound in.
    *fake.volume_key_missing.lock().unwrap() = false;
    let statuses = r.reconcile(&desired).await;
    assert_eq!(statuses[0].state, proto::TenantState::Running as i32);
    // After a reboot (stopped, key not here again): it stays stopped until the key comes.
    fake.containers.lock().unwrap()[0].state = "exited".into();
    *fake.volume_key_missing.lock().unwrap() = true;
    fake.calls.lock().unwrap().clear();
    let statuses = r.reconcile(&desired).await;
    assert_eq!(statuses[0].state, proto::TenantState::WaitingForKey as i32);
    assert!(
        !fake.calls().iter().any(|c| c.starts_with("start")),
        "{:?}",
        fake.calls()
    );
    *fake.volume_key_missing.lock().unwrap() = false;
    r.reconcile(&desired).await;
    assert_eq!(fake.calls(), ["volume a", "start 0001"]);
}

#[tokio::test]
async fn no_container_starts_without_its_rules_and_an_allowlist_change_does_not_recreate() {
    let (fake, r) = with_image();
    *fake.egress_broken.lock().unwrap() = true;
    let one = Desired {
        generation: 1,
        tenants: vec![spec("a", "img:1")],
        staged: vec![],
    };
    let statuses = r.reconcile(&one).await;
    assert_eq!(statuses[0].state, proto::TenantState::Failed as i32);
    assert_eq!(
        statuses[0].message,
        "egress: cannot run nft: No such file or directory (os error 2)"
    );
    assert!(fake.containers.lock().unwrap().is_empty());
    *fake.egress_broken.lock().unwrap() = false;
    r.reconcile(&one).await;
    assert_eq!(fake.containers.lock().unwrap().len(), 1);
    // A new allowlist: same container (egress is not part of its spec hash).
    let mut changed = spec("a", "img:1");
    changed.egress = spec_with_egress().egress;
    fake.calls.lock().unwrap().clear();
    r.reconcile(&Desired {
        generation: 2,
        tenants: vec![changed],
        staged: vec![],
    })
    .await;
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    // A stopped container whose rules cannot be applied stays stopped.
    fake.containers.lock().unwrap()[0].state = "exited".into();
    *fake.egress_broken.lock().unwrap() = true;
    let statuses = r.reconcile(&one).await;
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    assert_eq!(statuses[0].state, proto::TenantState::Failed as i32);
    // Stale rules are swept only for tenants whose container is gone.
    *fake.egress_broken.lock().unwrap() = false;
    fake.egress_applied
        .lock()
        .unwrap()
        .push("old 10.213.9.0/28".into());
    r.reconcile(&one).await;
    assert_eq!(fake.calls(), ["volume a", "start 0001", "sweep"]);
}

fn spec_with_egress() -> TenantSpec {
    TenantSpec::from_resolved(proto::TenantSpec {
        egress: vec![proto::EgressRule {
            destination: "203.0.113.0/24".into(),
            protocol: "tcp".into(),
            port: 443,
        }],
        ..spec("a", "img:1").to_proto()
    })
    .unwrap()
}

#[tokio::test]
async fn a_port_taken_while_stopped_means_a_new_container_on_a_fresh_port() {
    let (fake, r) = with_image();
    let desired = Desired {
        generation: 1,
        tenants: vec![spec("a", "img:1")],
        staged: vec![],
    };
    r.reconcile(&desired).await;
    fake.containers.lock().unwrap()[0].state = "exited".into();
    *fake.port_taken.lock().unwrap() = true;
    fake.foreign_ports.lock().unwrap().push(20000);
    fake.calls.lock().unwrap().clear();
    let statuses = r.reconcile(&desired).await;
    assert_eq!(
        fake.calls(),
        [
            "volume a",
            "start 0001",
            "remove 0001",
            "volume a",
            "create berth-a-33112ee1"
        ]
    );
    assert_eq!(statuses[0].published_port, 20001);
}

#[tokio::test]
async fn a_staged_tenant_gets_its_network_and_rules_but_no_volume_or_container_until_it_runs() {
    let (fake, r) = with_image();
    // The tenant's network on the host it leaves, on the same engine (as in tests): named for
    // that host, so neither used here nor its subnet taken.
    fake.networks.lock().unwrap().insert(
        container_spec::network_name(&HostId::new("h0").unwrap(), &TenantId::new("m").unwrap()),
        vec!["10.213.0.0/28".into()],
    );
    let staged = Desired {
        generation: 5,
        tenants: vec![],
        staged: vec![spec("m", "img:1")],
    };
    let statuses = r.reconcile(&staged).await;
    assert!(statuses.is_empty(), "a staged tenant is not reported");
    assert_eq!(
        fake.calls(),
        [
            "network berth-m-33112ee1 10.213.0.16/28",
            "egress m 10.213.0.16/28"
        ]
    );
    // Staged again: nothing new, and its rules are not swept.
    fake.calls.lock().unwrap().clear();
    r.reconcile(&staged).await;
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    // Its volume arrived and it is delivered: only the volume and the container are left.
    fake.calls.lock().unwrap().clear();
    r.reconcile(&Desired {
        generation: 6,
        tenants: vec![spec("m", "img:1")],
        staged: vec![],
    })
    .await;
    assert_eq!(fake.calls(), ["volume m", "create berth-m-33112ee1"]);
}

#[tokio::test(start_paused = true)]
async fn a_staged_tenants_network_is_made_outside_the_pass_and_a_tenant_arriving_meanwhile_is_not_held()
 {
    let (fake, r) = with_image();
    // Every network takes Docker 5 s here.
    *fake.network_time.lock().unwrap() = Some(Duration::from_secs(5));
    let staging_m = Desired {
        generation: 1,
        tenants: vec![],
        staged: vec![spec("m", "img:1")],
    };
    let began = tokio::time::Instant::now();
    r.reconcile_current(|| staging_m.clone()).await;
    assert_eq!(
        began.elapsed(),
        Duration::ZERO,
        "the pass waited for m's network"
    );
    assert!(r.busy_tenants().contains("m"));
    // A tenant arriving meanwhile has its creation begun at once; m is not staged twice.
    let a_arrives = Desired {
        generation: 2,
        tenants: vec![spec("a", "img:1")],
        staged: vec![spec("m", "img:1")],
    };
    r.reconcile_current(|| a_arrives.clone()).await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(began.elapsed(), Duration::from_millis(1));
    assert_eq!(
        fake.calls(),
        [
            "network berth-m-33112ee1 10.213.0.0/28",
            "volume a",
            "network berth-a-33112ee1 10.213.0.0/28",
        ]
    );
    // m arrives before its staging ended: its container waits for it, on the staged network.
    let m_arrives = Desired {
        generation: 3,
        tenants: vec![spec("a", "img:1"), spec("m", "img:1")],
        staged: vec![],
    };
    let statuses = r.reconcile_current(|| m_arrives.clone()).await;
    let m = statuses.iter().find(|s| s.tenant_id == "m").unwrap();
    assert_eq!(m.state, proto::TenantState::Pending as i32, "{m:?}");
    r.settled().await;
    assert_eq!(began.elapsed(), Duration::from_secs(5));
    r.reconcile(&m_arrives).await;
    let m_calls: Vec<String> = fake
        .calls()
        .into_iter()
        .filter(|c| c.contains(" m") || c.contains("berth-m"))
        .collect();
    assert_eq!(
        m_calls,
        [
            "network berth-m-33112ee1 10.213.0.0/28",
            "egress m 10.213.0.0/28",
            "volume m",
            "create berth-m-33112ee1"
        ]
    );
}

#[tokio::test]
async fn a_staged_tenant_whose_move_is_called_off_loses_its_rules_and_network_here_only() {
    let (fake, r) = with_image();
    let elsewhere =
        container_spec::network_name(&HostId::new("h0").unwrap(), &TenantId::new("m").unwrap());
    fake.networks
        .lock()
        .unwrap()
        .insert(elsewhere.clone(), vec!["10.213.0.0/28".into()]);
    r.reconcile(&Desired {
        generation: 5,
        tenants: vec![],
        staged: vec![spec("m", "img:1")],
    })
    .await;
    fake.calls.lock().unwrap().clear();
    r.reconcile(&Desired {
        generation: 6,
        tenants: vec![],
        staged: vec![],
    })
    .await;
    assert_eq!(fake.calls(), ["sweep", "rm-network berth-m-33112ee1"]);
    assert_eq!(
        fake.networks.lock().unwrap().keys().collect::<Vec<_>>(),
        [&elsewhere],
        "another host's network of the same tenant stays"
    );
}

#[tokio::test]
async fn a_leaving_tenants_volume_is_free_once_its_container_stopped_and_a_failed_removal_is_retried()
 {
    let (fake, r) = with_a_running().await;
    *fake.remove_error.lock().unwrap() =
        Some("removal of container 0001 is already in progress".into());
    fake.calls.lock().unwrap().clear();
    let torn_down = r.passes.torn_down();
    let none = Desired {
        generation: 2,
        tenants: vec![],
        staged: vec![],
    };
    // Whatever woke a pass so far is spent.
    let _ = futures::FutureExt::now_or_never(r.wake.notified());
    r.reconcile_current(|| none.clone()).await;
    while !r.removing().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        futures::FutureExt::now_or_never(r.wake.notified()).is_none(),
        "a failed removal woke a pass at once (a removal Docker keeps refusing would loop)"
    );
    assert_eq!(
        *torn_down.borrow(),
        TornDown {
            released: none.generation,
            removed: 1
        },
        "a copy of its volume (a drain's) goes on, its deletion waits for the removal"
    );
    assert_eq!(
        fake.calls(),
        ["stop 0001", "rm-egress a", "rm-volume a", "remove 0001"]
    );
    assert_eq!(fake.containers.lock().unwrap()[0].state, "exited");
    assert_eq!(
        fake.networks.lock().unwrap().len(),
        1,
        "its network stays with its container"
    );

    *fake.remove_error.lock().unwrap() = None;
    fake.calls.lock().unwrap().clear();
    r.reconcile(&none).await;
    assert_eq!(fake.calls(), TEARDOWN_OF_A);
    assert!(fake.containers.lock().unwrap().is_empty());
    assert_eq!(*torn_down.borrow(), TornDown::complete(none.generation));
}

#[tokio::test(start_paused = true)]
async fn the_next_tenant_to_leave_is_stopped_while_the_last_ones_container_is_being_removed() {
    let (fake, r) = with_image();
    let both = Desired {
        generation: 1,
        tenants: vec![spec("a", "img:1"), spec("b", "img:1")],
        staged: vec![],
    };
    r.reconcile(&both).await;
    *fake.remove_time.lock().unwrap() = Some(Duration::from_secs(5));
    let torn_down = r.passes.torn_down();
    fake.calls.lock().unwrap().clear();

    let began = tokio::time::Instant::now();
    let only_b = Desired {
        generation: 2,
        tenants: vec![spec("b", "img:1")],
        staged: vec![],
    };
    r.reconcile_current(|| only_b.clone()).await;
    assert_eq!(
        began.elapsed(),
        Duration::ZERO,
        "the pass waited for the removal"
    );
    assert_eq!(
        *torn_down.borrow(),
        TornDown {
            released: 2,
            removed: 1
        },
        "a's volume may be copied, not yet deleted"
    );
    let none = Desired {
        generation: 3,
        tenants: vec![],
        staged: vec![],
    };
    r.reconcile_current(|| none.clone()).await;
    assert_eq!(
        began.elapsed(),
        Duration::ZERO,
        "b's stop waited for a's removal"
    );
    assert_eq!(
        *torn_down.borrow(),
        TornDown {
            released: 3,
            removed: 1
        }
    );
    let released = [
        "stop 0001",
        "rm-egress a",
        "rm-volume a",
        "stop 0002",
        "rm-egress b",
        "rm-volume b",
    ];
    let calls_but = |removals: bool| -> Vec<String> {
        fake.calls()
            .into_iter()
            .filter(|c| c.starts_with("remove") == removals)
            .collect()
    };
    assert_eq!(calls_but(false), released);
    // Another pass meanwhile (the removals under way) tears neither down again nor sweeps
    // their networks.
    tokio::task::yield_now().await;
    r.reconcile_current(|| none.clone()).await;
    assert_eq!(calls_but(false), released);
    assert_eq!(calls_but(true), ["remove 0001", "remove 0002"]);
    assert_eq!(fake.networks.lock().unwrap().len(), 2);

    r.settled().await;
    // (`settled` looks every millisecond.)
    assert!(
        began.elapsed().abs_diff(Duration::from_secs(5)) <= Duration::from_millis(1),
        "side by side: {:?}",
        began.elapsed()
    );
    assert_eq!(*torn_down.borrow(), TornDown::complete(3));
    assert!(fake.containers.lock().unwrap().is_empty());
    assert!(fake.networks.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn new_tenants_start_two_side_by_side_no_pass_waits_for_a_start_and_two_stop_side_by_side() {
    let (fake, r) = with_image();
    *fake.start_time.lock().unwrap() = Some(Duration::from_secs(1));
    let desired = Desired {
        generation: 1,
        tenants: vec![spec("a", "img:1"), spec("b", "img:1"), spec("c", "img:1")],
        staged: vec![],
    };
    let began = tokio::time::Instant::now();
    let statuses = r.reconcile_current(|| desired.clone()).await;
    assert_eq!(began.elapsed(), Duration::ZERO, "the pass did not wait");
    assert!(
        statuses
            .iter()
            .all(|s| s.state == proto::TenantState::Pending as i32),
        "{statuses:?}"
    );
    // A pass meanwhile starts nothing twice.
    r.reconcile_current(|| desired.clone()).await;
    r.settled().await;
    assert_eq!(
        began.elapsed(),
        Duration::from_secs(2),
        "two side by side, then the third"
    );
    let creates: Vec<String> = fake
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("create"))
        .collect();
    assert_eq!(
        creates,
        [
            "create berth-a-33112ee1",
            "create berth-b-33112ee1",
            "create berth-c-33112ee1"
        ]
    );

    let statuses = r.reconcile_current(|| desired.clone()).await;
    assert!(
        statuses
            .iter()
            .all(|s| s.state == proto::TenantState::Running as i32),
        "{statuses:?}"
    );
    let ports: BTreeSet<u32> = statuses.iter().map(|s| s.published_port).collect();
    assert_eq!(ports.len(), 3, "each its own port: {ports:?}");

    // Gone from the desired state: stopped and removed two side by side as well.
    let began = tokio::time::Instant::now();
    let statuses = r
        .reconcile_current(|| Desired {
            generation: 2,
            tenants: vec![],
            staged: vec![],
        })
        .await;
    assert!(statuses.is_empty());
    assert_eq!(began.elapsed(), Duration::from_secs(2));
    r.settled().await;
    assert!(fake.containers.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_pass_reports_at_once_while_another_tenants_container_is_being_started() {
    let (fake, r) = with_image();
    let a = spec("a", "img:1");
    let only_a = Desired {
        generation: 1,
        tenants: vec![a.clone()],
        staged: vec![],
    };
    r.reconcile(&only_a).await;
    // b's container is made, and Docker holds it while it starts (here: 5 s).
    *fake.start_time.lock().unwrap() = Some(Duration::from_secs(5));
    let both = Desired {
        generation: 2,
        tenants: vec![a, spec("b", "img:1")],
        staged: vec![],
    };
    r.reconcile_current(|| both.clone()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        fake.containers
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.tenant == "b" && c.state == "created"),
        "b's container is listed while it starts"
    );
    fake.calls.lock().unwrap().clear();

    let began = tokio::time::Instant::now();
    let statuses = r.reconcile_current(|| both.clone()).await;
    assert_eq!(
        began.elapsed(),
        Duration::ZERO,
        "the pass (and a's status in its report) waited for b's start"
    );
    let state = |t: &str| statuses.iter().find(|s| s.tenant_id == t).unwrap().state;
    assert_eq!(state("a"), proto::TenantState::Running as i32);
    assert_eq!(state("b"), proto::TenantState::Pending as i32);
    assert!(
        !fake.calls().iter().any(|c| c.starts_with("start")),
        "the pass started b's container beside its creation: {:?}",
        fake.calls()
    );

    r.settled().await;
    let statuses = r.reconcile_current(|| both.clone()).await;
    assert!(
        statuses
            .iter()
            .all(|s| s.state == proto::TenantState::Running as i32),
        "{statuses:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_tenant_dropped_while_its_container_is_made_keeps_its_rules_and_the_teardown_open_until_it_is_gone()
 {
    let (fake, r) = with_image();
    *fake.start_time.lock().unwrap() = Some(Duration::from_secs(1));
    let a = Desired {
        generation: 1,
        tenants: vec![spec("a", "img:1")],
        staged: vec![],
    };
    let none = Desired {
        generation: 2,
        tenants: vec![],
        staged: vec![],
    };
    r.reconcile_current(|| a.clone()).await;
    // Its rules are in place and its container is starting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let torn_down = r.passes.torn_down();
    r.reconcile_current(|| none.clone()).await;
    assert!(
        torn_down.borrow().released < none.generation,
        "what waits for a's teardown (a purge) waits for its container"
    );
    assert_eq!(
        *fake.egress_applied.lock().unwrap(),
        ["a 10.213.0.0/28"],
        "its rules stay while its container may start"
    );

    r.settled().await;
    fake.calls.lock().unwrap().clear();
    r.reconcile(&none).await;
    assert_eq!(
        *torn_down.borrow(),
        TornDown::complete(none.generation),
        "torn down"
    );
    assert_eq!(fake.calls(), TEARDOWN_OF_A);
    assert!(fake.containers.lock().unwrap().is_empty());
}
