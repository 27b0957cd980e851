//! berth's nftables table (`inet berth` unless configured otherwise): the scripts that change
//! it, each loaded with `nft -f -` as one transaction (all or nothing), and the parser of its
//! JSON listing. berth never flushes the ruleset or touches another table: dockerd keeps its
//! own `ip nat` / `ip filter` tables through iptables-nft.
//!
//! Layout. Tenant traffic is matched by source address (the tenant network's /28): with
//! br_netfilter on, bridged traffic reaches the `inet` hooks with the bridge as `iifname`, not
//! the container's veth. Two verdict maps dispatch a tenant's subnet to its chains:
//! `tenant_fwd` (forward hook: traffic leaving the host or going to another tenant) to
//! `t_<digest>`, and `tenant_host` (input hook: traffic to the host itself) to
//! `t_<digest>_host`. The forward chain accepts replies of established connections, DNS to the
//! configured resolvers and whatever matches the tenant's set `t_<digest>_allow` of
//! (address or prefix . protocol . port) elements, each with its own counter, unless the
//! element is also in `t_<digest>_deny`; everything else is counted and rejected.
//!
//! Why the deny set: deleting a set element costs the kernel an RCU grace period (10–20 ms
//! here), adding one does not. So an update that removes entries adds them to the deny set, in
//! the same transaction as its additions, and takes effect at once; [`gc_script`] deletes the
//! withdrawn elements from both sets later, in a transaction that changes no verdict. The host chain accepts only replies and DNS to the resolvers.
//! IPv6 is disabled on tenant networks; IPv6 from a tenant bridge (`bt*`) is dropped anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use berth_shared::ids::TenantId;
use berth_shared::spec::Protocol;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::command::{CommandError, run_command_with_input};

pub const DEFAULT_TABLE: &str = "berth";

/// A table name nft scripts cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid egress.table {0:?}: 1 to 32 characters of a-z, 0-9 and _, starting with a letter")]
pub struct BadTableName(pub String);

/// What `nft -j list` printed and berth could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListingError {
    #[error("nft -j printed invalid JSON: {0}")]
    Json(String),
    #[error("nft -j printed no \"nftables\" array")]
    NoArray,
}

/// A table name: it is spliced into nft scripts, so only `[a-z][a-z0-9_]{0,31}`.
pub fn validate_table(name: &str) -> Result<(), BadTableName> {
    let ok = name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(BadTableName(name.to_string()))
    }
}

/// An IPv4 network, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Prefix {
    pub fn new(addr: Ipv4Addr, len: u8) -> Self {
        let len = len.min(32);
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        };
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len,
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text.split_once('/') {
            Some((a, l)) => Some(Self::new(
                a.parse().ok()?,
                l.parse().ok().filter(|l| *l <= 32)?,
            )),
            None => Some(Self::new(text.parse().ok()?, 32)),
        }
    }

    pub fn contains(&self, other: &Prefix) -> bool {
        other.len >= self.len && Prefix::new(other.addr, self.len).addr == self.addr
    }
}

impl std::fmt::Display for Prefix {
    /// nft's own spelling: a single address without `/32`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.len == 32 {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.len)
        }
    }
}

/// One element of a tenant's allowlist set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub net: Prefix,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} . {} . {}",
            self.net,
            self.protocol.as_str(),
            self.port
        )
    }
}

impl Element {
    /// Whether this element allows everything `other` does (same protocol and port, a prefix
    /// containing `other`'s).
    pub fn covers(&self, other: &Element) -> bool {
        self.protocol == other.protocol && self.port == other.port && self.net.contains(&other.net)
    }
}

/// Drops elements covered by another one: nft refuses overlapping intervals, and the covering
/// element already allows the traffic.
pub fn normalize(elements: impl IntoIterator<Item = Element>) -> BTreeSet<Element> {
    let all: BTreeSet<Element> = elements.into_iter().collect();
    all.iter()
        .filter(|e| !all.iter().any(|o| o != *e && o.covers(e)))
        .copied()
        .collect()
}

/// Chain name of a tenant: a digest, so names stay short and uniform whatever the id.
pub fn chain(tenant: &TenantId) -> String {
    format!(
        "t_{}",
        &hex::encode(Sha256::digest(tenant.as_str().as_bytes()))[..13]
    )
}

/// What one tenant's rules should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRules {
    pub chain: String,
    pub subnet: Prefix,
    pub elements: BTreeSet<Element>,
}

/// What the table holds for one tenant chain, read from the listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstalledTenant {
    pub fwd_subnet: Option<Prefix>,
    pub host_subnet: Option<Prefix>,
    pub has_set: bool,
    pub has_deny_set: bool,
    pub fwd_chain: bool,
    pub host_chain: bool,
    pub fwd_rules: usize,
    pub host_rules: usize,
    /// Forward rules that mark what they accept (a chain made before the forward guard has
    /// none, and is rebuilt).
    pub fwd_marked: usize,
    /// Packets counted per element of the allow set.
    pub elements: BTreeMap<Element, u64>,
    /// Elements withdrawn but not yet deleted from the allow set (see the module doc).
    pub withdrawn: BTreeSet<Element>,
    /// Packets rejected by the forward and host chains together.
    pub denied_packets: u64,
}

const FWD_RULES: usize = 5;
const FWD_MARKED: usize = 3;
const HOST_RULES: usize = 3;

impl InstalledTenant {
    /// What the table holds for the tenant once `tenant_script(_, want, before)` is applied:
    /// counters of kept elements carry over; elements `want` drops stay in the allow set,
    /// withdrawn behind the deny set, until [`gc_script`].
    pub fn after(want: &TenantRules, before: Option<&InstalledTenant>) -> Self {
        let kept = before.filter(|b| b.complete());
        let mut elements: BTreeMap<Element, u64> = want
            .elements
            .iter()
            .map(|e| {
                (
                    *e,
                    kept.and_then(|k| k.elements.get(e)).copied().unwrap_or(0),
                )
            })
            .collect();
        let mut withdrawn = BTreeSet::new();
        for (e, n) in kept.iter().flat_map(|k| &k.elements) {
            if !want.elements.contains(e) {
                elements.insert(*e, *n);
                withdrawn.insert(*e);
            }
        }
        Self {
            fwd_subnet: Some(want.subnet),
            host_subnet: Some(want.subnet),
            has_set: true,
            has_deny_set: true,
            fwd_chain: true,
            host_chain: true,
            fwd_rules: FWD_RULES,
            host_rules: HOST_RULES,
            fwd_marked: FWD_MARKED,
            elements,
            withdrawn,
            denied_packets: kept.map_or(0, |k| k.denied_packets),
        }
    }

    /// Packets counted for `e`: its own counter, or that of the element covering it.
    pub fn hits(&self, e: &Element) -> u64 {
        self.elements.get(e).copied().unwrap_or_else(|| {
            self.elements
                .iter()
                .find(|(o, _)| o.covers(e))
                .map_or(0, |(_, n)| *n)
        })
    }

    /// Everything in place, so only differences need applying.
    pub fn complete(&self) -> bool {
        self.has_set
            && self.has_deny_set
            && self.fwd_rules == FWD_RULES
            && self.fwd_marked == FWD_MARKED
            && self.host_rules == HOST_RULES
            && self.fwd_subnet.is_some()
            && self.fwd_subnet == self.host_subnet
    }
}

/// The table as listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// Base chains, maps and resolver set present with their rules.
    pub base_complete: bool,
    pub resolvers: BTreeSet<Ipv4Addr>,
    /// Keyed by chain name (`t_<digest>`).
    pub tenants: BTreeMap<String, InstalledTenant>,
}

/// The base of the table: resolver set, dispatch maps, hooked chains. Loaded on its own (nft
/// refuses, in one transaction, a new map whose elements jump to chains created after it).
/// The packet mark a tenant's forward rules put on what they let through; the forward guard
/// ([`crate::egress::guard`]) drops what leaves a tenant bridge without it, so traffic no tenant chain
/// judged (berth's table flushed or deleted) goes nowhere.
pub const ACCEPTED_MARK: u32 = 0x1000_0000;

pub fn base_script(table: &str, resolvers: &BTreeSet<Ipv4Addr>) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "add table inet {table}");
    let _ = writeln!(w, "add set inet {table} resolvers {{ type ipv4_addr; }}");
    for map in ["tenant_fwd", "tenant_host"] {
        let _ = writeln!(
            w,
            "add map inet {table} {map} {{ type ipv4_addr : verdict; flags interval; }}"
        );
    }
    for (chain, hook, map) in [
        ("forward", "forward", "tenant_fwd"),
        ("input", "input", "tenant_host"),
    ] {
        let _ = writeln!(
            w,
            "add chain inet {table} {chain} {{ type filter hook {hook} priority filter - 10; policy accept; }}"
        );
        let _ = writeln!(w, "flush chain inet {table} {chain}");
        let _ = writeln!(
            w,
            "add rule inet {table} {chain} meta nfproto ipv6 iifname \"bt*\" counter drop"
        );
        let _ = writeln!(w, "add rule inet {table} {chain} ip saddr vmap @{map}");
    }
    let _ = writeln!(w, "flush set inet {table} resolvers");
    if !resolvers.is_empty() {
        let list: Vec<String> = resolvers.iter().map(Ipv4Addr::to_string).collect();
        let _ = writeln!(
            w,
            "add element inet {table} resolvers {{ {} }}",
            list.join(", ")
        );
    }
    out
}

fn elements_line(out: &mut String, verb: &str, table: &str, set: &str, els: &[&Element]) {
    if !els.is_empty() {
        let list: Vec<String> = els.iter().map(|e| e.to_string()).collect();
        let _ = writeln!(
            out,
            "{verb} element inet {table} {set} {{ {} }}",
            list.join(", ")
        );
    }
}

fn dispatch_lines(
    out: &mut String,
    verb: &str,
    table: &str,
    chain: &str,
    fwd: Prefix,
    host: Prefix,
) {
    let _ = writeln!(
        out,
        "{verb} element inet {table} tenant_fwd {{ {fwd} : jump {chain} }}"
    );
    let _ = writeln!(
        out,
        "{verb} element inet {table} tenant_host {{ {host} : jump {chain}_host }}"
    );
}

/// The script that turns `installed` into `want`, or `None` when they already agree. An
/// incomplete tenant is rebuilt whole; a complete one gets only its element and dispatch
/// differences, so counters and established connections are untouched.
pub fn tenant_script(
    table: &str,
    want: &TenantRules,
    installed: Option<&InstalledTenant>,
) -> Option<String> {
    let c = &want.chain;
    let mut out = String::new();
    let w = &mut out;
    match installed.filter(|i| i.complete()) {
        Some(i) => {
            let withdraw: Vec<&Element> = i
                .elements
                .keys()
                .filter(|e| !want.elements.contains(e) && !i.withdrawn.contains(e))
                .collect();
            let new: Vec<&Element> = want
                .elements
                .iter()
                .filter(|e| !i.elements.contains_key(e))
                .collect();
            // Wanted again before the clean-up: the one case that deletes on the fast path.
            let readmit: Vec<&Element> = want
                .elements
                .iter()
                .filter(|e| i.withdrawn.contains(e))
                .collect();
            elements_line(w, "delete", table, &format!("{c}_deny"), &readmit);
            elements_line(w, "add", table, &format!("{c}_deny"), &withdraw);
            elements_line(w, "add", table, &format!("{c}_allow"), &new);
            if i.fwd_subnet != Some(want.subnet) {
                if let (Some(f), Some(h)) = (i.fwd_subnet, i.host_subnet) {
                    dispatch_lines(w, "delete", table, c, f, h);
                }
                dispatch_lines(w, "add", table, c, want.subnet, want.subnet);
            }
        }
        None => {
            // Dispatch first removed (if any), so no packet reaches a half-built chain.
            if let Some(i) = installed {
                if let Some(f) = i.fwd_subnet {
                    let _ = writeln!(w, "delete element inet {table} tenant_fwd {{ {f} }}");
                }
                if let Some(h) = i.host_subnet {
                    let _ = writeln!(w, "delete element inet {table} tenant_host {{ {h} }}");
                }
            }
            let _ = writeln!(
                w,
                "add set inet {table} {c}_allow {{ type ipv4_addr . inet_proto . inet_service; flags interval; counter; }}"
            );
            let _ = writeln!(w, "flush set inet {table} {c}_allow");
            let _ = writeln!(
                w,
                "add set inet {table} {c}_deny {{ type ipv4_addr . inet_proto . inet_service; flags interval; }}"
            );
            let _ = writeln!(w, "flush set inet {table} {c}_deny");
            let all: Vec<&Element> = want.elements.iter().collect();
            elements_line(w, "add", table, &format!("{c}_allow"), &all);
            for chain in [c.clone(), format!("{c}_host")] {
                // What the forward chain lets through is marked for the forward guard.
                let accept = if chain == *c {
                    format!("meta mark set meta mark | {ACCEPTED_MARK:#x} accept")
                } else {
                    "accept".to_string()
                };
                let _ = writeln!(w, "add chain inet {table} {chain}");
                let _ = writeln!(w, "flush chain inet {table} {chain}");
                let _ = writeln!(
                    w,
                    "add rule inet {table} {chain} ct state established,related {accept}"
                );
                let _ = writeln!(
                    w,
                    "add rule inet {table} {chain} meta l4proto {{ tcp, udp }} th dport 53 ip daddr @resolvers {accept}"
                );
                if chain == *c {
                    let _ = writeln!(
                        w,
                        "add rule inet {table} {chain} ip daddr . meta l4proto . th dport @{c}_deny counter reject with icmpx admin-prohibited"
                    );
                    let _ = writeln!(
                        w,
                        "add rule inet {table} {chain} ip daddr . meta l4proto . th dport @{c}_allow {accept}"
                    );
                }
                let _ = writeln!(
                    w,
                    "add rule inet {table} {chain} counter reject with icmpx admin-prohibited"
                );
            }
            dispatch_lines(w, "add", table, c, want.subnet, want.subnet);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Removes everything of one tenant chain that the listing showed.
pub fn remove_script(table: &str, chain: &str, installed: &InstalledTenant) -> String {
    let mut out = String::new();
    let w = &mut out;
    if let Some(f) = installed.fwd_subnet {
        let _ = writeln!(w, "delete element inet {table} tenant_fwd {{ {f} }}");
    }
    if let Some(h) = installed.host_subnet {
        let _ = writeln!(w, "delete element inet {table} tenant_host {{ {h} }}");
    }
    for (c, present) in [
        (chain.to_string(), installed.fwd_chain),
        (format!("{chain}_host"), installed.host_chain),
    ] {
        if present {
            let _ = writeln!(w, "flush chain inet {table} {c}");
            let _ = writeln!(w, "delete chain inet {table} {c}");
        }
    }
    if installed.has_set {
        let _ = writeln!(w, "delete set inet {table} {chain}_allow");
    }
    if installed.has_deny_set {
        let _ = writeln!(w, "delete set inet {table} {chain}_deny");
    }
    out
}

/// Deletes withdrawn elements from both sets of every tenant, in one transaction (one RCU
/// grace period for them all). No verdict changes: they are denied before and absent after,
/// so it runs off the update path. `None` when nothing is withdrawn.
pub fn gc_script(table: &str, installed: &Installed) -> Option<String> {
    let mut out = String::new();
    for (chain, t) in &installed.tenants {
        let withdrawn: Vec<&Element> = t.withdrawn.iter().collect();
        let in_allow: Vec<&Element> = t
            .withdrawn
            .iter()
            .filter(|e| t.elements.contains_key(e))
            .collect();
        elements_line(
            &mut out,
            "delete",
            table,
            &format!("{chain}_allow"),
            &in_allow,
        );
        elements_line(
            &mut out,
            "delete",
            table,
            &format!("{chain}_deny"),
            &withdrawn,
        );
    }
    (!out.is_empty()).then_some(out)
}

/// The model after [`gc_script`] succeeded.
pub fn collect_garbage(installed: &mut Installed) {
    for t in installed.tenants.values_mut() {
        for e in std::mem::take(&mut t.withdrawn) {
            t.elements.remove(&e);
        }
    }
}

fn tenant_chain_of(name: &str) -> Option<(&str, bool)> {
    let base = name.strip_prefix("t_")?;
    let (digest, host) = match base.strip_suffix("_host") {
        Some(d) => (d, true),
        None => (base, false),
    };
    (digest.len() == 13 && digest.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| (&name[..2 + 13], host))
}

fn prefix_of(v: &Value) -> Option<Prefix> {
    match v {
        Value::String(s) => Prefix::parse(s),
        Value::Object(o) => {
            let p = o.get("prefix")?;
            Some(Prefix::new(
                p.get("addr")?.as_str()?.parse().ok()?,
                p.get("len")?.as_u64()? as u8,
            ))
        }
        _ => None,
    }
}

/// An element as listed: `{"elem": {"val": {"concat": ..}, "counter": ..}}` in a set with
/// counters, the bare `{"concat": ..}` otherwise.
fn element_of(v: &Value) -> Option<(Element, u64)> {
    let (value, elem) = match v.get("elem") {
        Some(elem) => (elem.get("val")?, Some(elem)),
        None => (v, None),
    };
    let parts = value.get("concat")?.as_array()?;
    let [net, proto, port] = parts.as_slice() else {
        return None;
    };
    let protocol = match proto.as_str()? {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    let packets = elem
        .and_then(|e| e.get("counter"))
        .and_then(|c| c.get("packets"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some((
        Element {
            net: prefix_of(net)?,
            protocol,
            port: u16::try_from(port.as_u64()?).ok()?,
        },
        packets,
    ))
}

fn rule_counter(expr: &[Value]) -> Option<u64> {
    let rejects = expr.iter().any(|e| e.get("reject").is_some());
    let packets = expr
        .iter()
        .find_map(|e| e.get("counter")?.get("packets")?.as_u64());
    if rejects { packets } else { None }
}

/// Whether a rule expression sets [`ACCEPTED_MARK`] (`meta mark set meta mark | MARK`).
fn sets_accepted_mark(expr: &Value) -> bool {
    let Some(mangle) = expr.get("mangle") else {
        return false;
    };
    mangle.pointer("/key/meta/key").and_then(Value::as_str) == Some("mark")
        && mangle
            .pointer("/value/|/1")
            .and_then(Value::as_u64)
            .is_some_and(|m| m == u64::from(ACCEPTED_MARK))
}

/// Hands each element of the listing's `nftables` array to `each` as it is read, so the
/// listing (hundreds of kilobytes with many tenants) is never held whole as a tree of values:
/// that tree took about ten times the listing's size in every pass.
fn for_each_item(json: &str, each: impl FnMut(Value)) -> Result<(), ListingError> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

    struct Items<F>(F);
    impl<'de, F: FnMut(Value)> Visitor<'de> for Items<F> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
            while let Some(item) = seq.next_element::<Value>()? {
                (self.0)(item);
            }
            Ok(())
        }
    }
    impl<'de, F: FnMut(Value)> DeserializeSeed<'de> for Items<F> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }
    /// Whether the document had an `nftables` array.
    struct Document<F>(F);
    impl<'de, F: FnMut(Value)> Visitor<'de> for Document<F> {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut each = Some(self.0);
            let mut found = false;
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                match (key.as_ref(), each.take()) {
                    ("nftables", Some(each)) => {
                        map.next_value_seed(Items(each))?;
                        found = true;
                    }
                    (_, unused) => {
                        each = unused;
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(found)
        }
    }
    let mut reader = serde_json::Deserializer::from_str(json);
    let found = reader
        .deserialize_map(Document(each))
        .and_then(|found| reader.end().map(|()| found))
        .map_err(|e| ListingError::Json(e.to_string()))?;
    if found {
        Ok(())
    } else {
        Err(ListingError::NoArray)
    }
}

/// Parses `nft -j list table inet <table>`.
pub fn parse_listing(json: &str) -> Result<Installed, ListingError> {
    let mut installed = Installed::default();
    let (mut base_rules, mut maps, mut resolver_set) = (0, 0, false);
    fn entry<'a>(t: &'a mut Installed, chain: &str) -> &'a mut InstalledTenant {
        t.tenants.entry(chain.to_string()).or_default()
    }
    for_each_item(json, |item| {
        if let Some(set) = item.get("set") {
            let name = set.get("name").and_then(Value::as_str).unwrap_or_default();
            let elems = set.get("elem").and_then(Value::as_array);
            if name == "resolvers" {
                resolver_set = true;
                installed.resolvers = elems
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.as_str()?.parse().ok())
                    .collect();
            } else if let Some(chain) = name.strip_suffix("_allow")
                && let Some((chain, false)) = tenant_chain_of(chain)
            {
                let t = entry(&mut installed, chain);
                t.has_set = true;
                t.elements = elems.into_iter().flatten().filter_map(element_of).collect();
            } else if let Some(chain) = name.strip_suffix("_deny")
                && let Some((chain, false)) = tenant_chain_of(chain)
            {
                let t = entry(&mut installed, chain);
                t.has_deny_set = true;
                t.withdrawn = elems
                    .into_iter()
                    .flatten()
                    .filter_map(element_of)
                    .map(|(e, _)| e)
                    .collect();
            }
        } else if let Some(map) = item.get("map") {
            let name = map.get("name").and_then(Value::as_str).unwrap_or_default();
            if name != "tenant_fwd" && name != "tenant_host" {
                return;
            }
            maps += 1;
            for pair in map
                .get("elem")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some([key, verdict]) = pair.as_array().map(Vec::as_slice) else {
                    continue;
                };
                let target = verdict
                    .get("jump")
                    .and_then(|j| j.get("target"))
                    .and_then(Value::as_str)
                    .and_then(tenant_chain_of);
                if let (Some(prefix), Some((chain, _))) = (prefix_of(key), target) {
                    let t = entry(&mut installed, chain);
                    if name == "tenant_fwd" {
                        t.fwd_subnet = Some(prefix);
                    } else {
                        t.host_subnet = Some(prefix);
                    }
                }
            }
        } else if let Some(rule) = item.get("rule") {
            let chain = rule
                .get("chain")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let expr = rule
                .get("expr")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            if chain == "forward" || chain == "input" {
                base_rules += 1;
            } else if let Some((c, host)) = tenant_chain_of(chain) {
                let t = entry(&mut installed, c);
                if host {
                    t.host_rules += 1;
                } else {
                    t.fwd_rules += 1;
                    if expr.iter().any(sets_accepted_mark) {
                        t.fwd_marked += 1;
                    }
                }
                t.denied_packets += rule_counter(expr).unwrap_or(0);
            }
        } else if let Some(ch) = item.get("chain") {
            let name = ch.get("name").and_then(Value::as_str).unwrap_or_default();
            if let Some((c, host)) = tenant_chain_of(name) {
                let t = entry(&mut installed, c);
                if host {
                    t.host_chain = true;
                } else {
                    t.fwd_chain = true;
                }
            }
        }
    })?;
    installed.base_complete = resolver_set && maps == 2 && base_rules == 4;
    Ok(installed)
}

/// Runs nft (a trait so unit tests record instead of changing the host).
pub trait Nft: Send + Sync + std::fmt::Debug {
    /// Loads `script` as one transaction.
    fn apply(&self, script: &str) -> Result<(), CommandError>;
    /// `nft -j list table inet <table>`; `None` when the table does not exist.
    fn list(&self, table: &str) -> Result<Option<String>, CommandError>;
}

/// The real `nft` binary, optionally inside a network namespace (tests).
#[derive(Debug, Clone, Default)]
pub struct NftCommand {
    pub netns: Option<String>,
}

impl NftCommand {
    fn run(&self, args: &[&str], input: Option<&[u8]>) -> Result<String, CommandError> {
        let timeout = Duration::from_secs(10);
        match &self.netns {
            Some(ns) => {
                let mut all = vec!["netns", "exec", ns, "nft"];
                all.extend_from_slice(args);
                run_command_with_input("ip", &all, input, timeout)
            }
            None => run_command_with_input("nft", args, input, timeout),
        }
    }
}

impl Nft for NftCommand {
    fn apply(&self, script: &str) -> Result<(), CommandError> {
        self.run(&["-f", "-"], Some(script.as_bytes())).map(drop)
    }

    fn list(&self, table: &str) -> Result<Option<String>, CommandError> {
        match self.run(&["-j", "list", "table", "inet", table], None) {
            Ok(json) => Ok(Some(json)),
            Err(CommandError::Failed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
