//! Several hosts for drain tests and the drain benchmark: a coordinator and agents on the real
//! Docker engine, each in its own network namespace, with helpers to put tenants with data on
//! one of them and to read placements and drains back through `berthctl`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::docker::{remove_host_objects, test_tenant_image};
use crate::fleet::unique;
use crate::netns::{NetHost, TestNet};
use crate::procs::{AgentProc, CoordinatorProc};
use crate::{missing_component, wait_for};

/// Every running berth container on the engine, as (tenant, host) label pairs.
pub fn running() -> Vec<(String, String)> {
    labelled(&["ps"])
}

/// Every berth network on the engine, as (tenant, host) label pairs.
pub fn networks() -> Vec<(String, String)> {
    labelled(&["network", "ls"])
}

/// The (tenant, host) labels of what the docker listing `command` shows with a tenant label.
fn labelled(command: &[&str]) -> Vec<(String, String)> {
    let out = Command::new("docker")
        .args(command)
        .args([
            "--filter",
            "label=berth.tenant",
            "--format",
            "{{.Label \"berth.tenant\"}} {{.Label \"berth.host\"}}",
        ])
        .output()
        .expect("docker");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (t, h) = l.split_once(' ')?;
            Some((t.to_string(), h.to_string()))
        })
        .collect()
}

/// One host: its agent and its namespace.
#[derive(Debug)]
pub struct Host {
    pub agent: AgentProc,
    pub net: Option<NetHost>,
}

impl Host {
    pub fn volume(&self, tenant: &str) -> std::path::PathBuf {
        self.agent.dir.path().join("volumes/plain").join(tenant)
    }

    /// The agent's nftables table, listed in its namespace.
    pub fn nft_table(&self) -> String {
        let mut cmd = match &self.net {
            Some(net) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.netns, "nft"]);
                c
            }
            None => Command::new("nft"),
        };
        let out = cmd
            .args(["list", "table", "inet"])
            .arg(self.agent.nft_table())
            .output()
            .expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.agent.kill9();
        remove_host_objects(&self.agent.host_id);
    }
}

pub fn sha256_file(path: &std::path::Path) -> String {
    hex_digest(&std::fs::read(path).unwrap())
}

pub fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn json(c: &CoordinatorProc, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = c.berthctl(&all);
    assert!(ok, "berthctl {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

pub fn drain_status(c: &CoordinatorProc, host: &str) -> serde_json::Value {
    json(c, &["drain-status", host])
}

/// Where each of `tenants` is placed, from the coordinator.
pub fn placed(c: &CoordinatorProc) -> BTreeMap<String, (String, String)> {
    json(c, &["tenants"])
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["tenant_id"].as_str().unwrap().to_string(),
                (
                    t["host_id"].as_str().unwrap().to_string(),
                    t["state"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// A coordinator and `n` agents on Docker, each in its own network namespace when
/// `namespaces` (else all on this host's); `None` (or a failure under BERTH_REQUIRE_REAL=1)
/// without them.
pub fn fleet(n: u8, namespaces: bool) -> Option<(Option<TestNet>, CoordinatorProc, Vec<Host>)> {
    fleet_configured(n, namespaces, "")
}

/// [`fleet`] with `coordinator_config` added to the coordinator's config file.
pub fn fleet_configured(
    n: u8,
    namespaces: bool,
    coordinator_config: &str,
) -> Option<(Option<TestNet>, CoordinatorProc, Vec<Host>)> {
    if namespaces && let Err(why) = crate::netns::available() {
        missing_component("network namespaces", &why);
        return None;
    }
    if let Err(why) = crate::docker::available() {
        missing_component("Docker engine", &why);
        return None;
    }
    let mut net = namespaces.then(|| TestNet::new().expect("test network"));
    let mut namespace = |i: u8| net.as_mut().map(|net| net.add_host(i).unwrap());
    let coordinator_net = namespace(1);
    // The tenants' egress rules name the test network's own (private) addresses.
    let coordinator = CoordinatorProc::start(
        coordinator_net.as_ref(),
        &format!("allow_private_egress = true\n{coordinator_config}"),
    );
    let hosts: Vec<Host> = (0..n)
        .map(|i| {
            let host = namespace(2 + i);
            let mut agent =
                AgentProc::enroll(&coordinator, &unique(&format!("h{i}x")), host.as_ref());
            agent.start_with_docker(true);
            Host { agent, net: host }
        })
        .collect();
    wait_for("ready hosts", Duration::from_secs(20), || {
        let h = coordinator.hosts();
        (h.len() == usize::from(n) && h.iter().all(|h| h["state"] == "ready")).then_some(())
    });
    Some((net, coordinator, hosts))
}

/// Places `count` tenants (64 MiB, an egress rule, an unencrypted volume) on `source` with the
/// `others` cordoned meanwhile, waits until they run, and writes `data_mib` MiB of random
/// data (`data.bin`) and a chat log into each volume. Returns each tenant's data digest.
pub fn tenants_on(
    coordinator: &CoordinatorProc,
    source: &Host,
    others: &[&str],
    count: usize,
    data_mib: usize,
) -> BTreeMap<String, String> {
    tenants_on_with(coordinator, source, others, count, data_mib, "")
}

/// [`tenants_on`] with `spec_tables` (TOML tables) added to each tenant's spec.
pub fn tenants_on_with(
    coordinator: &CoordinatorProc,
    source: &Host,
    others: &[&str],
    count: usize,
    data_mib: usize,
    spec_tables: &str,
) -> BTreeMap<String, String> {
    let image = test_tenant_image();
    let src = source.agent.host_id.as_str();
    for t in others {
        assert!(coordinator.berthctl(&["cordon", t]).0);
    }
    let tenants: Vec<String> = (0..count).map(|i| unique(&format!("d{i}t"))).collect();
    for tenant in &tenants {
        let spec = format!(
            "tenant_id = \"{tenant}\"\nimage = \"{image}\"\negress = [\"10.77.0.1:443\"]\n[resources]\nmemory = \"64MiB\"\ncpu_millicores = 100\nvolume = \"{}MiB\"\n[volume]\nencrypted = false\n{spec_tables}",
            2 * data_mib.max(32)
        );
        let path = coordinator.dir.path().join(format!("{tenant}.toml"));
        std::fs::write(&path, spec).unwrap();
        let (ok, _, err) = coordinator.berthctl(&["place", path.to_str().unwrap()]);
        assert!(ok, "{err}");
    }
    wait_for(
        "tenants running on the source",
        Duration::from_secs(60),
        || {
            let p = placed(coordinator);
            tenants
                .iter()
                .all(|t| p.get(t).is_some_and(|(h, s)| h == src && s == "running"))
                .then_some(())
        },
    );
    let mut data = BTreeMap::new();
    for tenant in &tenants {
        let mut bytes = vec![0u8; data_mib << 20];
        rand::fill(&mut bytes[..]);
        let volume = source.volume(tenant);
        std::fs::create_dir_all(volume.join("chats")).unwrap();
        std::fs::write(volume.join("data.bin"), &bytes).unwrap();
        std::fs::write(volume.join("chats/today.log"), format!("{tenant} says hi")).unwrap();
        data.insert(tenant.clone(), hex_digest(&bytes));
    }
    for t in others {
        assert!(coordinator.berthctl(&["uncordon", t]).0);
    }
    data
}
