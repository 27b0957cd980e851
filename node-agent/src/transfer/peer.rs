//! The agent's transfer port: during a drain, the source host's agent pushes a tenant's volume
//! straight to the target host's agent, over mutual TLS under the fleet CA.
//!
//! Ensures: a stream is taken only for a transfer the coordinator announced to this host (an
//! import command), only from the host it named as the source (by the caller's certificate),
//! only with that transfer's token and for its tenant, and only once; anything else is refused
//! before a byte is written. The caller checks the other way round that it reached the target
//! the coordinator named ([`berth_shared::tls::peer_client_config`]).

use berth_shared::transport::PEER_MESSAGE_BYTES;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_shared::ids::{HostId, TenantId};
use berth_shared::pki::{Subject, parse_peer_cert};
use berth_shared::proto::peer_service_client::PeerServiceClient;
use berth_shared::proto::peer_service_server::{PeerService, PeerServiceServer};
use berth_shared::proto::{self, volume_chunk::Body};
use berth_shared::tls::{ClientIdentity, PEER_SERVER_NAME, peer_client_config};
use berth_shared::transport::PeerInfo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{Notify, mpsc};
use tonic::{Request, Response, Status, Streaming};

/// How long a stream waits for its transfer to be announced: the coordinator tells the source
/// and the target at the same moment, so the source may call first.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(10);

/// Chunks (of up to 1 MiB) buffered between the network and the disk.
const INCOMING_CHUNKS: usize = 4;

/// The sending host's stream broke: the import learns so rather than seeing it end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the sending host's stream broke: {0}")]
pub struct StreamBroke(pub String);

/// What an import reads: the stream's chunks, or why it broke.
pub type IncomingChunks = mpsc::Receiver<Result<proto::VolumeChunk, StreamBroke>>;
type IncomingSender = mpsc::Sender<Result<proto::VolumeChunk, StreamBroke>>;

/// Why a volume command's transfer fields name no peer to copy with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("transfer_token: {0} bytes, not 32")]
    TokenLength(usize),
    #[error("peer_host_id: {0}")]
    PeerHost(berth_shared::ids::IdError),
    #[error("peer_address: {0:?} is not an ip:port")]
    PeerAddress(String),
    #[error("not connected to the coordinator")]
    NoSession,
    #[error("transfer TLS: {0}")]
    Tls(String),
}

#[derive(Debug)]
struct Expected {
    tenant: TenantId,
    source: HostId,
    token: Vec<u8>,
    sender: Option<IncomingSender>,
}

/// The transfers this host was told to accept, by transfer id.
#[derive(Debug, Default)]
pub struct Incoming {
    expected: Mutex<HashMap<u64, Expected>>,
    announced: Notify,
}

/// Stops expecting a transfer when its import ends, however that happens.
#[derive(Debug)]
pub struct Expecting {
    incoming: Arc<Incoming>,
    transfer_id: u64,
}

impl Drop for Expecting {
    fn drop(&mut self) {
        self.incoming
            .expected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.transfer_id);
    }
}

/// Equal, in a time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Incoming {
    /// Accepts transfer `transfer_id` of `tenant`'s volume from `source` with `token`, once.
    pub fn expect(
        self: &Arc<Self>,
        transfer_id: u64,
        tenant: &TenantId,
        source: HostId,
        token: Vec<u8>,
    ) -> (Expecting, IncomingChunks) {
        let (sender, receiver) = mpsc::channel(INCOMING_CHUNKS);
        self.expected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                transfer_id,
                Expected {
                    tenant: tenant.clone(),
                    source,
                    token,
                    sender: Some(sender),
                },
            );
        self.announced.notify_waiters();
        let expecting = Expecting {
            incoming: self.clone(),
            transfer_id,
        };
        (expecting, receiver)
    }

    /// The sending end of the transfer `header` names, for `caller`, if it may send it.
    fn take(
        &self,
        caller: &HostId,
        header: &proto::VolumeStreamHeader,
    ) -> Option<Result<IncomingSender, Status>> {
        let mut expected = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        let slot = expected.get_mut(&header.transfer_id)?;
        if slot.source != *caller
            || slot.tenant.as_str() != header.tenant_id
            || !same_secret(&slot.token, &header.transfer_token)
        {
            return Some(Err(Status::permission_denied(format!(
                "transfer {} of tenant {:?} is not {caller}'s to send",
                header.transfer_id,
                header.tenant_id.chars().take(64).collect::<String>()
            ))));
        }
        Some(slot.sender.take().ok_or_else(|| {
            Status::already_exists(format!("transfer {} is already sent", header.transfer_id))
        }))
    }

    /// [`Self::take`], waiting up to `wait` for the transfer to be announced.
    async fn take_announced(
        &self,
        caller: &HostId,
        header: &proto::VolumeStreamHeader,
        wait: Duration,
    ) -> Result<IncomingSender, Status> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let announced = self.announced.notified();
            if let Some(taken) = self.take(caller, header) {
                return taken;
            }
            if tokio::time::timeout_at(deadline, announced).await.is_err() {
                return Err(Status::not_found(format!(
                    "no transfer {} is expected here",
                    header.transfer_id
                )));
            }
        }
    }
}

/// The host a caller's certificate names (chain-verified at the handshake).
fn caller_host(request: &Request<Streaming<proto::VolumeChunk>>) -> Result<HostId, Status> {
    let cert = request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.cert.clone())
        .ok_or_else(|| Status::unauthenticated("client certificate required"))?;
    match parse_peer_cert(&cert) {
        Ok(peer) => match peer.subject {
            Subject::Host(host) => Ok(host),
            Subject::Operator(_) => Err(Status::permission_denied(
                "only a host of the fleet may push a volume",
            )),
        },
        Err(e) => Err(Status::unauthenticated(e.to_string())),
    }
}

/// The transfer port's gRPC service.
#[derive(Debug, Clone)]
pub struct PeerApi {
    pub incoming: Arc<Incoming>,
}

impl PeerApi {
    pub fn router(self) -> axum::Router {
        tonic::service::Routes::new(
            PeerServiceServer::new(self)
                .max_decoding_message_size(PEER_MESSAGE_BYTES)
                .max_encoding_message_size(PEER_MESSAGE_BYTES),
        )
        .into_axum_router()
    }

    async fn take_stream(
        &self,
        caller: &HostId,
        mut inbound: Streaming<proto::VolumeChunk>,
    ) -> Result<u64, Status> {
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("volume stream: empty"))?;
        let Some(Body::Header(header)) = &first.body else {
            return Err(Status::invalid_argument(
                "volume stream: the first chunk must be the header",
            ));
        };
        let sender = self
            .incoming
            .take_announced(caller, header, ANNOUNCE_WAIT)
            .await?;
        let gone = || Status::cancelled("the import of this transfer stopped");
        sender.send(Ok(first)).await.map_err(|_| gone())?;
        let mut data_bytes = 0u64;
        loop {
            match inbound.message().await {
                Ok(Some(chunk)) => {
                    if let Some(Body::Data(d)) = &chunk.body {
                        data_bytes += d.data.len() as u64;
                    }
                    sender.send(Ok(chunk)).await.map_err(|_| gone())?;
                }
                Ok(None) => return Ok(data_bytes),
                Err(status) => {
                    // The import learns that the stream broke rather than seeing it end.
                    let why = StreamBroke(status.message().to_string());
                    let _ = sender.send(Err(why)).await;
                    return Err(status);
                }
            }
        }
    }
}

#[tonic::async_trait]
impl PeerService for PeerApi {
    async fn push_volume(
        &self,
        request: Request<Streaming<proto::VolumeChunk>>,
    ) -> Result<Response<proto::VolumeSent>, Status> {
        let caller = caller_host(&request)?;
        let data_bytes = self
            .take_stream(&caller, request.into_inner())
            .await
            .inspect_err(|status| {
                tracing::warn!(host = %caller, error = %status.message(), "volume stream refused or broken");
            })?;
        Ok(Response::new(proto::VolumeSent { data_bytes }))
    }
}

/// This host's identity as it calls another agent's transfer port.
pub struct PeerTls {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

/// The bytes of a transfer's token.
const TOKEN_BYTES: usize = 32;

/// The host an import command accepts its stream from.
pub fn source_of(command: &proto::VolumeCommand) -> Result<HostId, PeerError> {
    check_token(command)?;
    HostId::new(&command.peer_host_id).map_err(PeerError::PeerHost)
}

fn check_token(command: &proto::VolumeCommand) -> Result<(), PeerError> {
    match command.transfer_token.len() {
        TOKEN_BYTES => Ok(()),
        n => Err(PeerError::TokenLength(n)),
    }
}

/// A client of the transfer port an export command names, as this host (`tls`; `None`: no
/// coordinator session, so no transfer), accepting only the target host it names.
pub fn push_target(
    command: &proto::VolumeCommand,
    tls: Option<&PeerTls>,
    denied: Arc<berth_shared::tls::SerialDenyList>,
) -> Result<PeerServiceClient<tonic::transport::Channel>, PeerError> {
    check_token(command)?;
    let target = HostId::new(&command.peer_host_id).map_err(PeerError::PeerHost)?;
    let address: SocketAddr = command.peer_address.parse().map_err(|_| {
        PeerError::PeerAddress(command.peer_address.chars().take(64).collect::<String>())
    })?;
    let tls = tls.ok_or(PeerError::NoSession)?;
    let identity = ClientIdentity {
        chain: tls.chain.clone(),
        key: tls.key.clone_key(),
    };
    let config = peer_client_config(tls.ca.clone(), identity, target, denied)
        .map_err(|e| PeerError::Tls(e.to_string()))?;
    // A stream lasts as long as the volume takes; the coordinator cancels it when it must.
    let channel = berth_shared::transport::tls_channel(
        (address.ip().to_string(), address.port()),
        PEER_SERVER_NAME,
        config,
        None,
    );
    Ok(PeerServiceClient::new(channel)
        .max_decoding_message_size(PEER_MESSAGE_BYTES)
        .max_encoding_message_size(PEER_MESSAGE_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(transfer_id: u64, tenant: &str, token: &[u8]) -> proto::VolumeStreamHeader {
        proto::VolumeStreamHeader {
            transfer_id,
            tenant_id: tenant.into(),
            transfer_token: token.to_vec(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn only_the_named_source_with_the_token_sends_an_announced_transfer_and_once() {
        let incoming = Arc::new(Incoming::default());
        let (a, c) = (HostId::new("a").unwrap(), HostId::new("c").unwrap());
        let tenant = TenantId::new("acme").unwrap();
        let token = vec![7u8; 32];
        let wait = Duration::from_millis(50);
        let code = |r: Result<IncomingSender, Status>| r.map(|_| ()).unwrap_err().code();
        // Not announced: refused once the wait is over.
        assert_eq!(
            code(
                incoming
                    .take_announced(&a, &header(9, "acme", &token), wait)
                    .await
            ),
            tonic::Code::NotFound
        );
        let (expecting, _chunks) = incoming.expect(9, &tenant, a.clone(), token.clone());
        for (caller, h) in [
            (&c, header(9, "acme", &token)),
            (&a, header(9, "other", &token)),
            (&a, header(9, "acme", &[7u8; 31])),
            (&a, header(9, "acme", &[8u8; 32])),
        ] {
            assert_eq!(
                code(incoming.take_announced(caller, &h, wait).await),
                tonic::Code::PermissionDenied,
                "{caller} {h:?}"
            );
        }
        incoming
            .take_announced(&a, &header(9, "acme", &token), wait)
            .await
            .unwrap();
        assert_eq!(
            code(
                incoming
                    .take_announced(&a, &header(9, "acme", &token), wait)
                    .await
            ),
            tonic::Code::AlreadyExists
        );
        drop(expecting);
        assert_eq!(
            code(
                incoming
                    .take_announced(&a, &header(9, "acme", &token), wait)
                    .await
            ),
            tonic::Code::NotFound,
            "no longer expected once its import ended"
        );
    }

    /// A host of the test fleet: its identity, and its certificate for a transfer port.
    fn fleet_host(
        ca: &berth_shared::pki::CertificateAuthority,
        host: &str,
    ) -> (PeerTls, berth_shared::tls::CurrentCert) {
        use berth_shared::pki::{self, Validity};
        let key = pki::generate_key().unwrap();
        let now = berth_shared::clock::Clock::now_unix_ms(&berth_shared::clock::SystemClock);
        let subject = Subject::Host(HostId::new(host).unwrap());
        let validity = Validity::starting_now(now, Duration::from_secs(3600));
        let cert = ca.issue_for_key(&key, &subject, validity).unwrap().der;
        let presented =
            berth_shared::tls::CurrentCert::new(vec![cert.clone()], pki::private_key_der(&key))
                .unwrap();
        let tls = PeerTls {
            ca: ca.cert_der().clone(),
            chain: vec![cert],
            key: pki::private_key_der(&key),
        };
        (tls, presented)
    }

    /// Serves `incoming` on a transfer port on loopback presenting `presented`.
    async fn transfer_port(
        ca: &berth_shared::pki::CertificateAuthority,
        presented: berth_shared::tls::CurrentCert,
        incoming: Arc<Incoming>,
    ) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let tls = berth_shared::tls::server_config_presenting(
            Arc::new(presented),
            Some(berth_shared::tls::ClientAuth {
                ca: ca.cert_der().clone(),
                denied: Arc::default(),
                mandatory: true,
            }),
        )
        .unwrap();
        let router = PeerApi { incoming }.router();
        tokio::spawn(berth_shared::transport::serve_tls(
            listener,
            tls,
            router,
            std::future::pending(),
        ));
        address
    }

    #[tokio::test]
    async fn a_volume_goes_from_agent_to_agent_over_mtls_only_between_the_named_hosts() {
        use crate::transfer::{VolumeLocation, receive_volume, send_volume};
        berth_shared::tls::install_crypto_provider();
        let ca = berth_shared::pki::CertificateAuthority::generate("test").unwrap();
        let (source_tls, _) = fleet_host(&ca, "source");
        let (intruder_tls, _) = fleet_host(&ca, "intruder");
        let (_, target_cert) = fleet_host(&ca, "target");
        let incoming = Arc::new(Incoming::default());
        let address = transfer_port(&ca, target_cert, incoming.clone()).await;
        let (from_dir, to_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let tenant = TenantId::new("acme").unwrap();
        let plain = from_dir.path().join("plain/acme");
        std::fs::create_dir_all(&plain).unwrap();
        std::fs::write(plain.join("chat.log"), "hello from the source").unwrap();
        let at = |dir: &tempfile::TempDir| VolumeLocation {
            root: dir.path().to_path_buf(),
            tenant: tenant.clone(),
        };
        let token = vec![5u8; TOKEN_BYTES];
        let export = |target: &str| proto::VolumeCommand {
            transfer_id: 11,
            peer_host_id: target.into(),
            peer_address: address.to_string(),
            transfer_token: token.clone(),
            ..Default::default()
        };
        let never = || tokio::sync::watch::channel(false).1;
        let (_expecting, chunks) =
            incoming.expect(11, &tenant, HostId::new("source").unwrap(), token.clone());
        let reports = Arc::new(Mutex::new(Vec::new()));
        let heard = reports.clone();
        let report = move |total, received| heard.lock().unwrap().push((total, received));
        let receiving = receive_volume(chunks, at(&to_dir), 11, false, None, report, never());

        // The source's push, as `tls`, to the transfer port as if it were `target`'s.
        let push = |tls: &PeerTls, target: &str| {
            send_volume(
                push_target(&export(target), Some(tls), Arc::default()).unwrap(),
                at(&from_dir),
                11,
                token.clone(),
                false,
                None,
                never(),
            )
        };
        // The source refuses a transfer port that is not the host it was sent to.
        let wrong = push(&source_tls, "elsewhere")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            wrong.contains("the transfer port presented host target, not host elsewhere"),
            "{wrong}"
        );
        // Another host of the fleet, though it holds the token, is not the source named.
        let refused = push(&intruder_tls, "target").await.unwrap_err().to_string();
        assert!(refused.contains("not intruder's to send"), "{refused}");

        let sending = push(&source_tls, "target");
        let (sent, received) = tokio::join!(sending, receiving);
        let (sent, received) = (sent.unwrap(), received.unwrap());
        assert_eq!(sent.volume_sha256, received.volume_sha256);
        assert_eq!(sent.data_bytes, 21);
        assert_eq!(
            std::fs::read_to_string(to_dir.path().join("plain/acme/chat.log")).unwrap(),
            "hello from the source"
        );
    }

    #[tokio::test]
    async fn a_cancelled_import_ends_at_once_and_leaves_nothing() {
        let incoming = Arc::new(Incoming::default());
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::new("acme").unwrap();
        let at = crate::transfer::VolumeLocation {
            root: dir.path().to_path_buf(),
            tenant: tenant.clone(),
        };
        let (_expecting, chunks) =
            incoming.expect(4, &tenant, HostId::new("a").unwrap(), vec![1; 32]);
        let (cancel, cancelled) = tokio::sync::watch::channel(false);
        let import =
            crate::transfer::receive_volume(chunks, at, 4, false, None, |_, _| {}, cancelled);
        let (outcome, ()) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(5), import),
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                cancel.send_replace(true);
            }
        );
        let error = outcome.expect("ended at once").unwrap_err();
        assert!(
            matches!(error, crate::transfer::CopyError::Cancelled),
            "{error}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing left"
        );
    }

    #[tokio::test]
    async fn a_stream_that_comes_before_its_announcement_waits_for_it() {
        let incoming = Arc::new(Incoming::default());
        let a = HostId::new("a").unwrap();
        let early = {
            let incoming = incoming.clone();
            let a = a.clone();
            tokio::spawn(async move {
                incoming
                    .take_announced(&a, &header(3, "acme", b"t"), Duration::from_secs(10))
                    .await
                    .map(|_| ())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_expecting, _chunks) =
            incoming.expect(3, &TenantId::new("acme").unwrap(), a, b"t".to_vec());
        early.await.unwrap().unwrap();
    }
}
