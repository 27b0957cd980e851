//! A coordinator that waits to lead the fleet on etcd.
//!
//! Ensures: a standby's agent, operator and HTTP ports are bound and answer every request at
//! once with where the leader is ([`berth_shared::leader::standby_router`]; berth's clients
//! follow it), as etcd's oldest candidacy says, asked every [`LEADER_POLL`], but for its
//! `/metrics`, which says `berth_coordinator_leading 0` (and nothing more); a standby acts on
//! nothing and reads nothing else of the fleet; once it leads, every connection it accepted as
//! a standby is closed (they were checked against no deny-list) before the same ports serve
//! the fleet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_shared::leader::standby_router;
use berth_shared::transport::{serve_plain, serve_tls};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::CoordinatorConfig;
use crate::etcd::EtcdStore;

/// How often a standby asks etcd who leads.
pub const LEADER_POLL: Duration = Duration::from_secs(1);

/// What a coordinator's candidacy in the election says: who it is and where clients reach it
/// once it leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidacy {
    /// Host name and process id, for people.
    pub who: String,
    pub agent: Option<String>,
    pub operator: Option<String>,
    pub http: Option<String>,
}

impl Candidacy {
    /// This coordinator's candidacy: its ports at the `[etcd] advertise` host (by default
    /// each port's listening address, or the host name where it listens on every address);
    /// a port bound to loopback by its own address (only this machine reaches it).
    pub fn of(config: &CoordinatorConfig, ports: &Ports) -> std::io::Result<Self> {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let advertise = config.etcd.as_ref().and_then(|e| e.advertise.clone());
        let host = |listen: SocketAddr| match &advertise {
            _ if listen.ip().is_loopback() => listen.ip().to_string(),
            Some(host) => host.clone(),
            None if listen.ip().is_unspecified() => hostname.clone(),
            None => listen.ip().to_string(),
        };
        let url = |scheme: &str, listen: SocketAddr| {
            let host = host(listen);
            if host.contains(':') {
                format!("{scheme}://[{host}]:{}", listen.port())
            } else {
                format!("{scheme}://{host}:{}", listen.port())
            }
        };
        let http_scheme = if config.http_tls.is_some() {
            "https"
        } else {
            "http"
        };
        Ok(Self {
            who: format!("{hostname} pid {}", std::process::id()),
            agent: Some(url("https", ports.agent.local_addr()?)),
            operator: Some(url("https", ports.operator.local_addr()?)),
            http: Some(url(http_scheme, ports.http.local_addr()?)),
        })
    }

    /// A candidacy's value in etcd; one that is not this JSON (written by an older
    /// coordinator) is its `who` alone.
    pub fn parse(value: &str) -> Self {
        serde_json::from_str(value).unwrap_or_else(|_| Self {
            who: value.chars().take(200).collect(),
            agent: None,
            operator: None,
            http: None,
        })
    }

    pub fn to_value(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl std::fmt::Display for Candidacy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.operator {
            Some(operator) => write!(f, "{} at {operator}", self.who),
            None => f.write_str(&self.who),
        }
    }
}

/// The three listening ports, bound once: a standby serves them, then the leader it becomes.
#[derive(Debug, Clone)]
pub struct Ports {
    pub agent: Arc<TcpListener>,
    pub operator: Arc<TcpListener>,
    pub http: Arc<TcpListener>,
}

/// How a standby's ports speak TLS (as the leader's will, without the deny-list).
#[derive(Debug)]
pub struct StandbyTls {
    pub agent: Arc<rustls::ServerConfig>,
    pub operator: Arc<rustls::ServerConfig>,
    pub http: Option<Arc<rustls::ServerConfig>>,
}

/// A standby's serving: stopped (its connections closed) by [`Standby::stop`].
#[derive(Debug)]
pub struct Standby {
    tasks: tokio::task::JoinSet<()>,
}

impl Standby {
    /// Serves `ports` as a standby, naming the leader `etcd` says leads.
    pub fn serve(ports: &Ports, tls: StandbyTls, etcd: Arc<EtcdStore>) -> Self {
        let (agent, agent_leader) = watch::channel(None);
        let (operator, operator_leader) = watch::channel(None);
        let (http, http_leader) = watch::channel(None);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            loop {
                let etcd = etcd.clone();
                let leader = match tokio::task::spawn_blocking(move || etcd.leader()).await {
                    Ok(Ok(leader)) => leader.as_deref().map(Candidacy::parse),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "cannot ask etcd who leads");
                        None
                    }
                    Err(_) => None,
                };
                let (a, o, h) = leader
                    .map(|c| (c.agent, c.operator, c.http))
                    .unwrap_or_default();
                agent.send_if_modified(|now| std::mem::replace(now, a.clone()) != a);
                operator.send_if_modified(|now| std::mem::replace(now, o.clone()) != o);
                http.send_if_modified(|now| std::mem::replace(now, h.clone()) != h);
                tokio::time::sleep(LEADER_POLL).await;
            }
        });
        let never = std::future::pending::<()>;
        tasks.spawn(serve_tls(
            ports.agent.clone(),
            tls.agent,
            standby_router(agent_leader),
            never(),
        ));
        tasks.spawn(serve_tls(
            ports.operator.clone(),
            tls.operator,
            standby_router(operator_leader),
            never(),
        ));
        // Scrapers keep seeing every coordinator: a standby's metrics say it waits.
        let http_router = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(crate::dashboard::prometheus::standby_page),
            )
            .merge(standby_router(http_leader));
        match tls.http {
            Some(tls) => tasks.spawn(serve_tls(ports.http.clone(), tls, http_router, never())),
            None => tasks.spawn(serve_plain(ports.http.clone(), http_router, never())),
        };
        Self { tasks }
    }

    /// Stops answering: every connection accepted as a standby is closed; the ports stay
    /// bound (connections arriving meanwhile wait in the backlog).
    pub async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidacy_reads_back_and_an_older_plain_one_is_its_who() {
        let candidacy = Candidacy {
            who: "coord-1 pid 7".into(),
            agent: Some("https://10.0.0.5:7443".into()),
            operator: Some("https://10.0.0.5:7444".into()),
            http: Some("http://127.0.0.1:7480".into()),
        };
        assert_eq!(Candidacy::parse(&candidacy.to_value()), candidacy);
        assert_eq!(
            candidacy.to_string(),
            "coord-1 pid 7 at https://10.0.0.5:7444"
        );
        let older = Candidacy::parse("coord-0 pid 3");
        assert_eq!(older.who, "coord-0 pid 3");
        assert_eq!(older.operator, None);
        assert_eq!(older.to_string(), "coord-0 pid 3");
    }

    #[tokio::test]
    async fn a_candidacy_names_the_advertised_host_with_the_bound_ports() {
        let bind = || async { Arc::new(TcpListener::bind("0.0.0.0:0").await.unwrap()) };
        let ports = Ports {
            agent: bind().await,
            operator: bind().await,
            http: Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        };
        let port = |l: &Arc<TcpListener>| l.local_addr().unwrap().port();
        let mut config = CoordinatorConfig::parse(
            std::path::Path::new("c.toml"),
            "[etcd]\nendpoints = [\"http://e:1\"]\nadvertise = \"coord-1.example.com\"\n",
        )
        .unwrap();
        let candidacy = Candidacy::of(&config, &ports).unwrap();
        assert_eq!(
            candidacy.agent.unwrap(),
            format!("https://coord-1.example.com:{}", port(&ports.agent))
        );
        assert_eq!(
            candidacy.operator.unwrap(),
            format!("https://coord-1.example.com:{}", port(&ports.operator))
        );
        // A loopback HTTP port is reached on this machine only: named as it is.
        assert_eq!(
            candidacy.http.unwrap(),
            format!("http://127.0.0.1:{}", port(&ports.http))
        );
        // Without `advertise`, a port on every address is named by the host name.
        config.etcd.as_mut().unwrap().advertise = None;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(
            Candidacy::of(&config, &ports).unwrap().agent.unwrap(),
            format!("https://{}:{}", hostname.trim(), port(&ports.agent))
        );
    }
}
