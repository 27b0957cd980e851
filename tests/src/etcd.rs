//! A real etcd cluster (Debian's `etcd-server`) on loopback for a test: each member its own
//! process, data directory and ports; members can be killed and started again on their data.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{OPENSSL_NEW_EC_KEY, wait_for};

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
    /// With mutual TLS on the client port: the directory of its certificates and keys.
    tls: Option<PathBuf>,
}

/// Runs openssl with `args` in `dir`, or panics with what it said.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` with a new P-256 key in `NAME.key` (mode 0600), then `more` arguments.
fn request(dir: &Path, name: &str, more: &[&str]) {
    let key = format!("{name}.key");
    let subject = format!("/CN={name}");
    let mut args = vec!["req"];
    args.extend(OPENSSL_NEW_EC_KEY);
    args.extend(["-nodes", "-keyout", &key, "-subj", &subject]);
    args.extend(more);
    openssl(dir, &args);
    std::fs::set_permissions(
        dir.join(key),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("key mode");
}

/// In `dir`: a CA `<ca>.crt`/`.key`, and `<name>.crt`/`.key` signed by it for 127.0.0.1,
/// for servers and clients both. Keys are mode 0600.
fn issue(dir: &Path, ca: &str, names: &[&str]) {
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    if !dir.join(&ca_crt).exists() {
        request(dir, ca, &["-x509", "-out", &ca_crt, "-days", "2"]);
    }
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("ext.cnf");
    for name in names {
        let (csr, crt) = (format!("{name}.csr"), format!("{name}.crt"));
        request(dir, name, &["-out", &csr]);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
    }
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster has a leader.
    pub fn start(size: usize) -> Self {
        Self::start_listening(size, None, false)
    }

    /// The same, with mutual TLS on the client ports (`--client-cert-auth`): the members'
    /// certificates and a client's ([`EtcdCluster::client_tls`]) from a CA made for the test,
    /// and a client certificate from another CA ([`EtcdCluster::stranger_tls`]).
    pub fn start_tls(size: usize) -> Self {
        Self::start_listening(size, None, true)
    }

    /// The same, each member's client port listening at `address` too (the host side of a
    /// test's network namespace, so processes inside reach the cluster).
    pub fn start_reachable_at(size: usize, address: &str) -> Self {
        Self::start_listening(size, Some(address.to_string()), false)
    }

    fn start_listening(size: usize, also_at: Option<String>, tls: bool) -> Self {
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
        let tls = tls.then(|| {
            let tls = dir.path().join("tls");
            std::fs::create_dir(&tls).expect("tls dir");
            issue(&tls, "etcd-ca", &["member", "client"]);
            issue(&tls, "other-ca", &["stranger"]);
            tls
        });
        let mut cluster = Self {
            dir,
            members,
            also_at,
            tls,
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
        let scheme = self.scheme();
        let mut client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        if let Some(address) = &self.also_at {
            client.push_str(&format!(",{scheme}://{address}:{}", m.client_port));
        }
        let mut tls_args: Vec<std::ffi::OsString> = Vec::new();
        if let Some(tls) = &self.tls {
            for (flag, file) in [
                ("--cert-file", "member.crt"),
                ("--key-file", "member.key"),
                ("--trusted-ca-file", "etcd-ca.crt"),
            ] {
                tls_args.push(flag.into());
                tls_args.push(tls.join(file).into());
            }
            tls_args.push("--client-cert-auth".into());
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
            .args(tls_args)
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

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The client URLs of every member at `address` (loopback, or where it also listens).
    pub fn endpoints_at(&self, address: &str) -> Vec<String> {
        let scheme = self.scheme();
        self.members
            .iter()
            .map(|m| format!("{scheme}://{address}:{}", m.client_port))
            .collect()
    }

    /// A client's TLS files for a cluster started with [`EtcdCluster::start_tls`].
    pub fn client_tls(&self) -> Option<berth_coordinator::etcd::EtcdTls> {
        self.tls_of("client", "etcd-ca")
    }

    /// Files of a client whose certificate another CA signed (it trusts the right one).
    pub fn stranger_tls(&self) -> Option<berth_coordinator::etcd::EtcdTls> {
        self.tls_of("stranger", "etcd-ca")
    }

    fn tls_of(&self, name: &str, ca: &str) -> Option<berth_coordinator::etcd::EtcdTls> {
        self.tls
            .as_ref()
            .map(|dir| berth_coordinator::etcd::EtcdTls {
                ca_file: dir.join(format!("{ca}.crt")),
                cert_file: dir.join(format!("{name}.crt")),
                key_file: dir.join(format!("{name}.key")),
            })
    }

    /// The `[etcd]` table of a coordinator's configuration for this cluster.
    pub fn config(&self, prefix: &str) -> String {
        self.config_at(prefix, "127.0.0.1")
    }

    /// The same, reaching the members at `address`.
    pub fn config_at(&self, prefix: &str, address: &str) -> String {
        let mut table = format!(
            "[etcd]\nendpoints = {:?}\nprefix = {prefix:?}\n",
            self.endpoints_at(address)
        );
        if let Some(tls) = self.client_tls() {
            table.push_str(&format!(
                "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
                tls.ca_file, tls.cert_file, tls.key_file
            ));
        }
        table
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
                    let mut curl = Command::new("curl");
                    curl.args(["-sS", "-m", "2"]);
                    if let Some(tls) = self.client_tls() {
                        curl.arg("--cacert")
                            .arg(tls.ca_file)
                            .arg("--cert")
                            .arg(tls.cert_file)
                            .arg("--key")
                            .arg(tls.key_file);
                    }
                    curl.arg(format!(
                        "{}://127.0.0.1:{}/health",
                        self.scheme(),
                        m.client_port
                    ))
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
