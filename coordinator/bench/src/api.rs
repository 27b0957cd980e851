//! Load test of the whole placement path: a real `berth-coordinator` process on loopback,
//! synthetic hosts enrolled over the enrollment service and holding mTLS sessions (they
//! acknowledge every desired state), and concurrent operator clients, each on its own TLS
//! connection, placing tenants. Every placement is flushed to disk before its reply.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use berth_coordinator::api::admin::{self, AdminRequest, AdminResponse};
use berth_coordinator::config::CoordinatorConfig;
use berth_shared::ids::HostId;
use berth_shared::pki::{
    self, CertificateAuthority, Fingerprint, Subject, Validity, cert_der_from_pem,
};
use berth_shared::proto::agent_message::Body as AgentBody;
use berth_shared::proto::agent_service_client::AgentServiceClient;
use berth_shared::proto::coordinator_message::Body as CoordinatorBody;
use berth_shared::proto::enrollment_service_client::EnrollmentServiceClient;
use berth_shared::proto::operator_service_client::OperatorServiceClient;
use berth_shared::proto::{self, AgentMessage};
use berth_shared::tls::{ClientIdentity, ServerTrust, client_config};
use berth_shared::transport::{CoordinatorUrl, channel};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

struct Coordinator {
    child: Child,
    config: CoordinatorConfig,
    operator: CoordinatorUrl,
    agent: CoordinatorUrl,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("executable directory")?.join(name);
    if !path.exists() {
        bail!(
            "{} not found next to berth-bench: build the workspace binaries first",
            path.display()
        );
    }
    Ok(path)
}

/// The store lines of the configuration: none (sled), or etcd under a prefix of this run's.
fn store_config(etcd: &[String]) -> String {
    if etcd.is_empty() {
        return String::new();
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("store = \"etcd\"\n[etcd]\nendpoints = {etcd:?}\nprefix = \"/berth-bench-{nanos}/\"\n")
}

fn start_coordinator(dir: &Path, etcd: &[String]) -> anyhow::Result<Coordinator> {
    let state = dir.join("state");
    let config_path = dir.join("coordinator.toml");
    std::fs::write(
        &config_path,
        format!(
            "state_dir = {:?}\nagent_listen = \"127.0.0.1:0\"\noperator_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n{}",
            state.display().to_string(),
            store_config(etcd)
        ),
    )?;
    let bin = sibling("berth-coordinator")?;
    let status = Command::new(&bin)
        .arg("--config")
        .arg(&config_path)
        .args(["ca", "init"])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("ca init failed");
    }
    let log = std::fs::File::create(dir.join("coordinator.log"))?;
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&config_path)
        .arg("serve")
        .env("BERTH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let endpoints = state.join("endpoints.json");
    let started = Instant::now();
    while !endpoints.exists() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!(
                "the coordinator did not start; see {}",
                dir.join("coordinator.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&endpoints)?)?;
    let url = |k: &str| -> anyhow::Result<CoordinatorUrl> {
        Ok(CoordinatorUrl::parse(
            "endpoints.json",
            &format!("https://{}", e[k].as_str().context("endpoint")?),
        )?)
    };
    Ok(Coordinator {
        child,
        config: CoordinatorConfig::load(Some(&config_path))?,
        operator: url("operator")?,
        agent: url("agent")?,
    })
}

/// Enrolls a synthetic host and keeps its session open, acknowledging every desired state.
async fn synthetic_host(
    c: &Coordinator,
    ca: &CertificateAuthority,
    n: usize,
) -> anyhow::Result<()> {
    let host = HostId::new(format!("bench-{n:04}"))?;
    let AdminResponse::Token { token, .. } = admin::call(
        &c.config,
        &AdminRequest::CreateEnrollmentToken {
            host_id: host.clone(),
            ttl_ms: 600_000,
        },
    )
    .await?
    else {
        bail!("unexpected admin answer");
    };
    let key = pki::generate_key()?;
    let tls = client_config(ServerTrust::Pinned(Fingerprint::of(ca.cert_der())), None)?;
    let enrolled = EnrollmentServiceClient::new(channel(&c.operator, tls))
        .enroll(proto::EnrollRequest {
            token,
            csr_pem: pki::make_csr(&key)?,
        })
        .await?
        .into_inner();
    let identity = ClientIdentity {
        chain: vec![cert_der_from_pem(&enrolled.certificate_pem)?],
        key: pki::private_key_der(&key),
    };
    let mut client = AgentServiceClient::new(channel(
        &c.agent,
        client_config(ServerTrust::Ca(ca.cert_der().clone()), Some(identity))?,
    ));
    let (tx, rx) = mpsc::channel(64);
    let facts = proto::HostFacts {
        provider: "other".into(),
        region: "bench".into(),
        memory_total_bytes: 1 << 40,
        memory_available_bytes: 1 << 40,
        memory_reserved_bytes: 1 << 30,
        cpu_count: 1024,
        disk_total_bytes: 1 << 50,
        disk_available_bytes: 1 << 50,
        ..Default::default()
    };
    let hello = proto::AgentHello {
        host_id: host.to_string(),
        facts: Some(facts),
        ..Default::default()
    };
    tx.send(AgentMessage {
        body: Some(AgentBody::Hello(hello)),
    })
    .await?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    tokio::spawn(async move {
        let mut reports = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = reports.tick() => {
                    let report = proto::HostReport { host_id: host.to_string(), memory_total_bytes: 1 << 40, memory_available_bytes: 1 << 40, ..Default::default() };
                    if tx.send(AgentMessage { body: Some(AgentBody::Report(report)) }).await.is_err() { return; }
                }
                message = inbound.message() => match message {
                    Ok(Some(proto::CoordinatorMessage { body: Some(CoordinatorBody::DesiredState(d)) })) => {
                        let ack = proto::DesiredStateAck { generation: d.generation, accepted: true, error: String::new() };
                        if tx.send(AgentMessage { body: Some(AgentBody::Ack(ack)) }).await.is_err() { return; }
                    }
                    Ok(Some(_)) => {}
                    _ => return,
                },
            }
        }
    });
    Ok(())
}

pub async fn run(
    hosts: usize,
    clients: usize,
    connections: usize,
    placements: usize,
    etcd: &[String],
) -> anyhow::Result<()> {
    berth_shared::tls::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let c = start_coordinator(dir.path(), etcd)?;
    let ca = CertificateAuthority::load(&c.config.ca_dir())?;
    for n in 0..hosts {
        synthetic_host(&c, &ca, n).await?;
    }
    let operator_key = pki::generate_key()?;
    let now = berth_shared::clock::Clock::now_unix_ms(&berth_shared::clock::SystemClock);
    let operator_cert = ca.issue_for_key(
        &operator_key,
        &Subject::Operator("bench".into()),
        Validity::starting_now(now, Duration::from_secs(3600)),
    )?;
    let operator_channel = || -> anyhow::Result<_> {
        let identity = ClientIdentity {
            chain: vec![operator_cert.der.clone()],
            key: pki::private_key_der(&operator_key),
        };
        Ok(OperatorServiceClient::new(channel(
            &c.operator,
            client_config(ServerTrust::Ca(ca.cert_der().clone()), Some(identity))?,
        )))
    };
    let mut probe = operator_channel()?;
    let started = Instant::now();
    loop {
        let listed = probe
            .list_hosts(proto::ListHostsRequest {})
            .await?
            .into_inner()
            .hosts;
        if listed
            .iter()
            .filter(|h| h.state == proto::HostState::Ready as i32)
            .count()
            == hosts
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("synthetic hosts did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let per_client = placements.div_ceil(clients);
    let mut tasks = Vec::new();
    // Concurrent clients share `connections` TLS connections (HTTP/2 multiplexes them), as a
    // provisioning service's connection pool would.
    let mut pool = Vec::new();
    for _ in 0..connections.max(1) {
        let mut client = operator_channel()?;
        // Connect before the clock starts: the handshake is not a placement.
        client.list_hosts(proto::ListHostsRequest {}).await?;
        pool.push(client);
    }
    let started = Instant::now();
    for k in 0..clients {
        let mut client = pool[k % pool.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let spec = proto::TenantSpec {
                    tenant_id: format!("t{k}-{i}"),
                    image: "ghcr.io/openclaw/gateway:1".into(),
                    tier: "individual".into(),
                    volume: Some(proto::VolumeSpec {
                        size_bytes: 0,
                        encrypted: false,
                        mount_path: String::new(),
                    }),
                    ..Default::default()
                };
                let t = Instant::now();
                client
                    .place_tenant(proto::PlaceTenantRequest { spec: Some(spec) })
                    .await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, tonic::Status>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1000.0
    };
    let listed = probe
        .list_tenants(proto::ListTenantsRequest {
            host_id: String::new(),
        })
        .await?
        .into_inner()
        .tenants
        .len();
    if listed != latencies.len() {
        bail!(
            "{} placements acknowledged but {listed} listed",
            latencies.len()
        );
    }
    println!(
        "{}",
        json!({ "api": { "store": if etcd.is_empty() { "sled".to_string() } else { format!("etcd ({} members)", etcd.len()) },
            "hosts": hosts, "clients": clients, "connections": connections, "placements": latencies.len(), "seconds": seconds,
            "placements_per_second": latencies.len() as f64 / seconds, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0) } })
    );
    Ok(())
}
