//! In-process gRPC clients with chosen identities, for probing the coordinator's ports.

use std::path::Path;

use berth_shared::pki::{self, CertificateAuthority, Subject, Validity, cert_der_from_pem};
use berth_shared::proto::agent_message::Body;
use berth_shared::proto::agent_service_client::AgentServiceClient;
use berth_shared::proto::operator_service_client::OperatorServiceClient;
use berth_shared::proto::{self, AgentMessage, CoordinatorMessage};
use berth_shared::tls::{ClientIdentity, ServerTrust, client_config};
use berth_shared::transport::{CoordinatorUrl, channel};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::procs::CoordinatorProc;

/// The identity an enrolled agent keeps in `<state_dir>/host.pem`.
pub fn agent_identity(state_dir: &Path) -> ClientIdentity {
    let path = state_dir.join("host.pem");
    let key = pki::read_private_key(&path).expect("host key");
    let pem = std::fs::read_to_string(&path).expect("host.pem");
    ClientIdentity {
        chain: vec![cert_der_from_pem(&pem).expect("host cert")],
        key: pki::private_key_der(&key),
    }
}

/// A client certificate for `subject` from `ca` with the given validity (ms from now).
pub fn identity_from(
    ca: &CertificateAuthority,
    subject: Subject,
    from_ms: i64,
    to_ms: i64,
) -> ClientIdentity {
    let key = pki::generate_key().expect("key");
    let now = now_ms();
    let validity = Validity {
        not_before_unix_ms: now + from_ms,
        not_after_unix_ms: now + to_ms,
    };
    let cert = ca.issue_for_key(&key, &subject, validity).expect("issue");
    ClientIdentity {
        chain: vec![cert.der],
        key: pki::private_key_der(&key),
    }
}

/// `message` with `authorization: Bearer <token>`.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .expect("a token a header can carry"),
    );
    request
}

/// The identity `berth-coordinator operator-cert create` wrote into `dir`.
pub fn operator_identity_in(dir: &Path) -> ClientIdentity {
    let key = pki::read_private_key(&dir.join("operator.key")).expect("operator.key");
    let pem = std::fs::read_to_string(dir.join("operator.crt")).expect("operator.crt");
    ClientIdentity {
        chain: vec![cert_der_from_pem(&pem).expect("operator certificate")],
        key: pki::private_key_der(&key),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

fn coordinator_channel(
    coordinator: &CoordinatorProc,
    addr: std::net::SocketAddr,
    identity: Option<ClientIdentity>,
) -> Channel {
    let ca = cert_der_from_pem(&std::fs::read_to_string(coordinator.ca_cert()).expect("ca.crt"))
        .expect("ca");
    let tls = client_config(ServerTrust::Ca(ca), identity).expect("tls config");
    let url = CoordinatorUrl {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    channel(&url, tls)
}

pub fn agent_client(
    coordinator: &CoordinatorProc,
    identity: Option<ClientIdentity>,
) -> AgentServiceClient<Channel> {
    AgentServiceClient::new(coordinator_channel(
        coordinator,
        coordinator.endpoints.agent,
        identity,
    ))
}

pub fn operator_client(
    coordinator: &CoordinatorProc,
    identity: Option<ClientIdentity>,
) -> OperatorServiceClient<Channel> {
    OperatorServiceClient::new(coordinator_channel(
        coordinator,
        coordinator.endpoints.operator,
        identity,
    ))
}

/// Facts that pass validation.
pub fn sample_facts() -> proto::HostFacts {
    proto::HostFacts {
        provider: "aws".into(),
        region: "eu-central-1".into(),
        instance_type: "m6i.large".into(),
        memory_total_bytes: 8 << 30,
        memory_available_bytes: 6 << 30,
        memory_reserved_bytes: 1 << 30,
        cpu_count: 2,
        ..Default::default()
    }
}

pub fn hello(host_id: &str) -> AgentMessage {
    AgentMessage {
        body: Some(Body::Hello(proto::AgentHello {
            host_id: host_id.into(),
            facts: Some(sample_facts()),
            ..Default::default()
        })),
    }
}

/// A hello from a host with a disk for volumes, with or without dm-crypt (which encrypted
/// tenants need).
pub fn hello_with_disk(host_id: &str, dm_crypt: bool) -> AgentMessage {
    let mut facts = sample_facts();
    facts.disk_total_bytes = 200 << 30;
    facts.disk_available_bytes = 150 << 30;
    facts.capabilities = Some(proto::Capabilities {
        dm_crypt,
        nftables: true,
        docker_version: "20.10.24".into(),
        ..Default::default()
    });
    AgentMessage {
        body: Some(Body::Hello(proto::AgentHello {
            host_id: host_id.into(),
            facts: Some(facts),
            ..Default::default()
        })),
    }
}

/// Reads the session until a VolumeKeys message holding `tenant` arrives, and returns the key
/// (`None` when none comes `within`).
pub async fn volume_key_for(
    inbound: &mut tonic::Streaming<CoordinatorMessage>,
    tenant: &str,
    within: std::time::Duration,
) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let message = tokio::time::timeout_at(deadline, inbound.message())
            .await
            .ok()?
            .ok()??;
        if let Some(proto::coordinator_message::Body::VolumeKeys(keys)) = message.body
            && let Some(k) = keys.keys.iter().find(|k| k.tenant_id == tenant)
        {
            return Some(k.key.clone());
        }
    }
}

/// The volume key of `tenant` the coordinator sends `host` (a host with dm-crypt, enrolled
/// with its state in `agent_state_dir`) on a session opened for it; panics when none comes
/// within 10 s.
pub async fn delivered_volume_key(
    coordinator: &CoordinatorProc,
    agent_state_dir: &Path,
    host: &str,
    tenant: &str,
) -> Vec<u8> {
    let mut client = agent_client(coordinator, Some(agent_identity(agent_state_dir)));
    let mut session = open_session(&mut client, hello_with_disk(host, true))
        .await
        .expect("a session");
    volume_key_for(
        &mut session.inbound,
        tenant,
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|| panic!("no volume key of {tenant} reached {host}"))
}

pub fn report(host_id: &str) -> AgentMessage {
    AgentMessage {
        body: Some(Body::Report(proto::HostReport {
            host_id: host_id.into(),
            sequence: 1,
            memory_total_bytes: 8 << 30,
            memory_available_bytes: 5 << 30,
            ..Default::default()
        })),
    }
}

/// An open session: the sender for further messages and the coordinator's stream.
#[derive(Debug)]
pub struct OpenSession {
    pub outbound: mpsc::Sender<AgentMessage>,
    pub inbound: tonic::Streaming<CoordinatorMessage>,
}

/// Opens a session with `first` as the first message.
pub async fn open_session(
    client: &mut AgentServiceClient<Channel>,
    first: AgentMessage,
) -> Result<OpenSession, tonic::Status> {
    let (outbound, rx) = mpsc::channel(8);
    outbound.send(first).await.expect("queue first message");
    let inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    Ok(OpenSession { outbound, inbound })
}

/// Reads coordinator messages (desired states, ...) until the stream ends with an error, and
/// returns that error; panics if it ends cleanly or nothing comes within 5 s.
pub async fn session_error(inbound: &mut tonic::Streaming<CoordinatorMessage>) -> tonic::Status {
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), inbound.message()).await {
            Err(_) => panic!("the session neither failed nor closed within 5 s"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the session closed without an error"),
            Ok(Err(status)) => return status,
        }
    }
}
