//! One coordinator and one agent on the real Docker engine, with helpers to place the test
//! tenant and read its state back through `berthctl`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

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
    if let Err(why) = crate::docker::available() {
        missing_component("Docker engine", &why);
        return None;
    }
    let image = test_tenant_image();
    let coordinator = CoordinatorProc::start(None, "");
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
        let spec = format!(
            "tenant_id = \"{tenant}\"\nimage = \"{}\"\negress = {egress:?}\n[resources]\nmemory = \"{memory}\"\ncpu_millicores = {cpu_millicores}\nvolume = \"64MiB\"\n[volume]\nencrypted = false\n",
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

    pub fn wait_running(&self, tenant: &str, within: Duration) -> serde_json::Value {
        wait_for(&format!("{tenant} running"), within, || {
            self.tenant(tenant).filter(|t| t["state"] == "running")
        })
    }
}

/// The body of `GET path` on 127.0.0.1:`port`, or `None` when nothing answered.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}
