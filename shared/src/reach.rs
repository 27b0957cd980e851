//! Which addresses a tenant's egress allowlist may name.
//!
//! Ensures: no allowlist entry, and no address an allowlisted name resolves to, reaches what
//! every host has and no tenant may touch — loopback, link-local (the cloud metadata service
//! at 169.254.169.254), multicast, reserved space; private ranges only where the fleet allows
//! them; tenant networks never; and no set of entries covers more than a configured share of
//! an address family (`0.0.0.0/1` + `128.0.0.0/1` is the whole Internet, too).

use std::net::IpAddr;

/// An address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Net {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Net {
    /// Parses `addr/prefix` (a bare address is one address).
    pub fn parse(value: &str) -> Option<Self> {
        let (addr, prefix) = match value.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = value.parse::<IpAddr>().ok()?;
                (a, width(a))
            }
        };
        (prefix <= width(addr)).then_some(Self { addr, prefix })
    }

    fn bits(self) -> u128 {
        match self.addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        }
    }

    /// The first `prefix` bits, left-aligned in the family's width.
    fn masked(self, prefix: u8) -> u128 {
        let w = width(self.addr);
        if prefix == 0 {
            return 0;
        }
        self.bits() >> (w - prefix)
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(self, other: Net) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4() && {
            let p = self.prefix.min(other.prefix);
            self.masked(p) == other.masked(p)
        }
    }

    /// Whether `other` lies inside this range.
    pub fn contains(self, other: Net) -> bool {
        self.prefix <= other.prefix && self.overlaps(other)
    }

    /// Addresses in the range, as a fraction of its family's space.
    fn share(self) -> f64 {
        (-f64::from(self.prefix)).exp2()
    }
}

fn width(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// Ranges no tenant may ever reach, whatever the configuration says, with why.
const NEVER: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\" (0.0.0.0/8)"),
    ("127.0.0.0/8", "loopback"),
    (
        "169.254.0.0/16",
        "link-local (the cloud metadata service is 169.254.169.254)",
    ),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved or broadcast"),
    ("::/127", "the unspecified or loopback address"),
    ("::ffff:0:0/96", "an IPv4-mapped address"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// Private ranges: reachable only where the fleet allows them (`allow_private_egress`).
const PRIVATE: &[(&str, &str)] = &[
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (RFC 6598)"),
    ("fc00::/7", "unique local (private IPv6)"),
];

fn first_overlap(table: &[(&str, &'static str)], net: Net) -> Option<&'static str> {
    table
        .iter()
        .find(|(range, _)| Net::parse(range).is_some_and(|r| r.overlaps(net)))
        .map(|(_, why)| *why)
}

/// Why `net` may never be reached by a tenant, if it touches such a range.
pub fn never_reachable(net: Net) -> Option<&'static str> {
    first_overlap(NEVER, net)
}

/// The fleet's rules for egress destinations (the coordinator's configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct ReachPolicy {
    /// Private ranges (RFC 1918, 100.64.0.0/10, fc00::/7) may be named.
    pub allow_private: bool,
    /// Every host's tenant networks: never reachable.
    pub tenant_networks: Vec<Net>,
    /// The most of an address family (0 to 1) a tenant's entries may cover together.
    pub max_share: f64,
}

impl Default for ReachPolicy {
    fn default() -> Self {
        Self {
            allow_private: false,
            tenant_networks: vec![Net::parse(DEFAULT_TENANT_NETWORKS).unwrap_or(Net {
                addr: IpAddr::from([10, 213, 0, 0]),
                prefix: 16,
            })],
            max_share: DEFAULT_MAX_SHARE,
        }
    }
}

/// The agents' default tenant subnet pool.
pub const DEFAULT_TENANT_NETWORKS: &str = "10.213.0.0/16";
/// A /8's worth of an address family.
pub const DEFAULT_MAX_SHARE: f64 = 1.0 / 256.0;

impl ReachPolicy {
    /// Why one entry's range may not be named, if it may not.
    pub fn refuse(&self, net: Net) -> Option<String> {
        if let Some(why) = never_reachable(net) {
            return Some(format!("{net} includes {why} addresses: never allowed"));
        }
        if let Some(tenants) = self.tenant_networks.iter().find(|t| t.overlaps(net)) {
            return Some(format!(
                "{net} overlaps the tenant networks {tenants}: never allowed"
            ));
        }
        if !self.allow_private
            && let Some(why) = first_overlap(PRIVATE, net)
        {
            return Some(format!(
                "{net} includes {why} addresses: allowed only with allow_private_egress = true in the coordinator's configuration"
            ));
        }
        None
    }

    /// Why a set of entries covers too much together, if it does: the share of each family
    /// their union covers, against `max_share`.
    pub fn refuse_union(&self, nets: &[Net]) -> Option<String> {
        for (v4, family) in [(true, "IPv4"), (false, "IPv6")] {
            let mut family_nets: Vec<Net> = nets
                .iter()
                .copied()
                .filter(|n| n.addr.is_ipv4() == v4)
                .collect();
            // Ranges nest or are disjoint: the union is the sum of those inside no other.
            family_nets.sort_by_key(|n| n.prefix);
            let mut outermost: Vec<Net> = Vec::new();
            for net in family_nets {
                if !outermost.iter().any(|o| o.contains(net)) {
                    outermost.push(net);
                }
            }
            let share: f64 = outermost.iter().map(|n| n.share()).sum();
            if share > self.max_share {
                return Some(format!(
                    "the entries cover {:.4} % of the {family} space together; at most {:.4} % (max_egress_share)",
                    share * 100.0,
                    self.max_share * 100.0
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Net {
        Net::parse(s).unwrap()
    }

    #[test]
    fn never_reachable_ranges_are_refused_whatever_the_policy() {
        let open = ReachPolicy {
            allow_private: true,
            tenant_networks: Vec::new(),
            max_share: 1.0,
        };
        for (entry, why) in [
            ("169.254.169.254", "link-local (the cloud metadata service"),
            ("169.0.0.0/8", "link-local"),
            ("127.0.0.1", "loopback"),
            ("0.0.0.0/1", "\"this network\""),
            ("224.0.0.251", "multicast"),
            ("255.255.255.255", "reserved or broadcast"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("::ffff:169.254.169.254", "IPv4-mapped"),
        ] {
            let refused = open.refuse(net(entry)).unwrap_or_default();
            assert!(refused.contains(why), "{entry}: {refused}");
            assert!(refused.ends_with("never allowed"), "{entry}: {refused}");
        }
        for entry in ["1.1.1.1", "10.1.2.3", "2606:4700::1111", "fd00:ec2::1"] {
            assert_eq!(open.refuse(net(entry)), None, "{entry}");
        }
    }

    #[test]
    fn private_ranges_need_the_fleets_word_and_tenant_networks_never_pass() {
        let closed = ReachPolicy::default();
        for entry in [
            "10.1.0.0/16",
            "172.20.1.1",
            "192.168.1.0/24",
            "100.64.0.1",
            "fd00:ec2::254",
        ] {
            let refused = closed.refuse(net(entry)).unwrap_or_default();
            assert!(
                refused.contains("allow_private_egress"),
                "{entry}: {refused}"
            );
        }
        let open = ReachPolicy {
            allow_private: true,
            ..ReachPolicy::default()
        };
        assert_eq!(open.refuse(net("10.1.0.0/16")), None);
        assert_eq!(
            open.refuse(net("10.213.0.0/16")).unwrap(),
            "10.213.0.0/16 overlaps the tenant networks 10.213.0.0/16: never allowed"
        );
        assert!(
            open.refuse(net("10.0.0.0/8"))
                .unwrap()
                .contains("tenant networks")
        );
        assert_eq!(closed.refuse(net("203.0.113.7")), None);
    }

    #[test]
    fn a_union_of_entries_is_held_to_the_share() {
        let p = ReachPolicy::default();
        // Two halves of the Internet are refused as one would be.
        let halves = [net("0.0.0.0/1"), net("128.0.0.0/1")];
        assert!(
            p.refuse_union(&halves)
                .unwrap()
                .contains("100.0000 % of the IPv4 space")
        );
        // Nested entries count once; a /8 is the most by default.
        assert_eq!(
            p.refuse_union(&[net("11.0.0.0/8"), net("11.1.0.0/16")]),
            None
        );
        let two = p
            .refuse_union(&[net("11.0.0.0/8"), net("12.0.0.0/8")])
            .unwrap();
        assert_eq!(
            two,
            "the entries cover 0.7812 % of the IPv4 space together; at most 0.3906 % (max_egress_share)"
        );
        assert!(p.refuse_union(&[net("2000::/7")]).unwrap().contains("IPv6"));
        assert_eq!(p.refuse_union(&[net("2606:4700::/32")]), None);
    }
}
