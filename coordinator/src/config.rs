//! The coordinator's configuration file (`/etc/berth/coordinator.toml`), validated on load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use berth_shared::config::ConfigError;
use berth_shared::config::{parse_toml, read};
use std::collections::BTreeMap;

use berth_shared::field::validate_token;
use berth_shared::host::Provider;
use berth_shared::ids::HostId;
use berth_shared::spec::{Resources, Tier};
use berth_shared::units::{parse_bytes, parse_duration};

use crate::placement::PlacementPolicy;
use crate::placement::scheduler::{CatalogEntry, Strategy};
use serde::Deserialize;

/// As written in the file; every key optional, unknown keys refused.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    agent_listen: Option<SocketAddr>,
    operator_listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    http_tls_cert: Option<PathBuf>,
    http_tls_key: Option<PathBuf>,
    http_insecure_listen: Option<bool>,
    transfer_hosts: Option<BTreeMap<String, String>>,
    server_names: Option<Vec<String>>,
    agent_cert_ttl: Option<String>,
    down_after: Option<String>,
    report_interval: Option<String>,
    drain_start_timeout: Option<String>,
    strategy: Option<Strategy>,
    allow_unrestricted_egress: Option<bool>,
    allow_private_egress: Option<bool>,
    tenant_networks: Option<Vec<String>>,
    max_egress_share: Option<f64>,
    tiers: Option<BTreeMap<String, RawTier>>,
    catalog: Option<Vec<RawCatalogEntry>>,
    backup: Option<RawBackup>,
    store: Option<StoreKind>,
    etcd: Option<RawEtcd>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    endpoints: Vec<String>,
    prefix: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    advertise: Option<String>,
}

/// Where the fleet's state is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The embedded database in the state directory.
    #[default]
    Sled,
    /// An etcd v3 cluster (`[etcd]`).
    Etcd,
}

/// The most etcd members the configuration may list.
const MAX_ETCD_ENDPOINTS: usize = 16;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackup {
    repository: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    memory: String,
    cpu_millicores: u32,
    cpu_limit_millicores: Option<u32>,
    volume: String,
    strategy: Option<Strategy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalogEntry {
    provider: String,
    instance_type: String,
    memory: String,
    cpus: u32,
    monthly_cost: f64,
    regions: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub state_dir: PathBuf,
    pub agent_listen: SocketAddr,
    pub operator_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// TLS for the HTTP port (certificate chain and key, PEM): required to listen anywhere but
    /// loopback unless `http_insecure_listen`.
    pub http_tls: Option<HttpTls>,
    /// Plain HTTP off loopback, said out loud at start: read tokens then cross the network in
    /// clear text.
    pub http_insecure_listen: bool,
    /// Where a host's transfer port is, when not at the address its session comes from (a
    /// host behind NAT, or with a private network for drains).
    pub transfer_hosts: BTreeMap<HostId, std::net::IpAddr>,
    /// Extra DNS names or IPs for the server certificate (for curl and browsers; berth's own
    /// clients verify the fixed internal name).
    pub server_names: Vec<String>,
    pub agent_cert_ttl: Duration,
    pub down_after: Duration,
    pub report_interval: Duration,
    /// How long a drained tenant may take to run and pass its health check on its target
    /// before its move rolls back.
    pub drain_start_timeout: Duration,
    /// Fleet-wide default strategy; a tier may override it.
    pub strategy: Strategy,
    pub allow_unrestricted_egress: bool,
    /// Which addresses egress entries may name: private ranges, tenant networks, the share of
    /// the address space one tenant's entries may cover.
    pub reach: berth_shared::reach::ReachPolicy,
    pub tiers: Vec<TierConfig>,
    /// Host types that can be bought, for refusals' recommendations (one currency).
    pub catalog: Vec<CatalogEntry>,
    /// `[backup] repository`: where tenants' backups go (each its own restic repository under
    /// it); `None`: no backups.
    pub backup_repository: Option<berth_shared::backup::Repository>,
    /// `store`: sled (the default) or etcd.
    pub store: StoreKind,
    /// `[etcd]`: the cluster `store = "etcd"` uses and `migrate-store --to etcd` fills.
    pub etcd: Option<crate::etcd::EtcdConfig>,
}

/// The HTTP port's certificate chain and key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TierConfig {
    pub tier: Tier,
    pub strategy: Option<Strategy>,
}

/// Built-in tiers (the DESIGN's presets). Memory is each tier's hard cap. CPU is sized for a
/// gateway: idle it uses a few percent of a core, so each tier requests what its busy moments
/// average (what placement counts, and its share when a host is contended) and may burst to
/// one or two cores, so a host fills by its RAM, as gateways' hosts are sized.
fn default_tiers() -> Vec<TierConfig> {
    let tier = |name: &str, memory_bytes: u64, cpu: (u32, u32), volume_bytes: u64| TierConfig {
        tier: Tier {
            name: name.into(),
            resources: Resources {
                memory_bytes,
                cpu_millicores: cpu.0,
                volume_bytes,
                cpu_limit_millicores: cpu.1,
            },
        },
        strategy: None,
    };
    vec![
        tier("individual", 256 << 20, (100, 1000), 2 << 30),
        tier("business", 1 << 30, (250, 2000), 10 << 30),
        tier("pro", 1536 << 20, (500, 2000), 20 << 30),
    ]
}

/// Built-in catalog: list prices per month in EUR (Hetzner's, and AWS on-demand converted),
/// as examples; configure your own under `[[catalog]]`.
fn default_catalog() -> Vec<CatalogEntry> {
    let hz = ["fsn1", "nbg1", "hel1"];
    let aws = ["eu-central-1", "eu-west-1"];
    let entry = |provider, t: &str, gib: u64, cpus, cents, regions: &[&str]| CatalogEntry {
        provider,
        instance_type: t.into(),
        memory_bytes: gib << 30,
        cpus,
        monthly_cost_cents: cents,
        regions: regions.iter().map(|r| r.to_string()).collect(),
    };
    vec![
        entry(Provider::Hetzner, "cx22", 4, 2, 379, &hz),
        entry(Provider::Hetzner, "cx32", 8, 4, 680, &hz),
        entry(Provider::Hetzner, "cx42", 16, 8, 1640, &hz),
        entry(Provider::Hetzner, "cx52", 32, 16, 3240, &hz),
        entry(Provider::Hetzner, "ccx13", 8, 2, 1249, &hz),
        entry(Provider::Hetzner, "ccx23", 16, 4, 2449, &hz),
        entry(Provider::Hetzner, "ccx33", 32, 8, 4849, &hz),
        entry(Provider::Hetzner, "ccx43", 64, 16, 9649, &hz),
        entry(Provider::Aws, "t3.medium", 4, 2, 3300, &aws),
        entry(Provider::Aws, "t3.large", 8, 2, 6600, &aws),
        entry(Provider::Aws, "t3.xlarge", 16, 4, 13200, &aws),
        entry(Provider::Aws, "m6i.large", 8, 2, 7700, &aws),
        entry(Provider::Aws, "m6i.xlarge", 16, 4, 15400, &aws),
        entry(Provider::Aws, "m6i.2xlarge", 32, 8, 30800, &aws),
    ]
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/berth/coordinator"),
            agent_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            operator_listen: SocketAddr::from(([0, 0, 0, 0], 7444)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            http_tls: None,
            http_insecure_listen: false,
            transfer_hosts: BTreeMap::new(),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            agent_cert_ttl: Duration::from_secs(30 * 24 * 3600),
            down_after: Duration::from_secs(15),
            report_interval: Duration::from_secs(5),
            drain_start_timeout: Duration::from_secs(120),
            strategy: Strategy::Binpack,
            allow_unrestricted_egress: false,
            reach: berth_shared::reach::ReachPolicy::default(),
            tiers: default_tiers(),
            catalog: default_catalog(),
            backup_repository: None,
            store: StoreKind::Sled,
            etcd: None,
        }
    }
}

/// A value in `[etcd]` that is refused; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdConfigError {
    #[error("etcd.endpoints: from 1 to {MAX_ETCD_ENDPOINTS} members' client URLs")]
    EndpointCount,
    #[error(
        "etcd.endpoints: {endpoint:?}: a {scheme}host:port URL, as the first one (every member is reached the same way)"
    )]
    MixedSchemes {
        endpoint: String,
        scheme: &'static str,
    },
    #[error("etcd.endpoints: {endpoint:?}: not {scheme}host:port")]
    NotHostPort {
        endpoint: String,
        scheme: &'static str,
    },
    #[error(
        "{0}: https:// endpoints need ca_file, cert_file and key_file (etcd checks this coordinator's certificate, it checks etcd's)"
    )]
    TlsFileMissing(&'static str),
    #[error("etcd.ca_file, etcd.cert_file, etcd.key_file: only with https:// endpoints")]
    TlsWithoutHttps,
    #[error("etcd.prefix: {0:?}: up to 64 printable characters ending in /")]
    Prefix(String),
    #[error(
        "etcd.advertise: {0:?}: an IP address or a DNS name (no port: the ports are the listening ones)"
    )]
    Advertise(String),
}

/// Whether `host` is an IP address or a DNS name (labels of letters, digits and inner dashes).
fn is_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks `[etcd]`, naming the key.
fn etcd_config(raw: RawEtcd) -> Result<crate::etcd::EtcdConfig, EtcdConfigError> {
    if raw.endpoints.is_empty() || raw.endpoints.len() > MAX_ETCD_ENDPOINTS {
        return Err(EtcdConfigError::EndpointCount);
    }
    let tls = raw.endpoints[0].starts_with("https://");
    let scheme = if tls { "https://" } else { "http://" };
    for endpoint in &raw.endpoints {
        let Some(rest) = endpoint.strip_prefix(scheme) else {
            return Err(EtcdConfigError::MixedSchemes {
                endpoint: endpoint.clone(),
                scheme,
            });
        };
        let valid = rest.len() <= 253
            && rest.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            })
            && !rest.contains(['/', '@', ' ']);
        if !valid {
            return Err(EtcdConfigError::NotHostPort {
                endpoint: endpoint.clone(),
                scheme,
            });
        }
    }
    let tls = match (tls, raw.ca_file, raw.cert_file, raw.key_file) {
        (true, Some(ca_file), Some(cert_file), Some(key_file)) => Some(crate::etcd::EtcdTls {
            ca_file,
            cert_file,
            key_file,
        }),
        (true, ca, cert, _) => {
            let missing = if ca.is_none() {
                "etcd.ca_file"
            } else if cert.is_none() {
                "etcd.cert_file"
            } else {
                "etcd.key_file"
            };
            return Err(EtcdConfigError::TlsFileMissing(missing));
        }
        (false, None, None, None) => None,
        (false, ..) => return Err(EtcdConfigError::TlsWithoutHttps),
    };
    let prefix = raw.prefix.unwrap_or_else(|| "/berth/".into());
    if prefix.is_empty()
        || prefix.len() > 64
        || !prefix.ends_with('/')
        || !prefix.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(EtcdConfigError::Prefix(prefix));
    }
    if let Some(host) = raw.advertise.as_ref().filter(|h| !is_host(h)) {
        return Err(EtcdConfigError::Advertise(host.chars().take(300).collect()));
    }
    Ok(crate::etcd::EtcdConfig {
        endpoints: raw.endpoints,
        prefix,
        tls,
        advertise: raw.advertise,
    })
}

impl CoordinatorConfig {
    /// Defaults, overridden by the file at `path` when given.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = read(path)?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_toml(path, text)?;
        let value = |e: berth_shared::units::UnitError| ConfigError::value(path, e);
        let mut config = Self::default();
        if let Some(v) = raw.state_dir {
            config.state_dir = v;
        }
        if let Some(v) = raw.agent_listen {
            config.agent_listen = v;
        }
        if let Some(v) = raw.operator_listen {
            config.operator_listen = v;
        }
        if let Some(v) = raw.http_listen {
            config.http_listen = v;
        }
        config.http_tls = match (raw.http_tls_cert, raw.http_tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(HttpTls { cert, key }),
            (Some(_), None) => {
                return Err(ConfigError::value(
                    path,
                    "invalid http_tls_cert: needs http_tls_key too",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::value(
                    path,
                    "invalid http_tls_key: needs http_tls_cert too",
                ));
            }
        };
        if let Some(v) = raw.http_insecure_listen {
            config.http_insecure_listen = v;
        }
        for (host, ip) in raw.transfer_hosts.unwrap_or_default() {
            let id = HostId::new(&host).map_err(|e| {
                ConfigError::value(path, format!("invalid transfer_hosts.{host:?}: {e}"))
            })?;
            let ip: std::net::IpAddr = ip.parse().map_err(|_| {
                ConfigError::value(
                    path,
                    format!("invalid transfer_hosts.{host}: {ip:?} is not an IP address"),
                )
            })?;
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(ConfigError::value(
                    path,
                    format!("invalid transfer_hosts.{host}: {ip} is not a host's address"),
                ));
            }
            config.transfer_hosts.insert(id, ip);
        }
        if let Some(v) = raw.server_names {
            config.server_names = v;
        }
        if let Some(b) = raw.backup {
            config.backup_repository = Some(
                berth_shared::backup::Repository::new(&b.repository)
                    .map_err(|e| ConfigError::value(path, format!("backup.repository: {e}")))?,
            );
        }
        if let Some(etcd) = raw.etcd {
            config.etcd = Some(etcd_config(etcd).map_err(|e| ConfigError::value(path, e))?);
        }
        if let Some(kind) = raw.store {
            if kind == StoreKind::Etcd && config.etcd.is_none() {
                return Err(ConfigError::value(
                    path,
                    "store = \"etcd\" needs an [etcd] table with the members' endpoints",
                ));
            }
            config.store = kind;
        }
        if let Some(v) = raw.agent_cert_ttl {
            config.agent_cert_ttl = parse_duration("agent_cert_ttl", &v).map_err(value)?;
        }
        if let Some(v) = raw.down_after {
            config.down_after = parse_duration("down_after", &v).map_err(value)?;
        }
        if let Some(v) = raw.strategy {
            config.strategy = v;
        }
        if let Some(v) = raw.allow_unrestricted_egress {
            config.allow_unrestricted_egress = v;
        }
        if let Some(v) = raw.allow_private_egress {
            config.reach.allow_private = v;
        }
        if let Some(networks) = raw.tenant_networks {
            config.reach.tenant_networks = networks
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    berth_shared::reach::Net::parse(n).ok_or_else(|| {
                        ConfigError::value(
                            path,
                            format!("invalid tenant_networks[{i}]: {n:?} is not a CIDR"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = raw.max_egress_share {
            if v.is_nan() || v <= 0.0 || v > 1.0 {
                return Err(ConfigError::value(
                    path,
                    format!(
                        "invalid max_egress_share: {v} is not a share (more than 0, at most 1)"
                    ),
                ));
            }
            config.reach.max_share = v;
        }
        if let Some(tiers) = raw.tiers {
            config.tiers = Vec::new();
            for (name, t) in tiers {
                validate_token("tiers", &name, false).map_err(|e| ConfigError::value(path, e))?;
                let field = |f: &str| format!("tiers.{name}.{f}");
                let memory_bytes = parse_bytes(&field("memory"), &t.memory)
                    .map_err(|e| ConfigError::value(path, e))?;
                if memory_bytes < berth_shared::spec::MIN_MEMORY_BYTES {
                    return Err(ConfigError::value(
                        path,
                        format!("invalid {}: below the minimum of 64 MiB", field("memory")),
                    ));
                }
                if t.cpu_millicores == 0 {
                    return Err(ConfigError::value(
                        path,
                        format!(
                            "invalid {}: must be greater than zero",
                            field("cpu_millicores")
                        ),
                    ));
                }
                let cpu_limit_millicores = t.cpu_limit_millicores.unwrap_or(0);
                let max = berth_shared::spec::MAX_CPU_MILLICORES;
                if t.cpu_millicores > max || cpu_limit_millicores > max {
                    return Err(ConfigError::value(
                        path,
                        format!("invalid tiers.{name}: CPU above {max} millicores (256 CPUs)"),
                    ));
                }
                if cpu_limit_millicores != 0 && cpu_limit_millicores < t.cpu_millicores {
                    return Err(ConfigError::value(
                        path,
                        format!(
                            "invalid {}: {cpu_limit_millicores} is below the tier's cpu_millicores ({})",
                            field("cpu_limit_millicores"),
                            t.cpu_millicores
                        ),
                    ));
                }
                let volume_bytes = parse_bytes(&field("volume"), &t.volume)
                    .map_err(|e| ConfigError::value(path, e))?;
                config.tiers.push(TierConfig {
                    tier: Tier {
                        name,
                        resources: Resources {
                            memory_bytes,
                            cpu_millicores: t.cpu_millicores,
                            volume_bytes,
                            cpu_limit_millicores,
                        },
                    },
                    strategy: t.strategy,
                });
            }
        }
        if let Some(catalog) = raw.catalog {
            config.catalog = Vec::new();
            for (i, e) in catalog.into_iter().enumerate() {
                let field = |f: &str| format!("catalog[{i}].{f}");
                let provider = Provider::parse(&field("provider"), &e.provider)
                    .map_err(|e| ConfigError::value(path, e))?;
                let memory_bytes = parse_bytes(&field("memory"), &e.memory)
                    .map_err(|e| ConfigError::value(path, e))?;
                if !e.monthly_cost.is_finite() || e.monthly_cost < 0.0 {
                    return Err(ConfigError::value(
                        path,
                        format!("invalid {}: must be a price", field("monthly_cost")),
                    ));
                }
                config.catalog.push(CatalogEntry {
                    provider,
                    instance_type: e.instance_type,
                    memory_bytes,
                    cpus: e.cpus,
                    monthly_cost_cents: (e.monthly_cost * 100.0).round() as u64,
                    regions: e.regions,
                });
            }
        }
        if let Some(v) = raw.report_interval {
            config.report_interval = parse_duration("report_interval", &v).map_err(value)?;
        }
        if let Some(v) = raw.drain_start_timeout {
            config.drain_start_timeout =
                parse_duration("drain_start_timeout", &v).map_err(value)?;
        }
        Ok(config)
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir.join("ca")
    }
    pub fn db_dir(&self) -> PathBuf {
        self.state_dir.join("db")
    }
    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join("admin.sock")
    }
    /// The master key that wraps the volume keys (mode 0600; a systemd credential named
    /// `master-key` takes its place when the unit passes one).
    pub fn master_key_file(&self) -> PathBuf {
        self.state_dir.join("master.key")
    }
    /// The wrapped volume keys (mode 0600), rewritten whole when a key is destroyed.
    pub fn keyring_file(&self) -> PathBuf {
        self.state_dir.join("volume-keys")
    }
    /// The wrapped backup keys (the passwords of tenants' restic repositories), alike.
    pub fn backup_keyring_file(&self) -> PathBuf {
        self.state_dir.join("backup-keys")
    }
    /// Written after the listeners are bound: their real addresses (port 0 resolved).
    pub fn endpoints_file(&self) -> PathBuf {
        self.state_dir.join("endpoints.json")
    }
}

impl CoordinatorConfig {
    /// What placement needs of this configuration: the tiers and spec rules, the strategies
    /// and the host catalog.
    pub fn placement_policy(&self) -> PlacementPolicy {
        PlacementPolicy {
            spec: berth_shared::spec::SpecPolicy {
                tiers: self.tiers.iter().map(|t| t.tier.clone()).collect(),
                allow_unrestricted_egress: self.allow_unrestricted_egress,
                reach: Some(self.reach.clone()),
            },
            strategy: self.strategy,
            tier_strategy: self
                .tiers
                .iter()
                .filter_map(|t| t.strategy.map(|s| (t.tier.name.clone(), s)))
                .collect(),
            catalog: self.catalog.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etcd_store_is_chosen_with_its_members_and_checked_by_key() {
        let path = Path::new("c.toml");
        let config = CoordinatorConfig::parse(
            path,
            "store = \"etcd\"\n[etcd]\nendpoints = [\"http://10.0.0.1:2379\", \"http://etcd-2:2379\"]\n",
        )
        .unwrap();
        assert_eq!(config.store, StoreKind::Etcd);
        assert_eq!(
            config.etcd,
            Some(crate::etcd::EtcdConfig {
                endpoints: vec!["http://10.0.0.1:2379".into(), "http://etcd-2:2379".into()],
                prefix: "/berth/".into(),
                tls: None,
                advertise: None,
            })
        );
        for host in ["coord-1.example.com", "10.0.0.5", "fd00::5"] {
            let text = format!("[etcd]\nendpoints = [\"http://e:1\"]\nadvertise = {host:?}\n");
            let etcd = CoordinatorConfig::parse(path, &text).unwrap().etcd.unwrap();
            assert_eq!(etcd.advertise.as_deref(), Some(host));
        }
        let tls = "[etcd]\nendpoints = [\"https://e1:2379\", \"https://e2:2379\"]\nca_file = \"/etc/berth/etcd-ca.crt\"\ncert_file = \"/etc/berth/etcd.crt\"\nkey_file = \"/etc/berth/etcd.key\"\n";
        assert_eq!(
            CoordinatorConfig::parse(path, tls)
                .unwrap()
                .etcd
                .unwrap()
                .tls,
            Some(crate::etcd::EtcdTls {
                ca_file: "/etc/berth/etcd-ca.crt".into(),
                cert_file: "/etc/berth/etcd.crt".into(),
                key_file: "/etc/berth/etcd.key".into(),
            })
        );
        assert_eq!(
            CoordinatorConfig::parse(path, "").unwrap().store,
            StoreKind::Sled
        );
        for (text, message) in [
            ("store = \"etcd\"", "store = \"etcd\" needs an [etcd] table"),
            (
                "store = \"postgres\"",
                "unknown variant `postgres`, expected `sled` or `etcd`",
            ),
            ("[etcd]\nendpoints = []", "etcd.endpoints: from 1 to 16"),
            (
                "[etcd]\nendpoints = [\"https://e:2379\"]",
                "etcd.ca_file: https:// endpoints need ca_file, cert_file and key_file",
            ),
            (
                "[etcd]\nendpoints = [\"https://e:2379\"]\nca_file = \"a\"\ncert_file = \"b\"",
                "etcd.key_file: https:// endpoints need",
            ),
            (
                "[etcd]\nendpoints = [\"https://e:2379\", \"http://f:2379\"]",
                "etcd.endpoints: \"http://f:2379\": a https://host:port URL, as the first one",
            ),
            (
                "[etcd]\nendpoints = [\"http://e:2379\"]\nca_file = \"a\"",
                "etcd.ca_file, etcd.cert_file, etcd.key_file: only with https:// endpoints",
            ),
            (
                "[etcd]\nendpoints = [\"ftp://e:2379\"]",
                "etcd.endpoints: \"ftp://e:2379\": a http://host:port URL",
            ),
            (
                "[etcd]\nendpoints = [\"http://e\"]",
                "etcd.endpoints: \"http://e\": not http://host:port",
            ),
            (
                "[etcd]\nendpoints = [\"http://u@e:1/x\"]",
                "not http://host:port",
            ),
            (
                "[etcd]\nendpoints = [\"http://e:1\"]\nprefix = \"berth\"",
                "etcd.prefix: \"berth\"",
            ),
            (
                "[etcd]\nendpoints = [\"http://e:1\"]\nprefix = \"/a b/\"",
                "etcd.prefix",
            ),
            (
                "[etcd]\nendpoints = [\"http://e:1\"]\nadvertise = \"coord-1:7443\"",
                "etcd.advertise: \"coord-1:7443\": an IP address or a DNS name (no port",
            ),
            (
                "[etcd]\nendpoints = [\"http://e:1\"]\nadvertise = \"-bad.example\"",
                "etcd.advertise: \"-bad.example\"",
            ),
        ] {
            let err = CoordinatorConfig::parse(path, text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(message), "{text}: {err}");
        }
    }

    #[test]
    fn parses_and_defaults() {
        let c = CoordinatorConfig::parse(
            Path::new("c.toml"),
            "down_after = \"20s\"\nagent_listen = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        assert_eq!(c.down_after, Duration::from_secs(20));
        assert_eq!(c.agent_listen.port(), 9000);
        assert_eq!(c.report_interval, Duration::from_secs(5));
        assert_eq!(c.drain_start_timeout, Duration::from_secs(120));
        let c = CoordinatorConfig::parse(Path::new("c.toml"), "drain_start_timeout = \"5m\"\n")
            .unwrap();
        assert_eq!(c.drain_start_timeout, Duration::from_secs(300));
    }

    #[test]
    fn tiers_and_catalog() {
        let c = CoordinatorConfig::default();
        assert_eq!(
            c.tiers
                .iter()
                .map(|t| t.tier.name.as_str())
                .collect::<Vec<_>>(),
            ["individual", "business", "pro"]
        );
        // Gateways: small CPU requests, bursts to a core or two.
        let business = &c.tiers[1].tier.resources;
        assert_eq!(
            (business.cpu_millicores, business.cpu_limit_millicores),
            (250, 2000)
        );
        let text = "strategy = \"spread\"\n[tiers.tiny]\nmemory = \"128MiB\"\ncpu_millicores = 250\ncpu_limit_millicores = 1500\nvolume = \"1GiB\"\nstrategy = \"binpack\"\n";
        let c = CoordinatorConfig::parse(Path::new("c.toml"), text).unwrap();
        assert_eq!(c.strategy, Strategy::Spread);
        assert_eq!(c.tiers.len(), 1);
        assert_eq!(c.tiers[0].tier.resources.cpu_limit_millicores, 1500);
        assert_eq!(c.tiers[0].strategy, Some(Strategy::Binpack));
        for (text, expected) in [
            (
                "[tiers.tiny]\nmemory = \"1MiB\"\ncpu_millicores = 250\nvolume = \"1GiB\"",
                "invalid tiers.tiny.memory: below the minimum",
            ),
            (
                "[tiers.tiny]\nmemory = \"1GiB\"\ncpu_millicores = 0\nvolume = \"1GiB\"",
                "invalid tiers.tiny.cpu_millicores",
            ),
            (
                "[tiers.tiny]\nmemory = \"1GiB\"\ncpu_millicores = 500\ncpu_limit_millicores = 400\nvolume = \"1GiB\"",
                "invalid tiers.tiny.cpu_limit_millicores: 400 is below the tier's cpu_millicores (500)",
            ),
            (
                "[tiers.tiny]\nmemory = \"1GiB\"\ncpu_millicores = 500\ncpu_limit_millicores = 300000\nvolume = \"1GiB\"",
                "invalid tiers.tiny: CPU above 256000 millicores",
            ),
            (
                "[[catalog]]\nprovider = \"gcp\"\ninstance_type = \"x\"\nmemory = \"1GiB\"\ncpus = 1\nmonthly_cost = 1.0\nregions = []",
                "invalid catalog[0].provider",
            ),
            ("strategy = \"random\"", "strategy"),
        ] {
            let err = CoordinatorConfig::parse(Path::new("c.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let unknown = CoordinatorConfig::parse(Path::new("c.toml"), "down_afterr = \"1s\"")
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("unknown field `down_afterr`"), "{unknown}");
        let bad_addr = CoordinatorConfig::parse(Path::new("c.toml"), "agent_listen = \"nowhere\"")
            .unwrap_err()
            .to_string();
        assert!(bad_addr.contains("agent_listen"), "{bad_addr}");
        let bad_dur = CoordinatorConfig::parse(Path::new("c.toml"), "agent_cert_ttl = \"forever\"")
            .unwrap_err()
            .to_string();
        assert!(
            bad_dur.contains("invalid agent_cert_ttl \"forever\""),
            "{bad_dur}"
        );
        let garbage = CoordinatorConfig::parse(Path::new("c.toml"), "\u{0}\u{1}[[[")
            .unwrap_err()
            .to_string();
        assert!(garbage.starts_with("c.toml:"), "{garbage}");
        for (text, expected) in [
            (
                "http_tls_cert = \"/c.pem\"",
                "invalid http_tls_cert: needs http_tls_key too",
            ),
            (
                "[transfer_hosts]\n\"../x\" = \"10.0.0.1\"",
                "invalid transfer_hosts.\"../x\"",
            ),
            (
                "[backup]\nrepository = \"sftp:-oProxyCommand=sh\"",
                "backup.repository: invalid backup repository",
            ),
            ("[backup]\nrepo = \"/srv\"", "unknown field `repo`"),
            (
                "[transfer_hosts]\nh1 = \"0.0.0.0\"",
                "invalid transfer_hosts.h1: 0.0.0.0 is not a host's address",
            ),
            (
                "[transfer_hosts]\nh1 = \"nowhere\"",
                "invalid transfer_hosts.h1: \"nowhere\" is not an IP address",
            ),
        ] {
            let err = CoordinatorConfig::parse(Path::new("c.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
        let zero = CoordinatorConfig::parse(Path::new("c.toml"), "drain_start_timeout = \"0s\"")
            .unwrap_err()
            .to_string();
        assert!(
            zero.contains("invalid drain_start_timeout \"0s\": must be greater than zero"),
            "{zero}"
        );
    }
}
