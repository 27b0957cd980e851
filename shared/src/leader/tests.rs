use super::*;
use crate::pki::CertificateAuthority;
use crate::proto::enrollment_service_client::EnrollmentServiceClient;
use crate::proto::enrollment_service_server::{EnrollmentService, EnrollmentServiceServer};
use crate::proto::{EnrollRequest, EnrollResponse};
use crate::tls::{ServerTrust, client_config, install_crypto_provider, server_config};
use crate::transport::serve_tls;
use tokio::net::TcpListener;

/// A leader: answers an enrollment with its name and the token it was sent.
struct Leader(&'static str);

#[tonic::async_trait]
impl EnrollmentService for Leader {
    async fn enroll(
        &self,
        request: tonic::Request<EnrollRequest>,
    ) -> Result<tonic::Response<EnrollResponse>, tonic::Status> {
        Ok(tonic::Response::new(EnrollResponse {
            host_id: format!("{} got {}", self.0, request.into_inner().token),
            ..Default::default()
        }))
    }
}

struct Fleet {
    ca: CertificateAuthority,
    stops: Vec<tokio::sync::watch::Sender<bool>>,
}

impl Fleet {
    fn new() -> Self {
        install_crypto_provider();
        Self {
            ca: CertificateAuthority::generate("test").unwrap(),
            stops: Vec::new(),
        }
    }

    /// Serves `router` on a loopback port over TLS; returns its URL and what stops it.
    async fn serve(&mut self, router: axum::Router) -> (CoordinatorUrl, usize) {
        let (chain, key) = self
            .ca
            .issue_server_cert(&[], Duration::from_secs(3600))
            .unwrap();
        let tls = server_config(chain, key, None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(serve_tls(listener, tls, router, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        self.stops.push(stop);
        let url = CoordinatorUrl {
            host: "127.0.0.1".into(),
            port,
        };
        (url, self.stops.len() - 1)
    }

    async fn leader(&mut self, name: &'static str) -> (CoordinatorUrl, usize) {
        let router = tonic::service::Routes::new(EnrollmentServiceServer::new(Leader(name)))
            .into_axum_router();
        self.serve(router).await
    }

    async fn standby(&mut self, leader: Option<&CoordinatorUrl>) -> (CoordinatorUrl, usize) {
        let (_, naming) = tokio::sync::watch::channel(leader.map(ToString::to_string));
        self.serve(standby_router(naming)).await
    }

    fn stop(&self, server: usize) {
        self.stops[server].send(true).unwrap();
    }

    fn client(
        &self,
        urls: &[&CoordinatorUrl],
        resend: Resend,
    ) -> EnrollmentServiceClient<FleetChannel> {
        let tls = client_config(ServerTrust::Ca(self.ca.cert_der().clone()), None).unwrap();
        let coordinators = Coordinators::new(urls.iter().map(|u| (*u).clone()).collect());
        EnrollmentServiceClient::new(FleetChannel::new(
            coordinators,
            tls,
            Duration::from_secs(10),
            resend,
        ))
    }
}

async fn enroll(
    client: &mut EnrollmentServiceClient<FleetChannel>,
    token: &str,
) -> Result<String, tonic::Status> {
    let request = EnrollRequest {
        token: token.into(),
        csr_pem: String::new(),
    };
    Ok(client.enroll(request).await?.into_inner().host_id)
}

#[tokio::test]
async fn a_client_given_only_a_standby_is_answered_by_the_leader_it_names() {
    let mut fleet = Fleet::new();
    let (leader, _) = fleet.leader("leader").await;
    let (standby, standby_server) = fleet.standby(Some(&leader)).await;
    let mut client = fleet.client(&[&standby], Resend::Requests);
    assert_eq!(enroll(&mut client, "one").await.unwrap(), "leader got one");
    // The next call goes to the leader straight away: the standby is gone and it still works.
    fleet.stop(standby_server);
    assert_eq!(enroll(&mut client, "two").await.unwrap(), "leader got two");
}

#[tokio::test]
async fn without_resending_the_standbys_answer_is_the_calls_and_the_next_call_goes_to_the_leader() {
    let mut fleet = Fleet::new();
    let (leader, _) = fleet.leader("leader").await;
    let (standby, _) = fleet.standby(Some(&leader)).await;
    let mut client = fleet.client(&[&standby], Resend::Never);
    let answer = enroll(&mut client, "one").await.unwrap_err();
    assert_eq!(answer.code(), tonic::Code::Unavailable);
    assert_eq!(
        answer.message(),
        format!("this coordinator is a standby; the fleet's leader is {leader}")
    );
    assert_eq!(
        answer.metadata().get(LEADER_HEADER).unwrap(),
        leader.to_string().as_str()
    );
    assert_eq!(enroll(&mut client, "two").await.unwrap(), "leader got two");
}

#[tokio::test]
async fn a_standby_that_knows_no_leader_sends_the_client_to_the_next_address() {
    let mut fleet = Fleet::new();
    let (lost, _) = fleet.standby(None).await;
    let (leader, _) = fleet.leader("leader").await;
    let mut client = fleet.client(&[&lost, &leader], Resend::Requests);
    assert_eq!(enroll(&mut client, "one").await.unwrap(), "leader got one");

    // Only standbys that know no leader: each is asked once, and the answer says so.
    let (other, _) = fleet.standby(None).await;
    let mut client = fleet.client(&[&lost, &other], Resend::Requests);
    let answer = enroll(&mut client, "two").await.unwrap_err();
    assert_eq!(answer.code(), tonic::Code::Unavailable);
    assert!(
        answer
            .message()
            .contains("no coordinator leads the fleet now"),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_named_leader_that_refuses_connections_is_passed_over() {
    let mut fleet = Fleet::new();
    // The standby names a leader that died (its lease not yet expired): the client goes on
    // to the addresses it was given, where the new leader answers.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        CoordinatorUrl {
            host: "127.0.0.1".into(),
            port: listener.local_addr().unwrap().port(),
        }
    };
    let (standby, _) = fleet.standby(Some(&dead)).await;
    let (leader, _) = fleet.leader("new leader").await;
    let mut client = fleet.client(&[&standby, &leader], Resend::Requests);
    assert_eq!(
        enroll(&mut client, "one").await.unwrap(),
        "new leader got one"
    );
}

#[tokio::test]
async fn the_http_answer_is_503_naming_the_leader() {
    let response = standby_answer(false, Some("https://10.0.0.5:7480"));
    assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[STANDBY_HEADER], "1");
    assert_eq!(response.headers()[LEADER_HEADER], "https://10.0.0.5:7480");
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["leader"], "https://10.0.0.5:7480");
    assert_eq!(
        body["error"],
        "this coordinator is a standby; the fleet's leader is https://10.0.0.5:7480"
    );
    let unknown = standby_answer(false, None);
    assert!(!unknown.headers().contains_key(LEADER_HEADER));
}

#[test]
fn the_leader_named_is_tried_first_then_the_given_addresses_from_the_last_that_accepted() {
    let url = |port| CoordinatorUrl {
        host: "127.0.0.1".into(),
        port,
    };
    let coordinators = Coordinators::new(vec![url(1), url(2), url(3)]);
    assert_eq!(coordinators.candidates(), [url(1), url(2), url(3)]);
    coordinators.standby_answered(Some(&url(1)), Some(url(9)));
    assert_eq!(coordinators.candidates(), [url(9), url(2), url(3), url(1)]);
    coordinators.accepted(&url(9));
    assert_eq!(coordinators.candidates()[0], url(9));
    // A leader that is one of the given addresses is not tried twice.
    coordinators.standby_answered(Some(&url(1)), Some(url(3)));
    assert_eq!(coordinators.candidates(), [url(3), url(2), url(1)]);
    // The named leader refused; the next given address accepted.
    coordinators.accepted(&url(2));
    assert_eq!(coordinators.candidates(), [url(2), url(3), url(1)]);
    // A standby naming no one (or itself) is passed over.
    coordinators.standby_answered(Some(&url(2)), None);
    assert_eq!(coordinators.candidates(), [url(3), url(1), url(2)]);
    coordinators.standby_answered(Some(&url(3)), Some(url(3)));
    assert_eq!(coordinators.candidates(), [url(1), url(2), url(3)]);
}
