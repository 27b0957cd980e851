//! Invariant 1: an agent can only speak for the host named in its certificate; a certificate
//! from another CA, an expired or revoked one, or none at all gets nothing.

use std::io::{Read, Write};
use std::time::Duration;

use berth_shared::ids::HostId;
use berth_shared::pki::{CertificateAuthority, Subject};
use berth_shared::proto;
use berth_tests::clients::{
    agent_client, agent_identity, hello, identity_from, open_session, operator_client, report,
};
use berth_tests::procs::{AgentProc, CoordinatorProc};

fn setup() -> (CoordinatorProc, AgentProc) {
    berth_shared::tls::install_crypto_provider();
    let coordinator = CoordinatorProc::start(None, "");
    let agent = AgentProc::enroll(&coordinator, "host-a", None);
    (coordinator, agent)
}

fn host(id: &str) -> Subject {
    Subject::Host(HostId::new(id).unwrap())
}

/// Every way of calling the agent port with `identity` fails, and no host state changes.
async fn gets_nothing(
    coordinator: &CoordinatorProc,
    identity: Option<berth_shared::tls::ClientIdentity>,
    claimed: &str,
) -> String {
    let mut client = agent_client(coordinator, identity);
    let session = open_session(&mut client, hello(claimed)).await;
    let err = match session {
        Ok(mut s) => s
            .inbound
            .message()
            .await
            .expect_err("no message may arrive"),
        Err(status) => status,
    };
    let renew = client
        .renew_certificate(proto::RenewCertificateRequest {
            csr_pem: String::new(),
        })
        .await;
    assert!(renew.is_err(), "renewal must fail too");
    format!("{err:?}")
}

/// Waits until the coordinator logged a handshake refusal with `reason`, and counts them.
fn refusals_logged(coordinator: &CoordinatorProc, reason: &str) -> usize {
    berth_tests::wait_for(
        &format!("a handshake refusal with {reason:?} in the log"),
        Duration::from_secs(5),
        || {
            let n = coordinator
                .log()
                .lines()
                .filter(|l| l.contains("TLS handshake refused") && l.contains(reason))
                .count();
            (n > 0).then_some(n)
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_without_a_valid_certificate_get_nothing() {
    let (coordinator, agent) = setup();
    let before = coordinator.hosts();

    // Under TLS 1.3 the client sees only a closed connection; the coordinator's log says why.
    gets_nothing(&coordinator, None, "host-a").await;
    refusals_logged(&coordinator, "peer sent no certificates");

    let foreign_ca = CertificateAuthority::generate("foreign").unwrap();
    gets_nothing(
        &coordinator,
        Some(identity_from(
            &foreign_ca,
            host("host-a"),
            -60_000,
            3_600_000,
        )),
        "host-a",
    )
    .await;
    refusals_logged(&coordinator, "UnknownIssuer");

    let ca = CertificateAuthority::load(&coordinator.state_dir().join("ca")).unwrap();
    gets_nothing(
        &coordinator,
        Some(identity_from(&ca, host("host-a"), -7_200_000, -3_600_000)),
        "host-a",
    )
    .await;
    refusals_logged(&coordinator, "certificate expired");

    // An operator certificate from the right CA is not a host identity.
    let operator = gets_nothing(
        &coordinator,
        Some(identity_from(
            &ca,
            Subject::Operator("ops".into()),
            -60_000,
            3_600_000,
        )),
        "host-a",
    )
    .await;
    assert!(
        operator.contains("operator certificate cannot speak for a host"),
        "{operator}"
    );

    // Revoked: enrolled properly, then revoked by host id.
    let identity = agent_identity(&agent.state_dir());
    let (ok, out, err) = berth_tests::procs::run(coordinator.admin_command(&[
        "revoke",
        "--host-id",
        "host-a",
        "--json",
    ]));
    assert!(ok, "revoke failed: {err}");
    assert!(out.contains("revoked"), "{out}");
    gets_nothing(&coordinator, Some(identity), "host-a").await;
    refusals_logged(&coordinator, "Revoked");

    assert_eq!(
        coordinator.hosts(),
        before,
        "no call may have changed host state"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_cannot_speak_for_another_host() {
    let (coordinator, agent) = setup();
    let _other = AgentProc::enroll(&coordinator, "host-b", None);
    let mut client = agent_client(&coordinator, Some(agent_identity(&agent.state_dir())));

    // A hello claiming host-b is refused outright.
    let err = match open_session(&mut client, hello("host-b")).await {
        Ok(mut s) => s.inbound.message().await.expect_err("refused"),
        Err(status) => status,
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("hello.host_id \"host-b\" does not match the certificate's host \"host-a\""),
        "{err:?}"
    );
    assert_eq!(
        coordinator.host_state("host-b").as_deref(),
        Some("down"),
        "host-b never reported"
    );

    // An honest hello, then a report claiming host-b: the session is closed.
    let mut session = open_session(&mut client, hello("host-a"))
        .await
        .expect("session");
    let accepted = session.inbound.message().await.unwrap().unwrap();
    assert!(matches!(
        accepted.body,
        Some(proto::coordinator_message::Body::Accepted(_))
    ));
    assert_eq!(coordinator.host_state("host-a").as_deref(), Some("ready"));
    session.outbound.send(report("host-b")).await.unwrap();
    let err = berth_tests::clients::session_error(&mut session.inbound).await;
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("report.host_id \"host-b\""),
        "{err:?}"
    );
    assert_eq!(
        coordinator.host_state("host-b").as_deref(),
        Some("down"),
        "the forged report changed nothing"
    );
    assert!(
        coordinator.log().contains("message claims another host"),
        "the attempt is logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_closes_an_open_session_and_refuses_the_next_call() {
    let (coordinator, agent) = setup();
    let mut client = agent_client(&coordinator, Some(agent_identity(&agent.state_dir())));
    let mut session = open_session(&mut client, hello("host-a"))
        .await
        .expect("session");
    session.inbound.message().await.unwrap().expect("accepted");

    let serial = berth_shared::pki::parse_peer_cert(&agent_identity(&agent.state_dir()).chain[0])
        .unwrap()
        .serial;
    let (ok, _, err) =
        berth_tests::procs::run(coordinator.admin_command(&["revoke", "--serial", &serial]));
    assert!(ok, "{err}");
    let status = berth_tests::clients::session_error(&mut session.inbound).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(status.message(), "certificate revoked");

    // The same HTTP/2 connection, a new call: refused.
    let again = open_session(&mut client, hello("host-a")).await;
    let err = match again {
        Ok(mut s) => s.inbound.message().await.expect_err("refused"),
        Err(status) => status,
    };
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_port_requires_an_operator_credential() {
    let (coordinator, agent) = setup();
    // No credential.
    let err = operator_client(&coordinator, None)
        .list_hosts(proto::ListHostsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // A host certificate is not an operator.
    let err = operator_client(&coordinator, Some(agent_identity(&agent.state_dir())))
        .list_hosts(proto::ListHostsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // A wrong bearer token.
    let mut request = tonic::Request::new(proto::ListHostsRequest {});
    request
        .metadata_mut()
        .insert("authorization", "Bearer bto_not-a-token".parse().unwrap());
    let err = operator_client(&coordinator, None)
        .list_hosts(request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // An operator certificate from `berth-coordinator operator-cert create`.
    let (dir, _) = coordinator.operator_cert("alice");
    let identity = berth_tests::clients::operator_identity_in(&dir);
    let hosts = operator_client(&coordinator, Some(identity))
        .list_hosts(proto::ListHostsRequest {})
        .await
        .expect("operator cert accepted");
    assert_eq!(hosts.into_inner().hosts.len(), 1);
    // And a bearer token from `operator-token create`, through berthctl.
    let (ok, out, err) = coordinator.berthctl(&["hosts"]);
    assert!(ok, "{err}");
    assert!(out.contains("host-a"), "{out}");
}

#[test]
fn garbage_on_the_agent_port_is_refused_and_changes_nothing() {
    let (coordinator, _agent) = setup();
    let before = coordinator.hosts();
    for garbage in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0],
        (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
    ] {
        let mut tcp = std::net::TcpStream::connect(coordinator.endpoints.agent).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = tcp.write_all(&garbage);
        let mut reply = Vec::new();
        let _ = tcp.read_to_end(&mut reply);
        // At most a TLS alert record comes back; never application data.
        assert!(
            reply.len() < 64 && (reply.is_empty() || reply[0] == 0x15),
            "unexpected reply {reply:?}"
        );
    }
    assert_eq!(coordinator.hosts(), before);
    berth_tests::wait_for("the refusal in the log", Duration::from_secs(5), || {
        coordinator
            .log()
            .contains("TLS handshake refused")
            .then_some(())
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hello_with_bad_facts_is_refused_naming_the_field() {
    let (coordinator, agent) = setup();
    let mut client = agent_client(&coordinator, Some(agent_identity(&agent.state_dir())));
    let before = coordinator.hosts();
    let mut message = hello("host-a");
    if let Some(proto::agent_message::Body::Hello(h)) = &mut message.body {
        h.facts.as_mut().unwrap().provider = "gcp".into();
    }
    let err = match open_session(&mut client, message).await {
        Ok(mut s) => s.inbound.message().await.expect_err("refused"),
        Err(status) => status,
    };
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "invalid facts.provider: unknown provider \"gcp\" (expected hetzner, aws or other)"
    );
    assert_eq!(coordinator.hosts(), before, "nothing recorded");
}

/// A revocation reaches every connected agent, whose transfer port then refuses the serial
/// (the handshake itself is tested in `berth_shared::tls`); an agent that connects later gets
/// the whole list at the start of its session.
#[test]
fn a_revocation_reaches_every_agents_transfer_port() {
    let coordinator = CoordinatorProc::start(None, "");
    let mut a = AgentProc::enroll(&coordinator, "host-a", None);
    let b = AgentProc::enroll(&coordinator, "host-b", None);
    a.start();
    berth_tests::wait_for("host-a's session", Duration::from_secs(10), || {
        a.log()
            .contains("revoked certificates received serials=0 replace=true")
            .then_some(())
    });
    let serial = berth_shared::pki::parse_peer_cert(&agent_identity(&b.state_dir()).chain[0])
        .unwrap()
        .serial;
    let (ok, _, err) =
        berth_tests::procs::run(coordinator.admin_command(&["revoke", "--host-id", "host-b"]));
    assert!(ok, "{err}");
    berth_tests::wait_for("host-a hears of it", Duration::from_secs(5), || {
        a.log()
            .contains("revoked certificates received serials=1 replace=false")
            .then_some(())
    });
    a.kill9();
    a.start();
    berth_tests::wait_for(
        "host-a's next session brings the whole list",
        Duration::from_secs(10),
        || {
            a.log()
                .contains("revoked certificates received serials=1 replace=true")
                .then_some(())
        },
    );
    assert!(coordinator.log().contains(&serial));
}
