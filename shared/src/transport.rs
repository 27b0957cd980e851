//! TLS listeners and gRPC channels.
//!
//! berth terminates TLS itself (tokio-rustls) rather than through tonic, so that it controls
//! the verifiers (CA pinning, serial deny-list) and can hand every request the peer's
//! certificate as a [`PeerInfo`] extension. Handshake failures are logged with the peer address
//! and never reach a service.

use std::borrow::Borrow;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::{Channel, Endpoint, Uri};
use tower::Service;

use crate::tls::COORDINATOR_SERVER_NAME;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one listener serves at once (handshakes included); past it a new connection is
/// closed at once, so descriptors never run out (the units allow 65,536).
pub const MAX_CONNECTIONS: usize = 8192;
/// A connection whose peer stops answering HTTP/2 pings for this long is closed.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// The largest message on an agent session, either way: a host's desired state of 2,048
/// tenants with the largest spec allowed ([`crate::spec::MAX_SPEC_BYTES`]), with room.
pub const SESSION_MESSAGE_BYTES: usize = 80 << 20;
/// The largest operator API message, either way (a listing of a large fleet's tenants).
pub const OPERATOR_MESSAGE_BYTES: usize = 64 << 20;
/// The largest message of a volume push (chunks are 1 MiB).
pub const PEER_MESSAGE_BYTES: usize = 4 << 20;

/// The authenticated transport facts of a request.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The verified client certificate, when the client presented one.
    pub cert: Option<CertificateDer<'static>>,
}

/// Accepts TLS connections on `listener` and serves `router` (gRPC and/or REST) on each, until
/// `shutdown` completes; then the connections it accepted are closed (`listener` itself stays
/// open while its owner keeps it: it may be served again).
pub async fn serve_tls(
    listener: impl Borrow<TcpListener>,
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) {
    serve(listener, Some(TlsAcceptor::from(tls)), router, shutdown).await
}

/// Serves `router` over plain HTTP on `listener` (loopback ports: the dashboard, metrics),
/// with the same limits as [`serve_tls`], until `shutdown` completes.
pub async fn serve_plain(
    listener: impl Borrow<TcpListener>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) {
    serve(listener, None, router, shutdown).await
}

/// The accept loop: at most [`MAX_CONNECTIONS`] at once, each given [`HANDSHAKE_TIMEOUT`] for
/// its TLS handshake (when `tls`) and for each request's headers.
async fn serve(
    listener: impl Borrow<TcpListener>,
    tls: Option<TlsAcceptor>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) {
    let listener = listener.borrow();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Dropped on return, which ends every connection still open.
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%remote, "connection refused: {MAX_CONNECTIONS} open already");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let router = router.clone();
        connections.spawn(async move {
            let _slot = slot;
            let Some(acceptor) = tls else {
                let peer = PeerInfo { remote, cert: None };
                return serve_connection(TokioIo::new(tcp), peer, router).await;
            };
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::warn!(%remote, %error, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|c| c.clone().into_owned());
            let peer = PeerInfo { remote, cert };
            serve_connection(TokioIo::new(stream), peer, router).await
        });
    }
}

/// HTTP/1 or HTTP/2 on one connection, each request carrying `peer`.
async fn serve_connection<S>(io: TokioIo<S>, peer: PeerInfo, router: axum::Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let remote = peer.remote;
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(peer.clone());
            router.clone().call(request)
        });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE);
    let served = builder.serve_connection_with_upgrades(io, service).await;
    if let Err(error) = served {
        tracing::debug!(%remote, %error, "connection ended with an error");
    }
}

/// Why a coordinator URL is unusable.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
}

/// A parsed `https://host:port` coordinator address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorUrl {
    pub host: String,
    pub port: u16,
}

/// The most coordinator addresses one option takes.
pub const MAX_COORDINATORS: usize = 8;

impl CoordinatorUrl {
    /// Parses a comma-separated list of `https://host:port` (a fleet's coordinators), at most
    /// [`MAX_COORDINATORS`], none twice.
    pub fn parse_list(field: &'static str, value: &str) -> Result<Vec<Self>, EndpointError> {
        let urls = value
            .split(',')
            .map(|one| Self::parse(field, one.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let invalid = |reason: String| EndpointError::Invalid {
            field,
            value: value.chars().take(200).collect(),
            reason,
        };
        if urls.len() > MAX_COORDINATORS {
            return Err(invalid(format!("more than {MAX_COORDINATORS} addresses")));
        }
        if let Some(twice) = urls
            .iter()
            .enumerate()
            .find(|(i, u)| urls[..*i].contains(u))
        {
            return Err(invalid(format!("{} is given twice", twice.1)));
        }
        Ok(urls)
    }

    /// Parses `https://host:port` (the port is required; `field` names the flag in errors).
    pub fn parse(field: &'static str, value: &str) -> Result<Self, EndpointError> {
        let invalid = |reason: &str| EndpointError::Invalid {
            field,
            value: value.chars().take(200).collect(),
            reason: reason.to_string(),
        };
        let uri: Uri = value
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(invalid("must start with https://"));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(invalid("must not have a path"));
        }
        let host = uri.host().ok_or_else(|| invalid("missing host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri
            .port_u16()
            .ok_or_else(|| invalid("missing port (https://host:port)"))?;
        Ok(Self { host, port })
    }

    pub fn with_port(&self, port: u16) -> Self {
        Self {
            host: self.host.clone(),
            port,
        }
    }
}

impl std::fmt::Display for CoordinatorUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "https://{}:{}", self.host, self.port)
        }
    }
}

/// A lazily connecting gRPC channel to the coordinator at `url` over TLS with `tls` (one
/// address; a fleet's clients use [`crate::leader::FleetChannel`]). The server is verified as
/// [`COORDINATOR_SERVER_NAME`] whatever address it is reached at. A call may take up to 30 s.
pub fn channel(url: &CoordinatorUrl, tls: Arc<rustls::ClientConfig>) -> Channel {
    tls_channel(
        (url.host.clone(), url.port),
        COORDINATOR_SERVER_NAME,
        tls,
        Some(Duration::from_secs(30)),
    )
}

/// A lazily connecting gRPC channel to `target` over TLS with `tls`, verifying the server as
/// `server_name` (or as `tls`'s verifier decides). A call may take up to `timeout`, if any.
pub fn tls_channel(
    target: (String, u16),
    server_name: &'static str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Option<Duration>,
) -> Channel {
    let dial = move || TcpStream::connect(target.clone());
    lazy_tls_channel(dial, server_name, tls, timeout, Duration::from_secs(5))
}

/// A lazily connecting gRPC channel over TLS with `tls` on whatever TCP connection `dial`
/// makes, verifying the server as `server_name`; `dial` may take up to `connect_timeout`.
pub(crate) fn lazy_tls_channel<D, F>(
    dial: D,
    server_name: &'static str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Option<Duration>,
    connect_timeout: Duration,
) -> Channel
where
    D: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = std::io::Result<TcpStream>> + Send + 'static,
{
    let connector = TlsConnector::from(tls);
    let connect = tower::service_fn(move |_: Uri| {
        let (dial, connector) = (dial.clone(), connector.clone());
        async move {
            let tcp = dial().await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(server_name)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    // The scheme is http because TLS happens in the connector above; tonic never sees it.
    let endpoint = Endpoint::from_static("http://berth.internal")
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    match timeout {
        Some(timeout) => endpoint.timeout(timeout),
        None => endpoint,
    }
    .connect_with_connector_lazy(connect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_lists() {
        let urls =
            CoordinatorUrl::parse_list("coordinator", "https://a:7443, https://b:7443").unwrap();
        assert_eq!(
            urls.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["https://a:7443", "https://b:7443"]
        );
        for (bad, why) in [
            ("https://a:1,https://a:1", "https://a:1 is given twice"),
            ("https://a:1,http://b:1", "must start with https://"),
            ("https://a:1,", "invalid coordinator"),
        ] {
            let err = CoordinatorUrl::parse_list("coordinator", bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let nine = (1..=9)
            .map(|port| format!("https://a:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let err = CoordinatorUrl::parse_list("coordinator", &nine).unwrap_err();
        assert!(err.to_string().contains("more than 8 addresses"), "{err}");
    }

    #[test]
    fn coordinator_urls() {
        let url = CoordinatorUrl::parse("--coordinator", "https://10.0.0.1:7444").unwrap();
        assert_eq!(
            url,
            CoordinatorUrl {
                host: "10.0.0.1".into(),
                port: 7444
            }
        );
        assert_eq!(url.to_string(), "https://10.0.0.1:7444");
        let v6 = CoordinatorUrl::parse("--coordinator", "https://[::1]:7").unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "https://[::1]:7");
        for (bad, why) in [
            ("http://a:1", "must start with https://"),
            ("https://a", "missing port"),
            ("https://a:1/x", "must not have a path"),
            ("not a url", "invalid"),
        ] {
            let err = CoordinatorUrl::parse("--coordinator", bad)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("invalid --coordinator"), "{err}");
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
