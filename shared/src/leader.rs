//! Reaching the coordinator that leads the fleet.
//!
//! Ensures: a standby coordinator answers every call at once and says where the leader is
//! ([`standby_router`]: gRPC `Unavailable`, HTTP 503, both with [`STANDBY_HEADER`] and, when
//! it knows one, the leader's address in [`LEADER_HEADER`]); berth's clients follow that answer
//! ([`FleetChannel`]): their next connection goes to the leader it names (or past the standby
//! when it names none), and a call whose request can be sent again is sent again there, so a
//! client given any coordinator's address is answered by the leader.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

use crate::tls::COORDINATOR_SERVER_NAME;
use crate::transport::{CoordinatorUrl, lazy_tls_channel};

/// Set on every answer of a standby coordinator.
pub const STANDBY_HEADER: &str = "berth-standby";
/// The leader's address on the port the request came to (`https://host:port`), when the
/// standby knows who leads.
pub const LEADER_HEADER: &str = "berth-leader";

/// How long one address of several may take to accept a connection before the next is tried.
const CONNECT_EACH: Duration = Duration::from_secs(2);

/// The largest request a [`FleetChannel`] keeps to send again: the largest operator message
/// and its gRPC frame header.
const MAX_RESENT_BYTES: usize = crate::transport::OPERATOR_MESSAGE_BYTES + 5;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The coordinators a client was given, and which to try first: the leader a standby named,
/// then the given addresses from the one that accepted last. Shared by the channels a
/// long-lived client makes one after another (an agent makes one per session).
#[derive(Debug)]
pub struct Coordinators {
    listed: Vec<CoordinatorUrl>,
    order: Mutex<Order>,
}

#[derive(Debug, Default)]
struct Order {
    /// The leader a standby named; tried first until it refuses a connection.
    leader: Option<CoordinatorUrl>,
    /// Where in `listed` to start.
    next: usize,
}

impl Coordinators {
    pub fn new(listed: Vec<CoordinatorUrl>) -> Arc<Self> {
        Arc::new(Self {
            listed,
            order: Mutex::new(Order::default()),
        })
    }

    fn order(&self) -> std::sync::MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The addresses to try, in order.
    fn candidates(&self) -> Vec<CoordinatorUrl> {
        let order = self.order();
        let n = self.listed.len();
        let rotated = (0..n).map(|i| &self.listed[(order.next + i) % n]);
        order
            .leader
            .iter()
            .chain(rotated.filter(|u| Some(*u) != order.leader.as_ref()))
            .cloned()
            .collect()
    }

    fn accepted(&self, url: &CoordinatorUrl) {
        let mut order = self.order();
        if order.leader.as_ref() == Some(url) {
            return;
        }
        order.leader = None;
        if let Some(i) = self.listed.iter().position(|u| u == url) {
            order.next = i;
        }
    }

    /// A standby at `by` answered, naming `leader` (or no one): the leader is tried first,
    /// then the given addresses after the standby (a leader that just died may still be named
    /// for a few seconds; the standby would name it again).
    fn standby_answered(&self, by: Option<&CoordinatorUrl>, leader: Option<CoordinatorUrl>) {
        let mut order = self.order();
        order.leader = leader.filter(|leader| Some(leader) != by);
        if let Some(i) = by.and_then(|by| self.listed.iter().position(|u| u == by)) {
            order.next = (i + 1) % self.listed.len();
        }
    }

    /// Connects to the first candidate that accepts. One address alone has the channel's
    /// connect timeout; of several, each has [`CONNECT_EACH`].
    async fn connect(&self) -> std::io::Result<(TcpStream, CoordinatorUrl)> {
        let candidates = self.candidates();
        let mut last_error = None;
        for url in &candidates {
            let attempt = TcpStream::connect((url.host.as_str(), url.port));
            let result = if candidates.len() == 1 {
                attempt.await
            } else {
                tokio::time::timeout(CONNECT_EACH, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("{url} did not answer"),
                        ))
                    })
            };
            match result {
                Ok(tcp) => {
                    self.accepted(url);
                    return Ok((tcp, url.clone()));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to connect to")
        }))
    }
}

/// Whether a [`FleetChannel`] sends a request again after a standby's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// Every call's request is one message (operator and enrollment calls): it is kept and
    /// sent again to the leader, so the caller gets the leader's answer.
    Requests,
    /// Some calls stream their requests (an agent's session): the standby's answer is the
    /// call's answer, and the next call goes to the leader.
    Never,
}

/// A gRPC channel to a fleet's coordinators that follows standbys' answers to the leader.
/// The server is verified as [`COORDINATOR_SERVER_NAME`] whatever address it is reached at.
#[derive(Clone)]
pub struct FleetChannel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FleetChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetChannel")
            .field("coordinators", &self.shared.coordinators)
            .finish_non_exhaustive()
    }
}

struct Shared {
    coordinators: Arc<Coordinators>,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    resend: Resend,
    current: Mutex<Current>,
}

/// The channel in use: replaced (its connection closed once its calls end) when a standby
/// answers on it.
#[derive(Clone)]
struct Current {
    generation: u64,
    channel: Channel,
    connected_to: Arc<Mutex<Option<CoordinatorUrl>>>,
}

impl FleetChannel {
    /// Connects lazily; each call may take up to `timeout` (an operator's `berthctl restart`
    /// waits for the tenant's health gate).
    pub fn new(
        coordinators: Arc<Coordinators>,
        tls: Arc<rustls::ClientConfig>,
        timeout: Duration,
        resend: Resend,
    ) -> Self {
        let current = Mutex::new(Self::open(&coordinators, &tls, timeout, 0));
        Self {
            shared: Arc::new(Shared {
                coordinators,
                tls,
                timeout,
                resend,
                current,
            }),
        }
    }

    fn open(
        coordinators: &Arc<Coordinators>,
        tls: &Arc<rustls::ClientConfig>,
        timeout: Duration,
        generation: u64,
    ) -> Current {
        let connected_to = Arc::new(Mutex::new(None));
        let dial = {
            let (coordinators, connected_to) = (coordinators.clone(), connected_to.clone());
            move || {
                let (coordinators, connected_to) = (coordinators.clone(), connected_to.clone());
                async move {
                    let (tcp, url) = coordinators.connect().await?;
                    *connected_to.lock().unwrap_or_else(|p| p.into_inner()) = Some(url);
                    Ok(tcp)
                }
            }
        };
        let count = u32::try_from(coordinators.listed.len() + 1).unwrap_or(u32::MAX);
        let channel = lazy_tls_channel(
            dial,
            COORDINATOR_SERVER_NAME,
            tls.clone(),
            Some(timeout),
            Duration::from_secs(5).max(CONNECT_EACH.saturating_mul(count)),
        );
        Current {
            generation,
            channel,
            connected_to,
        }
    }
}

impl Shared {
    fn current(&self) -> Current {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A standby answered on the channel of `generation`: the next connection goes where it
    /// says (unless another answer moved it already).
    fn follow(&self, answered_on: &Current, answer: &http::HeaderMap) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.generation != answered_on.generation {
            return;
        }
        let leader = answer
            .get(LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| CoordinatorUrl::parse(LEADER_HEADER, v).ok());
        let by = answered_on
            .connected_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        tracing::debug!(?by, ?leader, "a standby answered: following it");
        self.coordinators.standby_answered(by.as_ref(), leader);
        *current = FleetChannel::open(
            &self.coordinators,
            &self.tls,
            self.timeout,
            current.generation + 1,
        );
    }

    async fn call(
        self: Arc<Self>,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, BoxError> {
        if self.resend == Resend::Never {
            let current = self.current();
            let response = current.channel.clone().oneshot(request).await?;
            if response.headers().contains_key(STANDBY_HEADER) {
                self.follow(&current, response.headers());
            }
            return Ok(response);
        }
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(axum::body::Body::new(body), MAX_RESENT_BYTES).await?;
        // Each standby is asked at most once in a row: a leader, or the last standby's answer.
        let attempts = self.coordinators.listed.len() + 1;
        let mut attempt = 1;
        loop {
            let request = http::Request::from_parts(
                parts.clone(),
                tonic::body::Body::new(axum::body::Body::from(body.clone())),
            );
            let current = self.current();
            let response = current.channel.clone().oneshot(request).await?;
            if !response.headers().contains_key(STANDBY_HEADER) || attempt == attempts {
                return Ok(response);
            }
            self.follow(&current, response.headers());
            attempt += 1;
        }
    }
}

impl Service<http::Request<tonic::body::Body>> for FleetChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each call readies the channel it goes out on.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.shared.clone().call(request))
    }
}

/// What a standby coordinator answers any request with: gRPC `Unavailable` (a gRPC request)
/// or 503 with a JSON body, both naming `leader` when it is known.
pub fn standby_answer(grpc: bool, leader: Option<&str>) -> http::Response<axum::body::Body> {
    let message = match leader {
        Some(leader) => format!("this coordinator is a standby; the fleet's leader is {leader}"),
        None => "this coordinator is a standby and no coordinator leads the fleet now (an election is under way, or etcd has no quorum)".to_string(),
    };
    let leader_value = leader.and_then(|l| http::HeaderValue::from_str(l).ok());
    let mut response = if grpc {
        tonic::Status::unavailable(message).into_http::<axum::body::Body>()
    } else {
        let body = serde_json::json!({ "error": message, "leader": leader });
        let mut response = http::Response::new(axum::body::Body::from(body.to_string()));
        *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    };
    let headers = response.headers_mut();
    headers.insert(STANDBY_HEADER, http::HeaderValue::from_static("1"));
    if let Some(value) = leader_value {
        headers.insert(LEADER_HEADER, value);
    }
    response
}

/// A router answering every request with [`standby_answer`], naming the leader `leader`
/// holds at that moment.
pub fn standby_router(leader: tokio::sync::watch::Receiver<Option<String>>) -> axum::Router {
    axum::Router::new().fallback(move |request: axum::extract::Request| {
        let leader = leader.borrow().clone();
        async move {
            let grpc = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
            standby_answer(grpc, leader.as_deref())
        }
    })
}

#[cfg(test)]
mod tests;
