//! The tenant spec: what an operator or provisioning system asks for, validated into a
//! [`TenantSpec`] that cannot hold a bad value. Two inputs lead here: the protobuf message (gRPC)
//! and the human file format [`TenantSpecFile`] (TOML or JSON, also the REST body), which
//! converts into the protobuf message so that validation happens in one place.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::field::{FieldError, validate_token};
use crate::host::Provider;
use crate::ids::TenantId;
use crate::proto;
use crate::units::parse_bytes;

/// The smallest memory cap berth runs a tenant with.
pub const MIN_MEMORY_BYTES: u64 = 64 << 20;
/// The smallest volume: an ext4 filesystem with room for a gateway's state.
pub const MIN_VOLUME_BYTES: u64 = 16 << 20;
/// The largest volume (an ext4 filesystem of 4 KiB blocks holds up to 1 EiB; no host disk is
/// near this).
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// OpenClaw's data directory, the default mount path of the tenant volume.
pub const DEFAULT_MOUNT_PATH: &str = "/home/node/.openclaw";
/// OpenClaw's gateway port inside the container.
pub const DEFAULT_GATEWAY_PORT: u16 = 18789;
/// The largest tenant spec, encoded: a host's desired state of 2,048 of them fits an agent
/// session's message limit ([`crate::transport::SESSION_MESSAGE_BYTES`]) with room.
pub const MAX_SPEC_BYTES: usize = 32 << 10;
/// Egress entries per tenant.
pub const MAX_EGRESS_ENTRIES: usize = 64;
/// Environment variables per tenant, and their names and values together in bytes.
pub const MAX_ENV_VARS: usize = 64;
pub const MAX_ENV_BYTES: usize = 16 << 10;
/// Placement constraints: regions and labels per tenant.
pub const MAX_REGIONS: usize = 16;
pub const MAX_LABELS: usize = 16;

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// The most CPU a tenant may request or be limited to, in millicores (256 CPUs).
pub const MAX_CPU_MILLICORES: u32 = 256_000;

/// What a tenant gets. Memory is a hard cap and placed by it; CPU is compressible: placement
/// counts the request (`cpu_millicores`, also the tenant's weight when the host's CPU is
/// contended), and the tenant may burst up to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Resources {
    pub memory_bytes: u64,
    /// The CPU request.
    pub cpu_millicores: u32,
    pub volume_bytes: u64,
    /// The CPU limit (the cgroup quota), at least the request; 0: no quota, only the weight.
    /// Not written when 0, so specs stored without it read and digest as before.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cpu_limit_millicores: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// Where an egress rule allows traffic to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Destination {
    /// An address and prefix length (a single address is a /32 or /128).
    Cidr { addr: IpAddr, prefix: u8 },
    /// A DNS name, resolved by the agent.
    Name(String),
}

fn max_prefix(addr: &IpAddr) -> u32 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // A single address is written as one.
            Self::Cidr { addr, prefix } if u32::from(*prefix) == max_prefix(addr) => {
                write!(f, "{addr}")
            }
            Self::Cidr { addr, prefix } => write!(f, "{addr}/{prefix}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRule {
    pub destination: Destination,
    pub protocol: Protocol,
    pub port: u16,
}

impl EgressRule {
    pub fn to_proto(&self) -> proto::EgressRule {
        proto::EgressRule {
            destination: self.destination.to_string(),
            protocol: self.protocol.as_str().into(),
            port: u32::from(self.port),
        }
    }
}

/// `destination:port/protocol`, as operators write an egress entry (an IPv6 destination in
/// brackets); also for entries read back from the protobuf message.
pub fn egress_entry_text(destination: &str, port: u32, protocol: &str) -> String {
    if destination.contains(':') {
        format!("[{destination}]:{port}/{protocol}")
    } else {
        format!("{destination}:{port}/{protocol}")
    }
}

impl std::fmt::Display for EgressRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&egress_entry_text(
            &self.destination.to_string(),
            u32::from(self.port),
            self.protocol.as_str(),
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub encrypted: bool,
    pub mount_path: String,
}

/// A restore of the tenant's volume from its backups, asked by `berthctl restore` or by the
/// drain of a lost host (never by a spec an operator sends): the host that runs the tenant
/// does it once per `id`, after opening the volume and before starting the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restore {
    pub id: u64,
    /// restic's snapshot id; `None`: the latest snapshot.
    pub snapshot: Option<String>,
}

impl Restore {
    pub fn to_proto(&self) -> proto::RestoreRequest {
        proto::RestoreRequest {
            restore_id: self.id,
            snapshot_id: self.snapshot.clone().unwrap_or_default(),
        }
    }
}

/// When a tenant's volume is backed up (when the fleet has a backup repository), and how many
/// snapshots are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupPolicy {
    pub enabled: bool,
    #[serde(with = "humantime_serde_ms")]
    pub interval: std::time::Duration,
    pub keep_daily: u32,
    pub keep_weekly: u32,
}

impl BackupPolicy {
    pub const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);
    pub const MAX_INTERVAL: std::time::Duration = std::time::Duration::from_secs(7 * 86400);
    pub const MAX_KEEP: u32 = 1000;

    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn to_proto(&self) -> proto::BackupPolicy {
        proto::BackupPolicy {
            disabled: !self.enabled,
            interval_ms: self.interval.as_millis() as u64,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
        }
    }
}

impl Default for BackupPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: std::time::Duration::from_secs(86400),
            keep_daily: 7,
            keep_weekly: 4,
        }
    }
}

/// A duration kept as milliseconds in the store.
mod humantime_serde_ms {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        Ok(std::time::Duration::from_millis(u64::deserialize(d)?))
    }
}

/// When a tenant's container is restarted each night. A field left out takes the host's
/// default (the agent's `[restarts]` configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub enabled: bool,
    pub window: Option<Window>,
    pub time_zone: Option<ZoneName>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            window: None,
            time_zone: None,
        }
    }
}

/// A daily maintenance window in local civil time, `HH:MM-HH:MM`; it may cross midnight
/// (`23:00-01:00`). Start and end differ, so it is never empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Window {
    start_minute: u16,
    end_minute: u16,
}

impl Window {
    /// Minutes after local midnight at which the window opens.
    pub fn start_minute(&self) -> u16 {
        self.start_minute
    }

    /// The window's length in civil minutes (a daylight-saving change makes the real length
    /// differ on two nights a year).
    pub fn length_minutes(&self) -> u16 {
        (self.end_minute + 24 * 60 - self.start_minute) % (24 * 60)
    }
}

impl std::str::FromStr for Window {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let minute = |s: &str| -> Option<u16> {
            let (h, m) = s.split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
        };
        match value.split_once('-') {
            Some((a, b)) => match (minute(a), minute(b)) {
                (Some(start_minute), Some(end_minute)) if start_minute != end_minute => Ok(Self {
                    start_minute,
                    end_minute,
                }),
                _ => Err(format!(
                    "{value:?}: expected HH:MM-HH:MM with two different times, such as 02:00-05:00"
                )),
            },
            None => Err(format!(
                "{value:?}: expected HH:MM-HH:MM with two different times, such as 02:00-05:00"
            )),
        }
    }
}

impl TryFrom<String> for Window {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        value.parse()
    }
}

impl From<Window> for String {
    fn from(w: Window) -> String {
        w.to_string()
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start_minute), hm(self.end_minute))
    }
}

/// An IANA time zone name the time zone database knows (`Europe/Berlin`, `UTC`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ZoneName(String);

impl ZoneName {
    pub fn new(name: &str) -> Result<Self, String> {
        // Checked as characters first: the name is looked up as a path in the zoneinfo tree.
        let plausible = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('/')
            && !name
                .split('/')
                .any(|part| part.is_empty() || part.starts_with('.'))
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'+'));
        if !plausible {
            return Err(format!("{name:?}: not an IANA time zone name"));
        }
        jiff::tz::TimeZone::get(name)
            .map_err(|_| format!("{name:?}: not in the time zone database"))?;
        Ok(Self(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The zone's rules (the name was checked when made, so this only fails if the database
    /// changed underneath).
    pub fn time_zone(&self) -> Result<jiff::tz::TimeZone, String> {
        jiff::tz::TimeZone::get(&self.0).map_err(|e| format!("time zone {}: {e}", self.0))
    }
}

impl TryFrom<String> for ZoneName {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        Self::new(&value)
    }
}

impl From<ZoneName> for String {
    fn from(z: ZoneName) -> String {
        z.0
    }
}

impl std::fmt::Display for ZoneName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Constraints {
    /// Empty: any provider.
    pub providers: Vec<Provider>,
    /// Empty: any region. An entry ending in `*` is a prefix (`eu-*`).
    pub regions: Vec<String>,
    /// Every label must be on the host with this value.
    pub labels: BTreeMap<String, String>,
    /// At most one tenant of a group per host.
    pub anti_affinity_group: Option<String>,
}

impl Constraints {
    pub fn region_allowed(&self, region: &str) -> bool {
        self.regions.is_empty()
            || self.regions.iter().any(|r| match r.strip_suffix('*') {
                Some(prefix) => region.starts_with(prefix),
                None => r == region,
            })
    }

    pub fn provider_allowed(&self, provider: Provider) -> bool {
        self.providers.is_empty() || self.providers.contains(&provider)
    }
}

/// A validated tenant spec, resources resolved from its tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantSpec {
    pub tenant_id: TenantId,
    pub image: String,
    pub tier: Option<String>,
    pub resources: Resources,
    pub egress: Vec<EgressRule>,
    pub volume: VolumeSpec,
    pub restart: RestartPolicy,
    pub constraints: Constraints,
    pub gateway_port: u16,
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<Restore>,
    /// Left out of the stored form when it is the default (so what agents hash of a spec is
    /// what it was before backup policies existed).
    #[serde(default, skip_serializing_if = "BackupPolicy::is_default")]
    pub backup: BackupPolicy,
}

/// A named resource preset, from the coordinator's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub name: String,
    pub resources: Resources,
}

/// What the validation needs from the coordinator's configuration.
#[derive(Debug, Clone)]
pub struct SpecPolicy {
    pub tiers: Vec<Tier>,
    /// Whether `0.0.0.0/0` or `::/0` may be allowlisted.
    pub allow_unrestricted_egress: bool,
    /// Which addresses entries may name; `None` where the coordinator checked them already
    /// (an agent reading its desired state filters what it enforces instead).
    pub reach: Option<crate::reach::ReachPolicy>,
}

fn field(name: &str, reason: impl Into<String>) -> FieldError {
    FieldError::new(name, reason)
}

/// `[registry[:port]/]name[:tag][@sha256:<64 hex>]`, lowercase.
pub fn validate_image(value: &str) -> Result<(), FieldError> {
    let bad = |why: &str| Err(field("image", format!("{value:?}: {why}")));
    if value.is_empty() {
        return bad("must not be empty");
    }
    if value.len() > 255 {
        return bad("must be at most 255 characters");
    }
    let (name, digest) = match value.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (value, None),
    };
    if let Some(digest) = digest {
        let ok = digest.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        });
        if !ok {
            return bad("digest must be sha256: followed by 64 lowercase hex digits");
        }
    }
    if name.is_empty() || name.starts_with(['/', ':', '.', '-']) || name.ends_with(['/', ':']) {
        return bad("not an image reference");
    }
    if !name.bytes().all(|b| {
        b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || matches!(b, b'.' | b'_' | b'-' | b'/' | b':')
    }) {
        return bad(
            "may contain only a-z, 0-9, '.', '_', '-', '/', ':' (and '@sha256:' for a digest)",
        );
    }
    if name.contains("//") || name.contains("..") {
        return bad("not an image reference");
    }
    Ok(())
}

/// A DNS name as egress destinations and registries use them (RFC 1123, at least one dot).
fn valid_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.contains('.')
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Parses a destination: a CIDR, an address, or a DNS name.
pub fn parse_destination(
    field_name: &str,
    value: &str,
    allow_unrestricted: bool,
) -> Result<Destination, FieldError> {
    if let Some((addr, prefix)) = value.split_once('/') {
        let addr: IpAddr = addr.parse().map_err(|_| {
            field(
                field_name,
                format!("{value:?}: not a CIDR (address/prefix)"),
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| {
            field(
                field_name,
                format!("{value:?}: prefix length must be 0 to {max}"),
            )
        })?;
        if prefix == 0 && !allow_unrestricted {
            return Err(field(
                field_name,
                format!(
                    "{value:?} allows the whole Internet; an operator must enable allow_unrestricted_egress for that"
                ),
            ));
        }
        return Ok(Destination::Cidr { addr, prefix });
    }
    if let Ok(addr) = value.parse::<IpAddr>() {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        return Ok(Destination::Cidr { addr, prefix });
    }
    let name = value.trim_end_matches('.').to_ascii_lowercase();
    if !valid_dns_name(&name) {
        return Err(field(
            field_name,
            format!("{value:?}: not a CIDR, an address or a DNS name"),
        ));
    }
    Ok(Destination::Name(name))
}

/// A volume's mount path inside the container: absolute and normalized (no `.`, `..` or empty
/// components, no trailing `/`), not `/`, at most 255 bytes, and free of the `:` and `,` that
/// Docker's mount syntax would read as separators.
fn validate_mount_path(path: &str) -> Result<(), FieldError> {
    let why = if !path.starts_with('/') || path == "/" {
        Some("must be an absolute path below /")
    } else if path.len() > 255 {
        Some("must be at most 255 bytes")
    } else if path.contains([':', ',', '\0']) {
        Some("must not contain ':', ',' or NUL")
    } else if path[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        Some("must be normalized: no empty, . or .. components and no trailing /")
    } else {
        None
    };
    match why {
        Some(why) => Err(field("volume.mount_path", format!("{path:?}: {why}"))),
        None => Ok(()),
    }
}

/// The tier's resources (if any) with what the spec asks for on top: (tier name, resources).
fn resolve_resources(
    tier_name: &str,
    requested: proto::Resources,
    policy: &SpecPolicy,
) -> Result<(Option<String>, Resources), FieldError> {
    let (tier, base) = if tier_name.is_empty() {
        (None, Resources::default())
    } else {
        let tier = policy
            .tiers
            .iter()
            .find(|t| t.name == tier_name)
            .ok_or_else(|| {
                let known: Vec<&str> = policy.tiers.iter().map(|t| t.name.as_str()).collect();
                field(
                    "tier",
                    format!("unknown tier {:?} (known: {})", tier_name, known.join(", ")),
                )
            })?;
        (Some(tier.name.clone()), tier.resources)
    };
    let pick = |asked: u64, preset: u64| if asked != 0 { asked } else { preset };
    let cpu_millicores = pick(
        u64::from(requested.cpu_millicores),
        u64::from(base.cpu_millicores),
    ) as u32;
    // A limit the spec names must hold its request; a tier's is raised to a larger request.
    let cpu_limit_millicores = match requested.cpu_limit_millicores {
        0 if base.cpu_limit_millicores == 0 => 0,
        0 => base.cpu_limit_millicores.max(cpu_millicores),
        asked if asked < cpu_millicores => {
            return Err(field(
                "resources.cpu_limit_millicores",
                format!("{asked} is below the CPU request of {cpu_millicores}"),
            ));
        }
        asked => asked,
    };
    let resources = Resources {
        memory_bytes: pick(requested.memory_bytes, base.memory_bytes),
        cpu_millicores,
        volume_bytes: pick(requested.volume_bytes, base.volume_bytes),
        cpu_limit_millicores,
    };
    if resources.memory_bytes == 0 {
        return Err(field(
            "resources.memory_bytes",
            "required when no tier is given",
        ));
    }
    if resources.memory_bytes < MIN_MEMORY_BYTES {
        return Err(field(
            "resources.memory_bytes",
            format!(
                "{} bytes is below the minimum of 64 MiB",
                resources.memory_bytes
            ),
        ));
    }
    if resources.cpu_millicores == 0 {
        return Err(field(
            "resources.cpu_millicores",
            "required when no tier is given",
        ));
    }
    for (name, value) in [
        ("resources.cpu_millicores", resources.cpu_millicores),
        (
            "resources.cpu_limit_millicores",
            resources.cpu_limit_millicores,
        ),
    ] {
        if value > MAX_CPU_MILLICORES {
            return Err(field(name, "at most 256000 (256 CPUs)"));
        }
    }
    Ok((tier, resources))
}

/// The allowlist: each entry parsed, and all of them within what `policy` lets tenants reach.
fn parse_egress(
    rules: &[proto::EgressRule],
    policy: &SpecPolicy,
) -> Result<Vec<EgressRule>, FieldError> {
    if rules.len() > MAX_EGRESS_ENTRIES {
        return Err(field(
            "egress",
            format!("{} entries; at most {MAX_EGRESS_ENTRIES}", rules.len()),
        ));
    }
    let mut egress = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        let name = format!("egress[{i}]");
        let destination = parse_destination(
            &format!("{name}.destination"),
            &rule.destination,
            policy.allow_unrestricted_egress,
        )?;
        let protocol = match rule.protocol.as_str() {
            "" | "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(field(
                    &format!("{name}.protocol"),
                    format!("{other:?}: expected tcp or udp"),
                ));
            }
        };
        let port = u16::try_from(rule.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                field(
                    &format!("{name}.port"),
                    format!("{} is not a port (1 to 65535)", rule.port),
                )
            })?;
        egress.push(EgressRule {
            destination,
            protocol,
            port,
        });
    }
    if let Some(reach) = &policy.reach {
        let mut nets = Vec::new();
        for (i, rule) in egress.iter().enumerate() {
            let Destination::Cidr { addr, prefix } = rule.destination else {
                continue;
            };
            if prefix == 0 {
                // Allowed above only with allow_unrestricted_egress: everything, on purpose.
                continue;
            }
            let net = crate::reach::Net { addr, prefix };
            if let Some(why) = reach.refuse(net) {
                return Err(field(&format!("egress[{i}].destination"), why));
            }
            nets.push(net);
        }
        if let Some(why) = reach.refuse_union(&nets) {
            return Err(field("egress", why));
        }
    }
    Ok(egress)
}

fn parse_backup(b: Option<proto::BackupPolicy>) -> Result<BackupPolicy, FieldError> {
    let Some(b) = b else {
        return Ok(BackupPolicy::default());
    };
    let defaults = BackupPolicy::default();
    let interval = match b.interval_ms {
        0 => defaults.interval,
        ms => std::time::Duration::from_millis(ms),
    };
    if !(BackupPolicy::MIN_INTERVAL..=BackupPolicy::MAX_INTERVAL).contains(&interval) {
        return Err(field(
            "backup.interval",
            format!("{}: from 1h to 7days", humantime::format_duration(interval)),
        ));
    }
    let (keep_daily, keep_weekly) = match (b.keep_daily, b.keep_weekly) {
        (0, 0) => (defaults.keep_daily, defaults.keep_weekly),
        kept => kept,
    };
    for (name, n) in [
        ("backup.keep_daily", keep_daily),
        ("backup.keep_weekly", keep_weekly),
    ] {
        if n > BackupPolicy::MAX_KEEP {
            return Err(field(
                name,
                format!("{n}: at most {}", BackupPolicy::MAX_KEEP),
            ));
        }
    }
    Ok(BackupPolicy {
        enabled: !b.disabled,
        interval,
        keep_daily,
        keep_weekly,
    })
}

fn parse_restore(r: proto::RestoreRequest) -> Result<Restore, FieldError> {
    if r.restore_id == 0 {
        return Err(field("restore.restore_id", "0; a restore has an id"));
    }
    let snapshot = match r.snapshot_id.as_str() {
        "" => None,
        id => Some(
            crate::backup::snapshot_id(id)
                .map_err(|e| field("restore.snapshot_id", e.to_string()))?
                .to_string(),
        ),
    };
    Ok(Restore {
        id: r.restore_id,
        snapshot,
    })
}

fn parse_restart(restart: Option<proto::RestartPolicy>) -> Result<RestartPolicy, FieldError> {
    Ok(match restart {
        None => RestartPolicy::default(),
        Some(r) => RestartPolicy {
            enabled: r.enabled,
            window: (!r.window.is_empty())
                .then(|| r.window.parse())
                .transpose()
                .map_err(|e| field("restart.window", e))?,
            time_zone: (!r.time_zone.is_empty())
                .then(|| ZoneName::new(&r.time_zone))
                .transpose()
                .map_err(|e| field("restart.time_zone", e))?,
        },
    })
}

/// Regions, labels and the anti-affinity group (returned, if any) within their limits.
fn validate_placement_constraints(
    c: &proto::PlacementConstraints,
) -> Result<Option<String>, FieldError> {
    if c.regions.len() > MAX_REGIONS {
        return Err(field(
            "constraints.regions",
            format!("{} regions; at most {MAX_REGIONS}", c.regions.len()),
        ));
    }
    if c.labels.len() > MAX_LABELS {
        return Err(field(
            "constraints.labels",
            format!("{} labels; at most {MAX_LABELS}", c.labels.len()),
        ));
    }
    for region in &c.regions {
        validate_token(
            "constraints.regions",
            region.strip_suffix('*').unwrap_or(region),
            false,
        )?;
    }
    for (key, value) in &c.labels {
        validate_token("constraints.labels key", key, false)?;
        validate_token(&format!("constraints.labels.{key}"), value, true)?;
    }
    Ok(if c.anti_affinity_group.is_empty() {
        None
    } else {
        validate_token(
            "constraints.anti_affinity_group",
            &c.anti_affinity_group,
            false,
        )?;
        Some(c.anti_affinity_group.clone())
    })
}

fn validate_env(env: &std::collections::HashMap<String, String>) -> Result<(), FieldError> {
    if env.len() > MAX_ENV_VARS {
        return Err(field("env", format!("at most {MAX_ENV_VARS} variables")));
    }
    let env_bytes: usize = env.iter().map(|(k, v)| k.len() + v.len()).sum();
    if env_bytes > MAX_ENV_BYTES {
        return Err(field(
            "env",
            format!("{env_bytes} bytes of names and values; at most {MAX_ENV_BYTES}"),
        ));
    }
    for (k, v) in env {
        let ok = !k.is_empty()
            && k.len() <= 128
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(field(
                "env",
                format!("{k:?}: names are A-Z, 0-9 and _, not starting with a digit"),
            ));
        }
        if v.len() > 4096 || v.contains('\0') {
            return Err(field(&format!("env.{k}"), "at most 4096 bytes, no NUL"));
        }
    }
    Ok(())
}

impl TenantSpec {
    /// Validates a protobuf spec against `policy`, resolving the tier.
    pub fn from_proto(p: proto::TenantSpec, policy: &SpecPolicy) -> Result<Self, FieldError> {
        let volume_field = match &p.volume {
            Some(v) if v.size_bytes != 0 => "volume.size_bytes",
            _ => "resources.volume_bytes",
        };
        let spec = Self::validate(p, policy, MAX_SPEC_BYTES)?;
        // Checked where tenants are placed; a host takes what its coordinator resolved (a
        // volume without a size fails alone there, with the reason).
        let volume_bytes = spec.resources.volume_bytes;
        if volume_bytes == 0 {
            return Err(field(volume_field, "required when no tier is given"));
        }
        if !(MIN_VOLUME_BYTES..=MAX_VOLUME_BYTES).contains(&volume_bytes) {
            return Err(field(
                volume_field,
                format!("{volume_bytes} bytes; a volume is from 16 MiB to 64 TiB"),
            ));
        }
        Ok(spec)
    }

    fn validate(
        p: proto::TenantSpec,
        policy: &SpecPolicy,
        max_bytes: usize,
    ) -> Result<Self, FieldError> {
        let tenant_id =
            TenantId::new(&p.tenant_id).map_err(|e| field("tenant_id", e.to_string()))?;
        let encoded = prost::Message::encoded_len(&p);
        if encoded > max_bytes {
            return Err(field(
                "spec",
                format!("{encoded} bytes encoded; at most {max_bytes}"),
            ));
        }
        validate_image(&p.image)?;
        let (tier, resources) =
            resolve_resources(&p.tier, p.resources.unwrap_or_default(), policy)?;
        let egress = parse_egress(&p.egress, policy)?;
        let volume = p.volume.unwrap_or(proto::VolumeSpec {
            size_bytes: 0,
            encrypted: true,
            mount_path: String::new(),
        });
        let mount_path = if volume.mount_path.is_empty() {
            DEFAULT_MOUNT_PATH.to_string()
        } else {
            volume.mount_path
        };
        validate_mount_path(&mount_path)?;
        let resources = Resources {
            volume_bytes: if volume.size_bytes != 0 {
                volume.size_bytes
            } else {
                resources.volume_bytes
            },
            ..resources
        };
        let restart = parse_restart(p.restart)?;
        let c = p.constraints.unwrap_or_default();
        let providers = c
            .providers
            .iter()
            .map(|p| Provider::parse("constraints.providers", p))
            .collect::<Result<Vec<_>, _>>()?;
        let anti_affinity_group = validate_placement_constraints(&c)?;
        let gateway_port = if p.gateway_port == 0 {
            DEFAULT_GATEWAY_PORT
        } else {
            u16::try_from(p.gateway_port).map_err(|_| {
                field(
                    "gateway_port",
                    format!("{} is not a port (1 to 65535)", p.gateway_port),
                )
            })?
        };
        validate_env(&p.env)?;
        let restore = p.restore.map(parse_restore).transpose()?;
        let backup = parse_backup(p.backup)?;
        Ok(Self {
            tenant_id,
            image: p.image,
            tier,
            resources,
            egress,
            volume: VolumeSpec {
                encrypted: volume.encrypted,
                mount_path,
            },
            restart,
            constraints: Constraints {
                providers,
                regions: c.regions,
                labels: c.labels.into_iter().collect(),
                anti_affinity_group,
            },
            gateway_port,
            env: p.env.into_iter().collect(),
            restore,
            backup,
        })
    }

    /// Validates a spec the coordinator already resolved (what an agent receives): resources
    /// are explicit, the tier is only a name, egress was checked against the fleet's policy.
    pub fn from_resolved(mut p: proto::TenantSpec) -> Result<Self, FieldError> {
        let tier = std::mem::take(&mut p.tier);
        let policy = SpecPolicy {
            tiers: Vec::new(),
            allow_unrestricted_egress: true,
            reach: None,
        };
        // Resolution adds resources, the tier's name and the default mount path to what the
        // coordinator checked against MAX_SPEC_BYTES.
        let mut spec = Self::validate(p, &policy, MAX_SPEC_BYTES + 1024)?;
        spec.tier = (!tier.is_empty()).then_some(tier);
        Ok(spec)
    }

    /// The protobuf form, fully resolved (what the agent receives).
    pub fn to_proto(&self) -> proto::TenantSpec {
        proto::TenantSpec {
            tenant_id: self.tenant_id.to_string(),
            image: self.image.clone(),
            tier: self.tier.clone().unwrap_or_default(),
            resources: Some(proto::Resources {
                memory_bytes: self.resources.memory_bytes,
                cpu_millicores: self.resources.cpu_millicores,
                volume_bytes: self.resources.volume_bytes,
                cpu_limit_millicores: self.resources.cpu_limit_millicores,
            }),
            egress: self.egress.iter().map(EgressRule::to_proto).collect(),
            volume: Some(proto::VolumeSpec {
                size_bytes: self.resources.volume_bytes,
                encrypted: self.volume.encrypted,
                mount_path: self.volume.mount_path.clone(),
            }),
            restart: Some(proto::RestartPolicy {
                enabled: self.restart.enabled,
                window: self.restart.window.map(String::from).unwrap_or_default(),
                time_zone: self
                    .restart
                    .time_zone
                    .as_ref()
                    .map(|z| z.to_string())
                    .unwrap_or_default(),
            }),
            constraints: Some(proto::PlacementConstraints {
                providers: self
                    .constraints
                    .providers
                    .iter()
                    .map(|p| p.as_str().to_string())
                    .collect(),
                regions: self.constraints.regions.clone(),
                labels: self.constraints.labels.clone().into_iter().collect(),
                anti_affinity_group: self
                    .constraints
                    .anti_affinity_group
                    .clone()
                    .unwrap_or_default(),
            }),
            gateway_port: u32::from(self.gateway_port),
            env: self.env.clone().into_iter().collect(),
            restore: self.restore.as_ref().map(Restore::to_proto),
            backup: Some(self.backup.to_proto()),
        }
    }
}

/// The gRPC request header by which a client says its spec came from the human format (a
/// refusal then names fields as that format spells them).
pub const SPEC_FORMAT_HEADER: &str = "berth-spec-format";

/// A refusal of a spec given in the human format, naming the field as that format spells it
/// (`resources.memory`, not the message's `resources.memory_bytes`).
pub fn in_file_format(mut error: FieldError) -> FieldError {
    let spelled = match error.field.as_str() {
        "resources.memory_bytes" => "resources.memory",
        "resources.volume_bytes" => "resources.volume",
        "volume.size_bytes" => "volume.size",
        _ => return error,
    };
    error.field = spelled.to_string();
    error
}

/// The human spec format: TOML for `berthctl place`, JSON for files and the REST API.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TenantSpecFile {
    pub tenant_id: String,
    pub image: String,
    #[serde(default)]
    pub tier: Option<String>,
    #[serde(default)]
    pub resources: Option<ResourcesFile>,
    #[serde(default)]
    pub egress: Vec<EgressFile>,
    #[serde(default)]
    pub volume: Option<VolumeFile>,
    #[serde(default)]
    pub restart: Option<RestartFile>,
    #[serde(default)]
    pub backup: Option<BackupFile>,
    #[serde(default)]
    pub constraints: Option<ConstraintsFile>,
    #[serde(default)]
    pub gateway_port: Option<u32>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResourcesFile {
    /// `"1GiB"` or bytes.
    pub memory: Option<SizeFile>,
    /// The CPU request.
    pub cpu_millicores: Option<u32>,
    /// The CPU limit (burst ceiling).
    pub cpu_limit_millicores: Option<u32>,
    pub volume: Option<SizeFile>,
}

/// A size written as `"512MiB"` or as a number of bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeFile {
    Bytes(u64),
    Text(String),
}

impl SizeFile {
    fn bytes(&self, name: &str) -> Result<u64, FieldError> {
        match self {
            Self::Bytes(b) => Ok(*b),
            Self::Text(t) => parse_bytes(name, t).map_err(|e| field(name, e.reason)),
        }
    }
}

/// `"api.anthropic.com:443"` (tcp), or a table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EgressFile {
    Short(String),
    Full {
        destination: String,
        port: u32,
        #[serde(default)]
        protocol: Option<String>,
    },
}

impl EgressFile {
    /// Entry `i` as the protobuf message. The shorthand is `destination:port`, optionally
    /// followed by `/tcp` or `/udp` (tcp by default); IPv6 addresses go in brackets.
    pub fn to_proto(&self, i: usize) -> Result<proto::EgressRule, FieldError> {
        match self {
            EgressFile::Short(s) => {
                let (rest, protocol) = match s.rsplit_once('/') {
                    Some((r, p @ ("tcp" | "udp"))) => (r, p),
                    _ => (s.as_str(), "tcp"),
                };
                let (dest, port) = rest
                    .rsplit_once(':')
                    .filter(|(d, _)| !d.is_empty() && !d.ends_with(':'))
                    .ok_or_else(|| {
                        field(
                            &format!("egress[{i}]"),
                            format!(
                                "{s:?}: expected destination:port[/udp], e.g. api.anthropic.com:443"
                            ),
                        )
                    })?;
                let port = port.parse().map_err(|_| {
                    field(
                        &format!("egress[{i}].port"),
                        format!("{port:?} is not a port (1 to 65535)"),
                    )
                })?;
                Ok(proto::EgressRule {
                    destination: dest.trim_matches(['[', ']']).to_string(),
                    protocol: protocol.into(),
                    port,
                })
            }
            EgressFile::Full {
                destination,
                port,
                protocol,
            } => Ok(proto::EgressRule {
                destination: destination.clone(),
                protocol: protocol.clone().unwrap_or_default(),
                port: *port,
            }),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct VolumeFile {
    pub size: Option<SizeFile>,
    pub encrypted: Option<bool>,
    pub mount_path: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RestartFile {
    pub enabled: Option<bool>,
    pub window: Option<String>,
    pub time_zone: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BackupFile {
    pub enabled: Option<bool>,
    /// `"24h"`, `"6h"`: from 1h to 7days.
    pub interval: Option<String>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
}

impl BackupFile {
    fn to_proto(&self) -> Result<proto::BackupPolicy, FieldError> {
        let defaults = BackupPolicy::default();
        let interval = match &self.interval {
            None => defaults.interval,
            Some(text) => humantime::parse_duration(text)
                .map_err(|e| field("backup.interval", format!("{text:?}: {e}")))?,
        };
        Ok(proto::BackupPolicy {
            disabled: !self.enabled.unwrap_or(true),
            interval_ms: u64::try_from(interval.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            keep_daily: self.keep_daily.unwrap_or(defaults.keep_daily),
            keep_weekly: self.keep_weekly.unwrap_or(defaults.keep_weekly),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConstraintsFile {
    #[serde(default)]
    pub providers: Vec<String>,
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub anti_affinity_group: Option<String>,
}

impl TenantSpecFile {
    /// Converts to the protobuf message; only sizes and the egress shorthand are parsed here,
    /// everything else is validated by [`TenantSpec::from_proto`].
    pub fn to_proto(&self) -> Result<proto::TenantSpec, FieldError> {
        let r = self.resources.clone().unwrap_or_default();
        let v = self.volume.clone().unwrap_or_default();
        let egress = self
            .egress
            .iter()
            .enumerate()
            .map(|(i, e)| e.to_proto(i))
            .collect::<Result<Vec<_>, _>>()?;
        let restart = self.restart.clone().map(|r| proto::RestartPolicy {
            enabled: r.enabled.unwrap_or(true),
            window: r.window.unwrap_or_default(),
            time_zone: r.time_zone.unwrap_or_default(),
        });
        let constraints = self
            .constraints
            .clone()
            .map(|c| proto::PlacementConstraints {
                providers: c.providers,
                regions: c.regions,
                labels: c.labels.into_iter().collect(),
                anti_affinity_group: c.anti_affinity_group.unwrap_or_default(),
            });
        Ok(proto::TenantSpec {
            tenant_id: self.tenant_id.clone(),
            image: self.image.clone(),
            tier: self.tier.clone().unwrap_or_default(),
            resources: Some(proto::Resources {
                memory_bytes: r
                    .memory
                    .map(|m| m.bytes("resources.memory"))
                    .transpose()?
                    .unwrap_or(0),
                cpu_millicores: r.cpu_millicores.unwrap_or(0),
                cpu_limit_millicores: r.cpu_limit_millicores.unwrap_or(0),
                volume_bytes: r
                    .volume
                    .map(|m| m.bytes("resources.volume"))
                    .transpose()?
                    .unwrap_or(0),
            }),
            egress,
            volume: Some(proto::VolumeSpec {
                size_bytes: v
                    .size
                    .map(|s| s.bytes("volume.size"))
                    .transpose()?
                    .unwrap_or(0),
                encrypted: v.encrypted.unwrap_or(true),
                mount_path: v.mount_path.unwrap_or_default(),
            }),
            restart,
            constraints,
            gateway_port: self.gateway_port.unwrap_or(0),
            env: self.env.clone().into_iter().collect(),
            restore: None,
            backup: self.backup.as_ref().map(BackupFile::to_proto).transpose()?,
        })
    }
}

/// How a tenant state is written in views, JSON and metrics labels.
pub fn tenant_state_name(state: i32) -> &'static str {
    match proto::TenantState::try_from(state) {
        Ok(proto::TenantState::Pending) => "pending",
        Ok(proto::TenantState::Running) => "running",
        Ok(proto::TenantState::Failed) => "failed",
        Ok(proto::TenantState::Stopped) => "stopped",
        Ok(proto::TenantState::WaitingForKey) => "waiting_for_key",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SpecPolicy {
        SpecPolicy {
            tiers: vec![
                Tier {
                    name: "individual".into(),
                    resources: Resources {
                        memory_bytes: 256 << 20,
                        cpu_millicores: 500,
                        cpu_limit_millicores: 0,
                        volume_bytes: 1 << 30,
                    },
                },
                Tier {
                    name: "business".into(),
                    resources: Resources {
                        memory_bytes: 1 << 30,
                        cpu_millicores: 1000,
                        cpu_limit_millicores: 0,
                        volume_bytes: 5 << 30,
                    },
                },
            ],
            allow_unrestricted_egress: false,
            reach: Some(crate::reach::ReachPolicy::default()),
        }
    }

    fn file(toml_text: &str) -> Result<TenantSpec, String> {
        let f: TenantSpecFile = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        let p = f.to_proto().map_err(|e| e.to_string())?;
        TenantSpec::from_proto(p, &policy()).map_err(|e| e.to_string())
    }

    const BASE: &str =
        "tenant_id = \"acme-dental\"\nimage = \"ghcr.io/openclaw/gateway:2026.11\"\n";

    #[test]
    fn a_cpu_limit_comes_from_the_spec_or_its_tier_and_holds_its_request() {
        let mut policy = policy();
        policy.tiers[1].resources.cpu_limit_millicores = 2000;
        let resolve = |text: &str| -> Result<Resources, String> {
            let f: TenantSpecFile = toml::from_str(&format!("{BASE}{text}")).unwrap();
            TenantSpec::from_proto(f.to_proto().unwrap(), &policy)
                .map(|s| s.resources)
                .map_err(|e| e.to_string())
        };
        let cpu = |r: Resources| (r.cpu_millicores, r.cpu_limit_millicores);
        assert_eq!(cpu(resolve("tier = \"business\"").unwrap()), (1000, 2000));
        assert_eq!(
            cpu(resolve("tier = \"business\"\n[resources]\ncpu_limit_millicores = 4000").unwrap()),
            (1000, 4000)
        );
        // A request above the tier's limit raises it; a limit of the spec's own must hold it.
        assert_eq!(
            cpu(resolve("tier = \"business\"\n[resources]\ncpu_millicores = 3000").unwrap()),
            (3000, 3000)
        );
        assert_eq!(
            cpu(
                resolve("[resources]\nmemory = \"1GiB\"\nvolume = \"1GiB\"\ncpu_millicores = 300")
                    .unwrap()
            ),
            (300, 0),
            "no limit: only a weight"
        );
        for (text, message) in [
            (
                "[resources]\nmemory = \"1GiB\"\nvolume = \"1GiB\"\ncpu_millicores = 300\ncpu_limit_millicores = 200",
                "resources.cpu_limit_millicores: 200 is below the CPU request of 300",
            ),
            (
                "tier = \"business\"\n[resources]\ncpu_limit_millicores = 300000",
                "resources.cpu_limit_millicores: at most 256000",
            ),
        ] {
            let err = resolve(text).unwrap_err();
            assert!(err.contains(message), "{text}: {err}");
        }
    }

    #[test]
    fn a_tier_fills_resources_and_defaults_apply() {
        let spec = file(&format!("{BASE}tier = \"business\"\negress = [\"api.anthropic.com:443\", \"203.0.113.0/24:8443\"]\n")).unwrap();
        assert_eq!(
            spec.resources,
            Resources {
                memory_bytes: 1 << 30,
                cpu_millicores: 1000,
                cpu_limit_millicores: 0,
                volume_bytes: 5 << 30
            }
        );
        assert!(spec.volume.encrypted, "encrypted by default");
        assert_eq!(spec.volume.mount_path, DEFAULT_MOUNT_PATH);
        assert_eq!(spec.gateway_port, DEFAULT_GATEWAY_PORT);
        assert_eq!(
            spec.egress[0],
            EgressRule {
                destination: Destination::Name("api.anthropic.com".into()),
                protocol: Protocol::Tcp,
                port: 443
            }
        );
        assert_eq!(spec.egress[1].destination.to_string(), "203.0.113.0/24");
        // Round trip through the resolved protobuf form.
        assert_eq!(
            TenantSpec::from_proto(spec.to_proto(), &policy()).unwrap(),
            spec
        );
    }

    #[test]
    fn explicit_resources_override_the_tier() {
        let spec = file(&format!(
            "{BASE}tier = \"individual\"\n[resources]\nmemory = \"512MiB\"\n"
        ))
        .unwrap();
        assert_eq!(spec.resources.memory_bytes, 512 << 20);
        assert_eq!(spec.resources.cpu_millicores, 500);
    }

    #[test]
    fn a_refusal_of_the_file_format_names_the_field_as_the_file_spells_it() {
        for (message, file) in [
            ("resources.memory_bytes", "resources.memory"),
            ("resources.volume_bytes", "resources.volume"),
            ("volume.size_bytes", "volume.size"),
            ("egress[0].port", "egress[0].port"),
        ] {
            let spelled = in_file_format(FieldError::new(message, "why"));
            assert_eq!(spelled.to_string(), format!("invalid {file}: why"));
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (
                format!("{BASE}tier = \"gold\""),
                "invalid tier: unknown tier \"gold\" (known: individual, business)",
            ),
            (
                format!("{BASE}[resources]\nmemory = \"32MiB\"\ncpu_millicores = 100"),
                "invalid resources.memory_bytes: 33554432 bytes is below the minimum of 64 MiB",
            ),
            (
                format!("{BASE}[resources]\ncpu_millicores = 100"),
                "invalid resources.memory_bytes: required",
            ),
            (
                format!("{BASE}[resources]\nmemory = \"1GiB\""),
                "invalid resources.cpu_millicores: required",
            ),
            (
                format!("{BASE}[resources]\nmemory = \"1GiB\"\ncpu_millicores = 100"),
                "invalid resources.volume_bytes: required when no tier is given",
            ),
            (
                format!("{BASE}tier = \"business\"\n[volume]\nsize = \"8MiB\""),
                "invalid volume.size_bytes: 8388608 bytes; a volume is from 16 MiB to 64 TiB",
            ),
            (
                "tenant_id = \"Acme\"\nimage = \"x\"\ntier = \"business\"".to_string(),
                "invalid tenant_id: invalid tenant id \"Acme\"",
            ),
            (
                "tenant_id = \"a/../b\"\nimage = \"x\"\ntier = \"business\"".to_string(),
                "invalid tenant_id",
            ),
            (
                "tenant_id = \"acme\"\nimage = \"UPPER:case\"\ntier = \"business\"".to_string(),
                "invalid image",
            ),
            (
                "tenant_id = \"acme\"\nimage = \"x@sha256:123\"\ntier = \"business\"".to_string(),
                "invalid image: \"x@sha256:123\": digest must be sha256:",
            ),
            (
                format!("{BASE}tier = \"business\"\negress = [\"10.0.0.0/33:443\"]"),
                "invalid egress[0].destination: \"10.0.0.0/33\": prefix length must be 0 to 32",
            ),
            (
                format!("{BASE}tier = \"business\"\negress = [\"api.anthropic.com:0\"]"),
                "invalid egress[0].port: 0 is not a port",
            ),
            (
                format!("{BASE}tier = \"business\"\negress = [\"api.anthropic.com:70000\"]"),
                "invalid egress[0].port: 70000 is not a port",
            ),
            (
                format!("{BASE}tier = \"business\"\negress = [\"0.0.0.0/0:443\"]"),
                "invalid egress[0].destination: \"0.0.0.0/0\" allows the whole Internet",
            ),
            (
                format!("{BASE}tier = \"business\"\negress = [\"::/0:443\"]"),
                "allows the whole Internet",
            ),
            (
                format!("{BASE}tier = \"business\"\negress = [\"169.254.169.254:80\"]"),
                "invalid egress[0].destination: 169.254.169.254/32 includes link-local (the cloud metadata service is 169.254.169.254) addresses: never allowed",
            ),
            (
                format!(
                    "{BASE}tier = \"business\"\negress = [\"api.anthropic.com:443\", \"10.213.0.0/16:443\"]"
                ),
                "invalid egress[1].destination: 10.213.0.0/16 overlaps the tenant networks 10.213.0.0/16: never allowed",
            ),
            (
                format!("{BASE}tier = \"business\"\negress = [\"192.168.1.10:5432\"]"),
                "invalid egress[0].destination: 192.168.1.10/32 includes private (RFC 1918) addresses: allowed only with allow_private_egress = true",
            ),
            (
                format!(
                    "{BASE}tier = \"business\"\negress = [\"0.0.0.0/1:443\", \"128.0.0.0/1:443\"]"
                ),
                "invalid egress[0].destination: 0.0.0.0/1 includes \"this network\"",
            ),
            (
                format!(
                    "{BASE}tier = \"business\"\negress = [\"1.0.0.0/8:443\", \"2.0.0.0/8:443\"]"
                ),
                "invalid egress: the entries cover 0.7812 % of the IPv4 space together; at most 0.3906 % (max_egress_share)",
            ),
            (
                format!("{BASE}tier = \"business\"\negress = [\"not a host:443\"]"),
                "invalid egress[0].destination: \"not a host\": not a CIDR",
            ),
            (
                format!("{BASE}tier = \"business\"\negress = [\"api.anthropic.com\"]"),
                "invalid egress[0]: \"api.anthropic.com\": expected destination:port",
            ),
            (
                format!(
                    "{BASE}tier = \"business\"\n[[egress]]\ndestination = \"1.2.3.4\"\nport = 53\nprotocol = \"icmp\""
                ),
                "invalid egress[0].protocol",
            ),
            (
                format!("{BASE}tier = \"business\"\n[volume]\nmount_path = \"/data/../etc\""),
                "invalid volume.mount_path",
            ),
            (
                format!("{BASE}tier = \"business\"\n[volume]\nmount_path = \"/data:ro\""),
                "invalid volume.mount_path: \"/data:ro\": must not contain ':', ',' or NUL",
            ),
            (
                format!("{BASE}tier = \"business\"\n[volume]\nmount_path = \"/a,b\""),
                "invalid volume.mount_path: \"/a,b\": must not contain",
            ),
            (
                format!("{BASE}tier = \"business\"\n[volume]\nmount_path = \"/data//x\""),
                "invalid volume.mount_path: \"/data//x\": must be normalized",
            ),
            (
                format!("{BASE}tier = \"business\"\n[volume]\nmount_path = \"/data/\""),
                "must be normalized",
            ),
            (
                format!("{BASE}tier = \"business\"\n[volume]\nmount_path = \"/\""),
                "invalid volume.mount_path: \"/\": must be an absolute path below /",
            ),
            (
                format!(
                    "{BASE}tier = \"business\"\n[env]\n{}",
                    (0..5)
                        .map(|i| format!("V{i} = \"{}\"\n", "x".repeat(4000)))
                        .collect::<String>()
                ),
                "invalid env: 20010 bytes of names and values; at most 16384",
            ),
            (
                format!(
                    "{BASE}tier = \"business\"\negress = [{}]",
                    (0..65)
                        .map(|i| format!("\"10.1.{i}.0/24:443\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "invalid egress: 65 entries; at most 64",
            ),
            (
                format!(
                    "{BASE}tier = \"business\"\n[constraints.labels]\n{}",
                    (0..17)
                        .map(|i| format!("k{i} = \"v\"\n"))
                        .collect::<String>()
                ),
                "invalid constraints.labels: 17 labels; at most 16",
            ),
            (
                format!("{BASE}tier = \"business\"\n[constraints.labels]\nzone = \"EU West\""),
                "invalid constraints.labels.zone: \"EU West\" may contain only",
            ),
            (
                format!("{BASE}tier = \"business\"\n[restart]\nwindow = \"25:00-05:00\""),
                "invalid restart.window",
            ),
            (
                format!("{BASE}tier = \"business\"\n[restart]\ntime_zone = \"Europe/Berlin; rm\""),
                "invalid restart.time_zone",
            ),
            (
                format!("{BASE}tier = \"business\"\n[restart]\ntime_zone = \"Mars/Olympus\""),
                "invalid restart.time_zone: \"Mars/Olympus\": not in the time zone database",
            ),
            (
                format!("{BASE}tier = \"business\"\n[restart]\ntime_zone = \"../../etc/passwd\""),
                "invalid restart.time_zone: \"../../etc/passwd\": not an IANA time zone name",
            ),
            (
                format!("{BASE}tier = \"business\"\n[restart]\nwindow = \"03:00-03:00\""),
                "invalid restart.window: \"03:00-03:00\": expected HH:MM-HH:MM with two different times",
            ),
            (
                format!("{BASE}tier = \"business\"\n[constraints]\nproviders = [\"gcp\"]"),
                "invalid constraints.providers: unknown provider \"gcp\"",
            ),
            (
                format!("{BASE}tier = \"business\"\n[constraints]\nregions = [\"EU Central\"]"),
                "invalid constraints.regions",
            ),
            (
                format!("{BASE}tier = \"business\"\ngateway_port = 70000"),
                "invalid gateway_port",
            ),
            (
                format!("{BASE}tier = \"business\"\n[env]\n\"bad-name\" = \"x\""),
                "invalid env",
            ),
            (
                format!("{BASE}tier = \"business\"\nbogus = 1"),
                "unknown field `bogus`",
            ),
            (
                format!("{BASE}tier = \"business\"\n[resources]\nmemory = \"lots\""),
                "invalid resources.memory",
            ),
        ];
        for (text, expected) in cases {
            let err = file(&text).unwrap_err();
            assert!(
                err.contains(expected),
                "{text:?}\n  got: {err}\n  expected: {expected}"
            );
        }
    }

    #[test]
    fn unrestricted_egress_needs_the_operator_flag() {
        let mut p = policy();
        p.allow_unrestricted_egress = true;
        let f: TenantSpecFile = toml::from_str(&format!(
            "{BASE}tier = \"business\"\negress = [\"0.0.0.0/0:443\"]"
        ))
        .unwrap();
        let spec = TenantSpec::from_proto(f.to_proto().unwrap(), &p).unwrap();
        assert_eq!(spec.egress[0].destination.to_string(), "0.0.0.0/0");
    }

    #[test]
    fn windows_parse_print_and_measure_across_midnight() {
        let w: Window = "23:30-01:15".parse().unwrap();
        assert_eq!(w.to_string(), "23:30-01:15");
        assert_eq!(w.start_minute(), 23 * 60 + 30);
        assert_eq!(w.length_minutes(), 105);
        let w: Window = "02:00-05:00".parse().unwrap();
        assert_eq!(w.length_minutes(), 180);
        for bad in [
            "2:00-05:00",
            "02:00",
            "02:60-03:00",
            "24:00-01:00",
            "02:00-05:00-06:00",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad}");
        }
        // Stored specs keep the plain string form.
        assert_eq!(serde_json::to_string(&w).unwrap(), "\"02:00-05:00\"");
        assert!(serde_json::from_str::<Window>("\"05:00-05:00\"").is_err());
    }

    #[test]
    fn a_left_out_window_or_zone_is_the_hosts_default() {
        let spec = file(&format!("{BASE}tier = \"business\"")).unwrap();
        assert_eq!(spec.restart, RestartPolicy::default());
        let spec = file(&format!(
            "{BASE}tier = \"business\"\n[restart]\nwindow = \"01:00-04:00\"\ntime_zone = \"America/New_York\""
        ))
        .unwrap();
        assert_eq!(spec.restart.window.unwrap().to_string(), "01:00-04:00");
        assert_eq!(spec.restart.time_zone.unwrap().as_str(), "America/New_York");
        let off = file(&format!(
            "{BASE}tier = \"business\"\n[restart]\nenabled = false"
        ))
        .unwrap();
        assert!(!off.restart.enabled);
    }

    #[test]
    fn backups_are_nightly_by_default_and_a_policy_is_checked_by_field() {
        let spec = file(&format!("{BASE}tier = \"business\"")).unwrap();
        assert_eq!(spec.backup, BackupPolicy::default());
        assert_eq!(spec.backup.interval, std::time::Duration::from_secs(86400));
        let spec = file(&format!(
            "{BASE}tier = \"business\"\n[backup]\ninterval = \"6h\"\nkeep_daily = 14"
        ))
        .unwrap();
        assert_eq!(
            spec.backup.interval,
            std::time::Duration::from_secs(6 * 3600)
        );
        assert_eq!((spec.backup.keep_daily, spec.backup.keep_weekly), (14, 4));
        let round = TenantSpec::from_resolved(spec.to_proto()).unwrap();
        assert_eq!(round.backup, spec.backup);
        for (table, error) in [
            (
                "interval = \"30m\"",
                "invalid backup.interval: 30m: from 1h to 7days",
            ),
            (
                "interval = \"8days\"",
                "invalid backup.interval: 8days: from 1h to 7days",
            ),
            (
                "interval = \"soon\"",
                "invalid backup.interval: \"soon\": expected number at 0",
            ),
            (
                "keep_weekly = 5000",
                "invalid backup.keep_weekly: 5000: at most 1000",
            ),
        ] {
            let err = file(&format!("{BASE}tier = \"business\"\n[backup]\n{table}")).unwrap_err();
            assert_eq!(err, error, "{table}");
        }
        let off = file(&format!(
            "{BASE}tier = \"business\"\n[backup]\nenabled = false"
        ))
        .unwrap();
        assert!(!off.backup.enabled);
    }

    #[test]
    fn region_patterns() {
        let c = Constraints {
            regions: vec!["eu-*".into(), "fsn1".into()],
            ..Default::default()
        };
        assert!(c.region_allowed("eu-central-1"));
        assert!(c.region_allowed("fsn1"));
        assert!(!c.region_allowed("us-east-1"));
        assert!(Constraints::default().region_allowed("anything"));
    }
}
