//! rustls configurations for every berth connection (ring provider, TLS 1.3 and 1.2).
//!
//! Ensures: the agent port accepts only client certificates chained to the fleet CA and not on
//! the serial deny-list; enrollment pins the CA by fingerprint (no trust on first use); every
//! client verifies the coordinator as [`COORDINATOR_SERVER_NAME`] under the fleet CA; between
//! two agents (a drain's volume copy) each side holds a host certificate of the fleet CA and
//! the caller accepts only the host it meant to reach.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::ids::HostId;
use crate::pki::{Fingerprint, Subject, parse_peer_cert};

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

    /// Replaces the whole list (an agent's copy, at the start of each coordinator session).
    pub fn replace(&self, serials: impl IntoIterator<Item = String>) {
        *self.serials.write().unwrap_or_else(|p| p.into_inner()) = serials.into_iter().collect();
    }

    /// Every serial on the list, sorted.
    pub fn serials(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .serials
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        all.sort();
        all
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

/// The signature checks of a verifier, left to the webpki verifier in its field `$inner`.
macro_rules! delegate_signatures {
    ($inner:ident) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.$inner.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.$inner.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.$inner.supported_verify_schemes()
        }
    };
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
    delegate_signatures!(inner);
}

/// A server configuration with the given chain and key. ALPN offers h2 and http/1.1 so the
/// operator port can serve REST to curl as well as gRPC.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_auth: Option<ClientAuth>,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_presenting(Arc::new(CurrentCert::new(chain, key)?), client_auth)
}

/// A server configuration presenting whatever certificate `cert` holds at each handshake.
pub fn server_config_presenting(
    cert: Arc<CurrentCert>,
    client_auth: Option<ClientAuth>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let mut config = match client_auth {
        None => builder.with_no_client_auth().with_cert_resolver(cert),
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
                .with_cert_resolver(cert)
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certificate a server presents, replaceable while it serves (an agent renews its own).
#[derive(Debug)]
pub struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl CurrentCert {
    /// Checks that `key` belongs to the chain's leaf.
    fn certified(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Arc<CertifiedKey>, TlsError> {
        Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider())?))
    }

    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        Ok(Self(RwLock::new(Self::certified(chain, key)?)))
    }

    /// Presents `chain` from the next handshake on; connections made already keep theirs.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        let certified = Self::certified(chain, key)?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = certified;
        Ok(())
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The name an agent's transfer port is dialled by. Its certificate is checked for the host the
/// caller expects instead (see [`peer_client_config`]).
pub const PEER_SERVER_NAME: &str = "transfer.berth.internal";

/// A client configuration for `expected`'s transfer port: the server must present a host
/// certificate of the fleet CA `ca` naming `expected`, not on `denied`; this host presents
/// `identity`.
pub fn peer_client_config(
    ca: CertificateDer<'static>,
    identity: ClientIdentity,
    expected: HostId,
    denied: Arc<SerialDenyList>,
) -> Result<Arc<ClientConfig>, TlsError> {
    // Host certificates are issued for client authentication: the server's is verified as one.
    let hosts = WebPkiClientVerifier::builder_with_provider(roots(&ca)?, provider()).build()?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(HostPeerVerifier {
            hosts,
            expected,
            denied,
        }))
        .with_client_auth_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Verifies another agent's transfer port: its chain under the fleet CA, and the host its
/// certificate names.
#[derive(Debug)]
struct HostPeerVerifier {
    hosts: Arc<dyn ClientCertVerifier>,
    expected: HostId,
    denied: Arc<SerialDenyList>,
}

impl ServerCertVerifier for HostPeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.hosts
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = parse_peer_cert(end_entity)
            .map_err(|e| rustls::Error::General(format!("the transfer port's certificate: {e}")))?;
        if self.denied.contains(&peer.serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        let presented = match peer.subject {
            Subject::Host(host) if host == self.expected => {
                return Ok(ServerCertVerified::assertion());
            }
            Subject::Host(host) => format!("host {host}"),
            Subject::Operator(name) => format!("operator {name}"),
        };
        Err(rustls::Error::General(format!(
            "the transfer port presented {presented}, not host {}",
            self.expected
        )))
    }

    delegate_signatures!(hosts);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, CertificateAuthority, Validity};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A host certificate of `ca` for `host`: (chain, key).
    fn host_cert(
        ca: &CertificateAuthority,
        host: &str,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = pki::generate_key().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let issued = ca
            .issue_for_key(
                &key,
                &Subject::Host(HostId::new(host).unwrap()),
                Validity::starting_now(now, std::time::Duration::from_secs(3600)),
            )
            .unwrap();
        (vec![issued.der], pki::private_key_der(&key))
    }

    /// A handshake (and one byte each way) between a transfer port presenting `served` and a
    /// caller that is `caller` and expects `expected`.
    async fn handshake(
        ca: &CertificateAuthority,
        served: &Arc<CurrentCert>,
        caller: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
        expected: &str,
    ) -> Result<(), String> {
        handshake_denying(ca, served, caller, expected, &Arc::default()).await
    }

    /// [`handshake`] with both ends holding `denied`.
    async fn handshake_denying(
        ca: &CertificateAuthority,
        served: &Arc<CurrentCert>,
        caller: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
        expected: &str,
        denied: &Arc<SerialDenyList>,
    ) -> Result<(), String> {
        let server = server_config_presenting(
            served.clone(),
            Some(ClientAuth {
                ca: ca.cert_der().clone(),
                denied: denied.clone(),
                mandatory: true,
            }),
        )
        .unwrap();
        let client = peer_client_config(
            ca.cert_der().clone(),
            ClientIdentity {
                chain: caller.0,
                key: caller.1,
            },
            HostId::new(expected).unwrap(),
            denied.clone(),
        )
        .unwrap();
        let (near, far) = tokio::io::duplex(64 * 1024);
        let accept = async move {
            let mut stream = tokio_rustls::TlsAcceptor::from(server)
                .accept(far)
                .await
                .map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            stream
                .read_exact(&mut byte)
                .await
                .map_err(|e| e.to_string())?;
            stream.write_all(&byte).await.map_err(|e| e.to_string())?;
            stream.flush().await.map_err(|e| e.to_string())
        };
        let connect = async move {
            let name = ServerName::try_from(PEER_SERVER_NAME).unwrap();
            let mut stream = tokio_rustls::TlsConnector::from(client)
                .connect(name, near)
                .await
                .map_err(|e| e.to_string())?;
            stream.write_all(b"x").await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            stream
                .read_exact(&mut byte)
                .await
                .map_err(|e| e.to_string())
        };
        let (accepted, connected) = tokio::join!(accept, connect);
        connected.and(accepted.map(|_| ()))
    }

    /// A revoked certificate is refused by the transfer port it pushes to, and a transfer port
    /// presenting one is refused by the host that would push to it.
    #[tokio::test]
    async fn transfer_ports_refuse_revoked_certificates_both_ways() {
        install_crypto_provider();
        let ca = CertificateAuthority::generate("test").unwrap();
        let serial = |chain: &[CertificateDer<'static>]| parse_peer_cert(&chain[0]).unwrap().serial;
        let (chain, key) = host_cert(&ca, "target");
        let target_serial = serial(&chain);
        let target = Arc::new(CurrentCert::new(chain, key).unwrap());
        let source = host_cert(&ca, "source");
        let source_serial = serial(&source.0);
        let denied = Arc::new(SerialDenyList::default());
        let again = |s: &(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)| {
            (s.0.clone(), s.1.clone_key())
        };
        handshake_denying(&ca, &target, again(&source), "target", &denied)
            .await
            .unwrap();
        denied.insert(source_serial.clone());
        handshake_denying(&ca, &target, again(&source), "target", &denied)
            .await
            .unwrap_err();
        denied.replace([target_serial]);
        let refused = handshake_denying(&ca, &target, again(&source), "target", &denied)
            .await
            .unwrap_err();
        assert!(refused.contains("Revoked"), "{refused}");
        denied.replace([]);
        handshake_denying(&ca, &target, source, "target", &denied)
            .await
            .unwrap();
        assert!(denied.serials().is_empty());
    }

    #[tokio::test]
    async fn an_agent_reaches_only_the_host_it_expects_and_only_as_a_fleet_host() {
        install_crypto_provider();
        let ca = CertificateAuthority::generate("test").unwrap();
        let (chain, key) = host_cert(&ca, "target");
        let target = Arc::new(CurrentCert::new(chain, key).unwrap());
        handshake(&ca, &target, host_cert(&ca, "source"), "target")
            .await
            .unwrap();
        let wrong = handshake(&ca, &target, host_cert(&ca, "source"), "other")
            .await
            .unwrap_err();
        assert!(wrong.contains("not host other"), "{wrong}");
        // A certificate of another CA is refused whichever side holds it.
        let stranger = CertificateAuthority::generate("stranger").unwrap();
        handshake(&ca, &target, host_cert(&stranger, "source"), "target")
            .await
            .unwrap_err();
        let (chain, key) = host_cert(&stranger, "target");
        let impostor = Arc::new(CurrentCert::new(chain, key).unwrap());
        handshake(&ca, &impostor, host_cert(&ca, "source"), "target")
            .await
            .unwrap_err();
        // A renewed certificate is presented from the next handshake on.
        let (chain, key) = host_cert(&ca, "renamed");
        target.replace(chain, key).unwrap();
        handshake(&ca, &target, host_cert(&ca, "source"), "renamed")
            .await
            .unwrap();
        // A key that is not the certificate's is refused up front.
        let (chain, _) = host_cert(&ca, "target");
        let (_, other_key) = host_cert(&ca, "target");
        assert!(CurrentCert::new(chain, other_key).is_err());
    }
}
