//! A desired state an agent must refuse (invalid image, cap below 64 MiB, invalid id): the
//! agent answers with a precise error and changes nothing on the host. berth's coordinator
//! validates specs itself, so a test coordinator (same fleet CA, same agent port) sends them.

use std::sync::Arc;
use std::time::Duration;

use berth_node_agent::desired::DesiredStore;
use berth_shared::pki::CertificateAuthority;
use berth_shared::proto::agent_service_server::{AgentService, AgentServiceServer};
use berth_shared::proto::coordinator_message::Body;
use berth_shared::proto::{self, AgentMessage, CoordinatorMessage};
use berth_shared::store::MemStore;
use berth_shared::tls::{ClientAuth, SerialDenyList, server_config};
use berth_tests::procs::{AgentProc, CoordinatorProc};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Sends one desired state per session and forwards the agent's acknowledgements.
#[derive(Debug, Clone)]
struct RogueCoordinator {
    desired: proto::DesiredState,
    acks: mpsc::UnboundedSender<proto::DesiredStateAck>,
}

type Outbound =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for RogueCoordinator {
    type SessionStream = Outbound;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let accepted = proto::SessionAccepted {
            host_id: String::new(),
            report_interval_ms: 1000,
        };
        tx.send(Ok(CoordinatorMessage {
            body: Some(Body::Accepted(accepted)),
        }))
        .await
        .unwrap();
        tx.send(Ok(CoordinatorMessage {
            body: Some(Body::DesiredState(self.desired.clone())),
        }))
        .await
        .unwrap();
        let acks = self.acks.clone();
        tokio::spawn(async move {
            let _keep_open = tx;
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(proto::agent_message::Body::Ack(ack)) = m.body {
                    let _ = acks.send(ack);
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew_certificate(
        &self,
        _: Request<proto::RenewCertificateRequest>,
    ) -> Result<Response<proto::RenewCertificateResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn upload_export(
        &self,
        _: Request<Streaming<proto::ExportChunk>>,
    ) -> Result<Response<proto::ExportUploaded>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

fn tenant(id: &str, image: &str, memory: u64) -> proto::TenantSpec {
    proto::TenantSpec {
        tenant_id: id.into(),
        image: image.into(),
        resources: Some(proto::Resources {
            memory_bytes: memory,
            cpu_millicores: 100,
            cpu_limit_millicores: 0,
            volume_bytes: 0,
        }),
        volume: Some(proto::VolumeSpec {
            size_bytes: 0,
            encrypted: false,
            mount_path: String::new(),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_desired_state_is_refused_precisely_and_changes_nothing() {
    berth_shared::tls::install_crypto_provider();
    if let Err(why) = berth_tests::docker::available() {
        return berth_tests::missing_component("Docker engine", &why);
    }
    let image = berth_tests::docker::test_tenant_image();
    let mut coordinator = CoordinatorProc::start(None, "");
    let mut agent = AgentProc::enroll(&coordinator, &format!("bad{}", std::process::id()), None);
    // The real coordinator goes away; a test one takes its agent port with the fleet CA.
    coordinator.kill9();
    let ca = CertificateAuthority::load(&coordinator.state_dir().join("ca")).unwrap();
    let (chain, key) = ca.issue_server_cert(&[], Duration::from_secs(600)).unwrap();
    let tls = server_config(
        chain,
        key,
        Some(ClientAuth {
            ca: ca.cert_der().clone(),
            denied: Arc::new(SerialDenyList::default()),
            mandatory: true,
        }),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind(coordinator.endpoints.agent)
        .await
        .unwrap();

    let cases = [
        (
            tenant("ok-one", &image, 128 << 20),
            tenant("Bad_Id", &image, 128 << 20),
            "tenants[1]: invalid tenant_id",
        ),
        (
            tenant("ok-one", &image, 128 << 20),
            tenant("tiny", &image, 1 << 20),
            "tenants[1]: invalid resources.memory_bytes: 1048576 bytes is below the minimum of 64 MiB",
        ),
        (
            tenant("ok-one", &image, 128 << 20),
            tenant("weird", "Not An Image!", 128 << 20),
            "tenants[1]: invalid image",
        ),
    ];
    let (acks_tx, mut acks) = mpsc::unbounded_channel();
    let (first_good, first_bad, first_expected) = cases[0].clone();
    let rogue = RogueCoordinator {
        desired: proto::DesiredState {
            generation: 5,
            tenants: vec![first_good, first_bad],
            staged: vec![],
        },
        acks: acks_tx,
    };
    let router = tonic::service::Routes::new(AgentServiceServer::new(rogue)).into_axum_router();
    tokio::spawn(berth_shared::transport::serve_tls(
        listener,
        tls,
        router,
        std::future::pending(),
    ));
    agent.start_with_docker(true);

    let ack = tokio::time::timeout(Duration::from_secs(15), acks.recv())
        .await
        .expect("an ack")
        .unwrap();
    assert_eq!(ack.generation, 5);
    assert!(!ack.accepted);
    assert!(ack.error.starts_with(first_expected), "{}", ack.error);
    // Nothing changed on the host: not even the valid tenant of the refused state runs.
    std::thread::sleep(Duration::from_secs(6));
    let listed = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=berth.host={}", agent.host_id),
        ])
        .output()
        .unwrap();
    assert!(listed.stdout.is_empty(), "no container was created");
    assert!(
        agent.log().contains("desired state refused"),
        "{}",
        agent.log()
    );
    // The other bad forms are refused the same way by the same validation (unit-tested in
    // node-agent's desired store); their messages:
    for (good, bad, expected) in &cases[1..] {
        let mut store = DesiredStore::with_store(Box::new(MemStore::default())).unwrap();
        let err = store
            .accept(proto::DesiredState {
                generation: 1,
                tenants: vec![good.clone(), bad.clone()],
                staged: vec![],
            })
            .unwrap_err();
        assert!(err.to_string().starts_with(expected), "{err}");
    }
}
