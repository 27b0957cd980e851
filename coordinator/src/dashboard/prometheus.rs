//! The coordinator's `/metrics`: host and tenant gauges from the fleet's state, OOM and egress
//! counters from the agents' reports, how long ago each host reported, and the placement
//! latency histogram.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_shared::metrics::{CONTENT_TYPE, Exposition, Figure};

use crate::api::views::TenantView;
use crate::coordinator::Coordinator;
use crate::dashboard::snapshot;

/// `berth_coordinator_leading`: 1 on the coordinator that serves the fleet, 0 on a standby
/// (whose `/metrics` has nothing else).
pub fn leading(out: &mut Exposition, leads: bool) {
    out.single(
        "berth_coordinator_leading",
        "gauge",
        "Whether this coordinator leads the fleet (1) or waits as a standby (0).",
        if leads { 1.0 } else { 0.0 },
    );
}

/// A standby's `/metrics`.
pub async fn standby_page() -> Response {
    let mut out = Exposition::default();
    leading(&mut out, false);
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], out.into_string()).into_response()
}

/// The whole page.
pub fn render(c: &Coordinator) -> Result<String, crate::registry::RegistryError> {
    let snapshot = snapshot(c)?;
    let mut out = Exposition::default();
    leading(&mut out, true);
    out.family("berth_hosts", "gauge", "Hosts by state.");
    for state in ["ready", "cordoned", "draining", "down"] {
        let n = snapshot.hosts.iter().filter(|h| h.state == state).count();
        out.sample("berth_hosts", &[("state", state)], n as f64);
    }
    out.family(
        "berth_host_memory_bytes",
        "gauge",
        "Host memory: total, reserved for the host, committed to tenants (caps), used by tenants.",
    );
    for h in &snapshot.hosts {
        for (kind, v) in [
            ("total", h.memory_total),
            ("reserved", h.memory_reserved),
            ("committed", h.memory_committed),
            ("used", h.memory_used),
        ] {
            let labels = [
                ("host", h.host_id.as_str()),
                ("provider", h.provider.as_str()),
                ("region", h.region.as_str()),
                ("kind", kind),
            ];
            out.sample("berth_host_memory_bytes", &labels, v as f64);
        }
    }
    out.family("berth_host_tenants", "gauge", "Tenants placed on the host.");
    for h in &snapshot.hosts {
        out.sample(
            "berth_host_tenants",
            &[("host", &h.host_id)],
            f64::from(h.tenants),
        );
    }
    out.family(
        "berth_host_report_age_seconds",
        "gauge",
        "Seconds since the host's last report (hosts that never reported are left out).",
    );
    for h in &snapshot.hosts {
        if let Some(ms) = h.report_age_ms {
            out.sample(
                "berth_host_report_age_seconds",
                &[("host", &h.host_id)],
                ms as f64 / 1000.0,
            );
        }
    }
    out.family(
        "berth_host_monthly_cost",
        "gauge",
        "The host's monthly price in its currency.",
    );
    for h in &snapshot.hosts {
        out.sample(
            "berth_host_monthly_cost",
            &[("host", &h.host_id), ("currency", &h.currency)],
            h.monthly_cost_cents as f64 / 100.0,
        );
    }
    let tenants: Vec<TenantView> = c
        .placements
        .tenants(None)
        .iter()
        .map(TenantView::from)
        .collect();
    let per_tenant: [Figure<TenantView>; 7] = [
        (
            "berth_tenant_memory_used_bytes",
            "gauge",
            "Memory the tenant's container uses.",
            |t| t.memory_used_bytes as f64,
        ),
        (
            "berth_tenant_memory_cap_bytes",
            "gauge",
            "The tenant's hard memory cap.",
            |t| t.memory_cap_bytes as f64,
        ),
        (
            "berth_tenant_running",
            "gauge",
            "1 while the tenant's container runs.",
            |t| f64::from(u8::from(t.state == "running")),
        ),
        (
            "berth_tenant_oom_kills_total",
            "counter",
            "OOM kills of the tenant's container.",
            |t| t.oom_kills as f64,
        ),
        (
            "berth_tenant_egress_denied_packets_total",
            "counter",
            "Packets the tenant's egress rules rejected.",
            |t| t.egress_denied_packets as f64,
        ),
        (
            "berth_tenant_last_backup_timestamp_seconds",
            "gauge",
            "When the tenant's last good backup ended (Unix seconds); 0: never.",
            |t| {
                t.last_backup
                    .as_ref()
                    .map_or(0.0, |b| b.last_good_unix_ms as f64 / 1000.0)
            },
        ),
        (
            "berth_tenant_last_backup_ok",
            "gauge",
            "1 when the tenant's last backup attempt made a snapshot, 0 when it failed or none was made.",
            |t| f64::from(u8::from(t.last_backup.as_ref().is_some_and(|b| b.ok))),
        ),
    ];
    out.per_item(&per_tenant, &tenants, |t| {
        vec![
            ("tenant", t.tenant_id.as_str()),
            ("host", t.host_id.as_str()),
        ]
    });
    c.metrics.placement_latency.write(
        &mut out,
        "berth_placement_duration_seconds",
        "From a placement request to its durable write, for placements made.",
    );
    out.single(
        "berth_placements_refused_total",
        "counter",
        "Placements refused (invalid, conflicting, or nothing fits).",
        c.metrics.placements_refused.load(Ordering::Relaxed) as f64,
    );
    Ok(out.into_string())
}

pub async fn serve(State(c): State<Arc<Coordinator>>) -> Response {
    match render(&c) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
