//! One coordinator and one agent on the real Docker engine, with helpers to place the test
//! tenant and read its state back through `berthctl`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use berth_node_agent::restarts::schedule::slot_on;
use berth_shared::ids::TenantId;
use berth_shared::spec::Window;
use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::docker::test_tenant_image;
use crate::procs::{AgentProc, CoordinatorProc};
use crate::{missing_component, wait_for};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call (containers are global on the engine).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

#[derive(Debug)]
pub struct Fleet {
    pub coordinator: CoordinatorProc,
    pub agent: AgentProc,
    pub image: String,
}

/// `None` (or a failure under BERTH_REQUIRE_REAL=1) without a Docker engine.
pub fn fleet() -> Option<Fleet> {
    fleet_with("")
}

/// [`fleet`] with `agent_config` appended to the agent's configuration.
pub fn fleet_with(agent_config: &str) -> Option<Fleet> {
    fleet_configured("", agent_config)
}

/// [`fleet`] with `coordinator_config` and `agent_config` appended to the configurations.
pub fn fleet_configured(coordinator_config: &str, agent_config: &str) -> Option<Fleet> {
    if let Err(why) = crate::docker::available() {
        missing_component("Docker engine", &why);
        return None;
    }
    let image = test_tenant_image();
    // Tests reach only servers of their own, on private addresses they made.
    let coordinator = CoordinatorProc::start(
        None,
        &format!("allow_private_egress = true\n{coordinator_config}"),
    );
    let mut agent = AgentProc::enroll(&coordinator, &unique("ct"), None);
    agent.extra_config = agent_config.into();
    agent.start_with_docker(true);
    let host = agent.host_id.clone();
    wait_for("the agent ready", Duration::from_secs(10), || {
        (coordinator.host_state(&host).as_deref() == Some("ready")).then_some(())
    });
    Some(Fleet {
        coordinator,
        agent,
        image,
    })
}

impl Fleet {
    /// The Docker network of `tenant` on this fleet's host.
    pub fn network(&self, tenant: &str) -> String {
        berth_node_agent::runtime::container_spec::network_name(
            &berth_shared::ids::HostId::new(&self.agent.host_id).unwrap(),
            &TenantId::new(tenant).unwrap(),
        )
    }

    /// The Linux bridge of `tenant`'s network on this fleet's host.
    pub fn bridge(&self, tenant: &str) -> String {
        berth_node_agent::runtime::container_spec::bridge_name(
            &berth_shared::ids::HostId::new(&self.agent.host_id).unwrap(),
            &TenantId::new(tenant).unwrap(),
        )
    }

    /// What lies between 127.0.0.1:`port` and `tenant`'s gateway, for a failure message: the
    /// container's address and state as Docker sees them, the host's route and neighbour
    /// entries towards it, the bridge's ports and who listens on the published port.
    pub fn path_report(&self, tenant: &str, port: u16) -> String {
        let bridge = self.bridge(tenant);
        let container = crate::docker::inspect(&self.container(tenant));
        let endpoint = container
            .as_ref()
            .map(|c| c["NetworkSettings"]["Networks"][self.network(tenant)].clone());
        let address = endpoint
            .as_ref()
            .and_then(|e| e["IPAddress"].as_str().map(String::from))
            .unwrap_or_default();
        let run = |program: &str, args: &[&str]| {
            let out = std::process::Command::new(program).args(args).output();
            match out {
                Ok(o) => format!(
                    "$ {program} {}\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => format!("$ {program}: {e}\n"),
            }
        };
        let sport = format!("sport = :{port}");
        [
            format!(
                "container state {} endpoint {}\n",
                container
                    .as_ref()
                    .map_or("gone".into(), |c| c["State"].to_string()),
                endpoint.map_or("none".into(), |e| e.to_string())
            ),
            run("ip", &["route", "get", &address]),
            run("ip", &["neigh", "show", "dev", &bridge]),
            run("ip", &["-br", "link", "show", "master", &bridge]),
            run(
                "ip",
                &[
                    "-br",
                    "addr",
                    "show",
                    "to",
                    &format!(
                        "{address}/{}",
                        berth_node_agent::runtime::subnets::TENANT_PREFIX
                    ),
                ],
            ),
            run("ss", &["-ltnpH", &sport]),
        ]
        .concat()
    }

    /// The Docker container of `tenant` on this fleet's host.
    pub fn container(&self, tenant: &str) -> String {
        crate::docker::container_name(&self.agent.host_id, tenant)
    }

    pub fn place(&self, tenant: &str, memory: &str) -> Instant {
        self.place_with_cpu(tenant, memory, 250)
    }

    pub fn place_with_cpu(&self, tenant: &str, memory: &str, cpu_millicores: u32) -> Instant {
        self.place_spec(tenant, memory, cpu_millicores, &[])
    }

    /// Places the test tenant with an egress allowlist (`destination:port[/udp]` entries).
    pub fn place_spec(
        &self,
        tenant: &str,
        memory: &str,
        cpu_millicores: u32,
        egress: &[&str],
    ) -> Instant {
        self.place_toml(tenant, memory, (cpu_millicores, 0), egress, "")
    }

    /// Places the test tenant (128 MiB) with nightly restarts in `window`, UTC.
    pub fn place_with_window(&self, tenant: &str, window: &str) -> Instant {
        self.place_toml(
            tenant,
            "128MiB",
            (250, 0),
            &[],
            &format!("[restart]\nwindow = \"{window}\"\ntime_zone = \"UTC\"\n"),
        )
    }

    /// [`Fleet::place_spec`] with `tables` (TOML tables such as `[restart]`) added to the spec,
    /// and a CPU request and limit (`cpu`: millicores; a limit of 0 is none).
    pub fn place_toml(
        &self,
        tenant: &str,
        memory: &str,
        cpu: (u32, u32),
        egress: &[&str],
        tables: &str,
    ) -> Instant {
        let (cpu_millicores, cpu_limit_millicores) = cpu;
        let spec = format!(
            "tenant_id = \"{tenant}\"\nimage = \"{}\"\negress = {egress:?}\n[resources]\nmemory = \"{memory}\"\ncpu_millicores = {cpu_millicores}\ncpu_limit_millicores = {cpu_limit_millicores}\nvolume = \"64MiB\"\n[volume]\nencrypted = false\n{tables}",
            self.image
        );
        let path = self.coordinator.dir.path().join(format!("{tenant}.toml"));
        std::fs::write(&path, spec).unwrap();
        let (ok, _, err) = self
            .coordinator
            .berthctl(&["place", path.to_str().unwrap()]);
        let replied = Instant::now();
        assert!(ok, "{err}");
        replied
    }

    pub fn tenant(&self, tenant: &str) -> Option<serde_json::Value> {
        let (ok, out, err) = self.coordinator.berthctl(&["tenants", "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .unwrap()
            .into_iter()
            .find(|t| t["tenant_id"] == tenant)
    }

    /// Waits until `tenant`'s container started again after `before` (Docker's StartedAt), then
    /// until the agent reports that nightly restart done; returns the new start and the view.
    pub fn wait_nightly_restart(
        &self,
        tenant: &str,
        before: &str,
        within: Duration,
    ) -> (String, serde_json::Value) {
        let container = self.container(tenant);
        let started = wait_for(&format!("{tenant} restarted"), within, || {
            Some(crate::docker::started_at(&container)).filter(|s| !s.is_empty() && s != before)
        });
        let view = wait_for(
            &format!("{tenant}'s restart reported"),
            Duration::from_secs(30),
            || {
                self.tenant(tenant).filter(|t| {
                    t["restart_note"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("nightly restart at"))
                })
            },
        );
        (started, view)
    }

    pub fn wait_running(&self, tenant: &str, within: Duration) -> serde_json::Value {
        wait_for(&format!("{tenant} running"), within, || {
            self.tenant(tenant).filter(|t| t["state"] == "running")
        })
    }

    /// Waits until `tenant` runs and its gateway answers (the agent's health check passed
    /// since its container started): a test that talks to the gateway starts there, not at
    /// "running", which Docker's start alone makes true.
    pub fn wait_serving(&self, tenant: &str, within: Duration) -> serde_json::Value {
        wait_for(&format!("{tenant} running and healthy"), within, || {
            self.tenant(tenant)
                .filter(|t| t["state"] == "running" && t["healthy"] == true)
        })
    }
}

/// The body of `GET path` on 127.0.0.1:`port`, or `None` when nothing answered.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_get_within(port, path, Duration::from_secs(5))
}

/// [`http_get`] that gives up after `timeout` (connect and read each).
pub fn http_get_within(port: u16, path: &str, timeout: Duration) -> Option<String> {
    http_get_at(([127, 0, 0, 1], port).into(), path, timeout)
}

/// [`http_get_within`] at `address`.
pub fn http_get_at(address: SocketAddr, path: &str, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&address, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// A tenant id starting with `prefix` and a UTC window (opening this minute, 3 minutes long)
/// that puts its nightly slot between `from` and `to` from now: the agent's own slot
/// arithmetic, so a real nightly restart can be watched without waiting for the night.
pub fn nightly_slot_soon(
    prefix: &str,
    from: Duration,
    to: Duration,
) -> (String, String, Timestamp) {
    let now = Timestamp::now();
    let opens = now
        .round(
            jiff::TimestampRound::new()
                .smallest(jiff::Unit::Minute)
                .mode(jiff::RoundMode::Trunc),
        )
        .unwrap();
    let utc = TimeZone::UTC;
    let start = utc.to_datetime(opens);
    let end = utc.to_datetime(
        opens
            .checked_add(jiff::SignedDuration::from_mins(3))
            .unwrap(),
    );
    let window: Window = format!(
        "{:02}:{:02}-{:02}:{:02}",
        start.hour(),
        start.minute(),
        end.hour(),
        end.minute()
    )
    .parse()
    .unwrap();
    let (earliest, latest) = (
        now.checked_add(jiff::SignedDuration::try_from(from).unwrap())
            .unwrap(),
        now.checked_add(jiff::SignedDuration::try_from(to).unwrap())
            .unwrap(),
    );
    for i in 0..10_000 {
        let tenant = format!("{prefix}s{i}");
        let slot = slot_on(&TenantId::new(&tenant).unwrap(), window, &utc, start.date()).unwrap();
        if slot.at >= earliest && slot.at <= latest {
            return (tenant, window.to_string(), slot.at);
        }
    }
    panic!("no tenant id with a slot between {from:?} and {to:?} from now")
}

/// Polls the tenant's health endpoint every 10 ms on a thread until stopped; returns the
/// longest time it did not answer.
#[derive(Debug)]
pub struct Outage {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Duration>>,
}

impl Outage {
    pub fn watch(port: u16) -> Self {
        Self::watch_at(([127, 0, 0, 1], port).into())
    }

    /// [`Outage::watch`] of the gateway at `address`.
    pub fn watch_at(address: SocketAddr) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut longest = Duration::ZERO;
            let mut down_since: Option<Instant> = None;
            while !flag.load(Ordering::SeqCst) {
                let up = http_get_at(address, "/healthz", Duration::from_millis(500)).as_deref()
                    == Some("ok\n");
                match (up, down_since) {
                    (false, None) => down_since = Some(Instant::now()),
                    (true, Some(since)) => {
                        longest = longest.max(since.elapsed());
                        down_since = None;
                    }
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // Still down when stopped: that counts too.
            longest.max(down_since.map_or(Duration::ZERO, |s| s.elapsed()))
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching; the longest outage seen.
    pub fn stop(mut self) -> Duration {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}
