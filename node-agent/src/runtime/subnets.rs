//! Address space for tenant networks. Docker's default pools hold only 31 bridge networks, and
//! berth gives every tenant its own: the agent allocates each a /28 from its own pool instead.

use std::net::Ipv4Addr;

/// Prefix length of one tenant network: 11 usable addresses, plenty for one container.
pub const TENANT_PREFIX: u8 = 28;

/// An IPv4 pool such as `10.213.0.0/16`.
/// A subnet pool setting that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {why}")]
pub struct BadPool {
    pub field: String,
    pub value: String,
    pub why: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPool {
    base: u32,
    prefix: u8,
}

impl SubnetPool {
    /// Parses `a.b.c.d/n` with n ≤ 28; `field` names it in errors.
    pub fn parse(field: &str, value: &str) -> Result<Self, BadPool> {
        let bad = |why: &'static str| BadPool {
            field: field.to_string(),
            value: value.chars().take(64).collect(),
            why,
        };
        let (addr, prefix) = value
            .split_once('/')
            .ok_or_else(|| bad("expected an IPv4 CIDR such as 10.213.0.0/16"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("not a prefix length"))?;
        if !(8..=TENANT_PREFIX).contains(&prefix) {
            return Err(bad("prefix length must be 8 to 28"));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Self {
            base: u32::from(addr) & mask,
            prefix,
        })
    }

    /// The first /28 of the pool that overlaps none of `used` (CIDR strings as Docker reports
    /// them, for every network on the engine; IPv6 ones cannot overlap and are ignored).
    pub fn next_free(&self, used: &[String]) -> Option<String> {
        let used: Vec<(u32, u32)> = used.iter().filter_map(|u| range(u)).collect();
        let count = 1u32 << (TENANT_PREFIX - self.prefix);
        let step = 1u32 << (32 - TENANT_PREFIX);
        (0..count)
            .map(|i| self.base + i * step)
            .find(|start| {
                let end = start + step - 1;
                !used.iter().any(|(a, b)| *a <= end && *start <= *b)
            })
            .map(|start| format!("{}/{TENANT_PREFIX}", Ipv4Addr::from(start)))
    }
}

/// First and last address of an IPv4 CIDR.
fn range(cidr: &str) -> Option<(u32, u32)> {
    let (addr, prefix) = cidr.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let prefix: u32 = prefix.parse().ok().filter(|p| *p <= 32)?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    let start = u32::from(addr) & mask;
    Some((start, start | !mask))
}

impl Default for SubnetPool {
    fn default() -> Self {
        Self {
            base: u32::from(Ipv4Addr::new(10, 213, 0, 0)),
            prefix: 16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_the_first_free_slice() {
        let pool = SubnetPool::parse("tenant_subnets", "10.213.0.0/16").unwrap();
        assert_eq!(pool.next_free(&[]).as_deref(), Some("10.213.0.0/28"));
        assert_eq!(
            pool.next_free(&["10.213.0.0/28".into()]).as_deref(),
            Some("10.213.0.16/28")
        );
        let small = SubnetPool::parse("tenant_subnets", "192.168.7.0/27").unwrap();
        assert_eq!(
            small.next_free(&["192.168.7.0/28".into(), "192.168.7.16/28".into()]),
            None,
            "exhausted"
        );
    }

    #[test]
    fn bad_pools_name_the_field() {
        for (bad, why) in [
            ("10.0.0.0", "expected an IPv4 CIDR"),
            ("x/16", "not an IPv4 address"),
            ("10.0.0.0/30", "8 to 28"),
            ("::/16", "not an IPv4"),
        ] {
            let err = SubnetPool::parse("tenant_subnets", bad)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("invalid tenant_subnets") && err.contains(why),
                "{err}"
            );
        }
    }
}
