//! The container runtime behind a trait: Docker through bollard in production, a recording fake
//! in unit tests (`testing::runtime`). Only containers and networks labelled `berth.host=<this host>` are ever
//! listed, so nothing else on the host can be touched.

pub mod container_spec;
pub mod subnets;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use berth_shared::ids::HostId;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, ListContainersOptions,
    ListNetworksOptions, RemoveContainerOptions, StartContainerOptions,
};
use futures::StreamExt;

use crate::runtime::container_spec::{
    LABEL_GENERATION, LABEL_HOST, LABEL_PORT, LABEL_SPEC, LABEL_TENANT,
};

/// What the engine refused, classified once where its answer arrives, so the reconciler acts
/// on the kind of failure and never reads Docker's wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// A host port the container publishes is taken (by another container or a process).
    #[error("docker: {0}")]
    PortTaken(String),
    /// A new network's address range overlaps a network that exists.
    #[error("docker: {0}")]
    SubnetOverlaps(String),
    /// Anything else, as the engine said it.
    #[error("docker: {0}")]
    Other(String),
}

impl RuntimeError {
    /// The kind of failure an engine message says (Docker gives these as status 500 with a
    /// message, no code of their own).
    pub fn classify(message: String) -> Self {
        if message.contains("port is already allocated")
            || message.contains("address already in use")
        {
            Self::PortTaken(message)
        } else if message.contains("overlaps") {
            Self::SubnetOverlaps(message)
        } else {
            Self::Other(message)
        }
    }

    /// The engine's own words.
    pub fn message(&self) -> &str {
        match self {
            Self::PortTaken(m) | Self::SubnetOverlaps(m) | Self::Other(m) => m,
        }
    }
}

impl From<bollard::errors::Error> for RuntimeError {
    fn from(e: bollard::errors::Error) -> Self {
        Self::classify(e.to_string())
    }
}

/// A berth container as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedContainer {
    pub id: String,
    /// The `berth.tenant` label as found (validated by the reconciler, not trusted).
    pub tenant: String,
    pub spec_hash: String,
    pub generation: u64,
    pub port: u16,
    /// Docker's state: `running`, `restarting`, `exited`, `created`, ...
    pub state: String,
}

/// What only an inspect tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerDetails {
    pub restart_count: u64,
    pub oom_killed: bool,
    pub exit_code: i64,
    /// RFC 3339; Docker writes year 1 for a container that never started.
    pub started_at: String,
    pub error: String,
    pub running: bool,
    /// The image's healthcheck status (`starting`, `healthy`, `unhealthy`); `None`: the image
    /// has no healthcheck.
    pub health: Option<String>,
    /// Its address on its tenant network.
    pub address: Option<std::net::IpAddr>,
    /// Its network namespace (Docker's sandbox key) while it runs.
    pub netns: Option<std::path::PathBuf>,
}

impl ContainerDetails {
    /// When it last started; `None` if it never did.
    pub fn started(&self) -> Option<jiff::Timestamp> {
        self.started_at
            .parse::<jiff::Timestamp>()
            .ok()
            .filter(|t| t.as_second() > 0)
    }
}

#[tonic::async_trait]
pub trait ContainerRuntime: Send + Sync + std::fmt::Debug {
    async fn list(&self, host: &HostId) -> Result<Vec<ManagedContainer>, RuntimeError>;
    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError>;
    async fn pull(&self, image: &str) -> Result<(), RuntimeError>;
    /// Host ports published by every container on the engine (berth's and others'), and the
    /// gateway port of every berth container whatever its state or host: Docker lists a
    /// container's ports only while it runs, and a crashed one it is about to restart still
    /// needs its own.
    async fn published_ports(&self) -> Result<Vec<u16>, RuntimeError>;
    /// Every network on the engine (berth's and others') by name, with its subnets.
    async fn networks(&self) -> Result<HashMap<String, Vec<String>>, RuntimeError>;
    /// The names of the networks labelled for `host`.
    async fn host_networks(&self, host: &HostId) -> Result<Vec<String>, RuntimeError>;
    /// Creates a network.
    async fn create_network(&self, network: NetworkCreateRequest) -> Result<(), RuntimeError>;
    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError>;
    /// Creates and starts a container; returns its id.
    async fn create_and_start(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, RuntimeError>;
    async fn start(&self, id: &str) -> Result<(), RuntimeError>;
    /// Stops (with the same grace period as a removal) and starts a container again.
    async fn restart(&self, id: &str) -> Result<(), RuntimeError>;
    /// Stops a container (with a grace period). Returns once its processes have exited, which
    /// can be before Docker has taken down its network endpoint and its root filesystem:
    /// [`Self::remove`] waits for that.
    async fn stop(&self, id: &str) -> Result<(), RuntimeError>;
    /// Stops (with a grace period) and removes a container.
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    async fn details(&self, id: &str) -> Result<ContainerDetails, RuntimeError>;
}

/// Docker Engine over its Unix socket.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

const PULL_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_GRACE_SECONDS: i32 = 10;

impl DockerRuntime {
    /// Connects and negotiates the API version (Debian's engine speaks 1.41).
    pub async fn connect(socket: &Path) -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_socket(
            &socket.to_string_lossy(),
            30,
            bollard::API_DEFAULT_VERSION,
        )?;
        let docker = docker.negotiate_version().await?;
        Ok(Self { docker })
    }

    /// Streams OOM events of this host's tenants: calls `on_oom(tenant label)` for each.
    pub async fn watch_oom(
        &self,
        host: &HostId,
        on_oom: impl Fn(&str),
    ) -> Result<(), RuntimeError> {
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("event".to_string(), vec!["oom".to_string()]),
            ("label".to_string(), vec![format!("{LABEL_HOST}={host}")]),
        ]);
        let mut events = self.docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        while let Some(event) = events.next().await {
            let event = event?;
            if let Some(tenant) = event
                .actor
                .and_then(|a| a.attributes)
                .and_then(|a| a.get(LABEL_TENANT).cloned())
            {
                on_oom(&tenant);
            }
        }
        Err(RuntimeError::Other("the event stream ended".into()))
    }
}

fn label_filter(host: &HostId) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_string(), vec![format!("{LABEL_HOST}={host}")])])
}

#[tonic::async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn list(&self, host: &HostId) -> Result<Vec<ManagedContainer>, RuntimeError> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(label_filter(host)),
            ..Default::default()
        };
        let containers = self.docker.list_containers(Some(options)).await?;
        Ok(containers
            .into_iter()
            .map(|c| {
                let labels = c.labels.unwrap_or_default();
                let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
                ManagedContainer {
                    id: c.id.unwrap_or_default(),
                    tenant: label(LABEL_TENANT),
                    spec_hash: label(LABEL_SPEC),
                    generation: label(LABEL_GENERATION).parse().unwrap_or(0),
                    port: label(LABEL_PORT).parse().unwrap_or(0),
                    state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                }
            })
            .collect())
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn pull(&self, image: &str) -> Result<(), RuntimeError> {
        let options = CreateImageOptions {
            from_image: Some(image.to_string()),
            ..Default::default()
        };
        let pull = async {
            let mut progress = self.docker.create_image(Some(options), None, None);
            while let Some(step) = progress.next().await {
                step?;
            }
            Ok::<_, RuntimeError>(())
        };
        tokio::time::timeout(PULL_TIMEOUT, pull)
            .await
            .map_err(|_| {
                RuntimeError::Other(format!("pulling {image} took longer than {PULL_TIMEOUT:?}"))
            })?
    }

    async fn published_ports(&self) -> Result<Vec<u16>, RuntimeError> {
        let all = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                ..Default::default()
            }))
            .await?;
        Ok(all
            .into_iter()
            .flat_map(|c| {
                let claimed = c
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_PORT))
                    .and_then(|p| p.parse().ok());
                let published = c.ports.unwrap_or_default().into_iter();
                published.filter_map(|p| p.public_port).chain(claimed)
            })
            .collect())
    }

    async fn networks(&self) -> Result<HashMap<String, Vec<String>>, RuntimeError> {
        let networks = self
            .docker
            .list_networks(None::<ListNetworksOptions>)
            .await?;
        Ok(networks
            .into_iter()
            .map(|n| {
                let subnets = n
                    .ipam
                    .and_then(|i| i.config)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| c.subnet)
                    .collect();
                (n.name.unwrap_or_default(), subnets)
            })
            .collect())
    }

    async fn host_networks(&self, host: &HostId) -> Result<Vec<String>, RuntimeError> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_HOST}={host}")])]);
        let networks = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await?;
        Ok(networks.into_iter().filter_map(|n| n.name).collect())
    }

    async fn create_network(&self, network: NetworkCreateRequest) -> Result<(), RuntimeError> {
        self.docker.create_network(network).await?;
        Ok(())
    }

    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        match self.docker.remove_network(name).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn create_and_start(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, RuntimeError> {
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let created = self.docker.create_container(Some(options), body).await?;
        if let Err(e) = self
            .docker
            .start_container(&created.id, None::<StartContainerOptions>)
            .await
        {
            // Never leave a created-but-broken container behind.
            let _ = self.remove(&created.id).await;
            return Err(e.into());
        }
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        Ok(self
            .docker
            .start_container(id, None::<StartContainerOptions>)
            .await?)
    }

    async fn restart(&self, id: &str) -> Result<(), RuntimeError> {
        let options = bollard::query_parameters::RestartContainerOptions {
            t: Some(STOP_GRACE_SECONDS),
            signal: None,
        };
        Ok(self.docker.restart_container(id, Some(options)).await?)
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        let state = match self
            .docker
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
        {
            Ok(c) => c.state.unwrap_or_default(),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        // Docker answers a stop only after it took down the container's network endpoint and
        // root filesystem, 0.1-0.2 s after its processes exited; the tenant's volume and rules
        // are free from that exit on.
        let exit = state
            .running
            .unwrap_or(false)
            .then_some(state.pid)
            .flatten()
            .and_then(|pid| ProcessExit::of_container(pid, id));
        let stopping = tokio::spawn(stop_container(self.docker.clone(), id.to_string()));
        let stopped = async {
            stopping
                .await
                .map_err(|e| RuntimeError::Other(format!("stopping: {e}")))?
        };
        match exit {
            Some(exit) => tokio::select! {
                stopped = stopped => stopped,
                () = exit.exited() => Ok(()),
            },
            None => stopped.await,
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let _ = stop_container(self.docker.clone(), id.to_string()).await;
        match self
            .docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    link: false,
                }),
            )
            .await
        {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn details(&self, id: &str) -> Result<ContainerDetails, RuntimeError> {
        let c = self
            .docker
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await?;
        let state = c.state.unwrap_or_default();
        let network = c.network_settings.unwrap_or_default();
        let netns = network
            .sandbox_key
            .filter(|k| !k.is_empty())
            .map(std::path::PathBuf::from);
        let address = network
            .networks
            .unwrap_or_default()
            .into_values()
            .find_map(|e| e.ip_address.and_then(|a| a.parse().ok()));
        let health = state
            .health
            .and_then(|h| h.status)
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty() && s != "none");
        Ok(ContainerDetails {
            restart_count: c.restart_count.unwrap_or(0).max(0) as u64,
            oom_killed: state.oom_killed.unwrap_or(false),
            exit_code: state.exit_code.unwrap_or(0),
            started_at: state.started_at.unwrap_or_default(),
            error: state.error.unwrap_or_default(),
            running: state.running.unwrap_or(false),
            health,
            address,
            netns,
        })
    }
}

/// Stops a container with the grace period; one already stopped or gone is no error.
async fn stop_container(docker: Docker, id: String) -> Result<(), RuntimeError> {
    let options = bollard::query_parameters::StopContainerOptions {
        t: Some(STOP_GRACE_SECONDS),
        signal: None,
    };
    match docker.stop_container(&id, Some(options)).await {
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304 | 404,
            ..
        }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The exit of a container's first process, awaited through a pidfd.
struct ProcessExit(tokio::io::unix::AsyncFd<OwnedFd>);

impl ProcessExit {
    /// Watches process `pid` if it is container `id`'s (it is not when this agent sees
    /// another pid namespace than Docker's); `None` when it cannot be watched.
    fn of_container(pid: i64, id: &str) -> Option<Self> {
        let pid = libc::pid_t::try_from(pid).ok().filter(|p| *p > 0)?;
        // pidfd_open(2): Linux 5.3 and later.
        #[allow(unsafe_code)]
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let fd = std::os::fd::RawFd::try_from(fd)
            .ok()
            .filter(|fd| *fd >= 0)?;
        // SAFETY: the syscall returned this new descriptor, owned by no one else.
        #[allow(unsafe_code)]
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // Checked after the pidfd is open, so a pid reused since cannot pass: a process of the
        // container is in the container's cgroup, whose path holds its id.
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        if !cgroup.contains(id) {
            return None;
        }
        // SAFETY: an `OwnedFd` stays open, and the same, for as long as the `AsyncFd` owns it.
        #[allow(unsafe_code)]
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        };
        registered.ok().map(Self)
    }

    /// Once the process has exited: a pidfd turns readable then. When the first process of a
    /// PID namespace exits, the kernel has ended every other process in it first.
    async fn exited(self) {
        let _ = self.0.readable().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real process and the kernel's pidfd: the wait ends when the process exits, not before;
    /// a process outside the named cgroup is not watched.
    #[tokio::test]
    async fn a_process_exit_is_seen_when_it_happens_and_only_for_a_process_of_the_container() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .expect("sleep");
        let pid = i64::from(child.id());
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let cgroup = own.trim().rsplit(':').next().unwrap().to_string();
        assert!(ProcessExit::of_container(pid, "no-such-container-id").is_none());
        assert!(ProcessExit::of_container(0, &cgroup).is_none());
        let exit = ProcessExit::of_container(pid, &cgroup).expect("watchable");
        let began = std::time::Instant::now();
        exit.exited().await;
        assert!(
            began.elapsed() >= Duration::from_millis(200),
            "{:?}",
            began.elapsed()
        );
        assert!(child.try_wait().unwrap().is_some(), "it has exited");
    }

    #[test]
    fn docker_start_times_parse_and_year_one_means_never() {
        let started = |s: &str| {
            ContainerDetails {
                started_at: s.into(),
                ..Default::default()
            }
            .started()
        };
        assert_eq!(
            started("2026-11-21T07:45:19.302144871Z").map(|t| t.as_millisecond()),
            Some(1_795_247_119_302)
        );
        assert_eq!(started("0001-01-01T00:00:00Z"), None);
        assert_eq!(started(""), None);
    }

    #[test]
    fn engine_refusals_are_classified_once_by_kind() {
        for (message, kind) in [
            (
                "Bind for 127.0.0.1:20001 failed: port is already allocated",
                "port",
            ),
            (
                "driver failed programming external connectivity: listen tcp4 127.0.0.1:20002: bind: address already in use",
                "port",
            ),
            (
                "Pool overlaps with other one on this address space",
                "subnet",
            ),
            ("No such image: ghcr.io/openclaw/gateway:9", "other"),
        ] {
            let e = super::RuntimeError::classify(message.to_string());
            let got = match &e {
                super::RuntimeError::PortTaken(_) => "port",
                super::RuntimeError::SubnetOverlaps(_) => "subnet",
                super::RuntimeError::Other(_) => "other",
            };
            assert_eq!(got, kind, "{message}");
            assert_eq!(e.message(), message);
            assert_eq!(e.to_string(), format!("docker: {message}"));
        }
    }
}
