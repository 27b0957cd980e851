//! The container a tenant gets: every hardening setting in one pure function, so each one is
//! unit-tested and the runtime only carries it out.
//!
//! Ensures: memory = memory+swap = the tenant's cap (hard, no swap); CPU quota from the
//! request; a pids limit; every capability dropped; no-new-privileges; read-only root with a
//! tmpfs /tmp; a non-root user; the tenant's own bridge network; the gateway port published on
//! 127.0.0.1 only; restart with Docker's backoff; size-rotated json-file logs.

use std::collections::HashMap;

use berth_shared::ids::{HostId, TenantId};
use berth_shared::spec::TenantSpec;
use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, Ipam, IpamConfig, NetworkCreateRequest,
    PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use sha2::{Digest, Sha256};

pub const LABEL_TENANT: &str = "berth.tenant";
pub const LABEL_HOST: &str = "berth.host";
pub const LABEL_GENERATION: &str = "berth.generation";
pub const LABEL_SPEC: &str = "berth.spec";
pub const LABEL_PORT: &str = "berth.port";
/// Unprivileged uid/gid the tenant's process runs as (nobody).
pub const TENANT_USER: &str = "65534:65534";
pub const PIDS_LIMIT: i64 = 512;
pub const TMPFS_SIZE: &str = "64m";

/// The Docker name of a tenant's container and of its network on `host` (the id is a
/// validated slug). Named for the host too, so while a tenant moves the source's and the
/// target's can coexist (hosts that share a Docker engine, as in tests): the source removes
/// its stopped container while the target starts its own.
/// A CPU request as cgroup CPU shares: 1,024 a core, at least the kernel's minimum of 2.
fn cpu_shares(millicores: u32) -> i64 {
    (i64::from(millicores) * 1024 / 1000).max(2)
}

pub fn container_name(host: &HostId, tenant: &TenantId) -> String {
    format!("berth-{tenant}-{}", host_suffix(host))
}

fn host_suffix(host: &HostId) -> String {
    hex::encode(&Sha256::digest(host.as_str().as_bytes())[..4])
}

/// A tenant's network on `host`: named as its container.
pub fn network_name(host: &HostId, tenant: &TenantId) -> String {
    container_name(host, tenant)
}

/// The tenant a network named by [`network_name`] for `host` belongs to; `None` for any other
/// network, legacy names included.
pub fn network_tenant(host: &HostId, name: &str) -> Option<TenantId> {
    let tenant = name
        .strip_prefix("berth-")?
        .strip_suffix(&host_suffix(host))?
        .strip_suffix('-')?;
    TenantId::new(tenant).ok()
}

/// The network name agents before 0.1 used, still recognized (and removed) on their hosts.
pub fn legacy_network_name(tenant: &TenantId) -> String {
    format!("berth-{tenant}")
}

/// A digest of everything that shapes the container: a change means recreate. The egress
/// allowlist is not part of it: it is enforced on the host and updated in place.
pub fn spec_hash(spec: &TenantSpec) -> String {
    // The allowlist and the restart and backup policies are enforced around the container,
    // not in it, and a restore is carried out before it starts: changing them must not
    // recreate it.
    let shape = TenantSpec {
        egress: Vec::new(),
        restart: berth_shared::spec::RestartPolicy::default(),
        backup: berth_shared::spec::BackupPolicy::default(),
        restore: None,
        ..spec.clone()
    };
    let json = serde_json::to_vec(&shape).unwrap_or_default();
    hex::encode(&Sha256::digest(&json)[..12])
}

/// The tenant's bridge network: its own, so no two tenants share a segment, on `subnet`.
pub fn network(host: &HostId, spec: &TenantSpec, subnet: &str) -> NetworkCreateRequest {
    NetworkCreateRequest {
        name: network_name(host, &spec.tenant_id),
        driver: Some("bridge".into()),
        ipam: Some(Ipam {
            driver: Some("default".into()),
            config: Some(vec![IpamConfig {
                subnet: Some(subnet.into()),
                ..Default::default()
            }]),
            options: None,
        }),
        enable_ipv6: Some(false),
        options: Some(HashMap::from([
            (
                "com.docker.network.bridge.enable_icc".to_string(),
                "false".to_string(),
            ),
            (
                "com.docker.network.bridge.name".to_string(),
                bridge_name(host, &spec.tenant_id),
            ),
        ])),
        labels: Some(HashMap::from([
            (LABEL_TENANT.to_string(), spec.tenant_id.to_string()),
            (LABEL_HOST.to_string(), host.to_string()),
        ])),
        ..Default::default()
    }
}

/// Linux interface names are at most 15 bytes: `bt` + 13 hex digits of a hash of the host and
/// tenant ids.
pub fn bridge_name(host: &HostId, tenant: &TenantId) -> String {
    format!(
        "bt{}",
        &hex::encode(Sha256::digest(format!("{host}/{tenant}").as_bytes()))[..13]
    )
}

/// The hardened container for `spec`, publishing its gateway port on 127.0.0.1:`host_port`,
/// with the host directory `volume` (the mounted tenant volume) at the spec's mount path.
pub fn container(
    host: &HostId,
    spec: &TenantSpec,
    generation: u64,
    host_port: u16,
    volume: &std::path::Path,
) -> ContainerCreateBody {
    let memory = spec.resources.memory_bytes as i64;
    let gateway = format!("{}/tcp", spec.gateway_port);
    let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        user: Some(TENANT_USER.into()),
        env: Some(env),
        exposed_ports: Some(HashMap::from([(gateway.clone(), HashMap::new())])),
        labels: Some(HashMap::from([
            (LABEL_TENANT.to_string(), spec.tenant_id.to_string()),
            (LABEL_HOST.to_string(), host.to_string()),
            (LABEL_GENERATION.to_string(), generation.to_string()),
            (LABEL_SPEC.to_string(), spec_hash(spec)),
            (LABEL_PORT.to_string(), host_port.to_string()),
        ])),
        host_config: Some(HostConfig {
            memory: Some(memory),
            memory_swap: Some(memory),
            // CPU is compressible: the request is the tenant's weight when the host's CPU is
            // contended (1,024 shares a core), the limit its CFS quota over the default 100 ms
            // period (none without a limit).
            cpu_shares: Some(cpu_shares(spec.resources.cpu_millicores)),
            cpu_period: (spec.resources.cpu_limit_millicores > 0).then_some(100_000),
            cpu_quota: (spec.resources.cpu_limit_millicores > 0)
                .then(|| i64::from(spec.resources.cpu_limit_millicores) * 100),
            pids_limit: Some(PIDS_LIMIT),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_string(),
                format!("rw,noexec,nosuid,nodev,size={TMPFS_SIZE}"),
            )])),
            network_mode: Some(network_name(host, &spec.tenant_id)),
            binds: Some(vec![format!(
                "{}:{}:rw",
                volume.display(),
                spec.volume.mount_path
            )]),
            port_bindings: Some(HashMap::from([(
                gateway,
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(host_port.to_string()),
                }]),
            )])),
            // Not `unless-stopped`: after a reboot dockerd would start the container before the
            // agent attached its volume, and the tenant would write into an empty, unencrypted
            // mount point. The agent starts it; Docker only restarts it after a crash.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::ON_FAILURE),
                maximum_retry_count: None,
            }),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_string(), "10m".to_string()),
                    ("max-file".to_string(), "3".to_string()),
                ])),
            }),
            // Docker's init (tini) as PID 1 passes SIGTERM on and reaps zombies. A Node.js
            // gateway as PID 1 would ignore SIGTERM unless it handles it: every stop, nightly
            // restart and move would wait out the grace period, then kill it.
            init: Some(true),
            privileged: Some(false),
            // Tenant networks are IPv4-only; no link-local IPv6 path to the host either.
            sysctls: Some(HashMap::from([(
                "net.ipv6.conf.all.disable_ipv6".to_string(),
                "1".to_string(),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_shared::proto;

    fn spec() -> TenantSpec {
        TenantSpec::from_resolved(proto::TenantSpec {
            tenant_id: "acme-dental".into(),
            image: "ghcr.io/openclaw/gateway@sha256:".to_string() + &"a".repeat(64),
            resources: Some(proto::Resources {
                memory_bytes: 512 << 20,
                cpu_millicores: 750,
                cpu_limit_millicores: 0,
                volume_bytes: 1 << 30,
            }),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn every_hardening_setting() {
        let host = HostId::new("h1").unwrap();
        let volume = std::path::Path::new("/var/lib/berth/mnt/acme-dental");
        let c = container(&host, &spec(), 7, 20001, volume);
        let n = network(&host, &spec(), "10.213.0.32/28");
        assert_eq!(
            n.ipam.unwrap().config.unwrap()[0].subnet.as_deref(),
            Some("10.213.0.32/28")
        );
        let hc = c.host_config.clone().unwrap();
        assert_eq!(hc.memory, Some(512 << 20));
        assert_eq!(hc.memory_swap, hc.memory, "no swap");
        // A request without a limit: its weight, no quota.
        assert_eq!(hc.cpu_shares, Some(768));
        assert_eq!((hc.cpu_period, hc.cpu_quota), (None, None));
        let mut limited = spec();
        limited.resources.cpu_limit_millicores = 2000;
        let hc = container(&host, &limited, 7, 20001, volume)
            .host_config
            .unwrap();
        assert_eq!(hc.cpu_shares, Some(768));
        assert_eq!(
            (hc.cpu_period, hc.cpu_quota),
            (Some(100_000), Some(200_000)),
            "two cores to burst to"
        );
        let hc = c.host_config.clone().unwrap();
        assert_eq!(hc.pids_limit, Some(PIDS_LIMIT));
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(
            hc.security_opt,
            Some(vec!["no-new-privileges:true".to_string()])
        );
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert!(hc.tmpfs.unwrap()["/tmp"].contains("noexec"));
        assert_eq!(c.user.as_deref(), Some(TENANT_USER));
        assert_eq!(
            hc.network_mode.as_deref(),
            Some("berth-acme-dental-33112ee1"),
            "the host's own network"
        );
        let binding = &hc.port_bindings.unwrap()["18789/tcp"].clone().unwrap()[0];
        assert_eq!(
            (binding.host_ip.as_deref(), binding.host_port.as_deref()),
            (Some("127.0.0.1"), Some("20001"))
        );
        assert_eq!(
            hc.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::ON_FAILURE),
            "dockerd never starts it before its volume is there"
        );
        assert_eq!(
            hc.binds,
            Some(vec![
                "/var/lib/berth/mnt/acme-dental:/home/node/.openclaw:rw".to_string()
            ])
        );
        let log = hc.log_config.unwrap();
        assert_eq!(log.typ.as_deref(), Some("json-file"));
        assert_eq!(log.config.unwrap()["max-size"], "10m");
        assert_eq!(hc.privileged, Some(false));
        assert_eq!(hc.init, Some(true));
        let labels = c.labels.unwrap();
        assert_eq!(labels[LABEL_TENANT], "acme-dental");
        assert_eq!(labels[LABEL_HOST], "h1");
        assert_eq!(labels[LABEL_GENERATION], "7");
        assert_eq!(labels[LABEL_SPEC], spec_hash(&spec()));
        assert!(
            c.image.unwrap().contains("@sha256:"),
            "a digest stays pinned"
        );
    }

    #[test]
    fn spec_hash_changes_with_the_spec_only() {
        let a = spec();
        // What running containers carry: a new field of the spec must not change it, or an
        // agent upgrade would recreate every tenant.
        assert_eq!(spec_hash(&a), "5459d3d3b2acbc8e4c4550cb");
        let mut b = spec();
        assert_eq!(spec_hash(&a), spec_hash(&b));
        b.restart.window = Some("04:00-05:00".parse().unwrap());
        b.restart.enabled = false;
        b.backup.interval = std::time::Duration::from_secs(3600);
        b.restore = Some(berth_shared::spec::Restore {
            id: 3,
            snapshot: None,
        });
        assert_eq!(
            spec_hash(&a),
            spec_hash(&b),
            "restart and backup policies and restores are not in the hash"
        );
        b.resources.memory_bytes += 1 << 20;
        assert_ne!(spec_hash(&a), spec_hash(&b));
        let (h1, h2) = (HostId::new("h1").unwrap(), HostId::new("h2").unwrap());
        assert_eq!(bridge_name(&h1, &a.tenant_id).len(), 15);
        assert_ne!(
            bridge_name(&h1, &a.tenant_id),
            bridge_name(&h2, &a.tenant_id)
        );
        assert_ne!(
            network_name(&h1, &a.tenant_id),
            network_name(&h2, &a.tenant_id)
        );
    }

    #[test]
    fn containers_and_networks_are_named_for_their_host_and_only_its_own_map_back_to_tenants() {
        let (h1, h2) = (HostId::new("h1").unwrap(), HostId::new("h2").unwrap());
        let tenant = TenantId::new("acme-eu-2").unwrap();
        let name = container_name(&h1, &tenant);
        assert!(name.starts_with("berth-acme-eu-2-"), "{name}");
        assert_ne!(name, container_name(&h2, &tenant));
        assert_eq!(
            network_tenant(&h1, &network_name(&h1, &tenant)),
            Some(tenant.clone())
        );
        for other in [
            network_name(&h2, &tenant),
            legacy_network_name(&tenant),
            "bridge".to_string(),
            format!("berth-{}", &name[name.len() - 8..]),
            format!("berth--{}", &name[name.len() - 8..]),
            format!("berth-../x-{}", &name[name.len() - 8..]),
        ] {
            assert_eq!(network_tenant(&h1, &other), None, "{other}");
        }
    }
}
