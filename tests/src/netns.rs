//! Several "hosts" on one machine: a hub namespace holding a bridge, and one namespace per
//! host joined to it by a veth pair, each with its own address in 10.77.0.0/24. The addresses
//! exist only inside namespaces this test made, so nothing outside is ever reached.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Checks that namespaces can be made here; the error says why not.
pub fn available() -> Result<(), String> {
    if !crate::is_root() {
        return Err("network namespaces need root".into());
    }
    let probe = format!("bprobe{}", std::process::id());
    ip(&["netns", "add", &probe])?;
    ip(&["netns", "del", &probe])
}

/// A test network; dropping it deletes every namespace (and so every veth) it made.
#[derive(Debug)]
pub struct TestNet {
    prefix: String,
    hub: String,
    hosts: Vec<String>,
}

/// One host's namespace and address.
#[derive(Debug, Clone)]
pub struct NetHost {
    pub netns: String,
    pub address: String,
    veth_hub: String,
}

impl TestNet {
    pub fn new() -> Result<Self, String> {
        let prefix = format!(
            "b{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let hub = format!("{prefix}hub");
        ip(&["netns", "add", &hub])?;
        let net = Self {
            prefix,
            hub,
            hosts: Vec::new(),
        };
        ip(&["-n", &net.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &net.hub, "link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// Adds host number `index` (1..=250) at 10.77.0.<index>.
    pub fn add_host(&mut self, index: u8) -> Result<NetHost, String> {
        let netns = format!("{}h{index}", self.prefix);
        let veth_host = format!("{}v{index}", self.prefix);
        let veth_hub = format!("{}p{index}", self.prefix);
        ip(&["netns", "add", &netns])?;
        self.hosts.push(netns.clone());
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &netns, "link", "add", &veth_host, "type", "veth", "peer", "name", &veth_hub,
            "netns", &self.hub,
        ])?;
        ip(&["-n", &netns, "link", "set", &veth_host, "name", "eth0"])?;
        let address = format!("10.77.0.{index}");
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &self.hub, "link", "set", &veth_hub, "master", "br0"])?;
        ip(&["-n", &self.hub, "link", "set", &veth_hub, "up"])?;
        Ok(NetHost {
            netns,
            address,
            veth_hub,
        })
    }

    /// Cuts a host off the network (its cable pulled), or plugs it back in.
    pub fn set_link(&self, host: &NetHost, up: bool) -> Result<(), String> {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &host.veth_hub,
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
