//! Real berth processes under test. Each owns a temp directory (state, config, log) and is
//! killed when dropped; its log is printed if the test is failing.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde::Deserialize;
use tempfile::TempDir;

use crate::netns::NetHost;
use crate::wait_for;

/// A workspace binary next to the test executable (`target/<profile>/<name>`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    // Test executables live in target/<profile>/deps, binaries in target/<profile>.
    let mut dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile> directory");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the README test command does)",
        path.display()
    );
    path
}

/// `program` run directly, or through `ip netns exec` inside `netns`.
pub fn command(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Runs a command to completion; returns (success, stdout, stderr).
pub fn run(mut cmd: Command) -> (bool, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.stdin(Stdio::null()).output().expect("spawn");
    (
        status.success(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn spawn_logged(mut cmd: Command, log: &Path, env: &[(String, String)]) -> Child {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let err = out.try_clone().expect("log file");
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("BERTH_LOG", "info,berth_coordinator=debug")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .spawn()
        .expect("spawn")
}

/// The default maintenance window of test agents: an hour, UTC, opening 12 h from now, so no
/// nightly restart of a test's tenants happens while it runs unless the test gives a tenant a
/// window of its own ([`crate::fleet::Fleet::place_with_window`]). With the agent's default
/// (02:00-05:00 host time) a test run at those hours had its tenants restarted under it.
fn quiet_window() -> String {
    let opens = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .checked_add(jiff::SignedDuration::from_hours(12))
        .expect("12 h from now");
    let closes = opens
        .checked_add(jiff::SignedDuration::from_hours(1))
        .expect("an hour later");
    format!("{}-{}", opens.strftime("%H:%M"), closes.strftime("%H:%M"))
}

fn kill9(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Endpoints {
    pub agent: SocketAddr,
    pub operator: SocketAddr,
    pub http: SocketAddr,
    pub ca_fingerprint: String,
}

/// A self-signed server certificate for `ip` made with openssl, as an operator would bring
/// one for the coordinator's HTTP port: `(cert.pem, key.pem)` in `dir` (the key mode 0600).
pub fn server_cert_files(dir: &Path, ip: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("http-cert.pem"), dir.join("http-key.pem"));
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509"])
        .args(crate::OPENSSL_NEW_EC_KEY)
        .args(["-nodes", "-days", "1", "-subj", "/CN=berth-test", "-addext"])
        .arg(format!("subjectAltName=IP:{ip}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert);
    let (ok, _, err) = run(cmd);
    assert!(ok, "openssl req: {err}");
    fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (cert, key)
}

/// A `berth-coordinator serve` process.
#[derive(Debug)]
pub struct CoordinatorProc {
    pub dir: TempDir,
    pub netns: Option<String>,
    pub endpoints: Endpoints,
    child: Option<Child>,
    listen_ip: String,
    /// The HTTP port's address: loopback (of the namespace, if any) unless a test asks for
    /// the listen address (which then needs TLS or `http_insecure_listen`).
    http_ip: String,
    extra_config: String,
    /// Added to the daemon's environment.
    env: Vec<(String, String)>,
    /// The soft limit of open files it starts with (through `prlimit`), if not inherited.
    open_files: Option<u64>,
    /// Names its certificate carries besides its listen address.
    other_names: Vec<String>,
}

impl CoordinatorProc {
    /// A REST call with curl, as an operator's script would make it (with the operator token
    /// when `token`): the HTTP status and the parsed JSON body.
    pub fn rest(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: bool,
    ) -> (u16, serde_json::Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-X", method, "--cacert"])
            .arg(self.ca_cert())
            .arg(format!("{}{path}", self.operator_url()));
        if token {
            let t = std::fs::read_to_string(self.operator_token_file()).unwrap();
            cmd.args(["-H", &format!("Authorization: Bearer {}", t.trim())]);
        }
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data", b]);
        }
        let (code, body) = crate::curl_status(cmd);
        (
            code,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Creates a CA and starts the coordinator on port 0 (loopback, or the namespace host's
    /// address). `extra_config` is appended to its TOML config.
    pub fn start(host: Option<&NetHost>, extra_config: &str) -> Self {
        Self::start_with_env(host, extra_config, &[])
    }

    /// [`CoordinatorProc::start`] with `env` added to the daemon's environment.
    pub fn start_with_env(
        host: Option<&NetHost>,
        extra_config: &str,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_configured(host, extra_config, env, None)
    }

    /// [`CoordinatorProc::start`] with its HTTP port on `http_ip` (`extra_config` must give it
    /// TLS or `http_insecure_listen` unless that is loopback).
    pub fn start_with_http_at(host: Option<&NetHost>, http_ip: &str, extra_config: &str) -> Self {
        Self::start_configured(host, extra_config, &[], Some(http_ip))
    }

    /// [`CoordinatorProc::start`] on loopback, its certificate also naming the address qemu
    /// guests reach this machine's loopback at, so hosts in VMs enroll and connect.
    pub fn start_for_vm_hosts(extra_config: &str) -> Self {
        Self::start_named(None, extra_config, &[], None, &[crate::vmhost::HOST_ALIAS])
    }

    fn start_configured(
        host: Option<&NetHost>,
        extra_config: &str,
        env: &[(&str, &str)],
        http_ip: Option<&str>,
    ) -> Self {
        Self::start_named(host, extra_config, env, http_ip, &[])
    }

    fn start_named(
        host: Option<&NetHost>,
        extra_config: &str,
        env: &[(&str, &str)],
        http_ip: Option<&str>,
        other_names: &[&str],
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("berth-coord")
            .tempdir()
            .expect("tempdir");
        let listen_ip = host
            .map(|h| h.address.clone())
            .unwrap_or_else(|| "127.0.0.1".into());
        let placeholder = Endpoints {
            agent: SocketAddr::from(([0, 0, 0, 0], 0)),
            operator: SocketAddr::from(([0, 0, 0, 0], 0)),
            http: SocketAddr::from(([0, 0, 0, 0], 0)),
            ca_fingerprint: String::new(),
        };
        let http_ip = http_ip.unwrap_or("127.0.0.1").to_string();
        let mut me = Self {
            dir,
            netns: host.map(|h| h.netns.clone()),
            endpoints: placeholder,
            child: None,
            listen_ip,
            http_ip,
            extra_config: extra_config.into(),
            open_files: None,
            other_names: other_names.iter().map(|n| n.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        me.write_config(0, 0, 0);
        let (ok, _, err) = run(me.admin_command(&["ca", "init"]));
        assert!(ok, "ca init failed: {err}");
        me.spawn();
        me
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("coordinator.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("coordinator.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn write_config(&self, agent: u16, operator: u16, http: u16) {
        let (ip, http_ip) = (&self.listen_ip, &self.http_ip);
        let mut names = vec![ip.clone()];
        names.extend(self.other_names.iter().cloned());
        let text = format!(
            "state_dir = {:?}\nagent_listen = \"{ip}:{agent}\"\noperator_listen = \"{ip}:{operator}\"\nhttp_listen = \"{http_ip}:{http}\"\nserver_names = {names:?}\n{}\n",
            self.state_dir().display().to_string(),
            self.extra_config
        );
        fs::write(self.config_path(), text).expect("write config");
    }

    fn spawn(&mut self) {
        self.launch();
        self.await_endpoints(Duration::from_secs(20));
    }

    /// Starts `berth-coordinator serve` without waiting for it to serve (a standby waits to
    /// lead the fleet first).
    pub fn launch(&mut self) {
        let _ = fs::remove_file(self.state_dir().join("endpoints.json"));
        let mut cmd = match self.open_files {
            Some(soft) => {
                assert!(self.netns.is_none(), "prlimit only outside namespaces");
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={soft}:"))
                    .arg(bin("berth-coordinator"));
                cmd
            }
            None => command(self.netns.as_deref(), &bin("berth-coordinator")),
        };
        cmd.arg("--config").arg(self.config_path()).arg("serve");
        self.child = Some(spawn_logged(cmd, &self.log_path(), &self.env));
    }

    /// How the process ended, if it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok()?
    }

    /// Its agent port, as an agent's `coordinator` setting names it.
    pub fn agent_url(&self) -> String {
        format!("https://{}:{}", self.listen_ip, self.endpoints.agent.port())
    }

    /// Whether the launched coordinator serves yet (has written its endpoints).
    pub fn serving(&self) -> bool {
        self.state_dir().join("endpoints.json").exists()
    }

    /// Waits until the launched coordinator serves (panics if it exits or `within` passes),
    /// then keeps its ports for later restarts, as a real deployment does.
    pub fn await_endpoints(&mut self, within: Duration) {
        let endpoints_file = self.state_dir().join("endpoints.json");
        let log = self.log_path();
        self.endpoints = wait_for("the coordinator's endpoints.json", within, || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "berth-coordinator exited with {status}: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            fs::read(&endpoints_file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        });
        self.write_config(
            self.endpoints.agent.port(),
            self.endpoints.operator.port(),
            self.endpoints.http.port(),
        );
    }

    /// A second coordinator of `leader`'s fleet (its CA and master key copied, as an operator
    /// copies them to the machine that is to take over), configured with `extra_config` and
    /// launched: with `store = "etcd"` it waits as a standby while `leader` leads.
    pub fn standby_of(leader: &CoordinatorProc, extra_config: &str) -> Self {
        Self::standby(
            leader,
            leader.netns.clone(),
            &leader.listen_ip,
            extra_config,
        )
    }

    /// The same, on this machine's loopback whatever namespace `leader` runs in.
    pub fn standby_on_loopback(leader: &CoordinatorProc, extra_config: &str) -> Self {
        Self::standby(leader, None, "127.0.0.1", extra_config)
    }

    fn standby(
        leader: &CoordinatorProc,
        netns: Option<String>,
        listen_ip: &str,
        extra_config: &str,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("berth-coord")
            .tempdir()
            .expect("tempdir");
        let ip: std::net::IpAddr = listen_ip.parse().expect("an IP address");
        let mut me = Self {
            dir,
            netns,
            endpoints: Endpoints {
                agent: SocketAddr::new(ip, 0),
                operator: SocketAddr::new(ip, 0),
                http: SocketAddr::new(leader.http_ip.parse().expect("an IP address"), 0),
                ca_fingerprint: leader.endpoints.ca_fingerprint.clone(),
            },
            child: None,
            listen_ip: listen_ip.to_string(),
            http_ip: leader.http_ip.clone(),
            extra_config: extra_config.into(),
            open_files: None,
            other_names: leader.other_names.clone(),
            env: leader.env.clone(),
        };
        // Its ports are chosen now, so agents can be given its address before it serves.
        let free = || {
            std::net::TcpListener::bind((me.listen_ip.as_str(), 0))
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        };
        let (agent, operator, http) = (free(), free(), free());
        me.write_config(agent, operator, http);
        me.endpoints.agent = SocketAddr::new(me.endpoints.agent.ip(), agent);
        me.endpoints.operator = SocketAddr::new(me.endpoints.operator.ip(), operator);
        me.endpoints.http = SocketAddr::new(me.endpoints.http.ip(), http);
        let ca = me.state_dir().join("ca");
        fs::create_dir_all(&ca).expect("ca dir");
        for file in ["ca/ca.crt", "ca/ca.key", "master.key"] {
            fs::copy(leader.state_dir().join(file), me.state_dir().join(file)).expect(file);
        }
        // The operator token berthctl uses here is the leader's (tokens are fleet state).
        if leader.dir.path().join("operator.token").exists() {
            fs::copy(
                leader.dir.path().join("operator.token"),
                me.dir.path().join("operator.token"),
            )
            .expect("operator token");
        }
        me.launch();
        me
    }

    /// SIGKILL: no shutdown path runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    /// Stops it and starts it again with a soft limit of `soft` open files, as a shell's
    /// default 1,024 would give it.
    pub fn restart_with_open_files(&mut self, soft: u64) {
        self.kill9();
        self.open_files = Some(soft);
        self.spawn();
    }

    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Replaces what is appended to its configuration (it keeps its ports); takes effect at
    /// the next start.
    pub fn reconfigure(&mut self, extra_config: &str) {
        self.extra_config = extra_config.into();
        self.write_config(
            self.endpoints.agent.port(),
            self.endpoints.operator.port(),
            self.endpoints.http.port(),
        );
    }

    /// `berth-coordinator --config C <args>` (admin commands reach the server over its Unix
    /// socket, which works from any namespace).
    pub fn admin_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("berth-coordinator"));
        cmd.arg("--config").arg(self.config_path()).args(args);
        cmd
    }

    /// A one-time enrollment token for `host_id`.
    pub fn token(&self, host_id: &str, ttl: &str) -> String {
        let (ok, out, err) =
            run(self.admin_command(&["token", "create", "--host-id", host_id, "--ttl", ttl]));
        assert!(ok, "token create failed: {err}");
        out.trim().to_string()
    }

    /// The operator URL, as berthctl and agents use it.
    pub fn operator_url(&self) -> String {
        format!("https://{}", self.endpoints.operator)
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.state_dir().join("ca/ca.crt")
    }

    /// An operator token file (made on first use).
    pub fn operator_token_file(&self) -> PathBuf {
        let path = self.dir.path().join("operator.token");
        if !path.exists() {
            let (ok, out, err) =
                run(self.admin_command(&["operator-token", "create", "--name", "tester"]));
            assert!(ok, "operator-token create failed: {err}");
            fs::write(&path, out.trim()).expect("write token");
        }
        path
    }

    /// A new operator token: `berth-coordinator operator-token create --name NAME --scope
    /// SCOPE --ttl TTL`.
    pub fn operator_token(&self, name: &str, scope: &str, ttl: &str) -> String {
        let (ok, out, err) = run(self.admin_command(&[
            "operator-token",
            "create",
            "--name",
            name,
            "--scope",
            scope,
            "--ttl",
            ttl,
        ]));
        assert!(ok, "operator-token create failed: {err}");
        out.trim().to_string()
    }

    /// `berth-coordinator operator-cert create --name NAME` into a directory of this
    /// coordinator's: (that directory, the certificate's serial).
    pub fn operator_cert(&self, name: &str) -> (PathBuf, String) {
        let dir = self.dir.path().join(format!("opcert-{name}"));
        let (ok, out, err) = run(self.admin_command(&[
            "--json",
            "operator-cert",
            "create",
            "--name",
            name,
            "--out-dir",
            dir.to_str().expect("a UTF-8 path"),
        ]));
        assert!(ok, "operator-cert create failed: {err}");
        let created: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        let serial = created["serial"].as_str().expect("a serial").to_string();
        (dir, serial)
    }

    /// Runs berthctl against this coordinator (inside its namespace, if any).
    pub fn berthctl(&self, args: &[&str]) -> (bool, String, String) {
        let token = self.operator_token_file();
        let mut cmd = command(self.netns.as_deref(), &bin("berthctl"));
        cmd.args(args)
            .env("BERTH_COORDINATOR", self.operator_url())
            .env("BERTH_CA_CERT", self.ca_cert())
            .env("BERTH_TOKEN_FILE", token)
            .env_remove("BERTH_TOKEN");
        run(cmd)
    }

    /// `berthctl hosts --json`, parsed.
    pub fn hosts(&self) -> Vec<serde_json::Value> {
        let (ok, out, err) = self.berthctl(&["hosts", "--json"]);
        assert!(ok, "berthctl hosts failed: {err}");
        serde_json::from_str(&out).expect("hosts JSON")
    }

    /// The state of one host, as berthctl shows it.
    pub fn host_state(&self, host_id: &str) -> Option<String> {
        self.hosts()
            .into_iter()
            .find(|h| h["host_id"] == host_id)
            .map(|h| h["state"].as_str().unwrap_or_default().to_string())
    }
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        kill9(&mut self.child);
        if std::thread::panicking() {
            eprintln!("----- coordinator log -----\n{}", self.log());
        }
    }
}

/// A `berth-agent` with its own state directory.
#[derive(Debug)]
pub struct AgentProc {
    pub host_id: String,
    pub dir: TempDir,
    pub netns: Option<String>,
    /// The `berth-agent` executable run (the workspace's, unless a test measures another
    /// build of it).
    pub program: PathBuf,
    child: Option<Child>,
    uses_docker: bool,
    /// Appended to the agent config (e.g. an `[egress]` section).
    pub extra_config: String,
    /// Added to the daemon's environment.
    pub env: Vec<(String, String)>,
}

impl AgentProc {
    /// This agent's own nftables table, so agents of concurrent tests never touch each
    /// other's rules (the default `berth` table is for one agent per host).
    pub fn nft_table(&self) -> String {
        let mut t = format!("berth_{}", self.host_id.replace('-', "_"));
        t.truncate(32);
        t
    }

    /// An agent not yet enrolled (its state directory does not exist yet).
    pub fn enroll_fresh(_coordinator: &CoordinatorProc, host_id: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("berth-agent")
            .tempdir()
            .expect("tempdir");
        Self {
            host_id: host_id.into(),
            dir,
            netns: None,
            program: bin("berth-agent"),
            child: None,
            uses_docker: false,
            extra_config: String::new(),
            env: Vec::new(),
        }
    }

    /// Enrolls a new agent with a fresh token through `coordinators` (operator URLs, comma
    /// separated: a fleet's coordinators, whichever leads); panics if enrollment fails.
    pub fn enroll_through(
        coordinator: &CoordinatorProc,
        host_id: &str,
        coordinators: &str,
    ) -> Self {
        let me = Self::enroll_fresh(coordinator, host_id);
        let token = coordinator.token(host_id, "10m");
        let (ok, out, err) =
            run(me.enroll_command(coordinators, &token, &coordinator.endpoints.ca_fingerprint));
        assert!(ok, "enroll of {host_id} failed: {out}{err}");
        me
    }

    /// Enrolls a new agent with a fresh token; panics if enrollment fails.
    pub fn enroll(coordinator: &CoordinatorProc, host_id: &str, host: Option<&NetHost>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("berth-agent")
            .tempdir()
            .expect("tempdir");
        let me = Self {
            host_id: host_id.into(),
            dir,
            netns: host.map(|h| h.netns.clone()),
            program: bin("berth-agent"),
            child: None,
            uses_docker: false,
            extra_config: String::new(),
            env: Vec::new(),
        };
        let token = coordinator.token(host_id, "10m");
        let (ok, out, err) = run(me.enroll_command(
            &coordinator.operator_url(),
            &token,
            &coordinator.endpoints.ca_fingerprint,
        ));
        assert!(ok, "enroll of {host_id} failed: {out}{err}");
        me
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `berth-agent enroll ...` for this agent's state directory.
    pub fn enroll_command(&self, coordinator_url: &str, token: &str, fingerprint: &str) -> Command {
        let mut cmd = command(self.netns.as_deref(), &self.program);
        cmd.args([
            "enroll",
            "--coordinator",
            coordinator_url,
            "--token",
            token,
            "--ca-fingerprint",
            fingerprint,
        ])
        .arg("--state-dir")
        .arg(self.state_dir());
        cmd
    }

    /// Writes the agent config and starts `berth-agent run`, reporting every second, without
    /// a Docker engine (tenants are reported failed, nothing is ever pulled).
    pub fn start(&mut self) {
        self.start_with_docker(false);
    }

    /// Starts the agent; with `docker`, on the real engine (its objects are removed on drop).
    pub fn start_with_docker(&mut self, docker: bool) {
        self.uses_docker |= docker;
        let config = self.dir.path().join("agent.toml");
        let socket = if docker {
            "/var/run/docker.sock".to_string()
        } else {
            self.dir.path().join("no-docker.sock").display().to_string()
        };
        let extra = if self.extra_config.contains("[egress]") {
            self.extra_config.clone()
        } else {
            format!("{}\n[egress]\ntenant_resolvers = []\n", self.extra_config)
        };
        let extra = if extra.contains("[restarts]") {
            extra
        } else {
            format!("{extra}\n[restarts]\n")
        };
        let extra = extra.replace(
            "[restarts]",
            &format!(
                "[restarts]\nwindow = \"{}\"\ntime_zone = \"UTC\"",
                quiet_window()
            ),
        );
        let table = self.nft_table();
        // Any free port; other hosts reach it inside their namespaces, never from outside.
        let transfer_listen = match self.netns {
            Some(_) => "0.0.0.0:0",
            None => "127.0.0.1:0",
        };
        let text = format!(
            "state_dir = {:?}\nprovider = \"hetzner\"\nregion = \"fsn1\"\ninstance_type = \"cx22\"\nmonthly_cost = 4.51\nreport_interval = \"1s\"\ndocker_socket = {socket:?}\nmetrics_listen = \"127.0.0.1:0\"\ntransfer_listen = \"{transfer_listen}\"\nvolume_root = {:?}\n{}",
            self.state_dir().display().to_string(),
            self.dir.path().join("volumes").display().to_string(),
            extra.replace("[egress]", &format!("[egress]\ntable = \"{table}\""))
        );
        fs::write(&config, text).expect("agent config");
        let mut cmd = command(self.netns.as_deref(), &self.program);
        cmd.arg("run").arg("--config").arg(&config);
        self.child = Some(spawn_logged(cmd, &self.log_path(), &self.env));
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The image file of `tenant`'s unencrypted volume on this host.
    pub fn volume_image(&self, tenant: &str) -> PathBuf {
        self.dir
            .path()
            .join("volumes/volumes")
            .join(format!("{tenant}.ext4"))
    }

    /// `http://127.0.0.1:PORT/metrics` (in the agent's namespace), from the agent's log: it
    /// listens on a port of its own choosing so concurrent agents never collide.
    pub fn metrics_url(&self) -> String {
        wait_for(
            "the agent's metrics address",
            Duration::from_secs(10),
            || {
                let log = self.log();
                let start = log.find("metrics on http://")? + "metrics on ".len();
                let rest = &log[start..];
                Some(rest[..rest.find("/metrics")? + "/metrics".len()].to_string())
            },
        )
    }

    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }
}

/// The mount points under `dir` in this process's mount namespace, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

/// Whether a filesystem is mounted at `path` (in this process's mount namespace, where the
/// agent mounts volumes for Docker to see).
pub fn mounted_at(path: &Path) -> bool {
    mounts_under(path.parent().unwrap_or(Path::new("/"))).contains(&path.to_path_buf())
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        kill9(&mut self.child);
        if self.uses_docker {
            crate::docker::remove_host_objects(&self.host_id);
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", "inet", &self.nft_table()])
                .output();
        }
        // The tenants' volumes the agent left mounted (their loop devices go with them), so
        // the state directory can be removed.
        for point in mounts_under(self.dir.path()) {
            let _ = std::process::Command::new("umount").arg(&point).output();
        }
        if std::thread::panicking() {
            eprintln!("----- agent {} log -----\n{}", self.host_id, self.log());
        }
    }
}
