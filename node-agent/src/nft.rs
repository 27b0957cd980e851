//! berth's nftables table, `inet berth`, generated as text and loaded with `nft -f -` in one
//! transaction (all or nothing). berth never flushes the ruleset or touches another table:
//! dockerd keeps its own `ip nat` / `ip filter` tables through iptables-nft.
//!
//! Tenant traffic is matched by source address (the tenant network's /28): with br_netfilter
//! on, bridged traffic reaches the `inet` forward hook with the bridge as `iifname`, not the
//! container's veth. Per tenant: a chain `t_<digest>` and a set `t_<digest>_allow` of
//! (address or CIDR . protocol . port) elements with a counter each, so operators can see which
//! allowlist entries are used.
//!
//! Status: the ruleset generation and its loading are built and tested against the real `nft`;
//! the agent does not install these rules yet (see `reconcile::EgressNotBuilt`).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use berth_shared::ids::TenantId;
use berth_shared::spec::Protocol;
use sha2::{Digest, Sha256};

use crate::command::{CommandError, run_command_with_input};

pub const TABLE: &str = "berth";

/// One allowed destination, resolved to addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// `a.b.c.d` or `a.b.c.d/n`.
    pub cidr: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// Everything the ruleset needs about one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRules {
    pub tenant: TenantId,
    /// The tenant network's IPv4 subnet (IPv6 is disabled on tenant networks).
    pub subnet: String,
    pub allowed: Vec<Allowed>,
    /// DNS resolvers the tenant may query (port 53, UDP and TCP).
    pub resolvers: Vec<Ipv4Addr>,
}

/// Chain name of a tenant: a digest, so names stay short and uniform.
pub fn chain(tenant: &TenantId) -> String {
    format!(
        "t_{}",
        &hex::encode(Sha256::digest(tenant.as_str().as_bytes()))[..13]
    )
}

fn elements(t: &TenantRules) -> Vec<String> {
    let proto = |p: Protocol| match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    let mut out: Vec<String> = t
        .allowed
        .iter()
        .map(|a| format!("{} . {} . {}", a.cidr, proto(a.protocol), a.port))
        .collect();
    for r in &t.resolvers {
        out.push(format!("{r} . udp . 53"));
        out.push(format!("{r} . tcp . 53"));
    }
    out
}

/// The tenant's chain and set, replaced atomically: the set is flushed and refilled in the
/// same transaction, so no packet sees an empty allowlist, and established connections pass
/// the `ct state` rule before the set is consulted.
fn tenant_body(out: &mut String, t: &TenantRules) {
    let c = chain(&t.tenant);
    let _ = writeln!(
        out,
        "add set inet {TABLE} {c}_allow {{ type ipv4_addr . inet_proto . inet_service; flags interval; counter; }}"
    );
    let _ = writeln!(out, "flush set inet {TABLE} {c}_allow");
    let els = elements(t);
    if !els.is_empty() {
        let _ = writeln!(
            out,
            "add element inet {TABLE} {c}_allow {{ {} }}",
            els.join(", ")
        );
    }
    let _ = writeln!(out, "add chain inet {TABLE} {c}");
    let _ = writeln!(out, "flush chain inet {TABLE} {c}");
    let _ = writeln!(
        out,
        "add rule inet {TABLE} {c} ct state established,related accept"
    );
    let _ = writeln!(
        out,
        "add rule inet {TABLE} {c} ip daddr . meta l4proto . th dport @{c}_allow accept"
    );
    let _ = writeln!(
        out,
        "add rule inet {TABLE} {c} counter reject with icmpx admin-prohibited"
    );
}

/// The whole table for `tenants`: base chains dispatching by source subnet, then each tenant's
/// chain and set. Tenants reach neither the host itself (input hook) nor each other (their
/// chains only accept allowlisted destinations).
pub fn full_ruleset(tenants: &[TenantRules]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "add table inet {TABLE}");
    // Declared before flushed so the first load works too.
    let _ = writeln!(
        out,
        "add chain inet {TABLE} forward {{ type filter hook forward priority filter - 10; policy accept; }}"
    );
    let _ = writeln!(
        out,
        "add chain inet {TABLE} input {{ type filter hook input priority filter - 10; policy accept; }}"
    );
    let _ = writeln!(out, "flush chain inet {TABLE} forward");
    let _ = writeln!(out, "flush chain inet {TABLE} input");
    for t in tenants {
        tenant_body(&mut out, t);
        let c = chain(&t.tenant);
        let _ = writeln!(
            out,
            "add rule inet {TABLE} forward ip saddr {} jump {c}",
            t.subnet
        );
        // To the host itself (the agent, the Docker API, other tenants' published ports):
        // only replies to connections the host opened.
        let _ = writeln!(
            out,
            "add rule inet {TABLE} input ip saddr {} ct state established,related accept",
            t.subnet
        );
        let _ = writeln!(
            out,
            "add rule inet {TABLE} input ip saddr {} counter reject with icmpx admin-prohibited",
            t.subnet
        );
    }
    out
}

/// Runs nft scripts (a trait so unit tests record instead of changing the host).
pub trait Nft: Send + Sync + std::fmt::Debug {
    fn apply(&self, script: &str) -> Result<(), CommandError>;
}

/// The real `nft` binary, optionally inside a network namespace (tests).
#[derive(Debug, Clone, Default)]
pub struct NftCommand {
    pub netns: Option<String>,
}

impl Nft for NftCommand {
    fn apply(&self, script: &str) -> Result<(), CommandError> {
        let timeout = Duration::from_secs(10);
        match &self.netns {
            Some(ns) => run_command_with_input(
                "ip",
                &["netns", "exec", ns, "nft", "-f", "-"],
                Some(script.as_bytes()),
                timeout,
            )
            .map(drop),
            None => run_command_with_input("nft", &["-f", "-"], Some(script.as_bytes()), timeout)
                .map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn rules(tenant: &str, subnet: &str) -> TenantRules {
        TenantRules {
            tenant: TenantId::new(tenant).unwrap(),
            subnet: subnet.into(),
            allowed: vec![
                Allowed {
                    cidr: "203.0.113.0/24".into(),
                    protocol: Protocol::Tcp,
                    port: 443,
                },
                Allowed {
                    cidr: "198.51.100.7".into(),
                    protocol: Protocol::Udp,
                    port: 123,
                },
            ],
            resolvers: vec![Ipv4Addr::new(192, 0, 2, 53)],
        }
    }

    #[test]
    fn ruleset_shape() {
        let text = full_ruleset(&[rules("acme", "10.213.0.0/28")]);
        let c = chain(&TenantId::new("acme").unwrap());
        assert!(c.len() <= 15);
        assert!(text.contains(&format!(
            "add rule inet berth forward ip saddr 10.213.0.0/28 jump {c}"
        )));
        assert!(text.contains(&format!("add element inet berth {c}_allow {{ 203.0.113.0/24 . tcp . 443, 198.51.100.7 . udp . 123, 192.0.2.53 . udp . 53, 192.0.2.53 . tcp . 53 }}")));
        assert!(text.contains("ct state established,related accept"));
        assert!(text.contains("counter reject with icmpx admin-prohibited"));
        assert!(
            !text.contains("flush ruleset"),
            "never flush what is not berth's"
        );
        assert!(
            text.lines().all(|l| l.contains("inet berth")),
            "only berth's table"
        );
    }

    /// Loads the ruleset with the real nft, in a network namespace made for the test, twice
    /// (idempotent), and reads it back.
    #[test]
    fn the_real_nft_accepts_it() {
        let root = nix::unistd::Uid::effective().is_root();
        let have_nft = std::process::Command::new("nft")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !root || !have_nft {
            assert!(
                std::env::var("BERTH_REQUIRE_REAL").ok().as_deref() != Some("1"),
                "nft and root are required (BERTH_REQUIRE_REAL=1)"
            );
            eprintln!("SKIPPED: needs root and nft");
            return;
        }
        let ns = format!("bnft{}", std::process::id());
        assert!(
            std::process::Command::new("ip")
                .args(["netns", "add", &ns])
                .status()
                .unwrap()
                .success()
        );
        let nft = NftCommand {
            netns: Some(ns.clone()),
        };
        let script = full_ruleset(&[
            rules("acme", "10.213.0.0/28"),
            rules("beta", "10.213.0.16/28"),
        ]);
        let first = nft.apply(&script);
        let second = nft.apply(&script);
        let listed = std::process::Command::new("ip")
            .args([
                "netns", "exec", &ns, "nft", "list", "table", "inet", "berth",
            ])
            .output()
            .unwrap();
        let broken = nft.apply("add rule inet berth nosuchchain accept\n");
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .status();
        first.unwrap();
        second.unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert_eq!(listed.matches("jump t_").count(), 2, "{listed}");
        assert!(
            listed.contains("203.0.113.0/24 . tcp . 443 counter packets 0"),
            "{listed}"
        );
        let err = broken.unwrap_err().to_string();
        assert!(err.starts_with("ip exited with"), "{err}");
        assert!(
            err.contains("nosuchchain"),
            "nft's own message is kept: {err}"
        );
    }
}
