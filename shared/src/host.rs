//! A host as the fleet knows it: its provider, its capabilities and the facts its agent
//! reports, validated when they arrive from the wire so that the rest of the code never
//! handles an unchecked value.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::field::{FieldError, validate_token};
use crate::proto;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Hetzner,
    Aws,
    Other,
}

impl Provider {
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        match value {
            "hetzner" => Ok(Self::Hetzner),
            "aws" => Ok(Self::Aws),
            "other" => Ok(Self::Other),
            _ => Err(FieldError::new(
                field,
                format!("unknown provider {value:?} (expected hetzner, aws or other)"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hetzner => "hetzner",
            Self::Aws => "aws",
            Self::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    V1,
    V2,
}

/// What the agent probed on its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Capabilities {
    pub cgroup: Option<CgroupVersion>,
    pub dm_crypt: bool,
    pub nftables: bool,
    pub nft_version: String,
    /// Empty when no Docker engine answered.
    pub docker_version: String,
}

/// A host's facts as reported in the agent's hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub provider: Provider,
    pub region: String,
    pub instance_type: String,
    pub labels: BTreeMap<String, String>,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub cpu_count: u32,
    pub disk_total_bytes: u64,
    pub disk_available_bytes: u64,
    pub memory_reserved_bytes: u64,
    pub monthly_cost_cents: u64,
    pub currency: String,
    /// The CPU placement may give out as requests, in percent of its cores.
    #[serde(default = "full_cpu")]
    pub cpu_overcommit_percent: u32,
    pub capabilities: Capabilities,
    pub hostname: String,
    pub kernel_version: String,
    pub os_version: String,
    pub agent_version: String,
}

fn full_cpu() -> u32 {
    100
}

/// The range of `cpu_overcommit_percent`: from a tenth of the cores to ten times them.
pub const CPU_OVERCOMMIT_PERCENT: std::ops::RangeInclusive<u32> = 10..=1000;

impl HostFacts {
    /// The CPU requests placement may put on the host, in millicores: its cores times its
    /// overcommit.
    pub fn cpu_allocatable_millicores(&self) -> u64 {
        u64::from(self.cpu_count) * 10 * u64::from(self.cpu_overcommit_percent)
    }
}

/// Free text shown to operators (hostname, versions): bounded and printable.
fn validate_text(field: &str, value: &str) -> Result<(), FieldError> {
    if value.len() > 256 {
        return Err(FieldError::new(field, "must be at most 256 bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

impl TryFrom<proto::HostFacts> for HostFacts {
    type Error = FieldError;

    fn try_from(p: proto::HostFacts) -> Result<Self, FieldError> {
        let provider = Provider::parse("facts.provider", &p.provider)?;
        validate_token("facts.region", &p.region, false)?;
        validate_token("facts.instance_type", &p.instance_type, true)?;
        if p.labels.len() > 64 {
            return Err(FieldError::new("facts.labels", "at most 64 labels"));
        }
        for (k, v) in &p.labels {
            validate_token("facts.labels key", k, false)?;
            validate_text(&format!("facts.labels[{k}]"), v)?;
        }
        if p.memory_total_bytes == 0 {
            return Err(FieldError::new(
                "facts.memory_total_bytes",
                "must be greater than zero",
            ));
        }
        if p.memory_reserved_bytes >= p.memory_total_bytes {
            return Err(FieldError::new(
                "facts.memory_reserved_bytes",
                "must be less than facts.memory_total_bytes",
            ));
        }
        if p.cpu_count == 0 {
            return Err(FieldError::new(
                "facts.cpu_count",
                "must be greater than zero",
            ));
        }
        let cpu_overcommit_percent = match p.cpu_overcommit_percent {
            0 => 100,
            n if CPU_OVERCOMMIT_PERCENT.contains(&n) => n,
            _ => {
                return Err(FieldError::new(
                    "facts.cpu_overcommit_percent",
                    "must be from 10 to 1000",
                ));
            }
        };
        if !(p.currency.is_empty()
            || (p.currency.len() == 3 && p.currency.bytes().all(|b| b.is_ascii_uppercase())))
        {
            return Err(FieldError::new(
                "facts.currency",
                "must be an ISO 4217 code such as EUR or USD",
            ));
        }
        for (field, value) in [
            ("facts.hostname", &p.hostname),
            ("facts.kernel_version", &p.kernel_version),
            ("facts.os_version", &p.os_version),
            ("facts.agent_version", &p.agent_version),
        ] {
            validate_text(field, value)?;
        }
        let caps = p.capabilities.unwrap_or_default();
        validate_text("facts.capabilities.nft_version", &caps.nft_version)?;
        validate_text("facts.capabilities.docker_version", &caps.docker_version)?;
        let cgroup = match proto::CgroupVersion::try_from(caps.cgroup_version) {
            Ok(proto::CgroupVersion::V1) => Some(CgroupVersion::V1),
            Ok(proto::CgroupVersion::V2) => Some(CgroupVersion::V2),
            Ok(proto::CgroupVersion::Unspecified) => None,
            Err(_) => {
                return Err(FieldError::new(
                    "facts.capabilities.cgroup_version",
                    "unknown value",
                ));
            }
        };
        Ok(Self {
            provider,
            region: p.region,
            instance_type: p.instance_type,
            labels: p.labels.into_iter().collect(),
            memory_total_bytes: p.memory_total_bytes,
            memory_available_bytes: p.memory_available_bytes.min(p.memory_total_bytes),
            cpu_count: p.cpu_count,
            disk_total_bytes: p.disk_total_bytes,
            disk_available_bytes: p.disk_available_bytes.min(p.disk_total_bytes),
            memory_reserved_bytes: p.memory_reserved_bytes,
            monthly_cost_cents: p.monthly_cost_cents,
            cpu_overcommit_percent,
            currency: if p.currency.is_empty() {
                "EUR".into()
            } else {
                p.currency
            },
            capabilities: Capabilities {
                cgroup,
                dm_crypt: caps.dm_crypt,
                nftables: caps.nftables,
                nft_version: caps.nft_version,
                docker_version: caps.docker_version,
            },
            hostname: p.hostname,
            kernel_version: p.kernel_version,
            os_version: p.os_version,
            agent_version: p.agent_version,
        })
    }
}

impl From<&HostFacts> for proto::HostFacts {
    fn from(f: &HostFacts) -> Self {
        Self {
            provider: f.provider.as_str().into(),
            region: f.region.clone(),
            instance_type: f.instance_type.clone(),
            labels: f.labels.clone().into_iter().collect(),
            memory_total_bytes: f.memory_total_bytes,
            memory_available_bytes: f.memory_available_bytes,
            cpu_count: f.cpu_count,
            disk_total_bytes: f.disk_total_bytes,
            disk_available_bytes: f.disk_available_bytes,
            memory_reserved_bytes: f.memory_reserved_bytes,
            monthly_cost_cents: f.monthly_cost_cents,
            cpu_overcommit_percent: f.cpu_overcommit_percent,
            currency: f.currency.clone(),
            capabilities: Some(proto::Capabilities {
                cgroup_version: match f.capabilities.cgroup {
                    None => proto::CgroupVersion::Unspecified,
                    Some(CgroupVersion::V1) => proto::CgroupVersion::V1,
                    Some(CgroupVersion::V2) => proto::CgroupVersion::V2,
                } as i32,
                dm_crypt: f.capabilities.dm_crypt,
                nftables: f.capabilities.nftables,
                nft_version: f.capabilities.nft_version.clone(),
                docker_version: f.capabilities.docker_version.clone(),
            }),
            hostname: f.hostname.clone(),
            kernel_version: f.kernel_version.clone(),
            os_version: f.os_version.clone(),
            agent_version: f.agent_version.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> proto::HostFacts {
        proto::HostFacts {
            provider: "hetzner".into(),
            region: "fsn1".into(),
            instance_type: "ccx33".into(),
            memory_total_bytes: 32 << 30,
            memory_available_bytes: 30 << 30,
            memory_reserved_bytes: 2 << 30,
            cpu_count: 8,
            ..Default::default()
        }
    }

    #[test]
    fn round_trips() {
        let facts = HostFacts::try_from(sample()).unwrap();
        assert_eq!(facts.currency, "EUR");
        let back = HostFacts::try_from(proto::HostFacts::from(&facts)).unwrap();
        assert_eq!(back, facts);
    }

    #[test]
    fn a_hosts_cpu_requests_may_reach_its_cores_times_its_overcommit() {
        // An agent that says nothing (older ones) offers its cores.
        let facts = HostFacts::try_from(sample()).unwrap();
        assert_eq!(facts.cpu_overcommit_percent, 100);
        assert_eq!(
            facts.cpu_allocatable_millicores(),
            u64::from(facts.cpu_count) * 1000
        );
        let twice = HostFacts::try_from(proto::HostFacts {
            cpu_overcommit_percent: 250,
            ..sample()
        })
        .unwrap();
        assert_eq!(
            twice.cpu_allocatable_millicores(),
            u64::from(twice.cpu_count) * 2500
        );
        // Facts stored before the field existed read as 100 %.
        let mut stored = serde_json::to_value(&facts).unwrap();
        stored
            .as_object_mut()
            .unwrap()
            .remove("cpu_overcommit_percent");
        let read: HostFacts = serde_json::from_value(stored).unwrap();
        assert_eq!(read, facts);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = Box<dyn Fn(&mut proto::HostFacts)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|f| f.provider = "gcp".into()),
                "invalid facts.provider: unknown provider \"gcp\"",
            ),
            (
                Box::new(|f| f.region = "".into()),
                "invalid facts.region: must not be empty",
            ),
            (
                Box::new(|f| f.region = "../x y".into()),
                "invalid facts.region",
            ),
            (
                Box::new(|f| f.memory_total_bytes = 0),
                "invalid facts.memory_total_bytes",
            ),
            (
                Box::new(|f| f.memory_reserved_bytes = 64 << 30),
                "invalid facts.memory_reserved_bytes",
            ),
            (Box::new(|f| f.cpu_count = 0), "invalid facts.cpu_count"),
            (
                Box::new(|f| f.cpu_overcommit_percent = 1001),
                "invalid facts.cpu_overcommit_percent: must be from 10 to 1000",
            ),
            (
                Box::new(|f| f.cpu_overcommit_percent = 9),
                "invalid facts.cpu_overcommit_percent",
            ),
            (
                Box::new(|f| f.currency = "euro".into()),
                "invalid facts.currency",
            ),
            (
                Box::new(|f| f.hostname = "a\nb".into()),
                "invalid facts.hostname",
            ),
            (
                Box::new(|f| {
                    f.labels.insert("Bad Key".into(), "v".into());
                }),
                "invalid facts.labels key",
            ),
        ];
        for (mutate, expected) in cases {
            let mut facts = sample();
            mutate(&mut facts);
            let err = HostFacts::try_from(facts).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{err} (expected {expected})");
        }
    }
}
