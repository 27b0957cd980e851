//! A seeded fleet in memory for tests, the dashboard's benchmark and screenshots: the real
//! registry and placement code over a [`MemStore`], hosts registered through enrollment tokens
//! and reporting facts, tenants placed by the scheduler and reported by "their agents".
//! Deterministic: the same sizes give the same fleet.

use std::sync::Arc;
use std::time::Duration;

use berth_shared::clock::ManualClock;
use berth_shared::host::{Capabilities, CgroupVersion, HostFacts, Provider};
use berth_shared::ids::HostId;
use berth_shared::pki::CertificateAuthority;
use berth_shared::proto;
use berth_shared::store::{MemStore, Store};

use crate::api::Backend;
use crate::config::CoordinatorConfig;
use crate::coordinator::Coordinator;
use crate::drain::Drainer;
use crate::keys::MasterKey;
use crate::registry::{CertRecord, HostRecord};
use crate::sessions::{AgentLink, SessionHub};

/// Seeding failed (a bug in the seed, or in what it exercises).
#[derive(Debug, thiserror::Error)]
#[error("seeding the fleet: {0}")]
pub struct SeedError(String);

fn err(e: impl std::fmt::Display) -> SeedError {
    SeedError(e.to_string())
}

/// 2026-11-21 12:00 UTC: seeded fleets are the same whenever they are made.
pub const SEED_TIME_MS: i64 = 1_795_262_400_000;

/// (provider, region, instance type, GiB, CPUs, monthly cost in cents, currency)
const HOST_TYPES: [(Provider, &str, &str, u64, u32, u64, &str); 5] = [
    (Provider::Hetzner, "fsn1", "ccx43", 64, 16, 9649, "EUR"),
    (Provider::Hetzner, "nbg1", "ccx53", 128, 32, 19249, "EUR"),
    (Provider::Hetzner, "hel1", "ccx53", 128, 32, 19249, "EUR"),
    (
        Provider::Aws,
        "eu-central-1",
        "m6i.4xlarge",
        64,
        16,
        64240,
        "EUR",
    ),
    (
        Provider::Aws,
        "us-east-1",
        "r6i.4xlarge",
        128,
        16,
        73000,
        "EUR",
    ),
];

/// A small pseudo-random sequence (xorshift) so figures vary but never between runs.
fn mix(i: u64) -> u64 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 32)
}

/// A coordinator holding `hosts` hosts and up to `tenants` tenants (fewer when they do not
/// fit): every 25th host cordoned, every 40th down (it stopped reporting), tenants using
/// 20–95 % of their caps, a few with OOM kills and egress denials. No agent is connected.
pub fn seeded(hosts: usize, tenants: usize) -> Result<Arc<Coordinator>, SeedError> {
    seeded_with(
        crate::keys::keyring::Keyring::in_memory(),
        Arc::new(SessionHub::default()),
        hosts,
        tenants,
    )
}

/// A coordinator over `store` with the default configuration, its clock at `clock`, its
/// volume keys in `keyring`, talking to its agents over `agents`.
pub fn open(
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    keyring: crate::keys::keyring::Keyring,
    agents: Arc<dyn AgentLink>,
) -> Result<Coordinator, SeedError> {
    let config = CoordinatorConfig {
        backup_repository: Some(
            berth_shared::backup::Repository::new("/srv/berth-backups").map_err(err)?,
        ),
        ..CoordinatorConfig::default()
    };
    Coordinator::open(
        config,
        store,
        clock,
        CertificateAuthority::generate("seed").map_err(err)?,
        crate::keys::Vaults {
            volume: crate::keys::KeyVault::new(MasterKey::generate().map_err(err)?, keyring),
            backup: crate::keys::KeyVault::new(
                MasterKey::generate().map_err(err)?,
                crate::keys::keyring::Keyring::in_memory(),
            ),
        },
        agents,
        0,
    )
    .map_err(err)
}

/// A gateway tenant of `tier`, its volume (of the tier's size) encrypted or not.
pub fn tenant_spec(id: &str, tier: &str, encrypted: bool) -> proto::TenantSpec {
    proto::TenantSpec {
        tenant_id: id.into(),
        image: "ghcr.io/openclaw/gateway:1".into(),
        tier: tier.into(),
        volume: Some(proto::VolumeSpec {
            size_bytes: 0,
            encrypted,
            mount_path: String::new(),
        }),
        ..Default::default()
    }
}

/// The facts of a host of `gib` GiB and `cpus` CPUs (2 GiB of it reserved for the system).
pub fn facts(id: &HostId, provider: Provider, region: &str, gib: u64, cpus: u32) -> HostFacts {
    let total = gib << 30;
    HostFacts {
        provider,
        region: region.into(),
        instance_type: String::new(),
        labels: Default::default(),
        memory_total_bytes: total,
        memory_available_bytes: total / 2,
        cpu_count: cpus,
        disk_total_bytes: 500 << 30,
        disk_available_bytes: 400 << 30,
        memory_reserved_bytes: 2 << 30,
        monthly_cost_cents: 0,
        currency: "EUR".into(),
        cpu_overcommit_percent: 100,
        capabilities: Capabilities {
            cgroup: Some(CgroupVersion::V2),
            dm_crypt: true,
            nftables: true,
            nft_version: "1.0.6".into(),
            docker_version: "20.10.24".into(),
        },
        hostname: id.to_string(),
        kernel_version: "6.1.0-27-amd64".into(),
        os_version: "Debian GNU/Linux 12".into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Registers host `id` as enrollment does (a one-time token, certificate `serial`) and records
/// its hello with `facts`.
pub fn enroll(
    c: &Coordinator,
    id: &HostId,
    serial: &str,
    facts: HostFacts,
) -> Result<(), SeedError> {
    let (token, _) = c
        .registry
        .create_enrollment_token(id, Duration::from_secs(60))
        .map_err(err)?;
    c.registry
        .redeem_enrollment_token(&token, |_| {
            Ok::<_, crate::registry::RegistryError>((
                (),
                CertRecord {
                    serial: serial.into(),
                    subject: id.to_string(),
                    issued_unix_ms: SEED_TIME_MS,
                    not_after_unix_ms: SEED_TIME_MS + 86_400_000,
                },
            ))
        })
        .map_err(err)?;
    c.registry
        .record_hello(id, facts, |h: &HostRecord| c.sync_host(h))
        .map_err(err)?;
    Ok(())
}

/// [`seeded`] with its drainer (over the same store), as the API layers and the dashboard
/// serve it.
pub fn backend(hosts: usize, tenants: usize) -> Result<Backend, SeedError> {
    let store = Arc::new(MemStore::default());
    let c = seed_into(
        store.clone(),
        crate::keys::keyring::Keyring::in_memory(),
        Arc::new(SessionHub::default()),
        hosts,
        tenants,
    )?;
    Ok(Backend::new(Drainer::open(c, store).map_err(err)?))
}

/// [`seeded`] with its volume keys in `keyring` and its agents behind `agents`.
pub fn seeded_with(
    keyring: crate::keys::keyring::Keyring,
    agents: Arc<dyn AgentLink>,
    hosts: usize,
    tenants: usize,
) -> Result<Arc<Coordinator>, SeedError> {
    seed_into(
        Arc::new(MemStore::default()),
        keyring,
        agents,
        hosts,
        tenants,
    )
}

fn seed_into(
    store: Arc<MemStore>,
    keyring: crate::keys::keyring::Keyring,
    agents: Arc<dyn AgentLink>,
    hosts: usize,
    tenants: usize,
) -> Result<Arc<Coordinator>, SeedError> {
    let clock = Arc::new(ManualClock::at(SEED_TIME_MS));
    let c = open(store, clock.clone(), keyring, agents)?;
    let mut ids = Vec::with_capacity(hosts);
    for i in 0..hosts {
        let (provider, region, instance_type, gib, cpus, cost, currency) =
            HOST_TYPES[(mix(i as u64) % HOST_TYPES.len() as u64) as usize];
        let id = HostId::new(format!("{}-{region}-{i:03}", provider.as_str())).map_err(err)?;
        let facts = HostFacts {
            instance_type: instance_type.into(),
            monthly_cost_cents: cost,
            currency: currency.into(),
            ..facts(&id, provider, region, gib, cpus)
        };
        enroll(&c, &id, &format!("{i:08x}"), facts)?;
        if i % 25 == 3 {
            c.registry
                .set_cordoned(&id, true, |h| c.sync_host(h))
                .map_err(err)?;
        }
        ids.push(id);
    }
    let tiers = ["individual", "business", "pro"];
    let mut placed: Vec<(HostId, proto::TenantStatus)> = Vec::new();
    for t in 0..tenants {
        // Half individual, four in ten business, one in ten pro.
        let tier = match mix(1_000_000 + t as u64) % 10 {
            0..=4 => tiers[0],
            5..=8 => tiers[1],
            _ => tiers[2],
        };
        let spec = proto::TenantSpec {
            tenant_id: format!("tenant-{t:05}"),
            image: "ghcr.io/openclaw/gateway:2026.11".into(),
            tier: tier.into(),
            ..Default::default()
        };
        let Ok(applied) = c.placements.place(spec, SEED_TIME_MS) else {
            break;
        };
        let host = HostId::new(&applied.placement.host_id).map_err(err)?;
        let tenant = c
            .placements
            .tenant(&berth_shared::ids::TenantId::new(&applied.placement.tenant_id).map_err(err)?)
            .ok_or_else(|| err("a placed tenant is missing"))?;
        let cap = tenant
            .spec
            .and_then(|s| s.resources)
            .map_or(0, |r| r.memory_bytes);
        let r = mix(2_000_000 + t as u64);
        placed.push((
            host,
            proto::TenantStatus {
                tenant_id: applied.placement.tenant_id.clone(),
                state: proto::TenantState::Running as i32,
                generation: applied.placement.generation,
                memory_used_bytes: cap / 100 * (20 + r % 76),
                memory_cap_bytes: cap,
                oom_kills: u64::from(r.is_multiple_of(50)),
                last_restart_unix_ms: SEED_TIME_MS - 36_000_000 - (r % 3_600_000) as i64,
                next_restart_unix_ms: SEED_TIME_MS + 50_400_000 + (r % 10_800_000) as i64,
                egress_denied_packets: if r.is_multiple_of(7) { r % 500 } else { 0 },
                ..Default::default()
            },
        ));
    }
    // A minute later every host reports again, except the ones that went down.
    clock.advance_ms(60_000);
    for (i, id) in ids.iter().enumerate() {
        let statuses: Vec<proto::TenantStatus> = placed
            .iter()
            .filter(|(h, _)| h == id)
            .map(|(_, s)| s.clone())
            .collect();
        let used: u64 = statuses.iter().map(|s| s.memory_used_bytes).sum();
        c.placements.record_statuses(id, statuses);
        if i % 40 != 7 {
            let total = c
                .registry
                .host(id)
                .map_err(err)?
                .and_then(|h| h.facts)
                .map_or(0, |f| f.memory_total_bytes);
            let available = total.saturating_sub(used + (1 << 30));
            c.registry
                .record_report(id, available, 400 << 30, |h| c.sync_host(h))
                .map_err(err)?;
        }
    }
    clock.advance_ms(3_000);
    Ok(Arc::new(c))
}
