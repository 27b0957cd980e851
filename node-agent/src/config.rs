//! The agent's configuration file (`/etc/berth/agent.toml`), validated on load.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use berth_shared::config::ConfigError;
use berth_shared::config::{parse_toml, read};
use berth_shared::field::{FieldError, validate_token};
use berth_shared::host::Provider;
use berth_shared::transport::CoordinatorUrl;
use berth_shared::units::{UnitError, parse_bytes, parse_duration};

use crate::egress::EgressSettings;
use crate::restarts::RestartSettings;
use crate::runtime::subnets::SubnetPool;
use berth_shared::spec::ZoneName;
use serde::Deserialize;

/// A setting of a section whose value is refused; the message names it as the file does.
#[derive(Debug, thiserror::Error)]
enum SettingError {
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error(transparent)]
    Unit(#[from] UnitError),
    #[error(transparent)]
    Table(#[from] crate::egress::nft::BadTableName),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    coordinator: Option<String>,
    provider: String,
    region: String,
    #[serde(default)]
    instance_type: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Monthly price of the host, e.g. 54.90.
    #[serde(default)]
    monthly_cost: f64,
    currency: Option<String>,
    cpu_overcommit: Option<f64>,
    memory_reserved: Option<String>,
    report_interval: Option<String>,
    cgroup_root: Option<PathBuf>,
    docker_socket: Option<PathBuf>,
    tenant_subnets: Option<String>,
    metrics_listen: Option<String>,
    metrics_token_file: Option<PathBuf>,
    transfer_listen: Option<String>,
    transfer_advertise: Option<String>,
    volume_root: Option<PathBuf>,
    backup_sftp_command: Option<String>,
    backup_s3_credentials_file: Option<PathBuf>,
    #[serde(default)]
    egress: RawEgress,
    #[serde(default)]
    restarts: RawRestarts,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestarts {
    window: Option<String>,
    time_zone: Option<String>,
    max_concurrent: Option<u32>,
    skip_if_started_within: Option<String>,
    health_timeout: Option<String>,
}

impl RawRestarts {
    fn parse(self) -> Result<RestartSettings, SettingError> {
        let mut settings = RestartSettings::default();
        if let Some(w) = self.window {
            settings.window = w
                .parse()
                .map_err(|e: String| FieldError::new("restarts.window", e))?;
        }
        if let Some(z) = self.time_zone {
            settings.time_zone = ZoneName::new(&z)
                .map_err(|e| FieldError::new("restarts.time_zone", e.to_string()))?;
        }
        if let Some(k) = self.max_concurrent {
            if !(1..=64).contains(&k) {
                return Err(FieldError::new(
                    "restarts.max_concurrent",
                    format!("{k}: must be between 1 and 64"),
                )
                .into());
            }
            settings.max_concurrent = k as usize;
        }
        if let Some(v) = self.skip_if_started_within {
            settings.skip_if_started_within =
                parse_duration_or_zero("restarts.skip_if_started_within", &v)?;
        }
        if let Some(v) = self.health_timeout {
            settings.health_timeout = parse_duration("restarts.health_timeout", &v)?;
        }
        Ok(settings)
    }
}

/// A duration that may be zero (`0s` turns a rule off).
fn parse_duration_or_zero(name: &str, v: &str) -> Result<Duration, UnitError> {
    if v.trim() == "0s" || v.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(name, v)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    table: Option<String>,
    name_servers: Option<Vec<String>>,
    tenant_resolvers: Option<Vec<String>>,
    ttl_floor: Option<String>,
    ttl_ceiling: Option<String>,
    stale_grace: Option<String>,
}

/// The `[egress]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressConfig {
    /// Everything but the resolvers, which may come from /etc/resolv.conf.
    pub settings: EgressSettings,
    /// Where the agent resolves allowlist names; `None`: the host's /etc/resolv.conf.
    pub name_servers: Option<Vec<SocketAddr>>,
    /// DNS servers tenants may query; `None`: the non-loopback ones of /etc/resolv.conf.
    pub tenant_resolvers: Option<BTreeSet<Ipv4Addr>>,
}

/// The `nameserver` lines of a resolv.conf.
pub fn resolv_conf_nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse().ok())
        .collect()
}

impl EgressConfig {
    /// Name servers and tenant resolvers, with the defaults taken from `resolv_conf`.
    pub fn resolved(&self, resolv_conf: &str) -> (Vec<SocketAddr>, EgressSettings) {
        let system = resolv_conf_nameservers(resolv_conf);
        let name_servers = self
            .name_servers
            .clone()
            .unwrap_or_else(|| system.iter().map(|a| SocketAddr::new(*a, 53)).collect());
        let mut settings = self.settings.clone();
        settings.tenant_resolvers = self.tenant_resolvers.clone().unwrap_or_else(|| {
            system
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V4(v4) if !v4.is_loopback() => Some(*v4),
                    _ => None,
                })
                .collect()
        });
        (name_servers, settings)
    }

    fn parse(raw: RawEgress) -> Result<Self, SettingError> {
        let mut settings = EgressSettings::default();
        if let Some(t) = raw.table {
            crate::egress::nft::validate_table(&t)?;
            settings.table = t;
        }
        let duration = |name: &str, v: Option<String>, default: Duration| {
            v.map(|v| parse_duration(name, &v)).unwrap_or(Ok(default))
        };
        settings.ttl_floor = duration("egress.ttl_floor", raw.ttl_floor, settings.ttl_floor)?;
        settings.ttl_ceiling =
            duration("egress.ttl_ceiling", raw.ttl_ceiling, settings.ttl_ceiling)?;
        settings.stale_grace =
            duration("egress.stale_grace", raw.stale_grace, settings.stale_grace)?;
        if settings.ttl_floor > settings.ttl_ceiling {
            return Err(FieldError::new(
                "egress.ttl_floor",
                format!(
                    "{:?} is above egress.ttl_ceiling {:?}",
                    settings.ttl_floor, settings.ttl_ceiling
                ),
            )
            .into());
        }
        let name_servers = raw
            .name_servers
            .map(|list| {
                list.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.parse::<SocketAddr>()
                            .or_else(|_| v.parse::<IpAddr>().map(|a| SocketAddr::new(a, 53)))
                            .map_err(|_| {
                                FieldError::new(
                                    format!("egress.name_servers[{i}]"),
                                    format!("{v:?} is not an address or address:port"),
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let tenant_resolvers = raw
            .tenant_resolvers
            .map(|list| {
                list.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.parse::<Ipv4Addr>()
                            .ok()
                            .filter(|a| !a.is_unspecified() && !a.is_broadcast())
                            .ok_or_else(|| {
                                FieldError::new(
                                    format!("egress.tenant_resolvers[{i}]"),
                                    format!("{v:?} is not an IPv4 address"),
                                )
                            })
                    })
                    .collect::<Result<BTreeSet<_>, _>>()
            })
            .transpose()?;
        Ok(Self {
            settings,
            name_servers,
            tenant_resolvers,
        })
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    /// Overrides the agent endpoint learned at enrollment: the agent ports of the fleet's
    /// coordinators (`coordinator = "https://a:7443,https://b:7443"`), tried in turn (only the
    /// leader binds its ports); empty: the enrollment's.
    pub coordinator: Vec<CoordinatorUrl>,
    pub provider: Provider,
    pub region: String,
    pub instance_type: String,
    pub labels: BTreeMap<String, String>,
    pub monthly_cost_cents: u64,
    pub currency: String,
    /// The CPU requests placement may put on this host, in percent of its cores.
    pub cpu_overcommit_percent: u32,
    pub memory_reserved_bytes: u64,
    /// Overrides the interval the coordinator asks for.
    pub report_interval: Option<Duration>,
    pub cgroup_root: PathBuf,
    pub docker_socket: PathBuf,
    /// The pool tenant networks get their /28s from.
    pub tenant_subnets: SubnetPool,
    pub egress: EgressConfig,
    pub restarts: RestartSettings,
    /// Where `/metrics` is served.
    pub metrics_listen: SocketAddr,
    /// The transfer port, where other agents push drained volumes (mTLS under the fleet CA).
    pub transfer_listen: SocketAddr,
    /// The address other hosts reach the transfer port at; `None`: the address the
    /// coordinator sees this host's session come from.
    pub transfer_advertise: Option<std::net::IpAddr>,
    /// The token `/metrics` requests must carry; required off loopback.
    pub metrics_token: Option<String>,
    /// Tenant volumes: `volumes/` (backing files), `mnt/` (mounted), `plain/` (unencrypted).
    pub volume_root: PathBuf,
    /// For `sftp:` backup repositories: how restic reaches the server (`ssh -i IDENTITY -o
    /// UserKnownHostsFile=… user@host -s sftp`); the identity is this host's, not the fleet's.
    pub backup_sftp_command: Option<String>,
    /// For `s3:` backup repositories: the AWS credentials file restic reads.
    pub backup_s3_credentials_file: Option<PathBuf>,
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/berth/agent";

/// The transfer port's default: next to the coordinator's agent (7443) and operator (7444) ports.
pub const DEFAULT_TRANSFER_PORT: u16 = 7445;

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_toml(path, text)?;
        let value = |message: String| ConfigError::value(path, message);
        let field = |e: FieldError| value(e.to_string());
        let provider = Provider::parse("provider", &raw.provider).map_err(field)?;
        validate_token("region", &raw.region, false).map_err(field)?;
        validate_token("instance_type", &raw.instance_type, true).map_err(field)?;
        for key in raw.labels.keys() {
            validate_token("labels key", key, false).map_err(field)?;
        }
        if !raw.monthly_cost.is_finite() || raw.monthly_cost < 0.0 || raw.monthly_cost > 1e7 {
            return Err(value(
                "invalid monthly_cost: must be a price between 0 and 10,000,000".into(),
            ));
        }
        let cpu_overcommit_percent = match raw.cpu_overcommit {
            None => 100,
            Some(x) if x.is_finite() && (0.1..=10.0).contains(&x) => (x * 100.0).round() as u32,
            Some(x) => {
                return Err(value(format!(
                    "invalid cpu_overcommit: {x}: must be from 0.1 to 10 (1: CPU requests up to the host's cores)"
                )));
            }
        };
        let currency = raw.currency.unwrap_or_else(|| "EUR".into());
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(value(format!(
                "invalid currency {currency:?}: must be an ISO 4217 code such as EUR or USD"
            )));
        }
        let coordinator = raw
            .coordinator
            .map(|c| CoordinatorUrl::parse_list("coordinator", &c))
            .transpose()
            .map_err(|e| value(e.to_string()))?
            .unwrap_or_default();
        let memory_reserved_bytes = match raw.memory_reserved {
            Some(v) => parse_bytes("memory_reserved", &v).map_err(|e| value(e.to_string()))?,
            None => 1 << 30,
        };
        let report_interval = raw
            .report_interval
            .map(|v| parse_duration("report_interval", &v))
            .transpose()
            .map_err(|e| value(e.to_string()))?;
        let listen = |field: &str, v: &Option<String>, default: SocketAddr| match v {
            Some(v) => v.parse::<SocketAddr>().map_err(|_| {
                value(format!(
                    "invalid {field}: {v:?} is not an address:port such as {default}"
                ))
            }),
            None => Ok(default),
        };
        let metrics_listen = listen(
            "metrics_listen",
            &raw.metrics_listen,
            SocketAddr::from(([127, 0, 0, 1], 7481)),
        )?;
        let transfer_listen = listen(
            "transfer_listen",
            &raw.transfer_listen,
            SocketAddr::from(([0, 0, 0, 0], DEFAULT_TRANSFER_PORT)),
        )?;
        let backup_sftp_command = match raw.backup_sftp_command {
            Some(c) if c.trim().is_empty() || c.len() > 1024 || c.chars().any(char::is_control) => {
                return Err(value(format!(
                    "invalid backup_sftp_command: {c:?}: a command line of at most 1024 characters, on one line"
                )));
            }
            other => other,
        };
        let backup_s3_credentials_file = match raw.backup_s3_credentials_file {
            Some(p) if !p.is_absolute() || p.as_os_str().len() > 1024 => {
                return Err(value(format!(
                    "invalid backup_s3_credentials_file: {}: an absolute path",
                    p.display()
                )));
            }
            other => other,
        };
        let transfer_advertise = raw
            .transfer_advertise
            .map(|v| {
                v.parse::<std::net::IpAddr>()
                    .ok()
                    .filter(|ip| !ip.is_unspecified())
                    .ok_or_else(|| {
                        value(format!(
                            "invalid transfer_advertise: {v:?} is not an IP address other hosts can reach"
                        ))
                    })
            })
            .transpose()?;
        let metrics_token = raw
            .metrics_token_file
            .as_ref()
            .map(|p| {
                let token = read(p)
                    .map_err(|e| value(format!("invalid metrics_token_file: {e}")))?
                    .trim()
                    .to_string();
                if token.len() < 16 {
                    return Err(value(format!(
                        "invalid metrics_token_file: {} holds fewer than 16 characters",
                        p.display()
                    )));
                }
                Ok(token)
            })
            .transpose()?;
        if !metrics_listen.ip().is_loopback() && metrics_token.is_none() {
            return Err(value(format!(
                "invalid metrics_listen: {metrics_listen} is reachable from other machines: set metrics_token_file too"
            )));
        }
        let tenant_subnets = match raw.tenant_subnets {
            Some(v) => SubnetPool::parse("tenant_subnets", &v).map_err(|e| value(e.to_string()))?,
            None => SubnetPool::default(),
        };
        Ok(Self {
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            coordinator,
            provider,
            region: raw.region,
            instance_type: raw.instance_type,
            labels: raw.labels,
            monthly_cost_cents: (raw.monthly_cost * 100.0).round() as u64,
            currency,
            cpu_overcommit_percent,
            memory_reserved_bytes,
            report_interval,
            cgroup_root: raw
                .cgroup_root
                .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")),
            docker_socket: raw
                .docker_socket
                .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock")),
            tenant_subnets,
            egress: EgressConfig::parse(raw.egress).map_err(|e| value(e.to_string()))?,
            restarts: raw.restarts.parse().map_err(|e| value(e.to_string()))?,
            metrics_listen,
            metrics_token,
            transfer_listen,
            transfer_advertise,
            backup_sftp_command,
            backup_s3_credentials_file,
            volume_root: raw
                .volume_root
                .unwrap_or_else(|| PathBuf::from("/var/lib/berth")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "provider = \"hetzner\"\nregion = \"fsn1\"\ninstance_type = \"ccx33\"\nmonthly_cost = 54.9\nmemory_reserved = \"2GiB\"\n[labels]\nzone = \"a\"\n";

    #[test]
    fn parses_a_good_file() {
        let c = AgentConfig::parse(Path::new("a.toml"), GOOD).unwrap();
        assert_eq!(c.provider, Provider::Hetzner);
        assert_eq!(c.monthly_cost_cents, 5490);
        assert_eq!(c.memory_reserved_bytes, 2 << 30);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.cpu_overcommit_percent, 100);
        let overcommitted = GOOD.replace("monthly_cost", "cpu_overcommit = 2.5\nmonthly_cost");
        let c = AgentConfig::parse(Path::new("a.toml"), &overcommitted).unwrap();
        assert_eq!(c.cpu_overcommit_percent, 250);
    }

    #[test]
    fn the_transfer_port_and_its_advertised_address() {
        let c = AgentConfig::parse(Path::new("a.toml"), GOOD).unwrap();
        assert_eq!(c.transfer_listen, "0.0.0.0:7445".parse().unwrap());
        assert_eq!(c.transfer_advertise, None);
        let c = AgentConfig::parse(
            Path::new("a.toml"),
            &format!(
                "transfer_listen = \"10.0.0.5:0\"\ntransfer_advertise = \"203.0.113.9\"\n{GOOD}"
            ),
        )
        .unwrap();
        assert_eq!(c.transfer_listen, "10.0.0.5:0".parse().unwrap());
        assert_eq!(c.transfer_advertise, Some("203.0.113.9".parse().unwrap()));
        for (line, field) in [
            ("transfer_listen = \"7445\"", "transfer_listen"),
            ("transfer_advertise = \"0.0.0.0\"", "transfer_advertise"),
            (
                "transfer_advertise = \"host.example\"",
                "transfer_advertise",
            ),
        ] {
            let err = AgentConfig::parse(Path::new("a.toml"), &format!("{line}\n{GOOD}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("invalid {field}")), "{line}: {err}");
        }
    }

    #[test]
    fn metrics_off_loopback_need_a_token() {
        let c = AgentConfig::parse(Path::new("a.toml"), GOOD).unwrap();
        assert_eq!(c.metrics_listen, "127.0.0.1:7481".parse().unwrap());
        assert_eq!(c.metrics_token, None);
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("metrics.token");
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        let c = AgentConfig::parse(
            Path::new("a.toml"),
            &format!("metrics_listen = \"0.0.0.0:9100\"\nmetrics_token_file = {token:?}\n{GOOD}"),
        )
        .unwrap();
        assert_eq!(c.metrics_token.as_deref(), Some("0123456789abcdef0123"));
        std::fs::write(&token, "short").unwrap();
        let err = AgentConfig::parse(
            Path::new("a.toml"),
            &format!("metrics_token_file = {token:?}\n{GOOD}"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("holds fewer than 16 characters"), "{err}");
    }

    #[test]
    fn restart_defaults_and_overrides() {
        let c = AgentConfig::parse(Path::new("a.toml"), GOOD).unwrap();
        assert_eq!(c.restarts, RestartSettings::default());
        assert_eq!(c.restarts.window.to_string(), "02:00-05:00");
        assert_eq!(c.restarts.max_concurrent, 1);
        assert_eq!(
            c.restarts.skip_if_started_within,
            Duration::from_secs(12 * 3600)
        );
        let c = AgentConfig::parse(
            Path::new("a.toml"),
            &format!("{GOOD}[restarts]\nwindow = \"23:00-01:00\"\ntime_zone = \"Europe/Berlin\"\nmax_concurrent = 3\nskip_if_started_within = \"0s\"\nhealth_timeout = \"90s\"\n"),
        )
        .unwrap();
        assert_eq!(c.restarts.window.to_string(), "23:00-01:00");
        assert_eq!(c.restarts.time_zone.as_str(), "Europe/Berlin");
        assert_eq!(c.restarts.max_concurrent, 3);
        assert_eq!(c.restarts.skip_if_started_within, Duration::ZERO);
        assert_eq!(c.restarts.health_timeout, Duration::from_secs(90));
    }

    #[test]
    fn egress_defaults_come_from_resolv_conf() {
        let c = AgentConfig::parse(Path::new("a.toml"), GOOD).unwrap();
        let conf = "# generated\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nsearch example\n";
        let (servers, settings) = c.egress.resolved(conf);
        assert_eq!(
            servers,
            vec![
                "127.0.0.53:53".parse().unwrap(),
                "192.0.2.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(
            settings.tenant_resolvers,
            BTreeSet::from([Ipv4Addr::new(192, 0, 2, 53)]),
            "loopback resolvers are unreachable from tenants"
        );
        assert_eq!(settings.table, "berth");
        let explicit = AgentConfig::parse(
            Path::new("a.toml"),
            &format!("{GOOD}[egress]\ntable = \"berth_t1\"\nname_servers = [\"127.0.0.1:5353\"]\ntenant_resolvers = []\nttl_floor = \"5s\"\n"),
        )
        .unwrap();
        let (servers, settings) = explicit.egress.resolved(conf);
        assert_eq!(servers, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert!(settings.tenant_resolvers.is_empty());
        assert_eq!(settings.ttl_floor, Duration::from_secs(5));
        assert_eq!(settings.table, "berth_t1");
    }

    #[test]
    fn each_bad_value_is_named() {
        let cases = [
            ("provider = \"gcp\"\nregion = \"x\"", "invalid provider"),
            ("provider = \"aws\"", "missing field `region`"),
            (
                "provider = \"aws\"\nregion = \"EU Central\"",
                "invalid region",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\nmemory_reserved = \"lots\"",
                "invalid memory_reserved",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\nreport_interval = \"0s\"",
                "invalid report_interval",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\ncoordinator = \"http://x:1\"",
                "invalid coordinator",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\nmonthly_cost = -1.0",
                "invalid monthly_cost",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\ncurrency = \"usd\"",
                "invalid currency",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\ncpu_overcommit = 0.0",
                "invalid cpu_overcommit: 0: must be from 0.1 to 10",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\nregoin = \"y\"",
                "unknown field `regoin`",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\nbackup_sftp_command = \"ssh\\nrm\"",
                "invalid backup_sftp_command",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\nbackup_s3_credentials_file = \"aws\"",
                "invalid backup_s3_credentials_file: aws: an absolute path",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\n[labels]\n\"Bad Key\" = \"v\"",
                "invalid labels key",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\n[egress]\ntable = \"Berth; flush ruleset\"",
                "invalid egress.table",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\n[egress]\nname_servers = [\"dns.example\"]",
                "invalid egress.name_servers[0]",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\n[egress]\ntenant_resolvers = [\"::1\"]",
                "invalid egress.tenant_resolvers[0]",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\n[egress]\nttl_floor = \"2h\"",
                "invalid egress.ttl_floor",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\n[egress]\nstale_grace = \"soon\"",
                "invalid egress.stale_grace",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\nmetrics_listen = \"0.0.0.0:7481\"",
                "invalid metrics_listen: 0.0.0.0:7481 is reachable from other machines: set metrics_token_file too",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\nmetrics_listen = \"localhost\"",
                "invalid metrics_listen: \"localhost\" is not an address:port",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\nmetrics_token_file = \"/nonexistent/token\"",
                "invalid metrics_token_file: /nonexistent/token:",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\n[restarts]\nwindow = \"2-5\"",
                "invalid restarts.window: \"2-5\": expected HH:MM-HH:MM",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\n[restarts]\ntime_zone = \"Europe/Atlantis\"",
                "invalid restarts.time_zone: \"Europe/Atlantis\": not in the time zone database",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\n[restarts]\nmax_concurrent = 0",
                "invalid restarts.max_concurrent: 0: must be between 1 and 64",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\n[restarts]\nhealth_timeout = \"0s\"",
                "invalid restarts.health_timeout",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\n[restarts]\nskip_if_started_within = \"later\"",
                "invalid restarts.skip_if_started_within",
            ),
            ("\u{1}garbage[[", "a.toml:"),
        ];
        for (text, expected) in cases {
            let err = AgentConfig::parse(Path::new("a.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.starts_with("a.toml"), "{err}");
        }
    }
}
