//! The operator port's gRPC services: enrollment (token-authenticated) and the operator API
//! (operator certificate or bearer token, checked by [`authorize_grpc`] before any handler).

use std::sync::Arc;

use berth_shared::ids::{HostId, TenantId};
use berth_shared::pki::{Subject, Validity};
use berth_shared::proto::enrollment_service_server::EnrollmentService;
use berth_shared::proto::operator_service_server::OperatorService;
use berth_shared::proto::{self, HostRef};
use tonic::{Request, Response, Status};

use axum::extract::State;
use axum::middleware::Next;

use crate::api::failure::{Failure, Kind, bad_id, status};
use crate::coordinator::{Access, Coordinator};
use crate::drain::{CompactRequest, DrainOptions, Drainer};
use crate::placement::PlaceError;
use crate::registry::{CertRecord, RegistryError};

/// An unknown host, named as the caller wrote it.
pub fn unknown_host(id: &HostId) -> Failure {
    Failure::new(Kind::NotFound, format!("unknown host {:?}", id.as_str()))
}

/// An unknown tenant, named as the caller wrote it.
pub fn unknown_tenant(id: &TenantId) -> Failure {
    Failure::new(Kind::NotFound, format!("unknown tenant {:?}", id.as_str()))
}

fn tenant_id(field: &str, value: &str) -> Result<TenantId, Status> {
    TenantId::new(value).map_err(|e| status(bad_id(field)(e)))
}

/// A refusal of a spec that came in the human format names its fields as that format does.
pub fn spelled_for(e: PlaceError, file_format: bool) -> PlaceError {
    match e {
        PlaceError::Invalid(f) if file_format => {
            PlaceError::Invalid(berth_shared::spec::in_file_format(f))
        }
        e => e,
    }
}

fn host_id(field: &str, value: &str) -> Result<HostId, Status> {
    HostId::new(value).map_err(|e| status(bad_id(field)(e)))
}

#[derive(Debug, Clone)]
pub struct EnrollmentApi {
    pub coordinator: Arc<Coordinator>,
}

/// An enrollment failure that is the caller's fault, as opposed to the registry's.
enum EnrollError {
    Registry(RegistryError),
    Csr(String),
}

impl From<RegistryError> for EnrollError {
    fn from(e: RegistryError) -> Self {
        Self::Registry(e)
    }
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentApi {
    async fn enroll(
        &self,
        request: Request<proto::EnrollRequest>,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        let remote = request
            .extensions()
            .get::<berth_shared::transport::PeerInfo>()
            .map(|p| p.remote);
        let req = request.into_inner();
        if req.token.is_empty() || req.token.len() > 256 {
            return Err(Status::invalid_argument(
                "token: must be 1 to 256 characters",
            ));
        }
        if req.csr_pem.is_empty() {
            return Err(Status::invalid_argument("csr_pem: must not be empty"));
        }
        let coordinator = &self.coordinator;
        let now = coordinator.registry.now();
        let validity = Validity::starting_now(now, coordinator.config.agent_cert_ttl);
        let result = coordinator
            .registry
            .redeem_enrollment_token(&req.token, |host| {
                // The CSR is checked before the token is spent: a bad CSR leaves the token usable.
                let cert = coordinator
                    .ca
                    .sign_csr(&req.csr_pem, &Subject::Host(host.clone()), validity)
                    .map_err(|e| EnrollError::Csr(e.to_string()))?;
                let record = CertRecord {
                    serial: cert.serial.clone(),
                    subject: host.to_string(),
                    issued_unix_ms: now,
                    not_after_unix_ms: cert.not_after_unix_ms,
                };
                Ok::<_, EnrollError>((cert, record))
            });
        let (host, cert, revoked) = match result {
            Ok(done) => done,
            Err(EnrollError::Csr(message)) => return Err(Status::invalid_argument(message)),
            Err(EnrollError::Registry(e)) => {
                tracing::warn!(?remote, error = %e, "enrollment refused");
                return Err(status(e));
            }
        };
        coordinator.forget_serials(&revoked);
        tracing::info!(%host, serial = %cert.serial, ?remote, "host enrolled");
        Ok(Response::new(proto::EnrollResponse {
            host_id: host.to_string(),
            certificate_pem: cert.pem,
            ca_certificate_pem: coordinator.ca.cert_pem().to_string(),
            agent_port: u32::from(coordinator.agent_port),
            not_after_unix_ms: cert.not_after_unix_ms,
        }))
    }
}

/// The operator service's calls that only read (a `read` token may make these).
const READ_CALLS: &[&str] = &[
    "ListHosts",
    "GetHost",
    "GetTenant",
    "ListTenants",
    "GetDrainStatus",
    "GetCapacity",
];

/// The enrollment service: its token is its credential.
const ENROLLMENT_PATH: &str = "/berth.v1.EnrollmentService/";

/// What a gRPC call at `path` (`/berth.v1.OperatorService/Name`) needs: nothing (enrollment),
/// any operator credential (a read), or an admin one (everything else, unknown names included).
pub fn grpc_access(path: &str) -> Option<Access> {
    if path.starts_with(ENROLLMENT_PATH) {
        return None;
    }
    let method = path.rsplit('/').next().unwrap_or_default();
    Some(if READ_CALLS.contains(&method) {
        Access::Read
    } else {
        Access::Write
    })
}

/// Runs before every gRPC call of the operator port: an admin credential for what changes the
/// fleet, any credential for what reads it, none for enrollment.
pub async fn authorize_grpc(
    State(coordinator): State<Arc<Coordinator>>,
    request: axum::extract::Request,
    next: Next,
) -> axum::response::Response {
    let Some(access) = grpc_access(request.uri().path()) else {
        return next.run(request).await;
    };
    match coordinator.authorize_operator(request.extensions(), request.headers(), access) {
        Ok(_) => next.run(request).await,
        Err(refused) => {
            let remote = request
                .extensions()
                .get::<berth_shared::transport::PeerInfo>()
                .map(|p| p.remote);
            tracing::warn!(?remote, path = %request.uri().path(), error = %refused, "operator call refused");
            status(refused).into_http()
        }
    }
}

#[derive(Debug, Clone)]
pub struct OperatorApi {
    pub coordinator: Arc<Coordinator>,
    pub drainer: Arc<Drainer>,
}

impl OperatorApi {
    fn host(&self, field: &str, value: &str) -> Result<proto::Host, Status> {
        let id = host_id(field, value)?;
        let record = self
            .coordinator
            .registry
            .host(&id)
            .map_err(status)?
            .ok_or_else(|| status(unknown_host(&id)))?;
        Ok(self.coordinator.host_view(&record))
    }

    fn set_cordoned(
        &self,
        request: Request<HostRef>,
        cordoned: bool,
    ) -> Result<Response<proto::Host>, Status> {
        let id = host_id("host_id", &request.get_ref().host_id)?;
        let record = self
            .coordinator
            .registry
            .set_cordoned(&id, cordoned, |h| self.coordinator.sync_host(h))
            .map_err(status)?;
        tracing::info!(host = %id, cordoned, "host admin state changed");
        Ok(Response::new(self.coordinator.host_view(&record)))
    }
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    async fn list_hosts(
        &self,
        _: Request<proto::ListHostsRequest>,
    ) -> Result<Response<proto::ListHostsResponse>, Status> {
        let hosts = self.coordinator.registry.hosts().map_err(status)?;
        let hosts = hosts
            .iter()
            .map(|h| self.coordinator.host_view(h))
            .collect();
        Ok(Response::new(proto::ListHostsResponse { hosts }))
    }

    async fn get_host(&self, request: Request<HostRef>) -> Result<Response<proto::Host>, Status> {
        self.host("host_id", &request.get_ref().host_id)
            .map(Response::new)
    }

    async fn cordon_host(
        &self,
        request: Request<HostRef>,
    ) -> Result<Response<proto::Host>, Status> {
        self.set_cordoned(request, true)
    }

    async fn uncordon_host(
        &self,
        request: Request<HostRef>,
    ) -> Result<Response<proto::Host>, Status> {
        self.set_cordoned(request, false)
    }

    async fn place_tenant(
        &self,
        request: Request<proto::PlaceTenantRequest>,
    ) -> Result<Response<proto::Placement>, Status> {
        let file_format = request
            .metadata()
            .get(berth_shared::spec::SPEC_FORMAT_HEADER)
            .is_some_and(|v| v == "file");
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: required"))?;
        self.coordinator
            .place(spec)
            .await
            .map(Response::new)
            .map_err(|e| status(spelled_for(e, file_format)))
    }

    async fn remove_tenant(
        &self,
        request: Request<proto::RemoveTenantRequest>,
    ) -> Result<Response<proto::RemoveTenantResponse>, Status> {
        let req = request.into_inner();
        let id = tenant_id("tenant_id", &req.tenant_id)?;
        self.coordinator
            .remove(&id, req.purge)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn get_tenant(
        &self,
        request: Request<proto::TenantRef>,
    ) -> Result<Response<proto::Tenant>, Status> {
        let id = tenant_id("tenant_id", &request.get_ref().tenant_id)?;
        self.coordinator
            .placements
            .tenant(&id)
            .map(Response::new)
            .ok_or_else(|| status(unknown_tenant(&id)))
    }

    async fn list_tenants(
        &self,
        request: Request<proto::ListTenantsRequest>,
    ) -> Result<Response<proto::ListTenantsResponse>, Status> {
        let host = &request.get_ref().host_id;
        let host = if host.is_empty() {
            None
        } else {
            Some(host_id("host_id", host)?)
        };
        Ok(Response::new(proto::ListTenantsResponse {
            tenants: self.coordinator.placements.tenants(host.as_ref()),
        }))
    }

    async fn set_egress(
        &self,
        request: Request<proto::SetEgressRequest>,
    ) -> Result<Response<proto::Placement>, Status> {
        let req = request.into_inner();
        let id = tenant_id("tenant_id", &req.tenant_id)?;
        self.coordinator
            .set_egress(&id, req.egress)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn restart_tenant(
        &self,
        request: Request<proto::RestartTenantRequest>,
    ) -> Result<Response<proto::RestartTenantResponse>, Status> {
        let id = tenant_id("tenant_id", &request.get_ref().tenant_id)?;
        self.coordinator
            .restart(&id)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn backup_tenant(
        &self,
        request: Request<proto::TenantRef>,
    ) -> Result<Response<proto::BackupTenantResponse>, Status> {
        let id = tenant_id("tenant_id", &request.get_ref().tenant_id)?;
        self.coordinator
            .backup(&id)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn list_backups(
        &self,
        request: Request<proto::TenantRef>,
    ) -> Result<Response<proto::ListBackupsResponse>, Status> {
        let id = tenant_id("tenant_id", &request.get_ref().tenant_id)?;
        self.coordinator
            .list_backups(&id)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn restore_tenant(
        &self,
        request: Request<proto::RestoreTenantRequest>,
    ) -> Result<Response<proto::RestoreTenantResponse>, Status> {
        let r = request.get_ref();
        let id = tenant_id("tenant_id", &r.tenant_id)?;
        let snapshot = (!r.snapshot_id.is_empty()).then_some(r.snapshot_id.as_str());
        let to_host = (!r.to_host_id.is_empty())
            .then(|| host_id("to_host_id", &r.to_host_id))
            .transpose()?;
        self.coordinator
            .restore(&id, snapshot, to_host.as_ref())
            .await
            .map(Response::new)
            .map_err(status)
    }

    type ExportTenantStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::ExportData, Status>> + Send>>;

    async fn export_tenant(
        &self,
        request: Request<proto::ExportTenantRequest>,
    ) -> Result<Response<Self::ExportTenantStream>, Status> {
        let r = request.get_ref();
        let id = tenant_id("tenant_id", &r.tenant_id)?;
        let snapshot = (!r.snapshot_id.is_empty()).then_some(r.snapshot_id.as_str());
        let out = self.coordinator.export(&id, snapshot).map_err(status)?;
        use futures::StreamExt;
        let stream = tokio_stream::wrappers::ReceiverStream::new(out).map(|data| match data {
            Ok(data) => Ok(proto::ExportData { data }),
            Err(e) => Err(Status::aborted(format!("the export stopped: {e}"))),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn drain_host(
        &self,
        request: Request<proto::DrainRequest>,
    ) -> Result<Response<proto::DrainStatus>, Status> {
        let options = DrainOptions::from_request(request.get_ref()).map_err(status)?;
        self.drainer
            .drain(options)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn get_drain_status(
        &self,
        request: Request<HostRef>,
    ) -> Result<Response<proto::DrainStatus>, Status> {
        let host = host_id("host_id", &request.get_ref().host_id)?;
        self.drainer
            .drain_status(&host)
            .map(Response::new)
            .map_err(status)
    }

    async fn abort_drain(
        &self,
        request: Request<HostRef>,
    ) -> Result<Response<proto::DrainStatus>, Status> {
        let host = host_id("host_id", &request.get_ref().host_id)?;
        self.drainer
            .abort_drain(&host)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn compact(
        &self,
        request: Request<proto::CompactRequest>,
    ) -> Result<Response<proto::CompactResponse>, Status> {
        let request = CompactRequest::from_request(request.get_ref()).map_err(status)?;
        self.drainer
            .compact(request)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn get_capacity(
        &self,
        _: Request<proto::CapacityRequest>,
    ) -> Result<Response<proto::CapacityReport>, Status> {
        crate::capacity::report(&self.coordinator)
            .map(Response::new)
            .map_err(status)
    }
}
