//! A real etcd cluster (Debian's `etcd-server`) on loopback for a test: each member its own
//! process, data directory and ports; members can be killed and started again on their data.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_for;

const ETCD: &str = "/usr/bin/etcd";

/// Why there is no etcd to test with, if there is none.
pub fn unavailable() -> Option<String> {
    (!std::path::Path::new(ETCD).exists())
        .then(|| format!("{ETCD} is missing (Debian package etcd-server)"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A cluster of members on loopback, stopped and removed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    /// An address of this machine the members listen on too, beside loopback.
    also_at: Option<String>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster has a leader.
    pub fn start(size: usize) -> Self {
        Self::start_listening(size, None)
    }

    /// The same, each member's client port listening at `address` too (the host side of a
    /// test's network namespace, so processes inside reach the cluster).
    pub fn start_reachable_at(size: usize, address: &str) -> Self {
        Self::start_listening(size, Some(address.to_string()))
    }

    fn start_listening(size: usize, also_at: Option<String>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("berth-etcd")
            .tempdir()
            .expect("tempdir");
        let members = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = Self {
            dir,
            members,
            also_at,
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        cluster.wait_healthy();
        cluster
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    fn spawn(&mut self, i: usize) {
        let initial = self.initial_cluster();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("etcd log");
        let m = &self.members[i];
        let mut client = format!("http://127.0.0.1:{}", m.client_port);
        if let Some(address) = &self.also_at {
            client.push_str(&format!(",http://{address}:{}", m.client_port));
        }
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(ETCD)
            .args(["--name", &m.name, "--data-dir"])
            .arg(self.dir.path().join(&m.name))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "berth-test",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints_at("127.0.0.1")
    }

    /// The client URLs of every member at `address` (loopback, or where it also listens).
    pub fn endpoints_at(&self, address: &str) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{address}:{}", m.client_port))
            .collect()
    }

    /// The `[etcd]` table of a coordinator's configuration for this cluster.
    pub fn config(&self, prefix: &str) -> String {
        self.config_at(prefix, "127.0.0.1")
    }

    /// The same, reaching the members at `address`.
    pub fn config_at(&self, prefix: &str, address: &str) -> String {
        format!(
            "[etcd]\nendpoints = {:?}\nprefix = {prefix:?}\n",
            self.endpoints_at(address)
        )
    }

    /// SIGKILL one member.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed member again on its data.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} runs");
        self.spawn(i);
    }

    /// Waits until a running member reports the cluster healthy (a leader and a quorum).
    pub fn wait_healthy(&self) {
        wait_for("etcd healthy", Duration::from_secs(30), || {
            self.members
                .iter()
                .filter(|m| m.child.is_some())
                .any(|m| {
                    Command::new("curl")
                        .args(["-sS", "-m", "2"])
                        .arg(format!("http://127.0.0.1:{}/health", m.client_port))
                        .output()
                        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"true\""))
                })
                .then_some(())
        });
    }

    /// Every member's log, for a failing test's message.
    pub fn logs(&self) -> String {
        (0..self.members.len())
            .map(|i| std::fs::read_to_string(self.log_path(i)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
