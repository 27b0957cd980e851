//! The agent port's gRPC service: sessions (hello, reports, acks, results) and certificate
//! renewal.
//!
//! Ensures: a session speaks only for the host in its certificate; a message that claims
//! another host ends the session and is logged; a revoked or expired certificate ends it too;
//! a host reports progress only of the transfers it receives.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use berth_shared::host::HostFacts;
use berth_shared::ids::HostId;
use berth_shared::pki::{Subject, Validity};
use berth_shared::proto::agent_message::Body as AgentBody;
use berth_shared::proto::agent_service_server::AgentService;
use berth_shared::proto::coordinator_message::Body as CoordinatorBody;
use berth_shared::proto::{self, AgentMessage, CoordinatorMessage};
use berth_shared::store::{Store, StoreError};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::failure::status;
use crate::coordinator::{AuthenticatedHost, Coordinator};
use crate::registry::{CertRecord, RegistryError};
use crate::sessions::{AgentReply, SessionHub};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest chunk of an export upload (the agent sends at most 256 KiB).
const EXPORT_CHUNK_BYTES: usize = 256 << 10;
/// The least time between two desired-state snapshots to one host: a change after a quiet
/// spell goes out at once, and the rest of a burst of placements waits out this window and
/// goes out as one snapshot (delivery stays far inside 1 s).
const DESIRED_STATE_COALESCE: Duration = Duration::from_millis(20);

/// Where a host's transfer port is: the port from its hello, at the address the coordinator's
/// `transfer_hosts` names for it, else at the address its session comes from (`remote`).
/// `None` when it serves none. An address the hello claims must be that one: a host cannot
/// point other hosts' volume pushes at an address of its choosing.
fn transfer_address(
    hello: &proto::AgentHello,
    remote: Option<IpAddr>,
    configured: Option<IpAddr>,
) -> Result<Option<SocketAddr>, Status> {
    let port = match u16::try_from(hello.transfer_port) {
        Ok(0) => return Ok(None),
        Ok(port) => port,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "hello.transfer_port: {} is not a port",
                hello.transfer_port
            )));
        }
    };
    let ip = configured.or(remote);
    if !hello.transfer_host.is_empty() {
        let claimed = hello
            .transfer_host
            .parse::<IpAddr>()
            .ok()
            .filter(|ip| !ip.is_unspecified())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "hello.transfer_host: {:?} is not an IP address",
                    hello.transfer_host.chars().take(64).collect::<String>()
                ))
            })?;
        if Some(claimed) != ip {
            let expected = ip.map_or("unknown".to_string(), |ip| ip.to_string());
            return Err(Status::invalid_argument(format!(
                "hello.transfer_host: {claimed} is not this host's address ({expected}); name it in the coordinator's transfer_hosts"
            )));
        }
    }
    Ok(ip.map(|ip| SocketAddr::new(ip, port)))
}

/// A hello or report is taken (the figures it carries are in memory) when its record cannot
/// be written because etcd has no quorum or this coordinator's leadership lapsed: the session
/// goes on, and the next report after that is written. Any other failure ends the session.
fn tolerate_unwritten<T>(
    host: &HostId,
    what: &str,
    recorded: Result<T, RegistryError>,
) -> Result<(), Status> {
    match recorded {
        Ok(_) => Ok(()),
        Err(RegistryError::Store(
            e @ (StoreError::LeadershipLapsed { .. } | StoreError::Unreachable(_)),
        )) => {
            tracing::debug!(%host, what, error = %e, "taken, not recorded");
            Ok(())
        }
        Err(e) => Err(status(e)),
    }
}

#[derive(Debug, Clone)]
pub struct AgentApi {
    pub coordinator: Arc<Coordinator>,
    /// The sessions: the coordinator's link to agents (`coordinator.agents`) is this hub.
    pub sessions: Arc<SessionHub>,
    pub drainer: Arc<crate::drain::Drainer>,
}

impl AgentApi {
    fn claim_matches(auth: &AuthenticatedHost, field: &str, claimed: &str) -> Result<(), Status> {
        if claimed == auth.host_id.as_str() {
            return Ok(());
        }
        tracing::warn!(cert_host = %auth.host_id, claimed = %claimed.chars().take(64).collect::<String>(), field, "message claims another host");
        Err(Status::permission_denied(format!(
            "{field} {claimed:?} does not match the certificate's host {:?}",
            auth.host_id.as_str()
        )))
    }

    fn complete(&self, auth: &AuthenticatedHost, reply: AgentReply) {
        let request = reply.request_id();
        if !self.sessions.complete(&auth.host_id, reply) {
            tracing::warn!(host = %auth.host_id, request, "a result nobody waits for");
        }
    }

    /// Handles one message after the hello. An error ends the session.
    fn handle(&self, auth: &AuthenticatedHost, message: AgentMessage) -> Result<(), Status> {
        self.coordinator
            .check_still_valid(&auth.serial, auth.not_after_unix_ms)
            .map_err(status)?;
        match message.body {
            None => Err(Status::invalid_argument("agent message: body is empty")),
            Some(AgentBody::Hello(_)) => Err(Status::invalid_argument(
                "hello: only the first message of a session may be a hello",
            )),
            Some(AgentBody::Report(report)) => {
                Self::claim_matches(auth, "report.host_id", &report.host_id)?;
                if report.memory_available_bytes > report.memory_total_bytes {
                    return Err(Status::invalid_argument(
                        "report.memory_available_bytes: larger than report.memory_total_bytes",
                    ));
                }
                let recorded = self.coordinator.registry.record_report(
                    &auth.host_id,
                    report.memory_available_bytes,
                    report.disk_available_bytes,
                    |h| self.coordinator.sync_host(h),
                );
                tolerate_unwritten(&auth.host_id, "report", recorded)?;
                self.coordinator
                    .placements
                    .record_statuses(&auth.host_id, report.tenants);
                Ok(())
            }
            Some(AgentBody::RestartResult(result)) => {
                self.complete(auth, AgentReply::Restart(result));
                Ok(())
            }
            Some(AgentBody::VolumeResult(result)) => {
                self.complete(auth, AgentReply::Volume(result));
                Ok(())
            }
            Some(AgentBody::VolumeProgress(progress)) => {
                if !self
                    .drainer
                    .transfers
                    .record_progress(&auth.host_id, &progress)
                {
                    tracing::debug!(host = %auth.host_id, transfer = progress.transfer_id, "progress of a transfer not open to this host");
                }
                Ok(())
            }
            Some(AgentBody::Ack(ack)) => {
                tracing::debug!(host = %auth.host_id, generation = ack.generation, accepted = ack.accepted, "desired-state ack");
                if !ack.accepted {
                    tracing::warn!(host = %auth.host_id, generation = ack.generation, error = %ack.error, "desired state refused by the agent");
                }
                self.coordinator.placements.record_ack(&auth.host_id, ack);
                Ok(())
            }
        }
    }
}

/// Whether this coordinator may act now, as its store says (always, with sled).
struct Acting(Option<tokio::sync::watch::Receiver<bool>>);

impl Acting {
    fn of(store: &dyn Store) -> Self {
        Self(store.acting())
    }

    fn now(&self) -> bool {
        self.0.as_ref().is_none_or(|acting| *acting.borrow())
    }

    /// Waits for the next change; `true` when it is a return to acting. Never returns with
    /// sled, or once the store is gone.
    async fn resumed(&mut self) -> bool {
        if let Some(acting) = &mut self.0
            && acting.changed().await.is_ok()
        {
            return *acting.borrow_and_update();
        }
        std::future::pending().await
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let auth = self
            .coordinator
            .authenticate_host(request.extensions())
            .map_err(status)?;
        let remote = request
            .extensions()
            .get::<berth_shared::transport::PeerInfo>()
            .map(|p| p.remote.ip());
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??
            .ok_or_else(|| Status::invalid_argument("session closed before the hello"))?;
        let Some(AgentBody::Hello(hello)) = first.body else {
            return Err(Status::invalid_argument(
                "hello: the first message of a session must be a hello",
            ));
        };
        Self::claim_matches(&auth, "hello.host_id", &hello.host_id)?;
        let configured = self.coordinator.config.transfer_hosts.get(&auth.host_id);
        let transfer_address = transfer_address(&hello, remote, configured.copied())?;
        let facts = HostFacts::try_from(hello.facts.unwrap_or_default()).map_err(|e| {
            tracing::warn!(host = %auth.host_id, error = %e, "hello refused");
            Status::invalid_argument(e.to_string())
        })?;
        let recorded = self
            .coordinator
            .registry
            .record_hello(&auth.host_id, facts, |h| self.coordinator.sync_host(h));
        tolerate_unwritten(&auth.host_id, "hello", recorded)?;
        tracing::info!(host = %auth.host_id, serial = %auth.serial, "agent session opened");

        let (tx, rx) = mpsc::channel(16);
        let accepted = CoordinatorMessage {
            body: Some(CoordinatorBody::Accepted(proto::SessionAccepted {
                host_id: auth.host_id.to_string(),
                report_interval_ms: self.coordinator.config.report_interval.as_millis() as u32,
            })),
        };
        tx.send(Ok(accepted))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;

        let (session_id, mut close) =
            self.sessions
                .register(&auth.host_id, &auth.serial, tx.clone(), transfer_address);
        // The revoked serials, for its transfer port; a revocation from now on reaches it one by
        // one as well (taken after the registration, so none falls between the two).
        let revoked = CoordinatorMessage {
            body: Some(CoordinatorBody::Revoked(proto::RevokedSerials {
                serials: self.coordinator.denied.serials(),
                replace: true,
            })),
        };
        // An agent gone meanwhile ends the session's loop below, which unregisters it.
        let _ = tx.send(Ok(revoked)).await;
        // A renewed certificate that works retires the ones before it.
        match self
            .coordinator
            .registry
            .retire_older_certs(&auth.host_id, &auth.serial)
        {
            Ok(retired) if !retired.is_empty() => {
                tracing::info!(host = %auth.host_id, ?retired, "older certificates revoked");
                self.coordinator.forget_serials(&retired);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(host = %auth.host_id, error = %e, "older certificates not revoked")
            }
        }
        // Back after a drain moved tenants away without it: what it still holds of them goes.
        tokio::spawn(
            self.drainer
                .clone()
                .delete_stale_copies(auth.host_id.clone()),
        );
        let api = self.clone();
        let mut desired = self.coordinator.placements.subscribe(&auth.host_id);
        let mut acting = Acting::of(self.coordinator.registry.store());
        tokio::spawn(async move {
            // The host learns its durable desired state at once, and every change after.
            desired.mark_changed();
            let mut last_sent: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    resumed = acting.resumed() => {
                        // What was held back while the leadership lapsed goes out now.
                        if resumed {
                            desired.mark_changed();
                        }
                    }
                    changed = desired.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        if !acting.now() {
                            // A leader that cannot renew its leadership delivers nothing: by
                            // the time it arrived, another coordinator might lead.
                            desired.borrow_and_update();
                            continue;
                        }
                        // Coalesce a burst of placements into one snapshot.
                        if let Some(sent) = last_sent {
                            tokio::time::sleep_until(sent + DESIRED_STATE_COALESCE).await;
                        }
                        last_sent = Some(tokio::time::Instant::now());
                        desired.borrow_and_update();
                        let state = api.coordinator.placements.desired_state(&auth.host_id);
                        let keys = api.coordinator.volume_keys(&state);
                        let message = CoordinatorMessage { body: Some(CoordinatorBody::DesiredState(state)) };
                        if tx.send(Ok(message)).await.is_err() {
                            break;
                        }
                        match keys {
                            Ok(keys) => {
                                let message = CoordinatorMessage { body: Some(CoordinatorBody::VolumeKeys(keys)) };
                                if tx.send(Ok(message)).await.is_err() {
                                    break;
                                }
                            }
                            Err(e) => tracing::error!(host = %auth.host_id, error = %e, "volume keys not sent"),
                        }
                    }
                    reason = &mut close => {
                        if let Ok(status) = reason {
                            let _ = tx.send(Err(status)).await;
                        }
                        break;
                    }
                    message = inbound.message() => match message {
                        Ok(Some(message)) => {
                            if let Err(status) = api.handle(&auth, message) {
                                tracing::warn!(host = %auth.host_id, error = %status.message(), "session ended by the coordinator");
                                let _ = tx.send(Err(status)).await;
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(host = %auth.host_id, error = %status, "session stream error");
                            break;
                        }
                    },
                }
            }
            api.sessions.unregister(&auth.host_id, session_id);
            tracing::info!(host = %auth.host_id, "agent session closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn upload_export(
        &self,
        request: Request<Streaming<proto::ExportChunk>>,
    ) -> Result<Response<proto::ExportUploaded>, Status> {
        let auth = self
            .coordinator
            .authenticate_host(request.extensions())
            .map_err(status)?;
        let mut chunks = request.into_inner();
        let mut export = None;
        while let Some(chunk) = chunks.message().await? {
            let (id, data) = match &export {
                Some((id, _)) if *id != chunk.export_id => {
                    return Err(Status::invalid_argument(format!(
                        "export_id: {} in an upload of export {id}",
                        chunk.export_id
                    )));
                }
                Some(open) => open.clone(),
                None => {
                    let (tenant, data) = self
                        .coordinator
                        .exports
                        .upload(chunk.export_id, &auth.host_id)
                        .map_err(|e| {
                            tracing::warn!(host = %auth.host_id, error = %e, "export upload refused");
                            Status::permission_denied(e.to_string())
                        })?;
                    tracing::info!(host = %auth.host_id, %tenant, "export upload");
                    export = Some((chunk.export_id, data));
                    export.clone().expect("just set")
                }
            };
            if chunk.data.len() > EXPORT_CHUNK_BYTES {
                return Err(Status::invalid_argument(format!(
                    "data: {} bytes in one chunk; at most {EXPORT_CHUNK_BYTES}",
                    chunk.data.len()
                )));
            }
            if !chunk.data.is_empty() && data.send(Ok(chunk.data)).await.is_err() {
                return Err(Status::cancelled("the operator stopped reading the export"));
            }
            if chunk.done {
                if !chunk.error.is_empty() {
                    let _ = data.send(Err(chunk.error)).await;
                }
                self.coordinator.exports.finish(id, None).await;
                return Ok(Response::new(proto::ExportUploaded {}));
            }
        }
        Err(Status::invalid_argument(
            "the upload ended without its last chunk",
        ))
    }

    async fn renew_certificate(
        &self,
        request: Request<proto::RenewCertificateRequest>,
    ) -> Result<Response<proto::RenewCertificateResponse>, Status> {
        let auth = self
            .coordinator
            .authenticate_host(request.extensions())
            .map_err(status)?;
        let now = self.coordinator.registry.now();
        let validity = Validity::starting_now(now, self.coordinator.config.agent_cert_ttl);
        let cert = self
            .coordinator
            .ca
            .sign_csr(
                &request.get_ref().csr_pem,
                &Subject::Host(auth.host_id.clone()),
                validity,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let record = CertRecord {
            serial: cert.serial.clone(),
            subject: auth.host_id.to_string(),
            issued_unix_ms: now,
            not_after_unix_ms: cert.not_after_unix_ms,
        };
        // Agents renew at two thirds of a certificate's life: a tenth of it between two
        // renewals leaves room for a retry and none for minting certificates at will.
        let min_interval = self.coordinator.config.agent_cert_ttl / 10;
        self.coordinator
            .registry
            .record_renewal(&record, min_interval)
            .map_err(|e| {
                tracing::warn!(host = %auth.host_id, error = %e, "renewal refused");
                status(e)
            })?;
        tracing::info!(host = %auth.host_id, old_serial = %auth.serial, new_serial = %cert.serial, "certificate renewed");
        Ok(Response::new(proto::RenewCertificateResponse {
            certificate_pem: cert.pem,
            not_after_unix_ms: cert.not_after_unix_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(port: u32, host: &str) -> proto::AgentHello {
        proto::AgentHello {
            transfer_port: port,
            transfer_host: host.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_transfer_port_is_where_the_session_comes_from_or_where_the_coordinator_says() {
        let seen: Option<IpAddr> = Some("10.77.0.3".parse().unwrap());
        let named: Option<IpAddr> = Some("203.0.113.7".parse().unwrap());
        let at = |port, host, configured| transfer_address(&hello(port, host), seen, configured);
        assert_eq!(at(0, "", None).unwrap(), None, "serves none");
        assert_eq!(
            at(7445, "", None).unwrap(),
            Some("10.77.0.3:7445".parse().unwrap())
        );
        assert_eq!(
            at(7445, "10.77.0.3", None).unwrap(),
            Some("10.77.0.3:7445".parse().unwrap())
        );
        for claimed in ["", "203.0.113.7"] {
            assert_eq!(
                at(7445, claimed, named).unwrap(),
                Some("203.0.113.7:7445".parse().unwrap())
            );
        }
        assert_eq!(
            transfer_address(&hello(7445, ""), None, None).unwrap(),
            None
        );
        for (port, host, configured, field, why) in [
            (70000, "", None, "hello.transfer_port", "not a port"),
            (
                7445,
                "0.0.0.0",
                None,
                "hello.transfer_host",
                "not an IP address",
            ),
            (
                7445,
                "evil.example",
                None,
                "hello.transfer_host",
                "not an IP address",
            ),
            (
                7445,
                "203.0.113.7",
                None,
                "hello.transfer_host",
                "is not this host's address (10.77.0.3)",
            ),
            (
                7445,
                "10.77.0.3",
                named,
                "hello.transfer_host",
                "is not this host's address (203.0.113.7)",
            ),
        ] {
            let status = at(port, host, configured).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with(field), "{}", status.message());
            assert!(status.message().contains(why), "{}", status.message());
        }
    }
}
