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
    // Unique per call: tests of one binary probe concurrently.
    let probe = format!(
        "bprobe{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
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

/// A namespace routed from the host (not bridged): the host side of its veth pair has
/// `10.231.<n>.1`, the namespace `.2` and `.3`, so containers on the host reach its servers
/// through the host's forwarding, as they would reach the Internet. Dropping it kills its
/// servers and deletes the namespace (and so the veth pair).
#[derive(Debug)]
pub struct RoutedNet {
    pub netns: String,
    /// `10.231.<n>`.
    pub prefix: String,
    /// The host side of the veth pair.
    host_if: String,
    servers: Vec<std::process::Child>,
}

impl RoutedNet {
    pub fn new() -> Result<Self, String> {
        let n = (std::process::id() + NEXT.fetch_add(1, Ordering::SeqCst) * 7) % 250 + 1;
        let netns = format!("broute{n}");
        let prefix = format!("10.231.{n}");
        let (host_if, ns_if) = (format!("vr{n}h"), format!("vr{n}n"));
        ip(&["netns", "add", &netns])?;
        let me = Self {
            netns: netns.clone(),
            prefix: prefix.clone(),
            host_if: host_if.clone(),
            servers: Vec::new(),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &netns])?;
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        for last in [2, 3] {
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{prefix}.{last}/24"),
                "dev",
                &ns_if,
            ])?;
        }
        ip(&["-n", &netns, "link", "set", &ns_if, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        Ok(me)
    }

    /// `10.231.<n>.<last>` (1 is the host, 2 and 3 the namespace).
    pub fn address(&self, last: u8) -> String {
        format!("{}.{last}", self.prefix)
    }

    /// The namespace as a host for processes of a test, at `10.231.<n>.<last>` (2 or 3).
    pub fn host(&self, last: u8) -> NetHost {
        NetHost {
            netns: self.netns.clone(),
            address: self.address(last),
            veth_hub: self.host_if.clone(),
        }
    }

    /// Cuts the namespace off (the host side of its veth down: packets to and from it are
    /// lost, nothing is refused), or connects it again.
    pub fn set_link(&self, up: bool) -> Result<(), String> {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }])
    }

    /// Runs `program` in the namespace with `PORT=port` (the test tenant binary serves HTTP).
    pub fn serve(&mut self, program: &std::path::Path, port: u16) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(program)
            .env("PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("server in the routed namespace");
        self.servers.push(child);
    }
}

impl Drop for RoutedNet {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = ip(&["netns", "del", &self.netns]);
    }
}
