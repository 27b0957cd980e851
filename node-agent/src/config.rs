//! The agent's configuration file (`/etc/berth/agent.toml`), validated on load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use berth_shared::config::ConfigError;
use berth_shared::config::{parse_toml, read};
use berth_shared::model::{FieldError, Provider, validate_token};
use berth_shared::transport::CoordinatorUrl;
use berth_shared::units::{parse_bytes, parse_duration};

use crate::subnets::SubnetPool;
use serde::Deserialize;

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
    memory_reserved: Option<String>,
    report_interval: Option<String>,
    cgroup_root: Option<PathBuf>,
    docker_socket: Option<PathBuf>,
    tenant_subnets: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    /// Overrides the agent endpoint learned at enrollment.
    pub coordinator: Option<CoordinatorUrl>,
    pub provider: Provider,
    pub region: String,
    pub instance_type: String,
    pub labels: BTreeMap<String, String>,
    pub monthly_cost_cents: u64,
    pub currency: String,
    pub memory_reserved_bytes: u64,
    /// Overrides the interval the coordinator asks for.
    pub report_interval: Option<Duration>,
    pub cgroup_root: PathBuf,
    pub docker_socket: PathBuf,
    /// The pool tenant networks get their /28s from.
    pub tenant_subnets: SubnetPool,
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/berth/agent";

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
        let currency = raw.currency.unwrap_or_else(|| "EUR".into());
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(value(format!(
                "invalid currency {currency:?}: must be an ISO 4217 code such as EUR or USD"
            )));
        }
        let coordinator = raw
            .coordinator
            .map(|c| CoordinatorUrl::parse("coordinator", &c))
            .transpose()
            .map_err(|e| value(e.to_string()))?;
        let memory_reserved_bytes = match raw.memory_reserved {
            Some(v) => parse_bytes("memory_reserved", &v).map_err(|e| value(e.to_string()))?,
            None => 1 << 30,
        };
        let report_interval = raw
            .report_interval
            .map(|v| parse_duration("report_interval", &v))
            .transpose()
            .map_err(|e| value(e.to_string()))?;
        let tenant_subnets = match raw.tenant_subnets {
            Some(v) => SubnetPool::parse("tenant_subnets", &v).map_err(value)?,
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
            memory_reserved_bytes,
            report_interval,
            cgroup_root: raw
                .cgroup_root
                .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")),
            docker_socket: raw
                .docker_socket
                .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock")),
            tenant_subnets,
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
                "provider = \"aws\"\nregion = \"x\"\nregoin = \"y\"",
                "unknown field `regoin`",
            ),
            (
                "provider = \"aws\"\nregion = \"x\"\n[labels]\n\"Bad Key\" = \"v\"",
                "invalid labels key",
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
