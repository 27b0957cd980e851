//! `berth-agent run`, wired together: the agent's state and enforcement loop, the transfer
//! port, the metrics port, and the coordinator session, reconnected with jittered backoff
//! until SIGTERM. Everything the agent runs starts here.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use berth_shared::systemd::Notifier;

use crate::config::AgentConfig;
use crate::desired::DesiredStore;
use crate::enforce::Enforcement;
use crate::host::facts::Meter;
use crate::metrics::Telemetry;
use crate::session::identity::{Identity, IdentityError};
use crate::session::{Backoff, Link, SessionEnd, run_session};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("the agent's own store: {0}")]
    Store(berth_shared::store::StoreError),
    /// The transfer port could not be opened.
    #[error("transfer_listen {addr}: {source}")]
    TransferPort {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The longest wait after a standby coordinator answered (the wait is a random quarter to
/// all of it, so a fleet's agents do not come back at once).
const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// Runs until SIGTERM/SIGINT.
pub async fn run(config: AgentConfig) -> Result<(), RunError> {
    let identity = Identity::load(&config.state_dir)?;
    tracing::info!(host = %identity.host_id(), endpoint = %identity.enrollment.agent_endpoint, "berth-agent starting");
    let mut meter = Meter::new(&config.state_dir);
    let enforcement = Arc::new(Enforcement::new(
        DesiredStore::open(&config.state_dir).map_err(RunError::Store)?,
        config.restarts.clone(),
    ));
    tokio::spawn(crate::enforce::run(
        enforcement.clone(),
        config.clone(),
        identity.host_id().clone(),
    ));
    let transfer_port = open_transfer_port(&config, &identity, &enforcement).await?;
    let telemetry = Arc::new(Telemetry::default());
    tokio::spawn(crate::metrics::serve(
        config.metrics_listen,
        crate::metrics::router(
            enforcement.clone(),
            telemetry.clone(),
            config.metrics_token.clone(),
        ),
    ));
    // Ready once enforcing: the agent keeps the host converged with or without its coordinator.
    let systemd = Arc::new(Notifier::from_env());
    systemd.ready(&format!("enforcing as {}", identity.host_id()));
    systemd.clone().spawn_watchdog();
    let coordinators = identity.coordinators(&config.coordinator)?;
    let mut link = Link {
        identity,
        coordinators,
    };
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| IdentityError::Io {
        path: "signal handler".into(),
        source,
    })?;
    loop {
        let session = run_session(
            &config,
            &link,
            transfer_port.port,
            &mut meter,
            &enforcement,
            &telemetry,
            &mut backoff,
        );
        let end = tokio::select! {
            end = session => end,
            _ = tokio::signal::ctrl_c() => return stop(&systemd),
            _ = terminate.recv() => return stop(&systemd),
        };
        let (why, wait) = match end {
            SessionEnd::Renewed => {
                link.identity = Identity::load(&config.state_dir)?;
                link.identity.present_on(&transfer_port.presented)?;
                tracing::info!(serial = %link.identity.cert_info.serial, "reconnecting with the renewed certificate");
                continue;
            }
            // A standby's answer cost it a handshake and one request, and the leader it names
            // (or the one being elected) is there within seconds: soon again.
            SessionEnd::Standby(why) => (
                why,
                STANDBY_RETRY.mul_f64(rand::rng().random_range(0.25..=1.0)),
            ),
            SessionEnd::Lost(why) | SessionEnd::Failed(why) => {
                (why, backoff.next_wait(&mut rand::rng()))
            }
        };
        tracing::warn!(error = %why, retry_in_ms = wait.as_millis() as u64, "coordinator session down");
        tokio::select! {
            () = tokio::time::sleep(wait) => {},
            _ = tokio::signal::ctrl_c() => return stop(&systemd),
            _ = terminate.recv() => return stop(&systemd),
        }
    }
}

/// The open transfer port: the port it is on, and the certificate it presents.
struct TransferPort {
    port: u16,
    presented: Arc<berth_shared::tls::CurrentCert>,
}

/// Opens the transfer port, where other agents push drained volumes to this host.
async fn open_transfer_port(
    config: &AgentConfig,
    identity: &Identity,
    enforcement: &Enforcement,
) -> Result<TransferPort, RunError> {
    let addr = config.transfer_listen;
    let failed = |source| RunError::TransferPort { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(failed)?;
    let port = listener.local_addr().map_err(failed)?.port();
    let presented = Arc::new(identity.presented()?);
    let tls = berth_shared::tls::server_config_presenting(
        presented.clone(),
        Some(berth_shared::tls::ClientAuth {
            ca: identity.ca.clone(),
            // The coordinator's deny-list, as its sessions deliver it; besides, a transfer is
            // accepted only from the host, and with the token, the coordinator named.
            denied: enforcement.denied.clone(),
            mandatory: true,
        }),
    )
    .map_err(IdentityError::from)?;
    let router = crate::transfer::peer::PeerApi {
        incoming: enforcement.incoming.clone(),
    }
    .router();
    tokio::spawn(berth_shared::transport::serve_tls(
        listener,
        tls,
        router,
        std::future::pending(),
    ));
    tracing::info!(listen = %addr, port, "transfer port open");
    Ok(TransferPort { port, presented })
}

/// A clean exit: systemd hears it is on purpose; tenant containers stay up (they are dockerd's).
fn stop(systemd: &Notifier) -> Result<(), RunError> {
    tracing::info!("berth-agent stopping; tenant containers keep running");
    systemd.stopping();
    Ok(())
}
