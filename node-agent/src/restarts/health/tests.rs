use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;
use crate::runtime::ContainerDetails;
use crate::testing::runtime::{FakeProbe, FakeRuntime};

fn running_at(started_at: &str) -> ContainerDetails {
    ContainerDetails {
        running: true,
        address: Some("10.213.0.2".parse().unwrap()),
        netns: Some("/run/docker/netns/0123456789ab".into()),
        started_at: started_at.into(),
        ..Default::default()
    }
}

fn watch(fake: &Arc<FakeRuntime>, probe: &Arc<FakeProbe>) -> (Arc<HealthWatch>, Arc<Notify>) {
    let passed = Arc::new(Notify::new());
    let watch = HealthWatch::new(
        fake.clone(),
        probe.clone(),
        HealthGate::new(Duration::from_secs(300)),
        passed.clone(),
    );
    (watch, passed)
}

#[tokio::test(start_paused = true)]
async fn a_start_is_healthy_once_its_check_passes_and_the_next_start_is_checked_anew() {
    let fake = Arc::new(FakeRuntime::default());
    *fake.details.lock().unwrap() = Some(running_at("2026-11-21T10:00:00Z"));
    let probe = Arc::new(FakeProbe {
        failures: 2,
        ..Default::default()
    });
    let (watch, passed) = watch(&fake, &probe);

    assert_eq!(
        watch.healthy("a", "c1", "2026-11-21T10:00:00Z", 18789),
        Health::Checking
    );
    let began = Instant::now();
    passed.notified().await;
    // Two refused connects 50 ms apart, then the one that passed.
    assert_eq!(began.elapsed(), Duration::from_millis(100));
    assert_eq!(
        watch.healthy("a", "c1", "2026-11-21T10:00:00Z", 18789),
        Health::Healthy
    );
    assert_eq!(probe.attempts.load(Ordering::SeqCst), 3);
    assert_eq!(
        probe.addresses.lock().unwrap()[0],
        "10.213.0.2:18789".parse().unwrap()
    );
    assert_eq!(
        probe.namespaces.lock().unwrap()[0],
        std::path::PathBuf::from("/run/docker/netns/0123456789ab")
    );

    // Restarted (a crash, or the nightly restart): not healthy until checked again.
    *fake.details.lock().unwrap() = Some(running_at("2026-11-21T11:00:00Z"));
    assert_eq!(
        watch.healthy("a", "c1", "2026-11-21T11:00:00Z", 18789),
        Health::Checking
    );
    passed.notified().await;
    assert_eq!(
        watch.healthy("a", "c1", "2026-11-21T11:00:00Z", 18789),
        Health::Healthy
    );
    assert_eq!(probe.attempts.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn checks_back_off_and_end_with_their_start() {
    let fake = Arc::new(FakeRuntime::default());
    *fake.details.lock().unwrap() = Some(running_at("2026-11-21T10:00:00Z"));
    let probe = Arc::new(FakeProbe {
        failures: u32::MAX,
        ..Default::default()
    });
    let (watch, _passed) = watch(&fake, &probe);
    assert_eq!(
        watch.healthy("a", "c1", "2026-11-21T10:00:00Z", 18789),
        Health::Checking
    );
    // 50 ms apart for the first 10 s (201 checks), then doubling pauses up to 15 s.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let attempts = probe.attempts.load(Ordering::SeqCst);
    assert!(
        (201..=215).contains(&attempts),
        "{attempts} checks in the first minute"
    );
    assert_eq!(
        watch.healthy("a", "c1", "2026-11-21T10:00:00Z", 18789),
        Health::Failing("not healthy 50 s after its start: gateway port 18789: Connection refused (os error 111)".into())
    );

    // The container is gone: its checks stop.
    watch.retain(|_| false);
    tokio::time::sleep(Duration::from_secs(16)).await;
    let after = probe.attempts.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(probe.attempts.load(Ordering::SeqCst), after);
}

#[tokio::test(start_paused = true)]
async fn a_stopped_container_is_not_healthy() {
    let fake = Arc::new(FakeRuntime::default());
    *fake.details.lock().unwrap() = Some(ContainerDetails {
        running: false,
        exit_code: 137,
        ..running_at("2026-11-21T10:00:00Z")
    });
    let probe = Arc::new(FakeProbe::default());
    let (watch, _passed) = watch(&fake, &probe);
    assert_eq!(
        watch.healthy("a", "c1", "2026-11-21T10:00:00Z", 18789),
        Health::Checking
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        watch.healthy("a", "c1", "2026-11-21T10:00:00Z", 18789),
        Health::Checking
    );
    // Docker says it is not running: the gateway is never even tried.
    assert_eq!(probe.attempts.load(Ordering::SeqCst), 0);
}
