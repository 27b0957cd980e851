//! The host's identity: its key pair (made here, never sent anywhere), its certificate, the
//! pinned fleet CA, and the coordinator endpoint learned at enrollment.
//!
//! Files in the state directory: `host.pem` (key and certificate in one file, mode 0600, so a
//! renewal replaces both in one atomic rename), `ca.crt`, `enrollment.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_shared::ids::HostId;
use berth_shared::leader::{Coordinators, FleetChannel, Resend};
use berth_shared::pki::{
    self, Fingerprint, PeerCert, PkiError, Subject, cert_der_from_pem, parse_peer_cert,
};
use berth_shared::proto::agent_service_client::AgentServiceClient;
use berth_shared::proto::enrollment_service_client::EnrollmentServiceClient;
use berth_shared::proto::{EnrollRequest, RenewCertificateRequest};
use berth_shared::tls::{ClientIdentity, ServerTrust, TlsError, client_config};
use berth_shared::transport::CoordinatorUrl;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

const HOST_PEM: &str = "host.pem";
const CA_CRT: &str = "ca.crt";
const ENROLLMENT_JSON: &str = "enrollment.json";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "not enrolled: {0} is missing; run `berth-agent enroll --coordinator URL --token T --ca-fingerprint SHA256` first"
    )]
    NotEnrolled(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// The coordinator refused or could not be reached; the message carries the cause chain.
    #[error("{0}")]
    Rpc(String),
    #[error("the coordinator answered with something berth cannot accept: {0}")]
    BadAnswer(String),
}

/// What `enrollment.json` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    pub host_id: HostId,
    /// The coordinator's agent port (same host as the enrollment URL).
    pub agent_endpoint: String,
    pub ca_fingerprint: String,
}

/// A loaded identity, ready for mTLS.
#[derive(Debug)]
pub struct Identity {
    pub enrollment: Enrollment,
    pub ca: CertificateDer<'static>,
    pub cert: CertificateDer<'static>,
    pub cert_info: PeerCert,
    key: PrivateKeyDer<'static>,
}

/// Renders a tonic status or transport error with its whole cause chain on one line.
pub fn rpc_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// A tonic status on one line: code, message, then its transport cause chain.
pub fn status_error(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        text.push_str(": ");
        text.push_str(&rpc_error(source));
    }
    text
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            IdentityError::NotEnrolled(path.to_path_buf())
        } else {
            IdentityError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

impl Identity {
    pub fn load(state_dir: &Path) -> Result<Self, IdentityError> {
        let enrollment_path = state_dir.join(ENROLLMENT_JSON);
        let enrollment: Enrollment =
            serde_json::from_str(&read(&enrollment_path)?).map_err(|e| IdentityError::Corrupt {
                path: enrollment_path.clone(),
                message: e.to_string(),
            })?;
        let ca_pem = read(&state_dir.join(CA_CRT))?;
        let ca = cert_der_from_pem(&ca_pem)?;
        let pinned = Fingerprint::parse(&enrollment.ca_fingerprint)?;
        if Fingerprint::of(&ca) != pinned {
            return Err(IdentityError::Corrupt {
                path: state_dir.join(CA_CRT),
                message: "does not match the fingerprint pinned at enrollment".into(),
            });
        }
        let host_pem_path = state_dir.join(HOST_PEM);
        // The key file must be private.
        let key = pki::read_private_key(&host_pem_path).map_err(|e| match e {
            PkiError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
                IdentityError::NotEnrolled(path)
            }
            other => other.into(),
        })?;
        let host_pem = read(&host_pem_path)?;
        let cert = cert_der_from_pem(&host_pem)?;
        let cert_info = parse_peer_cert(&cert)?;
        if cert_info.subject != Subject::Host(enrollment.host_id.clone()) {
            return Err(IdentityError::Corrupt {
                path: host_pem_path,
                message: "certificate is for another host".into(),
            });
        }
        Ok(Self {
            enrollment,
            ca,
            cert,
            cert_info,
            key: pki::private_key_der(&key),
        })
    }

    pub fn host_id(&self) -> &HostId {
        &self.enrollment.host_id
    }

    /// This identity, for calls to other agents' transfer ports.
    pub fn peer_tls(&self) -> crate::transfer::peer::PeerTls {
        crate::transfer::peer::PeerTls {
            ca: self.ca.clone(),
            chain: vec![self.cert.clone()],
            key: self.key.clone_key(),
        }
    }

    /// The certificate the transfer port presents.
    pub fn presented(&self) -> Result<berth_shared::tls::CurrentCert, IdentityError> {
        Ok(berth_shared::tls::CurrentCert::new(
            vec![self.cert.clone()],
            self.key.clone_key(),
        )?)
    }

    /// Has `presented` show this (renewed) certificate from the next handshake on.
    pub fn present_on(
        &self,
        presented: &berth_shared::tls::CurrentCert,
    ) -> Result<(), IdentityError> {
        Ok(presented.replace(vec![self.cert.clone()], self.key.clone_key())?)
    }

    /// When to renew: at two thirds of the certificate's life, counted from its issue (its
    /// start is backdated by [`pki::BACKDATE`] for clock skew).
    pub fn renew_at_unix_ms(&self) -> i64 {
        let issued = self.cert_info.not_before_unix_ms + pki::BACKDATE.as_millis() as i64;
        let life = (self.cert_info.not_after_unix_ms - issued).max(0);
        issued + life * 2 / 3
    }

    /// The coordinators' agent ports: those of `endpoint_override`, or when it is empty the
    /// ones learned at enrollment.
    pub fn coordinators(
        &self,
        endpoint_override: &[CoordinatorUrl],
    ) -> Result<Arc<Coordinators>, IdentityError> {
        let urls = if endpoint_override.is_empty() {
            CoordinatorUrl::parse_list(
                "enrollment.json agent_endpoint",
                &self.enrollment.agent_endpoint,
            )
            .map_err(|e| IdentityError::Corrupt {
                path: PathBuf::from(ENROLLMENT_JSON),
                message: e.to_string(),
            })?
        } else {
            endpoint_override.to_vec()
        };
        Ok(Coordinators::new(urls))
    }

    /// An mTLS channel to the agent port of whichever of `coordinators` leads (a standby's
    /// answer ends the call it answers, and the next call goes to the leader it names).
    pub fn channel(&self, coordinators: &Arc<Coordinators>) -> Result<FleetChannel, IdentityError> {
        let identity = ClientIdentity {
            chain: vec![self.cert.clone()],
            key: self.key.clone_key(),
        };
        let tls = client_config(ServerTrust::Ca(self.ca.clone()), Some(identity))?;
        Ok(FleetChannel::new(
            coordinators.clone(),
            tls,
            std::time::Duration::from_secs(30),
            Resend::Never,
        ))
    }

    /// Renews the certificate over the mTLS channel with a new key pair, then replaces
    /// `host.pem` atomically. Returns the reloaded identity.
    pub async fn renew(
        &self,
        channel: FleetChannel,
        state_dir: &Path,
    ) -> Result<Identity, IdentityError> {
        let key = pki::generate_key()?;
        let csr_pem = pki::make_csr(&key)?;
        let response = AgentServiceClient::new(channel)
            .renew_certificate(RenewCertificateRequest { csr_pem })
            .await
            .map_err(|s| IdentityError::Rpc(status_error(&s)))?
            .into_inner();
        let cert = cert_der_from_pem(&response.certificate_pem)?;
        let info = parse_peer_cert(&cert)?;
        if info.subject != Subject::Host(self.enrollment.host_id.clone()) {
            return Err(IdentityError::BadAnswer(
                "renewed certificate names another host".into(),
            ));
        }
        write_host_pem(state_dir, &key, &response.certificate_pem)?;
        Identity::load(state_dir)
    }
}

fn write_host_pem(
    state_dir: &Path,
    key: &pki::KeyPair,
    cert_pem: &str,
) -> Result<(), IdentityError> {
    let contents = format!("{}{}", key.serialize_pem(), cert_pem);
    pki::write_file_atomic(&state_dir.join(HOST_PEM), contents.as_bytes(), 0o600)?;
    Ok(())
}

/// Enrolls this host: makes the key pair here, sends only a CSR, verifies the coordinator
/// against the pinned CA fingerprint, and writes the identity. Nothing is written on failure.
///
/// `coordinators` are the fleet's coordinators' operator ports (the leader enrolls the host: a
/// standby's answer names it and the request goes there); the agent endpoint kept is each of
/// them at the agent port the answer names (the coordinators of a fleet listen on the same
/// ports; `coordinator` in the agent's configuration overrides it).
pub async fn enroll(
    state_dir: &Path,
    coordinators: &[CoordinatorUrl],
    token: &str,
    ca_fingerprint: Fingerprint,
) -> Result<Enrollment, IdentityError> {
    let key = pki::generate_key()?;
    let csr_pem = pki::make_csr(&key)?;
    let tls = client_config(ServerTrust::Pinned(ca_fingerprint), None)?;
    let response = EnrollmentServiceClient::new(FleetChannel::new(
        Coordinators::new(coordinators.to_vec()),
        tls,
        std::time::Duration::from_secs(30),
        Resend::Requests,
    ))
    .enroll(EnrollRequest {
        token: token.to_string(),
        csr_pem,
    })
    .await
    .map_err(|s| IdentityError::Rpc(status_error(&s)))?
    .into_inner();
    let ca = cert_der_from_pem(&response.ca_certificate_pem)?;
    if Fingerprint::of(&ca) != ca_fingerprint {
        return Err(IdentityError::BadAnswer(
            "the CA certificate sent does not match --ca-fingerprint".into(),
        ));
    }
    let host_id =
        HostId::new(&response.host_id).map_err(|e| IdentityError::BadAnswer(e.to_string()))?;
    let cert = cert_der_from_pem(&response.certificate_pem)?;
    if parse_peer_cert(&cert)?.subject != Subject::Host(host_id.clone()) {
        return Err(IdentityError::BadAnswer(
            "the certificate names another host".into(),
        ));
    }
    let port = u16::try_from(response.agent_port)
        .map_err(|_| IdentityError::BadAnswer("agent_port out of range".into()))?;
    let enrollment = Enrollment {
        host_id,
        agent_endpoint: {
            let mut endpoints: Vec<String> = Vec::new();
            for endpoint in coordinators.iter().map(|c| c.with_port(port).to_string()) {
                if !endpoints.contains(&endpoint) {
                    endpoints.push(endpoint);
                }
            }
            endpoints.join(",")
        },
        ca_fingerprint: ca_fingerprint.to_string(),
    };
    std::fs::create_dir_all(state_dir).map_err(|source| IdentityError::Io {
        path: state_dir.into(),
        source,
    })?;
    std::fs::set_permissions(
        state_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(|source| IdentityError::Io {
        path: state_dir.into(),
        source,
    })?;
    pki::write_file_atomic(
        &state_dir.join(CA_CRT),
        response.ca_certificate_pem.as_bytes(),
        0o644,
    )?;
    write_host_pem(state_dir, &key, &response.certificate_pem)?;
    let json = serde_json::to_vec_pretty(&enrollment).unwrap_or_default();
    // Last: its presence is what marks the host as enrolled.
    pki::write_file_atomic(&state_dir.join(ENROLLMENT_JSON), &json, 0o644)?;
    Ok(enrollment)
}
