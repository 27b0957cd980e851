//! The agent's `/metrics` (Prometheus text) on `metrics_listen`: host memory, per-tenant memory,
//! OOM kills, restarts and egress denials, and how long ago the agent last reported to its
//! coordinator.
//!
//! Ensures: off loopback, only a request carrying the token of `metrics_token_file`
//! (`Authorization: Bearer`) is answered (configuration refuses a non-loopback address without
//! one); a port that cannot be bound is logged and the agent goes on enforcing without it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use berth_shared::clock::{Clock, SystemClock};
use berth_shared::metrics::{CONTENT_TYPE, Exposition, Figure};
use berth_shared::proto;
use berth_shared::spec::tenant_state_name;

use crate::enforce::Enforcement;

/// What the session last told the coordinator, for `/metrics`.
#[derive(Debug, Default)]
pub struct Telemetry {
    pub connected: AtomicBool,
    /// 0 until the first report.
    pub last_report_unix_ms: AtomicI64,
    pub memory_total_bytes: AtomicU64,
    pub memory_available_bytes: AtomicU64,
}

impl Telemetry {
    pub fn reported(&self, at_unix_ms: i64, memory_total: u64, memory_available: u64) {
        self.last_report_unix_ms
            .store(at_unix_ms, Ordering::Relaxed);
        self.memory_total_bytes
            .store(memory_total, Ordering::Relaxed);
        self.memory_available_bytes
            .store(memory_available, Ordering::Relaxed);
    }
}

/// The page, as of `now_unix_ms`.
pub fn render(telemetry: &Telemetry, statuses: &[proto::TenantStatus], now_unix_ms: i64) -> String {
    let mut out = Exposition::default();
    out.family(
        "berth_agent_host_memory_bytes",
        "gauge",
        "Host memory as last reported: total and available.",
    );
    for (kind, v) in [
        (
            "total",
            telemetry.memory_total_bytes.load(Ordering::Relaxed),
        ),
        (
            "available",
            telemetry.memory_available_bytes.load(Ordering::Relaxed),
        ),
    ] {
        out.sample("berth_agent_host_memory_bytes", &[("kind", kind)], v as f64);
    }
    out.single(
        "berth_agent_connected",
        "gauge",
        "1 while the session to the coordinator is up.",
        f64::from(u8::from(telemetry.connected.load(Ordering::Relaxed))),
    );
    let last = telemetry.last_report_unix_ms.load(Ordering::Relaxed);
    if last > 0 {
        out.single(
            "berth_agent_report_age_seconds",
            "gauge",
            "Seconds since the last report was sent to the coordinator.",
            (now_unix_ms - last).max(0) as f64 / 1000.0,
        );
    }
    out.family("berth_agent_tenants", "gauge", "Desired tenants by state.");
    for state in ["pending", "running", "failed", "stopped", "waiting_for_key"] {
        let n = statuses
            .iter()
            .filter(|s| tenant_state_name(s.state) == state)
            .count();
        out.sample("berth_agent_tenants", &[("state", state)], n as f64);
    }
    let per_tenant: [Figure<proto::TenantStatus>; 7] = [
        (
            "berth_agent_tenant_memory_used_bytes",
            "gauge",
            "Memory the tenant's container uses (its cgroup).",
            |s| s.memory_used_bytes as f64,
        ),
        (
            "berth_agent_tenant_cpu_used_cores",
            "gauge",
            "CPU the tenant's container used between the agent's last two looks (its cgroup), in cores.",
            |s| f64::from(s.cpu_used_millicores) / 1000.0,
        ),
        (
            "berth_agent_tenant_memory_cap_bytes",
            "gauge",
            "The tenant's hard memory cap.",
            |s| s.memory_cap_bytes as f64,
        ),
        (
            "berth_agent_tenant_oom_kills_total",
            "counter",
            "OOM kills of the tenant's container.",
            |s| s.oom_kills as f64,
        ),
        (
            "berth_agent_tenant_restarts_total",
            "counter",
            "Restarts of the tenant's container by Docker's restart policy.",
            |s| f64::from(s.restarts),
        ),
        (
            "berth_agent_tenant_egress_denied_packets_total",
            "counter",
            "Packets the tenant's egress rules rejected.",
            |s| s.egress_denied_packets as f64,
        ),
        (
            "berth_agent_tenant_next_restart_timestamp_seconds",
            "gauge",
            "When the next nightly restart is planned (0: none).",
            |s| s.next_restart_unix_ms as f64 / 1000.0,
        ),
    ];
    out.per_item(&per_tenant, statuses, |s| {
        vec![("tenant", s.tenant_id.as_str())]
    });
    out.into_string()
}

#[derive(Debug, Clone)]
struct Shared {
    enforcement: Arc<Enforcement>,
    telemetry: Arc<Telemetry>,
}

async fn page(State(s): State<Shared>) -> Response {
    let (_, statuses) = s.enforcement.statuses();
    let text = render(&s.telemetry, &statuses, SystemClock.now_unix_ms());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// Compares without an early exit, so the time taken tells nothing of the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require(State(token): State<Arc<String>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if presented.is_some_and(|p| same(p.as_bytes(), token.as_bytes())) {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"berth-agent\"")],
            "a token is needed: Authorization: Bearer TOKEN (metrics_token_file)\n",
        )
            .into_response()
    }
}

/// The routes; `token`: what requests must carry (`None` on loopback).
pub fn router(
    enforcement: Arc<Enforcement>,
    telemetry: Arc<Telemetry>,
    token: Option<String>,
) -> Router {
    let routes = Router::new()
        .route("/metrics", get(page))
        .with_state(Shared {
            enforcement,
            telemetry,
        });
    match token {
        Some(token) => routes.layer(middleware::from_fn_with_state(Arc::new(token), require)),
        None => routes,
    }
}

/// Serves until the process ends; a port that cannot be bound is logged, not fatal.
pub async fn serve(addr: SocketAddr, router: Router) {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            let bound = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(%bound, "metrics on http://{bound}/metrics");
            berth_shared::transport::serve_plain(listener, router, std::future::pending()).await;
        }
        Err(e) => tracing::warn!(%addr, error = %e, "cannot listen for metrics; going on without"),
    }
}

#[cfg(test)]
mod tests;
