//! `berth-coordinator serve`: binds the three ports, then runs until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_shared::clock::SystemClock;
use berth_shared::pki::CertificateAuthority;
use berth_shared::proto::agent_service_server::AgentServiceServer;
use berth_shared::proto::enrollment_service_server::EnrollmentServiceServer;
use berth_shared::proto::operator_service_server::OperatorServiceServer;
use berth_shared::store::{SledStore, Store, StoreError};
use berth_shared::systemd::Notifier;
use berth_shared::tls::{ClientAuth, SerialDenyList, server_config};
use berth_shared::transport::{
    OPERATOR_MESSAGE_BYTES, SESSION_MESSAGE_BYTES, serve_plain, serve_tls,
};

/// An enrollment request is a token and a CSR.
const ENROLL_MESSAGE_BYTES: usize = 64 << 10;
use serde::Serialize;
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::api::{Backend, admin, agent, operator};
use crate::config::{CoordinatorConfig, StoreKind};
use crate::coordinator::Coordinator;
use crate::dashboard;
use crate::drain::Drainer;
use crate::etcd::EtcdStore;
use crate::keys::KeyVault;
use crate::keys::keyring::{BACKUP_KEYS_PREFIX, Keyring, VOLUME_KEYS_PREFIX};
use crate::sessions::SessionHub;
use crate::standby::{Candidacy, Ports, Standby, StandbyTls};

/// The bound addresses, written to `endpoints.json` for scripts and tests.
#[derive(Debug, Serialize)]
pub struct Endpoints {
    pub agent: SocketAddr,
    pub operator: SocketAddr,
    pub http: SocketAddr,
    pub ca_fingerprint: String,
}

/// How often revoked serials of expired certificates leave the deny-list.
const DENY_LIST_PRUNE: Duration = Duration::from_secs(3600);

/// The server certificate is re-made at every start; a year covers any realistic uptime.
const SERVER_CERT_TTL: Duration = Duration::from_secs(397 * 24 * 3600);

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what} port)"))
}

/// How a coordinator that lost the fleet's leadership exits (EX_TEMPFAIL: systemd starts it
/// again, as a standby).
pub const LOST_LEADERSHIP_EXIT: i32 = 75;

/// Waits until this coordinator leads the fleet on etcd, its candidacy saying `candidacy`;
/// meanwhile it is a standby (see [`crate::standby`]). Leading, it stops acting while etcd
/// does not renew its leadership (see [`EtcdStore::lead`]) and goes on once etcd does. A
/// leadership etcd says ended ends the process at once: another coordinator may lead by
/// then, and this one must not act on what it holds in memory.
async fn lead(etcd: &Arc<EtcdStore>, candidacy: Candidacy) -> anyhow::Result<()> {
    tracing::info!(who = %candidacy, "waiting to lead the fleet");
    let etcd = etcd.clone();
    let leadership = tokio::task::spawn_blocking(move || {
        etcd.lead(&candidacy.to_value(), |reason| {
            tracing::error!(%reason, "lost the fleet's leadership: stopping at once");
            std::process::exit(LOST_LEADERSHIP_EXIT);
        })
    })
    .await
    .context("the election task")??;
    tracing::info!(term = leadership.term, "leading the fleet");
    Ok(())
}

/// Binds the agent, operator and HTTP ports.
async fn bind_ports(config: &CoordinatorConfig) -> anyhow::Result<Ports> {
    Ok(Ports {
        agent: Arc::new(bind(config.agent_listen, "agent").await?),
        operator: Arc::new(bind(config.operator_listen, "operator").await?),
        http: Arc::new(bind(config.http_listen, "http").await?),
    })
}

/// The fleet store the configuration names: the embedded database in the state directory, or
/// the etcd cluster of `[etcd]`.
pub fn open_store(config: &CoordinatorConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match (config.store, &config.etcd) {
        (StoreKind::Etcd, Some(etcd)) => Arc::new(EtcdStore::connect(etcd)?),
        _ => Arc::new(SledStore::open(&config.db_dir())?),
    })
}

/// The volume and backup keyrings: files in the state directory with sled, records in etcd
/// with etcd. A keyring file left beside an etcd store is refused: `migrate-store` moves it.
pub fn open_keyrings(
    config: &CoordinatorConfig,
    store: &Arc<dyn Store>,
) -> anyhow::Result<(Keyring, Keyring)> {
    Ok(match config.store {
        StoreKind::Sled => (
            Keyring::open(&config.keyring_file())?,
            Keyring::open(&config.backup_keyring_file())?,
        ),
        StoreKind::Etcd => {
            for file in [config.keyring_file(), config.backup_keyring_file()] {
                if file.exists() && !Keyring::open(&file)?.is_empty() {
                    anyhow::bail!(
                        "{} holds keys, but with store = \"etcd\" keys are kept in etcd: run berth-coordinator migrate-store --to etcd (it moves them)",
                        file.display()
                    );
                }
            }
            (
                Keyring::in_store(store.clone(), VOLUME_KEYS_PREFIX)?,
                Keyring::in_store(store.clone(), BACKUP_KEYS_PREFIX)?,
            )
        }
    })
}

/// Wrapped keys a store written before the keyring still holds move to the keyring; then the
/// store is rewritten into new files, so none of its old segments keeps them. Returns the store
/// to serve from.
fn move_keys_out_of_store(
    config: &CoordinatorConfig,
    store: Arc<dyn Store>,
    keys: &KeyVault,
) -> anyhow::Result<Arc<dyn Store>> {
    let moved = keys.move_out_of(store.as_ref())?;
    if moved == 0 {
        return Ok(store);
    }
    drop(store);
    SledStore::rewrite(&config.db_dir()).context("rewriting the store without its old keys")?;
    tracing::info!(
        moved,
        "volume keys moved from the store to the keyring; the store was rewritten"
    );
    Ok(Arc::new(SledStore::reopen(&config.db_dir())?))
}

/// Who may read the HTTP port and whether it speaks TLS. Off loopback it needs a certificate,
/// or `http_insecure_listen = true` said explicitly (and said again in the log): its read
/// tokens would otherwise cross the network in clear text.
fn http_port(
    config: &CoordinatorConfig,
) -> anyhow::Result<(dashboard::HttpAccess, Option<Arc<rustls::ServerConfig>>)> {
    let loopback = config.http_listen.ip().is_loopback();
    let tls = match &config.http_tls {
        Some(files) => {
            let (chain, key) = berth_shared::pki::read_chain_and_key(&files.cert, &files.key)
                .context("http_tls_cert / http_tls_key")?;
            Some(server_config(chain, key, None)?)
        }
        None if loopback => None,
        None if config.http_insecure_listen => {
            tracing::warn!(
                listen = %config.http_listen,
                "the HTTP port listens off loopback without TLS (http_insecure_listen = true): read tokens and fleet figures cross the network in clear text"
            );
            None
        }
        None => anyhow::bail!(
            "http_listen = {} is not loopback: give the HTTP port a certificate (http_tls_cert and http_tls_key), or set http_insecure_listen = true to serve read tokens over plain HTTP",
            config.http_listen
        ),
    };
    let access = if loopback {
        dashboard::HttpAccess::Loopback
    } else {
        dashboard::HttpAccess::ReadToken
    };
    Ok((access, tls))
}

pub async fn serve(config: CoordinatorConfig) -> anyhow::Result<()> {
    let ca = CertificateAuthority::load(&config.ca_dir()).with_context(|| {
        format!(
            "no usable CA in {}: run `berth-coordinator ca init` first",
            config.ca_dir().display()
        )
    })?;
    let systemd = Arc::new(Notifier::from_env());
    let (http_access, http_tls) = http_port(&config)?;
    let (chain, key) = ca.issue_server_cert(&config.server_names, SERVER_CERT_TTL)?;
    let ca_cert = ca.cert_der().clone();
    let client_auth = |denied, mandatory| ClientAuth {
        ca: ca_cert.clone(),
        denied,
        mandatory,
    };
    // A standby says it is ready (and feeds the watchdog) while it waits to lead.
    let mut standby = false;
    let (store, ports): (Arc<dyn Store>, Ports) = match (config.store, &config.etcd) {
        (StoreKind::Etcd, Some(etcd)) => {
            let etcd = Arc::new(
                EtcdStore::connect(etcd)
                    .context("is the etcd cluster of [etcd] up, with a quorum?")?,
            );
            let ports = bind_ports(&config).await?;
            let nobody_denied = || Arc::new(SerialDenyList::default());
            let serving = Standby::serve(
                &ports,
                StandbyTls {
                    agent: server_config(
                        chain.clone(),
                        key.clone_key(),
                        Some(client_auth(nobody_denied(), true)),
                    )?,
                    operator: server_config(
                        chain.clone(),
                        key.clone_key(),
                        Some(client_auth(nobody_denied(), false)),
                    )?,
                    http: http_tls.clone(),
                },
                etcd.clone(),
            );
            systemd.ready("standby: waiting to lead the fleet");
            systemd.clone().spawn_watchdog();
            standby = true;
            lead(&etcd, Candidacy::of(&config, &ports)?).await?;
            serving.stop().await;
            (etcd, ports)
        }
        _ => (
            open_store(&config)
                .context("is another berth-coordinator running on this state dir?")?,
            bind_ports(&config).await?,
        ),
    };

    let admin_listener = admin::bind_private(&config.admin_socket())
        .with_context(|| format!("cannot bind {}", config.admin_socket().display()))?;
    let endpoints = Endpoints {
        agent: ports.agent.local_addr()?,
        operator: ports.operator.local_addr()?,
        http: ports.http.local_addr()?,
        ca_fingerprint: ca.fingerprint().to_string(),
    };

    let master_key = crate::keys::master_key_path(&config.master_key_file());
    let (keyring, backup_keyring) = open_keyrings(&config, &store)?;
    let keys = KeyVault::open(&master_key, keyring, store.as_ref())?;
    let store = match config.store {
        StoreKind::Sled => move_keys_out_of_store(&config, store, &keys)?,
        StoreKind::Etcd => store,
    };
    let backup_keys = KeyVault::new(crate::keys::MasterKey::load(&master_key)?, backup_keyring);
    let sessions = Arc::new(SessionHub::default());
    let coordinator = Arc::new(Coordinator::open(
        config.clone(),
        store.clone(),
        Arc::new(SystemClock),
        ca,
        crate::keys::Vaults {
            volume: keys,
            backup: backup_keys,
        },
        sessions.clone(),
        endpoints.agent.port(),
    )?);
    let drainer = Drainer::open(coordinator.clone(), store)?;
    drainer.resume();
    let backend = Backend::new(drainer.clone());

    let denied = &coordinator.denied;
    let agent_tls = server_config(
        chain.clone(),
        key.clone_key(),
        Some(client_auth(denied.clone(), true)),
    )?;
    let operator_tls = server_config(chain, key, Some(client_auth(denied.clone(), false)))?;

    let agent_router = Routes::new(
        AgentServiceServer::new(agent::AgentApi {
            coordinator: coordinator.clone(),
            sessions,
            drainer: drainer.clone(),
        })
        .max_decoding_message_size(SESSION_MESSAGE_BYTES)
        .max_encoding_message_size(SESSION_MESSAGE_BYTES),
    )
    .into_axum_router();
    let operator_router = Routes::new(
        EnrollmentServiceServer::new(operator::EnrollmentApi {
            coordinator: coordinator.clone(),
        })
        .max_decoding_message_size(ENROLL_MESSAGE_BYTES),
    )
    .add_service(
        OperatorServiceServer::new(operator::OperatorApi {
            coordinator: coordinator.clone(),
            drainer,
        })
        .max_decoding_message_size(OPERATOR_MESSAGE_BYTES)
        .max_encoding_message_size(OPERATOR_MESSAGE_BYTES),
    )
    .into_axum_router()
    .layer(axum::middleware::from_fn_with_state(
        coordinator.clone(),
        operator::authorize_grpc,
    ))
    .merge(crate::api::rest::router(backend.clone()));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(serve_tls(
        ports.agent.clone(),
        agent_tls,
        agent_router,
        stopped(stop_rx.clone()),
    ));
    tasks.spawn(serve_tls(
        ports.operator.clone(),
        operator_tls,
        operator_router,
        stopped(stop_rx.clone()),
    ));
    let http_stop = stopped(stop_rx.clone());
    let http_router = dashboard::router(backend, http_access);
    match http_tls {
        Some(tls) => {
            tasks.spawn(serve_tls(ports.http.clone(), tls, http_router, http_stop));
        }
        None => {
            tasks.spawn(serve_plain(ports.http.clone(), http_router, http_stop));
        }
    }
    let sweeper = coordinator.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(error) = sweeper.sweep_liveness() {
                tracing::error!(%error, "liveness sweep failed");
            }
        }
    });
    let pruner = coordinator.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(DENY_LIST_PRUNE);
        loop {
            tick.tick().await;
            if let Err(error) = pruner.prune_deny_list() {
                tracing::error!(%error, "deny-list prune failed");
            }
        }
    });
    let admin_path = config.admin_socket();
    let admin_coordinator = coordinator.clone();
    tasks.spawn(async move {
        if let Err(error) = admin::serve_socket(admin_listener, admin_coordinator).await {
            tracing::error!(%error, path = %admin_path.display(), "admin socket failed");
        }
    });

    let endpoints_json = serde_json::to_vec_pretty(&endpoints)?;
    berth_shared::pki::write_file_atomic(&config.endpoints_file(), &endpoints_json, 0o644)?;
    tracing::info!(
        agent = %endpoints.agent, operator = %endpoints.operator, http = %endpoints.http,
        ca_fingerprint = %endpoints.ca_fingerprint, "berth-coordinator ready"
    );
    systemd.ready(&format!(
        "agents on {}, operators on {}, dashboard on {}",
        endpoints.agent, endpoints.operator, endpoints.http
    ));
    if !standby {
        systemd.clone().spawn_watchdog();
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate.recv() => {},
    }
    tracing::info!("shutting down");
    systemd.stopping();
    let _ = stop_tx.send(true);
    let _ = std::fs::remove_file(config.admin_socket());
    tasks.abort_all();
    Ok(())
}
