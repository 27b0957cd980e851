//! A recording, in-memory container runtime for unit tests (youki's recording `Syscall`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicU32, Ordering};

use berth_shared::ids::HostId;
use bollard::models::{ContainerCreateBody, NetworkCreateRequest};

use crate::runtime::container_spec;
use crate::runtime::{ContainerDetails, ContainerRuntime, ManagedContainer, RuntimeError};

/// Records every call; holds containers in memory.
#[derive(Debug, Default)]
pub struct FakeRuntime {
    pub calls: StdMutex<Vec<String>>,
    pub containers: StdMutex<Vec<ManagedContainer>>,
    pub images: StdMutex<Vec<String>>,
    pub networks: StdMutex<HashMap<String, Vec<String>>>,
    pub foreign_ports: StdMutex<Vec<u16>>,
    pub port_taken: StdMutex<bool>,
    pub egress_applied: StdMutex<Vec<String>>,
    pub egress_broken: StdMutex<bool>,
    pub next_id: StdMutex<u32>,
    /// What `details` answers; `None`: a running container restarted twice.
    pub details: StdMutex<Option<ContainerDetails>>,
    /// Makes `restart` fail.
    pub restart_error: StdMutex<Option<String>>,
    /// Makes `remove` fail.
    pub remove_error: StdMutex<Option<String>>,
    /// Makes the recording volume step wait for a key.
    pub volume_key_missing: StdMutex<bool>,
    /// How long a container takes to start, or to stop (none: at once).
    pub start_time: StdMutex<Option<std::time::Duration>>,
    /// How long removing a container takes (none: at once).
    pub remove_time: StdMutex<Option<std::time::Duration>>,
    /// How long creating a network takes (none: at once).
    pub network_time: StdMutex<Option<std::time::Duration>>,
    /// Containers being started: listed as created and, as Docker holds a container while it
    /// starts, answered by `details`, `start`, `stop` and `remove` only once they started.
    pub starting: StdMutex<std::collections::BTreeSet<String>>,
}

impl FakeRuntime {
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    pub fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
    /// Returns once the container `id` is not being started.
    async fn held_while_starting(&self, id: &str) {
        while self.starting.lock().unwrap().contains(id) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
    fn set_state(&self, id: &str, state: &str) {
        for c in self
            .containers
            .lock()
            .unwrap()
            .iter_mut()
            .filter(|c| c.id == id)
        {
            c.state = state.into();
        }
    }
}

#[tonic::async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn list(&self, _: &HostId) -> Result<Vec<ManagedContainer>, RuntimeError> {
        Ok(self.containers.lock().unwrap().clone())
    }
    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        Ok(self.images.lock().unwrap().iter().any(|i| i == image))
    }
    async fn pull(&self, image: &str) -> Result<(), RuntimeError> {
        self.record(format!("pull {image}"));
        Err(RuntimeError::Other("connection refused".into()))
    }
    /// As Docker's: other containers' ports and every berth container's, in any state.
    async fn published_ports(&self) -> Result<Vec<u16>, RuntimeError> {
        let mut ports = self.foreign_ports.lock().unwrap().clone();
        ports.extend(self.containers.lock().unwrap().iter().map(|c| c.port));
        Ok(ports)
    }
    async fn networks(&self) -> Result<HashMap<String, Vec<String>>, RuntimeError> {
        Ok(self.networks.lock().unwrap().clone())
    }
    /// Every network it holds (it keeps no labels).
    async fn host_networks(&self, _: &HostId) -> Result<Vec<String>, RuntimeError> {
        Ok(self.networks.lock().unwrap().keys().cloned().collect())
    }
    async fn create_network(&self, n: NetworkCreateRequest) -> Result<(), RuntimeError> {
        let subnet = n.ipam.unwrap().config.unwrap()[0].subnet.clone().unwrap();
        self.record(format!("network {} {subnet}", n.name));
        let network_time = *self.network_time.lock().unwrap();
        if let Some(t) = network_time {
            tokio::time::sleep(t).await;
        }
        self.networks.lock().unwrap().insert(n.name, vec![subnet]);
        Ok(())
    }
    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        self.record(format!("rm-network {name}"));
        self.networks.lock().unwrap().remove(name);
        Ok(())
    }
    async fn create_and_start(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, RuntimeError> {
        self.record(format!("create {name}"));
        let id = {
            let mut n = self.next_id.lock().unwrap();
            *n += 1;
            format!("{:064x}", *n)
        };
        let labels = body.labels.unwrap();
        self.containers.lock().unwrap().push(ManagedContainer {
            id: id.clone(),
            tenant: labels[container_spec::LABEL_TENANT].clone(),
            spec_hash: labels[container_spec::LABEL_SPEC].clone(),
            generation: labels[container_spec::LABEL_GENERATION].parse().unwrap(),
            port: labels[container_spec::LABEL_PORT].parse().unwrap(),
            state: "created".into(),
        });
        let start_time = *self.start_time.lock().unwrap();
        if let Some(t) = start_time {
            self.starting.lock().unwrap().insert(id.clone());
            tokio::time::sleep(t).await;
            self.starting.lock().unwrap().remove(&id);
        }
        self.set_state(&id, "running");
        Ok(id)
    }
    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.record(format!("start {}", &id[60..]));
        self.held_while_starting(id).await;
        if *self.port_taken.lock().unwrap() {
            return Err(RuntimeError::PortTaken(
                "Bind for 127.0.0.1:20000 failed: port is already allocated".into(),
            ));
        }
        self.set_state(id, "running");
        Ok(())
    }
    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        self.record(format!("stop {}", &id[60..]));
        self.held_while_starting(id).await;
        let stop_time = *self.start_time.lock().unwrap();
        if let Some(t) = stop_time {
            tokio::time::sleep(t).await;
        }
        self.set_state(id, "exited");
        Ok(())
    }
    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.record(format!("remove {}", &id[60..]));
        self.held_while_starting(id).await;
        let remove_time = *self.remove_time.lock().unwrap();
        if let Some(t) = remove_time {
            tokio::time::sleep(t).await;
        }
        if let Some(e) = self.remove_error.lock().unwrap().clone() {
            return Err(RuntimeError::Other(e));
        }
        self.containers.lock().unwrap().retain(|c| c.id != id);
        Ok(())
    }
    async fn restart(&self, id: &str) -> Result<(), RuntimeError> {
        self.record(format!("restart {}", &id[60..]));
        match self.restart_error.lock().unwrap().clone() {
            Some(e) => Err(RuntimeError::Other(e)),
            None => Ok(()),
        }
    }
    async fn details(&self, id: &str) -> Result<ContainerDetails, RuntimeError> {
        self.held_while_starting(id).await;
        Ok(self
            .details
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(ContainerDetails {
                restart_count: 2,
                running: true,
                ..Default::default()
            }))
    }
}

/// A health probe that refuses the first `failures` connects, then accepts; records where it
/// connected from and to, and what it announced from where.
#[derive(Debug, Default)]
pub struct FakeProbe {
    pub failures: u32,
    pub attempts: AtomicU32,
    pub addresses: StdMutex<Vec<SocketAddr>>,
    pub namespaces: StdMutex<Vec<PathBuf>>,
    pub announced: StdMutex<Vec<(PathBuf, IpAddr)>>,
}

#[tonic::async_trait]
impl crate::restarts::Probe for FakeProbe {
    async fn connect(
        &self,
        netns: &Path,
        address: SocketAddr,
    ) -> Result<(), crate::restarts::ProbeError> {
        self.addresses.lock().unwrap().push(address);
        self.namespaces.lock().unwrap().push(netns.to_path_buf());
        let n = self.attempts.fetch_add(1, Ordering::SeqCst);
        if n < self.failures {
            Err(crate::restarts::ProbeError::Connect(
                std::io::Error::from_raw_os_error(111),
            ))
        } else {
            Ok(())
        }
    }

    async fn announce(
        &self,
        netns: &Path,
        address: IpAddr,
    ) -> Result<(), crate::restarts::ProbeError> {
        self.announced
            .lock()
            .unwrap()
            .push((netns.to_path_buf(), address));
        Ok(())
    }
}
