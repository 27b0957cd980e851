//! rustls configurations for every berth connection (ring provider, TLS 1.3 and 1.2).
//!
//! Ensures: the agent port accepts only client certificates chained to the fleet CA and not on
//! the serial deny-list; enrollment pins the CA by fingerprint (no trust on first use); every
//! client verifies the coordinator as [`COORDINATOR_SERVER_NAME`] under the fleet CA.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::pki::{Fingerprint, parse_peer_cert};

pub use crate::pki::COORDINATOR_SERVER_NAME;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration (bad key, bad certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The trust anchor could not be used to verify peers.
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Installs ring as the process-wide rustls provider. Idempotent; call first in `main`.
pub fn install_crypto_provider() {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    store.add(ca.clone())?;
    Ok(Arc::new(store))
}

/// Serials (lowercase hex) of revoked certificates. Shared between the TLS verifier, which
/// refuses them at the handshake, and the services, which refuse them on every call (an HTTP/2
/// connection outlives the revocation).
#[derive(Debug, Default)]
pub struct SerialDenyList {
    serials: RwLock<HashSet<String>>,
}

impl SerialDenyList {
    pub fn new(serials: impl IntoIterator<Item = String>) -> Self {
        Self {
            serials: RwLock::new(serials.into_iter().collect()),
        }
    }

    pub fn insert(&self, serial: String) {
        self.serials
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(serial);
    }

    pub fn contains(&self, serial: &str) -> bool {
        self.serials
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
    }
}

/// Client certificates the server accepts: chained to `ca` and not on the deny-list.
#[derive(Debug)]
pub struct ClientAuth {
    pub ca: CertificateDer<'static>,
    pub denied: Arc<SerialDenyList>,
    /// Agent port: mandatory. Operator port: optional (a bearer token may stand in), but one
    /// that is presented must verify and must not be revoked.
    pub mandatory: bool,
}

#[derive(Debug)]
struct DenyListVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    denied: Arc<SerialDenyList>,
}

impl ClientCertVerifier for DenyListVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = parse_peer_cert(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        if self.denied.contains(&peer.serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server configuration with the given chain and key. ALPN offers h2 and http/1.1 so the
/// operator port can serve REST to curl as well as gRPC.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_auth: Option<ClientAuth>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let mut config = match client_auth {
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
        Some(ClientAuth {
            ca,
            denied,
            mandatory,
        }) => {
            let mut verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca)?, provider());
            if !mandatory {
                verifier = verifier.allow_unauthenticated();
            }
            let inner = verifier.build()?;
            builder
                .with_client_cert_verifier(Arc::new(DenyListVerifier { inner, denied }))
                .with_single_cert(chain, key)?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How a client decides to trust the coordinator.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// The fleet CA certificate, already trusted.
    Ca(CertificateDer<'static>),
    /// Only a fingerprint: the server must present, in its chain, a CA certificate with this
    /// SHA-256, and its leaf must verify under it.
    Pinned(Fingerprint),
}

/// A client identity: certificate chain and private key.
#[derive(Debug)]
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// A client configuration speaking h2 (gRPC).
pub fn client_config(
    trust: ServerTrust,
    identity: Option<ClientIdentity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match trust {
        ServerTrust::Ca(ca) => builder.with_root_certificates(roots(&ca)?),
        ServerTrust::Pinned(fingerprint) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier { fingerprint })),
    };
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Verifies the server under the CA certificate it sent, provided that CA's fingerprint is the
/// pinned one. The chain is then checked exactly as with a configured root.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: Fingerprint,
}

impl PinnedCaVerifier {
    fn schemes() -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Fingerprint::of(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the coordinator's CA does not match the pinned fingerprint {}",
                    self.fingerprint
                ))
            })?;
        let roots =
            roots(&ca.clone().into_owned()).map_err(|e| rustls::Error::General(e.to_string()))?;
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}
