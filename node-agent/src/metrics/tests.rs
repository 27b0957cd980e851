use axum::body::Body;
use axum::http::Request as HttpRequest;
use berth_shared::metrics::testing;
use berth_shared::store::MemStore;
use tower::ServiceExt;

use super::*;
use crate::desired::DesiredStore;
use crate::restarts::RestartSettings;

fn statuses() -> Vec<proto::TenantStatus> {
    vec![
        proto::TenantStatus {
            tenant_id: "acme".into(),
            state: proto::TenantState::Running as i32,
            memory_used_bytes: 200 << 20,
            memory_cap_bytes: 256 << 20,
            cpu_used_millicores: 1_250,
            oom_kills: 2,
            restarts: 1,
            egress_denied_packets: 17,
            next_restart_unix_ms: 1_795_300_000_000,
            ..Default::default()
        },
        proto::TenantStatus {
            tenant_id: "beta\"co".into(),
            state: proto::TenantState::Failed as i32,
            ..Default::default()
        },
    ]
}

#[test]
fn the_page_parses_and_carries_each_figure() {
    let telemetry = Telemetry::default();
    telemetry.reported(1_000_000, 8 << 30, 5 << 30);
    telemetry.connected.store(true, Ordering::Relaxed);
    let text = render(&telemetry, &statuses(), 1_004_500);
    let value = |name: &str, labels: &[(&str, &str)]| testing::value(&text, name, labels);
    assert_eq!(
        value("berth_agent_host_memory_bytes", &[("kind", "total")]),
        (8u64 << 30) as f64
    );
    assert_eq!(
        value("berth_agent_host_memory_bytes", &[("kind", "available")]),
        (5u64 << 30) as f64
    );
    assert_eq!(value("berth_agent_connected", &[]), 1.0);
    assert_eq!(value("berth_agent_report_age_seconds", &[]), 4.5);
    assert_eq!(value("berth_agent_tenants", &[("state", "running")]), 1.0);
    assert_eq!(value("berth_agent_tenants", &[("state", "failed")]), 1.0);
    let acme = [("tenant", "acme")];
    assert_eq!(
        value("berth_agent_tenant_memory_used_bytes", &acme),
        (200u64 << 20) as f64
    );
    assert_eq!(
        value("berth_agent_tenant_memory_cap_bytes", &acme),
        (256u64 << 20) as f64
    );
    assert_eq!(value("berth_agent_tenant_oom_kills_total", &acme), 2.0);
    assert_eq!(value("berth_agent_tenant_cpu_used_cores", &acme), 1.25);
    assert_eq!(value("berth_agent_tenant_restarts_total", &acme), 1.0);
    assert_eq!(
        value("berth_agent_tenant_egress_denied_packets_total", &acme),
        17.0
    );
    assert_eq!(
        value("berth_agent_tenant_next_restart_timestamp_seconds", &acme),
        1_795_300_000.0
    );
    // A quote in a label value is escaped, so the line still parses.
    assert!(text.contains("berth_agent_tenant_oom_kills_total{tenant=\"beta\\\"co\"} 0\n"));
    // Never reported: no age.
    assert!(!render(&Telemetry::default(), &[], 5).contains("berth_agent_report_age_seconds"));
}

async fn status(router: Router, auth: Option<&str>) -> StatusCode {
    let mut request = HttpRequest::get("/metrics");
    if let Some(a) = auth {
        request = request.header(header::AUTHORIZATION, a);
    }
    router
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn off_loopback_only_the_token_opens_it() {
    let enforcement = Arc::new(Enforcement::new(
        DesiredStore::with_store(Box::new(MemStore::default())).unwrap(),
        RestartSettings::default(),
    ));
    let telemetry = Arc::new(Telemetry::default());
    let token = "0123456789abcdef0123".to_string();
    let guarded = router(enforcement.clone(), telemetry.clone(), Some(token.clone()));
    assert_eq!(
        status(guarded.clone(), None).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(guarded.clone(), Some("Bearer 0123456789abcdef0124")).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(guarded, Some(&format!("Bearer {token}"))).await,
        StatusCode::OK
    );
    assert_eq!(
        status(router(enforcement, telemetry, None), None).await,
        StatusCode::OK
    );
}
