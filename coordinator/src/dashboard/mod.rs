//! The capacity dashboard on the coordinator's HTTP port: `/` (the fleet), `/hosts/{id}` (one
//! host and its tenants) and `/metrics` (Prometheus text), next to the always-open `/healthz`.
//!
//! Ensures: pages are rendered from one consistent [`Snapshot`] read per request; when the port
//! is bound to anything but loopback, every page needs a `read` operator token
//! (`Authorization: Bearer`, or HTTP Basic with the token as password so a browser can sign
//! in): an unauthenticated request gets 401 and an admin token 403, so the credential this
//! port sees can never change the fleet. On loopback no token is asked, but a request whose
//! `Host` is not a loopback name gets 421 (a web page that rebinds its DNS name to 127.0.0.1
//! cannot read the fleet through a browser).

pub mod figures;
pub mod pages;
pub mod prometheus;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use berth_shared::ids::HostId;

use crate::api::Backend;
use crate::api::views::TenantView;
use crate::coordinator::Coordinator;
use crate::drain::Drainer;
use crate::placement::HostLoad;
use crate::registry::{HostRecord, RegistryError, Scope};
use figures::{HostRow, Saving, Snapshot};

/// A host as the dashboard shows it.
fn host_row(c: &Coordinator, record: &HostRecord, load: HostLoad, now_ms: i64) -> HostRow {
    // A host enrolled but never connected has no facts yet.
    let facts = record.facts.as_ref();
    HostRow {
        host_id: record.host_id.to_string(),
        state: record.state(now_ms, c.config.down_after).as_str(),
        provider: facts.map_or("unknown", |f| f.provider.as_str()).to_string(),
        region: facts.map(|f| f.region.clone()).unwrap_or_default(),
        instance_type: facts.map(|f| f.instance_type.clone()).unwrap_or_default(),
        memory_total: facts.map_or(0, |f| f.memory_total_bytes),
        memory_reserved: facts.map_or(0, |f| f.memory_reserved_bytes),
        memory_committed: load.memory_committed,
        memory_used: load.memory_used,
        cpu_millicores: facts.map_or(0, |f| f.cpu_allocatable_millicores()),
        cpu_committed_millicores: load.cpu_committed_millicores,
        cpu_used_millicores: load.cpu_used_millicores,
        disk_capacity: facts.map_or(0, |f| crate::placement::disk_capacity(f.disk_total_bytes)),
        disk_committed: load.disk_committed,
        tenants: load.tenants,
        running: load.running,
        oom_kills: load.oom_kills,
        monthly_cost_cents: facts.map_or(0, |f| f.monthly_cost_cents),
        currency: facts.map(|f| f.currency.clone()).unwrap_or_default(),
        report_age_ms: (record.last_report_unix_ms > 0)
            .then(|| (now_ms - record.last_report_unix_ms).max(0)),
    }
}

/// The fleet now: every registered host with what it holds, and the tiers.
pub fn snapshot(c: &Coordinator) -> Result<Snapshot, RegistryError> {
    let now_ms = c.registry.now();
    let loads: HashMap<HostId, HostLoad> = c.placements.host_loads();
    let mut hosts: Vec<HostRow> = c
        .registry
        .hosts()?
        .iter()
        .map(|r| {
            let load = loads.get(&r.host_id).copied().unwrap_or_default();
            host_row(c, r, load, now_ms)
        })
        .collect();
    hosts.sort_by(|a, b| a.host_id.cmp(&b.host_id));
    let tiers: Vec<_> = c.config.tiers.iter().map(|t| t.tier.clone()).collect();
    let plan = c.placements.compaction_outlook();
    Ok(Snapshot {
        now_ms,
        hosts,
        tier_cpu: crate::capacity::tier_cpu(&tiers, c.placements.cpu_use_by_tier()),
        tiers,
        saving: Saving {
            hosts: plan.emptied.iter().map(|h| h.host.to_string()).collect(),
            monthly_cost_cents: plan.saving_cents(),
            moves: plan.moves() as u32,
        },
    })
}

/// The fleet page's HTML.
pub fn fleet_page(c: &Coordinator) -> Result<String, RegistryError> {
    Ok(pages::fleet(&snapshot(c)?).into_string())
}

/// A host page's HTML (with its drain, if it had one); `None` for a host that is not
/// registered.
pub fn host_page(d: &Drainer, host: &HostId) -> Result<Option<String>, RegistryError> {
    let c = &d.coordinator;
    let Some(record) = c.registry.host(host)? else {
        return Ok(None);
    };
    let now_ms = c.registry.now();
    let load = c.placements.host_load(host);
    let row = host_row(c, &record, load, now_ms);
    let mut tenants: Vec<TenantView> = c
        .placements
        .tenants(Some(host))
        .iter()
        .map(TenantView::from)
        .collect();
    tenants.sort_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
    let drain = d
        .drain_status(host)
        .ok()
        .map(|s| crate::api::views::DrainView::from(&s));
    Ok(Some(
        pages::host(&row, &tenants, drain.as_ref(), now_ms).into_string(),
    ))
}

fn internal(e: RegistryError) -> Response {
    tracing::error!(error = %e, "dashboard");
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
}

async fn fleet(State(c): State<Arc<Coordinator>>) -> Response {
    match fleet_page(&c) {
        Ok(html) => Html(html).into_response(),
        Err(e) => internal(e),
    }
}

async fn host(State(d): State<Arc<Drainer>>, Path(id): Path<String>) -> Response {
    let Ok(id) = HostId::new(&id) else {
        return (StatusCode::BAD_REQUEST, "host_id: not a host id\n").into_response();
    };
    match host_page(&d, &id) {
        Ok(Some(html)) => Html(html).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            format!("unknown host {:?}\n", id.as_str()),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

/// The operator token a request carries: `Bearer TOKEN`, or HTTP Basic with TOKEN as password.
fn presented_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_string());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.strip_prefix("Basic ")?.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split_once(':')?.1.to_string())
}

async fn require_read_token(
    State(c): State<Arc<Coordinator>>,
    request: Request,
    next: Next,
) -> Response {
    let refused = |status: StatusCode, message: String| {
        (
            status,
            [(
                header::WWW_AUTHENTICATE,
                "Basic realm=\"berth\", charset=\"UTF-8\"",
            )],
            message,
        )
            .into_response()
    };
    let Some(token) = presented_token(request.headers()) else {
        return refused(
            StatusCode::UNAUTHORIZED,
            "a read token is needed: Authorization: Bearer TOKEN (or Basic with the token as password)\n".into(),
        );
    };
    match c.check_token(&token) {
        Ok(operator) if operator.scope == Scope::Read => next.run(request).await,
        Ok(operator) => refused(
            StatusCode::FORBIDDEN,
            format!(
                "this port takes read tokens only, and {}'s token is an admin token: make one with `berth-coordinator operator-token create --scope read`\n",
                operator.name
            ),
        ),
        Err(e) => refused(StatusCode::UNAUTHORIZED, format!("{e}\n")),
    }
}

/// Whether `host` (a `Host` header) names this machine's loopback: `localhost`, `127.0.0.1`
/// (any 127/8 address) or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn require_loopback_host(request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    match host {
        Some(host) if is_loopback_host(host) => next.run(request).await,
        other => (
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this port is bound to loopback and answers only to localhost, 127.0.0.1 or [::1], not {:?}\n",
                other.unwrap_or("").chars().take(100).collect::<String>()
            ),
        )
            .into_response(),
    }
}

/// Who may read the HTTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpAccess {
    /// Bound to loopback: no credential, loopback `Host` names only.
    Loopback,
    /// Bound elsewhere: a `read` token on every page.
    ReadToken,
}

/// The HTTP port's routes (`/healthz` is always open).
pub fn router(backend: Backend, access: HttpAccess) -> Router {
    let pages = Router::new()
        .route("/", get(fleet))
        .route("/hosts/{id}", get(host))
        .route("/metrics", get(prometheus::serve));
    let pages = match access {
        HttpAccess::Loopback => pages.layer(middleware::from_fn(require_loopback_host)),
        HttpAccess::ReadToken => pages.layer(middleware::from_fn_with_state(
            backend.coordinator.clone(),
            require_read_token,
        )),
    };
    pages
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(backend)
}

#[cfg(test)]
mod tests;
