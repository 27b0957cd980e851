//! The coordinator's configuration file (`/etc/berth/coordinator.toml`), validated on load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use berth_shared::config::ConfigError;
use berth_shared::config::{parse_toml, read};
use berth_shared::units::parse_duration;
use serde::Deserialize;

/// As written in the file; every key optional, unknown keys refused.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    agent_listen: Option<SocketAddr>,
    operator_listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    server_names: Option<Vec<String>>,
    agent_cert_ttl: Option<String>,
    down_after: Option<String>,
    report_interval: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub state_dir: PathBuf,
    pub agent_listen: SocketAddr,
    pub operator_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// Extra DNS names or IPs for the server certificate (for curl and browsers; berth's own
    /// clients verify the fixed internal name).
    pub server_names: Vec<String>,
    pub agent_cert_ttl: Duration,
    pub down_after: Duration,
    pub report_interval: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/berth/coordinator"),
            agent_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            operator_listen: SocketAddr::from(([0, 0, 0, 0], 7444)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            agent_cert_ttl: Duration::from_secs(30 * 24 * 3600),
            down_after: Duration::from_secs(15),
            report_interval: Duration::from_secs(5),
        }
    }
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
        if let Some(v) = raw.server_names {
            config.server_names = v;
        }
        if let Some(v) = raw.agent_cert_ttl {
            config.agent_cert_ttl = parse_duration("agent_cert_ttl", &v).map_err(value)?;
        }
        if let Some(v) = raw.down_after {
            config.down_after = parse_duration("down_after", &v).map_err(value)?;
        }
        if let Some(v) = raw.report_interval {
            config.report_interval = parse_duration("report_interval", &v).map_err(value)?;
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
    /// Written after the listeners are bound: their real addresses (port 0 resolved).
    pub fn endpoints_file(&self) -> PathBuf {
        self.state_dir.join("endpoints.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
