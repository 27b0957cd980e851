use std::sync::atomic::Ordering;

use berth_shared::clock::ManualClock;
use berth_shared::spec::TenantSpec;

use super::*;
use crate::runtime::{ContainerDetails, ManagedContainer};
use crate::testing::runtime::{FakeProbe, FakeRuntime};

fn running(address: &str, health: Option<&str>) -> ContainerDetails {
    ContainerDetails {
        running: true,
        health: health.map(String::from),
        address: Some(address.parse().unwrap()),
        netns: Some("/run/docker/netns/0123456789ab".into()),
        started_at: "2026-11-21T10:00:00Z".into(),
        ..Default::default()
    }
}

fn fake_with_container(tenant: &str, details: ContainerDetails) -> Arc<FakeRuntime> {
    let fake = Arc::new(FakeRuntime::default());
    fake.containers.lock().unwrap().push(ManagedContainer {
        id: format!("{:064x}", 7),
        tenant: tenant.into(),
        spec_hash: String::new(),
        generation: 1,
        port: 20000,
        state: "running".into(),
    });
    *fake.details.lock().unwrap() = Some(details);
    fake
}

const ID: &str = "0000000000000000000000000000000000000000000000000000000000000007";

#[tokio::test(start_paused = true)]
async fn the_gate_connects_to_the_gateway_on_the_tenant_network_until_it_answers() {
    let fake = fake_with_container("a", running("10.213.0.2", None));
    let probe = FakeProbe {
        failures: 3,
        ..Default::default()
    };
    let down = restart_and_wait(
        fake.as_ref(),
        &probe,
        HealthGate::new(Duration::from_secs(300)),
        ID,
        18789,
        |_| panic!("no progress note while checks are fast"),
    )
    .await
    .unwrap();
    assert_eq!(fake.calls(), vec!["restart 0007"]);
    assert_eq!(probe.attempts.load(Ordering::SeqCst), 4);
    assert_eq!(
        probe.addresses.lock().unwrap()[0],
        "10.213.0.2:18789".parse().unwrap()
    );
    // Three failed checks 50 ms apart.
    assert_eq!(down, Duration::from_millis(150));
    // Announced once, when it answered, from its own namespace.
    assert_eq!(
        *probe.announced.lock().unwrap(),
        vec![(
            "/run/docker/netns/0123456789ab".into(),
            "10.213.0.2".parse().unwrap()
        )]
    );
}

/// A nightly restart's backup runs between the container's stop and its start, and the
/// downtime counts it.
#[tokio::test(start_paused = true)]
async fn work_while_stopped_comes_between_the_stop_and_the_start() {
    let fake = fake_with_container("a", running("10.213.0.2", None));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (runtime, calls) = (fake.clone(), seen.clone());
    let work = async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        calls.lock().unwrap().extend(runtime.calls());
    };
    let down = restart_around(
        fake.as_ref(),
        &FakeProbe::default(),
        HealthGate::new(Duration::from_secs(300)),
        (ID, 18789),
        Some(work),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(*seen.lock().unwrap(), ["stop 0007"], "stopped meanwhile");
    assert_eq!(fake.calls(), ["stop 0007", "start 0007"]);
    assert_eq!(down, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn a_docker_healthcheck_decides_when_the_image_has_one() {
    let fake = fake_with_container("a", running("10.213.0.2", Some("healthy")));
    let probe = FakeProbe::default();
    restart_and_wait(
        fake.as_ref(),
        &probe,
        HealthGate::new(Duration::from_secs(300)),
        ID,
        18789,
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(probe.attempts.load(Ordering::SeqCst), 0, "no TCP probe");
    assert_eq!(
        probe.announced.lock().unwrap().len(),
        1,
        "healthy: announced"
    );
    *fake.details.lock().unwrap() = Some(running("10.213.0.2", Some("unhealthy")));
    let err = restart_and_wait(
        fake.as_ref(),
        &probe,
        HealthGate::new(Duration::from_secs(60)),
        ID,
        18789,
        |_| {},
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("not healthy 1 min after the restart ("),
        "{err}"
    );
    assert!(
        err.ends_with("checks; last: Docker healthcheck says unhealthy)"),
        "{err}"
    );
    assert_eq!(
        probe.announced.lock().unwrap().len(),
        1,
        "never healthy again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_check_is_reported_and_retried_with_backoff_until_the_timeout() {
    let fake = fake_with_container("a", running("10.213.0.2", None));
    let probe = FakeProbe {
        failures: u32::MAX,
        ..Default::default()
    };
    let notes = Mutex::new(Vec::new());
    let err = restart_and_wait(
        fake.as_ref(),
        &probe,
        HealthGate::new(Duration::from_secs(120)),
        ID,
        18789,
        |n| notes.lock().unwrap().push(n),
    )
    .await
    .unwrap_err()
    .to_string();
    let notes = notes.into_inner().unwrap();
    // 10 s of checks every 50 ms, then pauses of 0.1, 0.2, 0.4 ... 15 s.
    let attempts = probe.attempts.load(Ordering::SeqCst);
    assert!((200..=220).contains(&attempts), "{attempts} checks");
    assert_eq!(
        notes[0],
        "restarted 10.0 s ago, not healthy yet: gateway port 18789: Connection refused (os error 111); next check in 0.1 s"
    );
    assert!(
        notes.last().unwrap().ends_with("next check in 15.0 s"),
        "{notes:?}"
    );
    assert_eq!(
        err,
        format!(
            "not healthy 2 min after the restart ({attempts} checks; last: gateway port 18789: Connection refused (os error 111))"
        )
    );
    assert!(
        probe.announced.lock().unwrap().is_empty(),
        "nothing announced for a gateway that never answered"
    );
    // Stopped, or never got an address: said so.
    *fake.details.lock().unwrap() = Some(ContainerDetails {
        exit_code: 137,
        ..Default::default()
    });
    let err = restart_and_wait(
        fake.as_ref(),
        &probe,
        HealthGate::new(Duration::from_secs(1)),
        ID,
        18789,
        |_| {},
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.ends_with("last: not running (exit code 137))"), "{err}");
}

fn spec(id: &str) -> TenantSpec {
    TenantSpec::from_resolved(proto::TenantSpec {
        tenant_id: id.into(),
        image: "berth-test-tenant:1".into(),
        resources: Some(proto::Resources {
            memory_bytes: 128 << 20,
            cpu_millicores: 100,
            cpu_limit_millicores: 0,
            volume_bytes: 0,
        }),
        gateway_port: 8080,
        ..Default::default()
    })
    .unwrap()
}

fn status(id: &str, state: proto::TenantState) -> proto::TenantStatus {
    proto::TenantStatus {
        tenant_id: id.into(),
        state: state as i32,
        last_restart_unix_ms: 1_700_000_000_000,
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_requested_restart_runs_behind_the_gate_and_answers_once() {
    let fake = fake_with_container("a", running("10.213.0.2", None));
    let restarts = Arc::new(Restarts::new(RestartSettings::default()));
    let driver = Driver {
        restarts: restarts.clone(),
        runtime: fake.clone(),
        probe: Arc::new(FakeProbe {
            failures: 2,
            ..Default::default()
        }),
        clock: Arc::new(ManualClock::at(1_763_726_400_000)),
        host: HostId::new("h1").unwrap(),
        backups: None,
    };
    let desired = Desired {
        generation: 3,
        tenants: vec![spec("a"), spec("b")],
        staged: vec![],
    };
    let statuses = [
        status("a", proto::TenantState::Running),
        status("b", proto::TenantState::Failed),
    ];
    restarts.request("a", 41);
    restarts.request("b", 42);
    restarts.request("c", 43);
    restarts.request("Not/Valid", 44);
    for task in driver.step(&desired, &statuses) {
        task.await.unwrap();
    }
    let mut results = restarts.take_results();
    results.sort_by_key(|r| r.request_id);
    let summary: Vec<(u64, bool, &str, u64)> = results
        .iter()
        .map(|r| (r.request_id, r.ok, r.error.as_str(), r.downtime_ms))
        .collect();
    assert_eq!(
        summary,
        vec![
            (41, true, "", 100),
            (42, false, "the container is not running", 0),
            (43, false, "the tenant is not placed on this host", 0),
            (
                44,
                false,
                "tenant_id: invalid tenant id \"Not/Valid\": must start with a lowercase letter a-z",
                0
            ),
        ]
    );
    assert_eq!(fake.calls(), vec!["restart 0007"]);
    assert!(restarts.busy().lock().unwrap().is_empty());
    let mut s = status("a", proto::TenantState::Running);
    restarts.annotate(&mut s);
    assert!(
        s.restart_note.starts_with("requested restart at "),
        "{}",
        s.restart_note
    );
    assert!(
        s.restart_note.ends_with("healthy again after 0.1 s"),
        "{}",
        s.restart_note
    );
    assert!(
        s.next_restart_unix_ms > 1_763_726_400_000,
        "the nightly one is still planned"
    );
    let opens = s.restart_window_opens_unix_ms;
    assert!(
        opens > 0 && opens <= s.next_restart_unix_ms && s.next_restart_unix_ms - opens < 86_400_000,
        "its window opens before it: {opens} {}",
        s.next_restart_unix_ms
    );
    assert!(restarts.take_results().is_empty(), "each result once");
}

#[tokio::test(start_paused = true)]
async fn a_failed_restart_is_reported_and_frees_its_place() {
    let fake = fake_with_container("a", running("10.213.0.2", None));
    *fake.restart_error.lock().unwrap() = Some("No such container: 0007".into());
    let restarts = Arc::new(Restarts::new(RestartSettings::default()));
    let driver = Driver {
        restarts: restarts.clone(),
        runtime: fake.clone(),
        probe: Arc::new(FakeProbe::default()),
        clock: Arc::new(ManualClock::at(1_763_726_400_000)),
        host: HostId::new("h1").unwrap(),
        backups: None,
    };
    let desired = Desired {
        generation: 1,
        tenants: vec![spec("a")],
        staged: vec![],
    };
    let statuses = [status("a", proto::TenantState::Running)];
    restarts.request("a", 1);
    for task in driver.step(&desired, &statuses) {
        task.await.unwrap();
    }
    let results = restarts.take_results();
    assert_eq!(results[0].error, "docker: No such container: 0007");
    assert!(!results[0].ok);
    // The place is free again: the next request runs.
    *fake.restart_error.lock().unwrap() = None;
    restarts.request("a", 2);
    for task in driver.step(&desired, &statuses) {
        task.await.unwrap();
    }
    assert!(restarts.take_results()[0].ok);
}

#[test]
fn a_policy_takes_the_hosts_defaults_for_what_it_leaves_out() {
    let settings = RestartSettings {
        window: "01:00-03:00".parse().unwrap(),
        time_zone: ZoneName::new("Europe/Berlin").unwrap(),
        ..Default::default()
    };
    let (w, tz) = settings.plan(&RestartPolicy::default()).unwrap();
    assert_eq!(
        (w.to_string().as_str(), tz.iana_name()),
        ("01:00-03:00", Some("Europe/Berlin"))
    );
    let own = RestartPolicy {
        enabled: true,
        window: Some("04:00-05:00".parse().unwrap()),
        time_zone: Some(ZoneName::new("Asia/Tokyo").unwrap()),
    };
    let (w, tz) = settings.plan(&own).unwrap();
    assert_eq!(
        (w.to_string().as_str(), tz.iana_name()),
        ("04:00-05:00", Some("Asia/Tokyo"))
    );
    assert!(
        settings
            .plan(&RestartPolicy {
                enabled: false,
                ..own
            })
            .is_none()
    );
}
