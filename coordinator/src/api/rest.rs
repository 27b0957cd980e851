//! REST/JSON on the operator port, with the same semantics as the gRPC operator API: the same
//! coordinator operations, the same operator authentication, the same errors (each domain
//! error's kind, see `failure`, as an HTTP status), and the same JSON shapes as
//! `berthctl --json`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use berth_shared::ids::{HostId, TenantId};
use berth_shared::spec::{EgressFile, TenantSpecFile};
use serde::Deserialize;

use crate::api::Backend;
use crate::api::failure::{Failure, bad_id};
use crate::api::operator::{spelled_for, unknown_host, unknown_tenant};
use crate::api::views::{
    BackupView, CompactionView, DrainView, HostView, PlacementView, RemovalView, RestartView,
    RestoreView, SnapshotView, TenantView,
};
use crate::coordinator::{Access, Coordinator};
use crate::drain::{CompactRequest, DrainOptions, Drainer};

type Shared = State<Arc<Coordinator>>;

/// A failed call, rendered as `{"code": ..., "error": ...}` (see [`Failure`]).
#[derive(Debug)]
pub struct ApiError(Failure);

impl<E: Into<Failure>> From<E> for ApiError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// How much of a refused request's body is read before the refusal.
const REFUSED_BODY_BYTES: usize = 64 << 10;

/// Any credential may read (`GET`); changing the fleet needs an admin credential.
async fn authorize(State(coordinator): Shared, request: Request, next: Next) -> Response {
    let access = if request.method() == http::Method::GET {
        Access::Read
    } else {
        Access::Write
    };
    match coordinator.authorize_operator(request.extensions(), request.headers(), access) {
        Ok(_) => next.run(request).await,
        Err(refused) => {
            // Read what the client is sending (up to a bound) before answering: an HTTP/2
            // stream reset over an unread body makes clients report a framing error instead
            // of the refusal.
            let _ = axum::body::to_bytes(request.into_body(), REFUSED_BODY_BYTES).await;
            ApiError::from(refused).into_response()
        }
    }
}

fn now_ms(coordinator: &Coordinator) -> i64 {
    coordinator.registry.now()
}

fn host_id(value: &str) -> Result<HostId, ApiError> {
    Ok(HostId::new(value).map_err(bad_id("host_id"))?)
}

fn tenant_id(value: &str) -> Result<TenantId, ApiError> {
    Ok(TenantId::new(value).map_err(bad_id("tenant_id"))?)
}

async fn list_hosts(State(c): Shared) -> ApiResult<Vec<HostView>> {
    let hosts = c.registry.hosts()?;
    let now = now_ms(&c);
    Ok(Json(
        hosts
            .iter()
            .map(|h| HostView::new(&c.host_view(h), now))
            .collect(),
    ))
}

async fn get_host(State(c): Shared, Path(id): Path<String>) -> ApiResult<HostView> {
    let id = host_id(&id)?;
    let host = c.registry.host(&id)?.ok_or_else(|| unknown_host(&id))?;
    Ok(Json(HostView::new(&c.host_view(&host), now_ms(&c))))
}

async fn set_cordon(c: Arc<Coordinator>, id: String, cordoned: bool) -> ApiResult<HostView> {
    let id = host_id(&id)?;
    let host = c.registry.set_cordoned(&id, cordoned, |h| c.sync_host(h))?;
    Ok(Json(HostView::new(&c.host_view(&host), now_ms(&c))))
}

async fn cordon(State(c): Shared, Path(id): Path<String>) -> ApiResult<HostView> {
    set_cordon(c, id, true).await
}

async fn uncordon(State(c): Shared, Path(id): Path<String>) -> ApiResult<HostView> {
    set_cordon(c, id, false).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFilter {
    host: Option<String>,
}

async fn list_tenants(
    State(c): Shared,
    Query(filter): Query<TenantFilter>,
) -> ApiResult<Vec<TenantView>> {
    let host = filter.host.as_deref().map(host_id).transpose()?;
    Ok(Json(
        c.placements
            .tenants(host.as_ref())
            .iter()
            .map(TenantView::from)
            .collect(),
    ))
}

async fn get_tenant(State(c): Shared, Path(id): Path<String>) -> ApiResult<TenantView> {
    let id = tenant_id(&id)?;
    let tenant = c
        .placements
        .tenant(&id)
        .ok_or_else(|| unknown_tenant(&id))?;
    Ok(Json(TenantView::from(&tenant)))
}

/// `POST /v1/tenants` with the spec file's JSON form.
async fn place(
    State(c): Shared,
    body: Bytes,
) -> Result<(StatusCode, Json<PlacementView>), ApiError> {
    let file: TenantSpecFile =
        serde_json::from_slice(&body).map_err(|e| Failure::field("body", e))?;
    let spec = file
        .to_proto()
        .map_err(|e| Failure::new(crate::api::failure::Kind::BadRequest, e))?;
    let placement = c.place(spec).await.map_err(|e| spelled_for(e, true))?;
    Ok((StatusCode::OK, Json(PlacementView::from(&placement))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveOptions {
    #[serde(default)]
    purge: bool,
}

async fn remove(
    State(c): Shared,
    Path(id): Path<String>,
    Query(options): Query<RemoveOptions>,
) -> ApiResult<RemovalView> {
    let id = tenant_id(&id)?;
    let removed = c.remove(&id, options.purge).await?;
    Ok(Json(RemovalView::from(&removed)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressBody {
    egress: Vec<EgressFile>,
}

/// `PUT /v1/tenants/{id}/egress` with `{"egress": ["api.anthropic.com:443", ...]}`.
async fn set_egress(
    State(c): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<PlacementView> {
    let id = tenant_id(&id)?;
    let body: EgressBody = serde_json::from_slice(&body).map_err(|e| Failure::field("body", e))?;
    let rules = body
        .egress
        .iter()
        .enumerate()
        .map(|(i, e)| e.to_proto(i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::new(crate::api::failure::Kind::BadRequest, e))?;
    let placement = c.set_egress(&id, rules).await?;
    Ok(Json(PlacementView::from(&placement)))
}

/// `POST /v1/tenants/{id}/restart`: answers once the tenant is healthy again.
async fn restart(State(c): Shared, Path(id): Path<String>) -> ApiResult<RestartView> {
    let id = tenant_id(&id)?;
    let done = c.restart(&id).await?;
    Ok(Json(RestartView::from(&done)))
}

/// `POST /v1/tenants/{id}/backups`: backs the tenant up now; answers with the snapshot.
async fn backup(State(c): Shared, Path(id): Path<String>) -> ApiResult<BackupView> {
    let id = tenant_id(&id)?;
    let done = c.backup(&id).await?;
    Ok(Json(BackupView::from(&done)))
}

/// `GET /v1/tenants/{id}/backups`: the tenant's snapshots, oldest first.
async fn list_backups(State(c): Shared, Path(id): Path<String>) -> ApiResult<Vec<SnapshotView>> {
    let id = tenant_id(&id)?;
    let listed = c.list_backups(&id).await?;
    Ok(Json(
        listed.snapshots.iter().map(SnapshotView::from).collect(),
    ))
}

/// `POST /v1/tenants/{id}/export` options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportBody {
    /// A snapshot's files instead of the files now.
    snapshot: Option<String>,
}

/// `POST /v1/tenants/{id}/export` (an admin's call, like gRPC's: it hands out a customer's
/// data): the tenant's files as a tar, streamed as its host makes it (a stop half-way ends the
/// body early, so the client sees a cut transfer, never a whole archive).
async fn export(
    State(c): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    use futures::StreamExt;
    let id = tenant_id(&id)?;
    let body: ExportBody = optional_body(&body, "export body")?;
    let out = c.export(&id, body.snapshot.as_deref())?;
    let tar = tokio_stream::wrappers::ReceiverStream::new(out)
        .map(|data| data.map(Bytes::from).map_err(std::io::Error::other));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-tar")],
        axum::body::Body::from_stream(tar),
    )
        .into_response())
}

/// `POST /v1/tenants/{id}/restore` options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    /// Default: the latest.
    snapshot: Option<String>,
    /// Default: the tenant's own host.
    to_host: Option<String>,
}

/// `POST /v1/tenants/{id}/restore`: answers once the tenant runs on its restored volume.
async fn restore(State(c): Shared, Path(id): Path<String>, body: Bytes) -> ApiResult<RestoreView> {
    let id = tenant_id(&id)?;
    let body: RestoreBody = optional_body(&body, "restore body")?;
    let to_host = body.to_host.as_deref().map(host_id).transpose()?;
    let done = c
        .restore(&id, body.snapshot.as_deref(), to_host.as_ref())
        .await?;
    Ok(Json(RestoreView::from(&done)))
}

/// A body whose every field is optional: empty means the defaults.
fn optional_body<T: Default + serde::de::DeserializeOwned>(
    body: &Bytes,
    what: &str,
) -> Result<T, Failure> {
    if body.is_empty() {
        Ok(T::default())
    } else {
        serde_json::from_slice(body).map_err(|e| Failure::field(what, e))
    }
}

/// A drain's `deadline` ("30m", "1h30m") in milliseconds; 0 (the default) when left out.
fn deadline_ms(text: Option<&str>) -> Result<u64, Failure> {
    text.map_or(Ok(0), |text| {
        humantime::parse_duration(text)
            .map(|d| d.as_millis() as u64)
            .map_err(|e| Failure::field("deadline", format!("{text:?}: {e}")))
    })
}

/// `POST /v1/hosts/{id}/drain` options (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    #[serde(default)]
    dry_run: bool,
    /// "30m", "1h30m".
    deadline: Option<String>,
    max_parallel: Option<u32>,
    #[serde(default)]
    force_lost: bool,
    #[serde(default)]
    no_precopy: bool,
    #[serde(default)]
    empty: bool,
}

async fn drain(
    State(d): State<Arc<Drainer>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<DrainView> {
    let body: DrainBody = optional_body(&body, "drain body")?;
    let deadline_ms = deadline_ms(body.deadline.as_deref())?;
    let options = DrainOptions::from_request(&berth_shared::proto::DrainRequest {
        host_id: id,
        dry_run: body.dry_run,
        deadline_ms,
        max_parallel: body.max_parallel.unwrap_or(0),
        force_lost: body.force_lost,
        no_precopy: body.no_precopy,
        empty: body.empty,
    })?;
    let status = d.drain(options).await?;
    Ok(Json(DrainView::from(&status)))
}

async fn drain_status(
    State(d): State<Arc<Drainer>>,
    Path(id): Path<String>,
) -> ApiResult<DrainView> {
    let status = d.drain_status(&host_id(&id)?)?;
    Ok(Json(DrainView::from(&status)))
}

async fn drain_abort(
    State(d): State<Arc<Drainer>>,
    Path(id): Path<String>,
) -> ApiResult<DrainView> {
    let status = d.abort_drain(&host_id(&id)?).await?;
    Ok(Json(DrainView::from(&status)))
}

/// `POST /v1/compact` options (all optional), as `berthctl compact` takes them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompactBody {
    #[serde(default)]
    dry_run: bool,
    max_moves: Option<u32>,
    #[serde(default)]
    providers: Vec<String>,
    /// Percent of each target's memory and CPU kept free.
    headroom: Option<u32>,
    /// Per emptied host, as for a drain: "30m".
    deadline: Option<String>,
    max_parallel: Option<u32>,
    #[serde(default)]
    now: bool,
}

async fn compact(State(d): State<Arc<Drainer>>, body: Bytes) -> ApiResult<CompactionView> {
    let body: CompactBody = optional_body(&body, "compact body")?;
    let deadline_ms = deadline_ms(body.deadline.as_deref())?;
    let request = CompactRequest::from_request(&berth_shared::proto::CompactRequest {
        dry_run: body.dry_run,
        max_moves: body.max_moves.unwrap_or(0),
        providers: body.providers,
        headroom_percent: body.headroom,
        deadline_ms,
        max_parallel: body.max_parallel.unwrap_or(0),
        now: body.now,
    })?;
    let done = d.compact(request).await?;
    Ok(Json(CompactionView::from(&done)))
}

/// The REST routes, behind operator authentication.
pub fn router(backend: Backend) -> axum::Router {
    axum::Router::new()
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{id}", get(get_host))
        .route("/v1/hosts/{id}/cordon", post(cordon))
        .route("/v1/hosts/{id}/uncordon", post(uncordon))
        .route("/v1/hosts/{id}/drain", get(drain_status).post(drain))
        .route("/v1/hosts/{id}/drain/abort", post(drain_abort))
        .route("/v1/compact", post(compact))
        .route("/v1/tenants", get(list_tenants).post(place))
        .route("/v1/tenants/{id}", get(get_tenant).delete(remove))
        .route("/v1/tenants/{id}/egress", put(set_egress))
        .route("/v1/tenants/{id}/restart", post(restart))
        .route("/v1/tenants/{id}/backups", get(list_backups).post(backup))
        .route("/v1/tenants/{id}/restore", post(restore))
        .route("/v1/tenants/{id}/export", post(export))
        .layer(middleware::from_fn_with_state(
            backend.coordinator.clone(),
            authorize,
        ))
        .with_state(backend)
}
