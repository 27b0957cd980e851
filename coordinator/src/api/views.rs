//! The JSON shapes of hosts, tenants and placements: what `berthctl --json` prints and what the
//! REST API returns (the same fields for the same things).

use berth_shared::proto;
use berth_shared::spec::egress_entry_text;
pub use berth_shared::spec::tenant_state_name;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct HostView {
    pub host_id: String,
    pub state: &'static str,
    pub provider: String,
    pub region: String,
    pub instance_type: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_reserved_bytes: u64,
    pub cpu_count: u32,
    pub tenant_count: u32,
    /// Milliseconds since the last report; null when it never reported.
    pub last_report_age_ms: Option<i64>,
    pub capabilities: CapabilitiesView,
    pub agent_version: String,
}

#[derive(Debug, Serialize)]
pub struct CapabilitiesView {
    pub cgroup: &'static str,
    pub dm_crypt: bool,
    pub nftables: bool,
    pub docker_version: String,
}

pub fn host_state_name(state: i32) -> &'static str {
    match proto::HostState::try_from(state) {
        Ok(proto::HostState::Ready) => "ready",
        Ok(proto::HostState::Cordoned) => "cordoned",
        Ok(proto::HostState::Draining) => "draining",
        Ok(proto::HostState::Down) => "down",
        _ => "unknown",
    }
}

impl HostView {
    pub fn new(host: &proto::Host, now_ms: i64) -> Self {
        let facts = host.facts.clone().unwrap_or_default();
        let caps = facts.capabilities.clone().unwrap_or_default();
        Self {
            host_id: host.host_id.clone(),
            state: host_state_name(host.state),
            provider: facts.provider,
            region: facts.region,
            instance_type: facts.instance_type,
            memory_total_bytes: facts.memory_total_bytes,
            memory_used_bytes: host.memory_used_bytes,
            memory_reserved_bytes: facts.memory_reserved_bytes,
            cpu_count: facts.cpu_count,
            tenant_count: host.tenant_count,
            last_report_age_ms: (host.last_report_unix_ms > 0)
                .then(|| (now_ms - host.last_report_unix_ms).max(0)),
            capabilities: CapabilitiesView {
                cgroup: match proto::CgroupVersion::try_from(caps.cgroup_version) {
                    Ok(proto::CgroupVersion::V1) => "v1",
                    Ok(proto::CgroupVersion::V2) => "v2",
                    _ => "none",
                },
                dm_crypt: caps.dm_crypt,
                nftables: caps.nftables,
                docker_version: caps.docker_version,
            },
            agent_version: facts.agent_version,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PlacementView {
    pub tenant_id: String,
    pub host_id: String,
    pub generation: u64,
    pub state: &'static str,
    pub delivered: bool,
}

impl From<&proto::Placement> for PlacementView {
    fn from(p: &proto::Placement) -> Self {
        Self {
            tenant_id: p.tenant_id.clone(),
            host_id: p.host_id.clone(),
            generation: p.generation,
            state: tenant_state_name(p.state),
            delivered: p.delivered,
        }
    }
}

/// The answer to a removal.
#[derive(Debug, Serialize)]
pub struct RemovalView {
    pub tenant_id: String,
    pub host_id: String,
    pub purged: bool,
    pub erased: bool,
    pub deleted: bool,
    pub key_destroyed: bool,
    pub key_kept: bool,
    pub backups_forgotten: u32,
    pub backup_key_destroyed: bool,
}

impl From<&proto::RemoveTenantResponse> for RemovalView {
    fn from(r: &proto::RemoveTenantResponse) -> Self {
        Self {
            tenant_id: r.tenant_id.clone(),
            host_id: r.host_id.clone(),
            purged: r.purged,
            erased: r.erased,
            deleted: r.deleted,
            key_destroyed: r.key_destroyed,
            key_kept: r.key_kept,
            backups_forgotten: r.backups_forgotten,
            backup_key_destroyed: r.backup_key_destroyed,
        }
    }
}

impl RemovalView {
    /// One line for a person.
    pub fn summary(&self) -> String {
        if !self.purged {
            let kept = if self.key_kept {
                "its volume and key are kept"
            } else {
                "its volume is kept"
            };
            return format!(
                "removed {} from {} ({kept}: it can be placed again)",
                self.tenant_id, self.host_id
            );
        }
        let done = |yes: bool, what: &str| {
            if yes {
                what.to_string()
            } else {
                format!("no {what} found")
            }
        };
        let backups = if self.backup_key_destroyed {
            format!(
                ", {} backups forgotten and their key destroyed",
                self.backups_forgotten
            )
        } else {
            String::new()
        };
        format!(
            "removed and purged {} on {}: {}, {}, {}{backups}",
            self.tenant_id,
            self.host_id,
            done(self.erased, "LUKS header erased"),
            done(self.deleted, "backing store deleted"),
            done(self.key_destroyed, "key destroyed"),
        )
    }
}

#[derive(Debug, Serialize)]
pub struct TenantView {
    pub tenant_id: String,
    pub host_id: String,
    pub state: &'static str,
    pub generation: u64,
    /// The host acknowledged a desired state containing this placement.
    pub delivered: bool,
    /// Its container passed its health check since it last started.
    pub healthy: bool,
    pub message: String,
    pub tier: String,
    pub image: String,
    pub memory_cap_bytes: u64,
    pub memory_used_bytes: u64,
    /// The CPU request (what placement counts).
    pub cpu_millicores: u32,
    /// The CPU limit it may burst to; 0: none.
    pub cpu_limit_millicores: u32,
    /// The CPU it used lately, as its host measured it (between its last two looks).
    pub cpu_used_millicores: u32,
    pub volume_bytes: u64,
    pub encrypted: bool,
    pub oom_kills: u64,
    pub restarts: u32,
    /// The gateway port on the host's 127.0.0.1, once the container runs.
    pub published_port: u32,
    /// The allowlist, each entry with what its host reported of it.
    pub egress: Vec<EgressEntryView>,
    /// Packets the tenant's egress rules rejected.
    pub egress_denied_packets: u64,
    /// When the container last started, for any reason (RFC 3339, UTC).
    pub last_restart: Option<String>,
    /// The next nightly restart (RFC 3339, UTC); none when restarts are off or it is not running.
    pub next_restart: Option<String>,
    /// What the host's restart scheduler last did for this tenant.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub restart_note: String,
    /// The snapshot its volume was last restored from on its host (its recovery point).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored: Option<SnapshotView>,
    /// How often its volume is backed up; 0: its backups are off.
    pub backup_interval_ms: u64,
    /// Its host's last backup of it (none yet, or the fleet has no backup repository).
    pub last_backup: Option<BackupReportView>,
}

/// How a tenant's last backup went.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReportView {
    /// When the last attempt ended (RFC 3339, UTC).
    pub at: Option<String>,
    pub ok: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub snapshot_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub bytes_added: u64,
    pub bytes_processed: u64,
    pub duration_ms: u64,
    /// Made while its container was stopped (in its nightly restart), not read live.
    pub stopped: bool,
    /// When the last good one ended; none: never.
    pub last_good: Option<String>,
    #[serde(skip)]
    pub last_good_unix_ms: i64,
}

impl From<&proto::BackupReport> for BackupReportView {
    fn from(r: &proto::BackupReport) -> Self {
        Self {
            at: rfc3339(r.unix_ms),
            ok: r.ok,
            snapshot_id: r.snapshot_id.clone(),
            error: r.error.clone(),
            bytes_added: r.bytes_added,
            bytes_processed: r.bytes_processed,
            duration_ms: r.duration_ms,
            stopped: r.stopped,
            last_good: rfc3339(r.last_good_unix_ms),
            last_good_unix_ms: r.last_good_unix_ms,
        }
    }
}

impl TenantView {
    /// Its backups are behind: its last good backup is older than two intervals, or its host
    /// tried and never made one.
    pub fn backup_overdue(&self, now_unix_ms: i64) -> bool {
        let Some(last) = &self.last_backup else {
            return false;
        };
        let interval = i64::try_from(self.backup_interval_ms).unwrap_or(i64::MAX);
        interval > 0
            && (last.last_good_unix_ms == 0
                || now_unix_ms - last.last_good_unix_ms > interval.saturating_mul(2))
    }

    /// The last good backup, for a person: its time, or why there is none.
    pub fn backup_text(&self) -> String {
        match &self.last_backup {
            _ if self.backup_interval_ms == 0 => "off".into(),
            None => "-".into(),
            Some(b) => match (&b.last_good, b.ok) {
                (Some(good), true) => good.clone(),
                (Some(good), false) => format!("{good} (last failed)"),
                (None, _) => "never (failed)".into(),
            },
        }
    }
}

/// A restic snapshot of a tenant's volume.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotView {
    pub id: String,
    pub short_id: String,
    /// When it was taken (RFC 3339).
    pub time: String,
}

impl From<&proto::BackupSnapshot> for SnapshotView {
    fn from(s: &proto::BackupSnapshot) -> Self {
        Self {
            id: s.id.clone(),
            short_id: s.short_id.clone(),
            time: s.time.clone(),
        }
    }
}

/// A finished `berthctl backup`.
#[derive(Debug, Serialize)]
pub struct BackupView {
    pub tenant_id: String,
    pub host_id: String,
    pub snapshot_id: String,
    pub files_new: u64,
    pub files_changed: u64,
    /// What the repository grew by (after deduplication), and what was read.
    pub bytes_added: u64,
    pub bytes_processed: u64,
    pub duration_ms: u64,
}

impl From<&proto::BackupTenantResponse> for BackupView {
    fn from(r: &proto::BackupTenantResponse) -> Self {
        let b = r.backup.clone().unwrap_or_default();
        Self {
            tenant_id: r.tenant_id.clone(),
            host_id: r.host_id.clone(),
            snapshot_id: b.snapshot_id,
            files_new: b.files_new,
            files_changed: b.files_changed,
            bytes_added: b.bytes_added,
            bytes_processed: b.bytes_processed,
            duration_ms: b.duration_ms,
        }
    }
}

/// A finished `berthctl restore`.
#[derive(Debug, Serialize)]
pub struct RestoreView {
    pub tenant_id: String,
    /// Where it runs now.
    pub host_id: String,
    pub restored: Option<SnapshotView>,
    /// Restored on another host: the host it left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_from: Option<String>,
    /// Whether its copy on the host it left is deleted.
    pub old_copy_deleted: bool,
}

impl From<&proto::RestoreTenantResponse> for RestoreView {
    fn from(r: &proto::RestoreTenantResponse) -> Self {
        Self {
            tenant_id: r.tenant_id.clone(),
            host_id: r.host_id.clone(),
            restored: r.restored.as_ref().map(SnapshotView::from),
            moved_from: (!r.moved_from.is_empty()).then(|| r.moved_from.clone()),
            old_copy_deleted: r.old_copy_deleted,
        }
    }
}

/// A finished `berthctl restart`.
#[derive(Debug, Serialize)]
pub struct RestartView {
    pub tenant_id: String,
    pub host_id: String,
    /// From the stop until the health check passed.
    pub downtime_ms: u64,
}

impl From<&proto::RestartTenantResponse> for RestartView {
    fn from(r: &proto::RestartTenantResponse) -> Self {
        Self {
            tenant_id: r.tenant_id.clone(),
            host_id: r.host_id.clone(),
            downtime_ms: r.downtime_ms,
        }
    }
}

/// A drain, as `berthctl drain-status --json` and the REST API show it.
#[derive(Debug, Serialize)]
pub struct DrainView {
    pub host_id: String,
    pub phase: String,
    pub started: Option<String>,
    pub deadline: Option<String>,
    pub max_parallel: u32,
    pub force_lost: bool,
    pub moves: Vec<MoveView>,
    /// Tenants whose old copies are still on the host: deleted once its agent is back.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stale_copies: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct MoveView {
    pub tenant_id: String,
    pub target_host_id: String,
    pub phase: String,
    pub bytes_copied: u64,
    pub bytes_total: u64,
    pub bytes_after_stop: u64,
    pub eta_ms: u64,
    pub memory_bytes: u64,
    pub error: String,
    /// A lost host's tenant restored from a backup: the snapshot (its recovery point).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored: Option<SnapshotView>,
    /// Not started before this (its tenant's maintenance window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
}

impl From<&proto::DrainStatus> for DrainView {
    fn from(d: &proto::DrainStatus) -> Self {
        Self {
            host_id: d.host_id.clone(),
            phase: d.phase.clone(),
            started: rfc3339(d.started_unix_ms),
            deadline: rfc3339(d.deadline_unix_ms),
            max_parallel: d.max_parallel,
            force_lost: d.force_lost,
            stale_copies: d.stale_copies.clone(),
            moves: d
                .moves
                .iter()
                .map(|m| MoveView {
                    tenant_id: m.tenant_id.clone(),
                    target_host_id: m.target_host_id.clone(),
                    phase: m.phase.clone(),
                    bytes_copied: m.bytes_copied,
                    bytes_total: m.bytes_total,
                    bytes_after_stop: m.bytes_after_stop,
                    eta_ms: m.eta_ms,
                    memory_bytes: m.memory_bytes,
                    error: m.error.clone(),
                    restored: m.restored.as_ref().map(SnapshotView::from),
                    not_before: rfc3339(m.not_before_unix_ms),
                })
                .collect(),
        }
    }
}

impl DrainView {
    /// A table for a person.
    pub fn table(&self) -> String {
        let mut out = format!(
            "drain of {}: {} ({} moves, {} at once{})\n",
            self.host_id,
            self.phase,
            self.moves.len(),
            self.max_parallel,
            self.deadline
                .as_deref()
                .map(|d| format!(", deadline {d}"))
                .unwrap_or_default()
        );
        out.push_str(&format!(
            "{:<24} {:<24} {:<14} {:>8} {:>19} {:>12} {:>8}  {}\n",
            "TENANT", "TARGET", "PHASE", "MEMORY", "COPIED", "AFTER STOP", "ETA", "NOTE"
        ));
        for m in &self.moves {
            let copied = if m.bytes_total > 0 || m.bytes_copied > 0 {
                format!(
                    "{}/{} MiB",
                    m.bytes_copied >> 20,
                    m.bytes_total.div_ceil(1 << 20)
                )
            } else {
                "-".into()
            };
            let eta = if m.eta_ms > 0 {
                format!("{}s", m.eta_ms.div_ceil(1000))
            } else {
                "-".into()
            };
            let after_stop = if m.bytes_after_stop > 0 || m.phase == "done" {
                format!("{:.1} MiB", m.bytes_after_stop as f64 / f64::from(1 << 20))
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "{:<24} {:<24} {:<14} {:>5}MiB {:>19} {:>12} {:>8}  {}\n",
                m.tenant_id,
                m.target_host_id,
                m.phase,
                m.memory_bytes >> 20,
                copied,
                after_stop,
                eta,
                match (&m.not_before, m.phase.as_str()) {
                    (Some(at), "planned") if m.error.is_empty() =>
                        format!("in its window, from {at}"),
                    _ => m.error.clone(),
                }
            ));
        }
        if !self.stale_copies.is_empty() {
            out.push_str(&format!(
                "old copies still on {} (deleted once its agent is back): {}\n",
                self.host_id,
                self.stale_copies.join(", ")
            ));
        }
        out.trim_end().to_string()
    }
}

/// Unix milliseconds as RFC 3339 (UTC); `None` for 0 (not known).
pub fn rfc3339(unix_ms: i64) -> Option<String> {
    (unix_ms > 0)
        .then(|| jiff::Timestamp::from_millisecond(unix_ms).ok())
        .flatten()
        .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
}

/// One allowlist entry: `destination:port/protocol`, its addresses now, and the packets it let
/// through (so operators can prune entries nobody uses).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EgressEntryView {
    pub entry: String,
    pub addresses: Vec<String>,
    pub hits: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl From<&proto::Tenant> for TenantView {
    fn from(t: &proto::Tenant) -> Self {
        let spec = t.spec.clone().unwrap_or_default();
        let placement = t.placement.clone().unwrap_or_default();
        let status = t.status.clone().unwrap_or_default();
        let resources = spec.resources.unwrap_or_default();
        Self {
            tenant_id: placement.tenant_id,
            host_id: placement.host_id,
            state: tenant_state_name(placement.state),
            generation: placement.generation,
            delivered: placement.delivered,
            healthy: status.healthy,
            message: status.message,
            tier: spec.tier,
            image: spec.image,
            memory_cap_bytes: resources.memory_bytes,
            memory_used_bytes: status.memory_used_bytes,
            cpu_millicores: resources.cpu_millicores,
            cpu_limit_millicores: resources.cpu_limit_millicores,
            cpu_used_millicores: status.cpu_used_millicores,
            volume_bytes: resources.volume_bytes,
            encrypted: spec.volume.is_some_and(|v| v.encrypted),
            oom_kills: status.oom_kills,
            restarts: status.restarts,
            published_port: status.published_port,
            egress: spec
                .egress
                .iter()
                .map(|rule| {
                    let seen = status.egress.iter().find(|s| s.rule.as_ref() == Some(rule));
                    EgressEntryView {
                        entry: egress_entry_text(&rule.destination, rule.port, &rule.protocol),
                        addresses: seen.map(|s| s.addresses.clone()).unwrap_or_default(),
                        hits: seen.map_or(0, |s| s.packets),
                        error: seen.map(|s| s.error.clone()).unwrap_or_default(),
                    }
                })
                .collect(),
            egress_denied_packets: status.egress_denied_packets,
            last_restart: rfc3339(status.last_restart_unix_ms),
            next_restart: rfc3339(status.next_restart_unix_ms),
            restart_note: status.restart_note,
            restored: status.restored.as_ref().map(SnapshotView::from),
            backup_interval_ms: spec.backup.as_ref().map_or(24 * 3_600_000, |b| {
                match (b.disabled, b.interval_ms) {
                    (true, _) => 0,
                    (false, 0) => 24 * 3_600_000,
                    (false, ms) => ms,
                }
            }),
            last_backup: status.last_backup.as_ref().map(BackupReportView::from),
        }
    }
}

/// The fleet's capacity, as berthctl and the REST API print it.
#[derive(Debug, Clone, Serialize)]
pub struct CapacityView {
    pub hosts: u32,
    pub tenants: u32,
    pub memory_capacity_bytes: u64,
    pub memory_committed_bytes: u64,
    pub memory_used_bytes: u64,
    pub cpu_capacity_millicores: u64,
    pub cpu_requested_millicores: u64,
    pub cpu_used_millicores: u64,
    pub tiers: Vec<TierCpuView>,
}

/// A tier's CPU request against what its running tenants use.
#[derive(Debug, Clone, Serialize)]
pub struct TierCpuView {
    pub tier: String,
    pub cpu_request_millicores: u32,
    pub cpu_limit_millicores: u32,
    pub tenants_measured: u32,
    pub cpu_used_p95_millicores: u32,
    /// What to change; absent when the request is near that use, or too few are measured.
    pub advice: Option<String>,
}

impl From<&proto::CapacityReport> for CapacityView {
    fn from(r: &proto::CapacityReport) -> Self {
        Self {
            hosts: r.hosts,
            tenants: r.tenants,
            memory_capacity_bytes: r.memory_capacity_bytes,
            memory_committed_bytes: r.memory_committed_bytes,
            memory_used_bytes: r.memory_used_bytes,
            cpu_capacity_millicores: r.cpu_capacity_millicores,
            cpu_requested_millicores: r.cpu_requested_millicores,
            cpu_used_millicores: r.cpu_used_millicores,
            tiers: r
                .tiers
                .iter()
                .map(|t| TierCpuView {
                    tier: t.tier.clone(),
                    cpu_request_millicores: t.cpu_request_millicores,
                    cpu_limit_millicores: t.cpu_limit_millicores,
                    tenants_measured: t.tenants_measured,
                    cpu_used_p95_millicores: t.cpu_used_p95_millicores,
                    advice: (!t.advice.is_empty()).then(|| t.advice.clone()),
                })
                .collect(),
        }
    }
}

/// The hosts kept by a compaction that its table names (a large fleet keeps hundreds).
const KEPT_SHOWN: usize = 10;

/// A compaction's plan (or start), as `berthctl compact --json` shows it.
#[derive(Debug, Serialize)]
pub struct CompactionView {
    /// `planned` (dry run) or `started`.
    pub phase: String,
    pub emptied: Vec<EmptiedView>,
    /// Per month, in the catalog's currency.
    pub saving: f64,
    pub currency: &'static str,
    pub moves: u32,
    pub kept: Vec<KeptView>,
    /// Cordoned hosts with no tenant: ready to be returned.
    pub returnable: Vec<ReturnableView>,
}

#[derive(Debug, Serialize)]
pub struct EmptiedView {
    pub host_id: String,
    pub provider: String,
    pub monthly_cost: f64,
    pub moves: Vec<MoveView>,
}

#[derive(Debug, Serialize)]
pub struct KeptView {
    pub host_id: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct ReturnableView {
    pub host_id: String,
    pub monthly_cost: f64,
}

fn money(cents: u64) -> f64 {
    cents as f64 / 100.0
}

impl From<&proto::CompactResponse> for CompactionView {
    fn from(c: &proto::CompactResponse) -> Self {
        Self {
            phase: c.phase.clone(),
            saving: money(c.saving_cents),
            currency: "EUR",
            moves: c.moves,
            emptied: c
                .emptied
                .iter()
                .map(|e| EmptiedView {
                    host_id: e.host_id.clone(),
                    provider: e.provider.clone(),
                    monthly_cost: money(e.monthly_cost_cents),
                    moves: DrainView::from(&proto::DrainStatus {
                        moves: e.moves.clone(),
                        ..Default::default()
                    })
                    .moves,
                })
                .collect(),
            kept: c
                .kept
                .iter()
                .map(|k| KeptView {
                    host_id: k.host_id.clone(),
                    reason: k.reason.clone(),
                })
                .collect(),
            returnable: c
                .returnable
                .iter()
                .map(|r| ReturnableView {
                    host_id: r.host_id.clone(),
                    monthly_cost: money(r.monthly_cost_cents),
                })
                .collect(),
        }
    }
}

impl CompactionView {
    /// The summary line ("2 hosts can be returned: a, b — saves 96.98 EUR/month — 7 moves"),
    /// each move, the hosts kept and why, and the hosts ready to return.
    pub fn table(&self) -> String {
        let mut out = match self.emptied.len() {
            0 => "no host can be emptied now\n".to_string(),
            n => format!(
                "{n} host{} can be returned: {} — saves {:.2} {}/month — {} move{}{}\n",
                if n == 1 { "" } else { "s" },
                self.emptied
                    .iter()
                    .map(|e| e.host_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.saving,
                self.currency,
                self.moves,
                if self.moves == 1 { "" } else { "s" },
                if self.phase == "started" {
                    " (started: `berthctl drain-status HOST` follows each)"
                } else {
                    ""
                },
            ),
        };
        if self.emptied.iter().any(|e| !e.moves.is_empty()) {
            out.push_str(&format!(
                "\n{:<24} {:<24} {:<24} {:>8}  {}\n",
                "TENANT", "FROM", "TO", "MEMORY", "CUT-OVER"
            ));
            for e in &self.emptied {
                for m in &e.moves {
                    out.push_str(&format!(
                        "{:<24} {:<24} {:<24} {:>5}MiB  {}\n",
                        m.tenant_id,
                        e.host_id,
                        m.target_host_id,
                        m.memory_bytes >> 20,
                        m.not_before
                            .as_deref()
                            .map_or("at once".to_string(), |t| format!(
                                "in its window, from {t}"
                            )),
                    ));
                }
            }
        }
        if !self.kept.is_empty() {
            out.push_str("\nkept:\n");
            for k in self.kept.iter().take(KEPT_SHOWN) {
                out.push_str(&format!("  {}: {}\n", k.host_id, k.reason));
            }
            if self.kept.len() > KEPT_SHOWN {
                out.push_str(&format!(
                    "  … and {} more (--json lists every one)\n",
                    self.kept.len() - KEPT_SHOWN
                ));
            }
        }
        if !self.returnable.is_empty() {
            out.push_str("\nready to return (cordoned, no tenant):\n");
            for r in &self.returnable {
                out.push_str(&format!(
                    "  {} ({:.2} {}/month)\n",
                    r.host_id, r.monthly_cost, self.currency
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compaction_table_says_what_is_saved_and_names_at_most_ten_kept_hosts() {
        let response = proto::CompactResponse {
            phase: "planned".into(),
            saving_cents: 9698,
            moves: 9,
            emptied: ["hetzner-fsn1-07", "hetzner-fsn1-11"]
                .iter()
                .map(|h| proto::EmptiedHost {
                    host_id: (*h).into(),
                    provider: "hetzner".into(),
                    monthly_cost_cents: 4849,
                    moves: Vec::new(),
                })
                .collect(),
            kept: (0..25)
                .map(|i| proto::KeptHost {
                    host_id: format!("h{i}"),
                    reason: "it receives tenants of an emptied host".into(),
                })
                .collect(),
            returnable: Vec::new(),
        };
        let table = CompactionView::from(&response).table();
        assert!(
            table.starts_with(
                "2 hosts can be returned: hetzner-fsn1-07, hetzner-fsn1-11 — saves 96.98 EUR/month — 9 moves\n"
            ),
            "{table}"
        );
        assert_eq!(table.matches("it receives tenants").count(), 10, "{table}");
        assert!(
            table.contains("… and 15 more (--json lists every one)"),
            "{table}"
        );
        let none = CompactionView::from(&proto::CompactResponse::default()).table();
        assert!(none.starts_with("no host can be emptied now"), "{none}");
    }
}
