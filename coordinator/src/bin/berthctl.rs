//! berthctl: the operator's CLI for the coordinator's operator API.

use std::path::PathBuf;

use berth_coordinator::api::client::{ClientOptions, OperatorClient, connect};
use berth_coordinator::api::views::{
    BackupView, CapacityView, CompactionView, DrainView, HostView, PlacementView, RemovalView,
    RestartView, RestoreView, SnapshotView, TenantView,
};
use berth_shared::proto::{self, HostRef};
use berth_shared::spec::{EgressFile, TenantSpecFile};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "berthctl", version, about = "Operate a berth fleet")]
struct Cli {
    /// The coordinator's operator port; a fleet's coordinators comma-separated (the leader
    /// answers: a standby's answer names it, and the call is made there).
    #[arg(
        long,
        global = true,
        env = "BERTH_COORDINATOR",
        default_value = "https://127.0.0.1:7444"
    )]
    coordinator: String,
    /// The fleet CA certificate.
    #[arg(long, global = true, env = "BERTH_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Or: the fleet CA's SHA-256 fingerprint.
    #[arg(long, global = true, env = "BERTH_CA_FINGERPRINT")]
    ca_fingerprint: Option<String>,
    /// A file holding an operator bearer token.
    #[arg(long, global = true, env = "BERTH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// An operator client certificate (with --key).
    #[arg(long, global = true, env = "BERTH_CLIENT_CERT")]
    cert: Option<PathBuf>,
    #[arg(long, global = true, env = "BERTH_CLIENT_KEY")]
    key: Option<PathBuf>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the fleet's hosts.
    Hosts,
    /// The fleet's memory and CPU: offered, placed, used; per tier, its CPU request against
    /// the 95th percentile of what its running tenants use.
    Capacity {
        /// Only say which tiers' CPU requests to change, and which way.
        #[arg(long)]
        advice: bool,
    },
    /// Stop placing new tenants on a host.
    Cordon { host: String },
    /// Allow placements on a host again.
    Uncordon { host: String },
    /// Place a tenant from a spec file (TOML, or JSON when it ends in .json).
    Place { spec: PathBuf },
    /// Remove a tenant from its host.
    Remove {
        tenant: String,
        /// Crypto-shred its volume (erase the LUKS header, destroy the key, delete the file).
        #[arg(long)]
        purge: bool,
    },
    /// A tenant's egress allowlist.
    Egress {
        #[command(subcommand)]
        action: EgressAction,
    },
    /// Restart a tenant's container now; waits until it is healthy again.
    Restart { tenant: String },
    /// Back a tenant's volume up now (into the coordinator's [backup] repository); waits
    /// for the snapshot.
    Backup { tenant: String },
    /// List a tenant's backups (restic snapshots), oldest first.
    Backups { tenant: String },
    /// Stream a tenant's files as a tar (a GDPR export): its files now, from the host that
    /// runs it, or a backup's.
    Export {
        tenant: String,
        /// A snapshot (its id or short id, as `berthctl backups` lists it) instead of the
        /// files now.
        #[arg(long)]
        snapshot: Option<String>,
        /// Write the tar to this new file (default: stdout, which must not be a terminal).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Replace a tenant's volume contents with a backup: its container stops, its host
    /// restores, it starts again; waits until it runs.
    Restore {
        tenant: String,
        /// The snapshot (its id or short id, as `berthctl backups` lists it); default: the
        /// latest.
        #[arg(long)]
        snapshot: Option<String>,
        /// Restore on this host instead of its own (checked like a placement there); its copy
        /// on its old host is deleted once it runs on the new one.
        #[arg(long)]
        to_host: Option<String>,
    },
    /// Move every tenant off a host (cordoned first), with its volume; or, with --dry-run,
    /// only show the plan (or why it cannot be done).
    Drain {
        host: String,
        #[arg(long)]
        dry_run: bool,
        /// Stop starting moves after this long, and roll back unfinished ones.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        deadline: std::time::Duration,
        /// Tenants moved at once.
        #[arg(long, default_value_t = 2)]
        max_parallel: u32,
        /// The host is lost: start its tenants elsewhere, each restored from its latest
        /// backup (one never backed up starts empty).
        #[arg(long)]
        force_lost: bool,
        /// With --force-lost: start them on empty volumes, without restoring.
        #[arg(long, requires = "force_lost")]
        empty: bool,
        /// Copy each volume only once its tenant stopped (no pre-copy while it runs).
        #[arg(long)]
        no_precopy: bool,
        /// Wait until the drain ends, printing its progress.
        #[arg(long)]
        wait: bool,
    },
    /// Empty the hosts whose removal saves the most money (monthly cost from the catalog),
    /// every tenant moved as a drain moves it, under all its constraints; emptied hosts stay
    /// cordoned, ready to return. With --dry-run, only show the plan and the saving.
    Compact {
        #[arg(long)]
        dry_run: bool,
        /// The most tenants moved.
        #[arg(long, default_value_t = 100)]
        max_moves: u32,
        /// Only empty hosts of these providers (comma-separated: hetzner, aws, other).
        #[arg(long, value_delimiter = ',')]
        providers: Vec<String>,
        /// Percent of each target host's memory and CPU kept free.
        #[arg(long, default_value_t = 10)]
        headroom: u32,
        /// Per emptied host: stop starting moves after this long.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        deadline: std::time::Duration,
        /// Per emptied host: tenants moved at once.
        #[arg(long, default_value_t = 2)]
        max_parallel: u32,
        /// Cut every tenant over at once; by default each moves in its own maintenance
        /// window, just before its nightly restart (which its new host then skips).
        #[arg(long)]
        now: bool,
        /// Wait until every emptied host's drain ends.
        #[arg(long)]
        wait: bool,
    },
    /// A host's drain: each tenant's target, phase, bytes copied and ETA.
    DrainStatus { host: String },
    /// Stop a host's drain: moves under way roll back, the host stays cordoned.
    DrainAbort { host: String },
    /// List tenants.
    Tenants {
        /// Only the tenants of this host.
        #[arg(long)]
        host: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum EgressAction {
    /// Replace the allowlist of a placed tenant; its container keeps running.
    Set {
        tenant: String,
        /// Entries `destination:port[/udp]`: a CIDR, an address or a DNS name
        /// (e.g. api.anthropic.com:443 203.0.113.0/24:8443 192.0.2.53:53/udp). None: deny all.
        entries: Vec<String>,
    },
    /// Show the allowlist with each entry's addresses and hits.
    Show { tenant: String },
}

/// Reads a spec file into the protobuf message; syntax and sizes are checked here, every other
/// rule by the coordinator.
fn read_spec(path: &std::path::Path) -> anyhow::Result<proto::TenantSpec> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let file: TenantSpecFile = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
    } else {
        toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}",
                path.display(),
                e.to_string().trim().replace('\n', " ")
            )
        })?
    };
    file.to_proto()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// How often `drain --wait` asks for the drain's status.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// How often `drain --wait` prints the status while no move changes phase.
const DRAIN_PRINT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

fn print_drain(json: bool, status: &proto::DrainStatus) -> anyhow::Result<()> {
    let view = DrainView::from(status);
    if json {
        berth_shared::outln!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        berth_shared::outln!("{}", view.table());
    }
    Ok(())
}

fn print_tenants(tenants: &[TenantView]) {
    berth_shared::outln!(
        "{:<24} {:<24} {:<9} {:>10} {:>9} {:<10} {:<20} {:<20} {:<20} MESSAGE",
        "TENANT",
        "HOST",
        "STATE",
        "GENERATION",
        "MEMORY",
        "TIER",
        "LAST RESTART",
        "NEXT RESTART",
        "LAST GOOD BACKUP"
    );
    let time = |t: &Option<String>| t.clone().unwrap_or_else(|| "-".into());
    for t in tenants {
        let memory = format!("{} MiB", t.memory_cap_bytes >> 20);
        let message = [t.message.as_str(), t.restart_note.as_str()]
            .into_iter()
            .filter(|m| !m.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        berth_shared::outln!(
            "{:<24} {:<24} {:<9} {:>10} {:>9} {:<10} {:<20} {:<20} {:<20} {}",
            t.tenant_id,
            t.host_id,
            t.state,
            t.generation,
            memory,
            t.tier,
            time(&t.last_restart),
            time(&t.next_restart),
            t.backup_text(),
            message
        );
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 30))
}

fn print_capacity(c: &CapacityView) {
    berth_shared::outln!("{} hosts, {} tenants", c.hosts, c.tenants);
    berth_shared::outln!(
        "memory: {} GiB offered, {} GiB placed, {} GiB used",
        gib(c.memory_capacity_bytes),
        gib(c.memory_committed_bytes),
        gib(c.memory_used_bytes)
    );
    berth_shared::outln!(
        "cpu:    {} mCPU offered, {} mCPU requested, {} mCPU used",
        c.cpu_capacity_millicores,
        c.cpu_requested_millicores,
        c.cpu_used_millicores
    );
    berth_shared::outln!(
        "{:<16} {:>8} {:>8} {:>9} {:>8}",
        "TIER",
        "REQUEST",
        "LIMIT",
        "MEASURED",
        "USE P95"
    );
    for t in &c.tiers {
        berth_shared::outln!(
            "{:<16} {:>8} {:>8} {:>9} {:>8}",
            t.tier,
            t.cpu_request_millicores,
            t.cpu_limit_millicores,
            t.tenants_measured,
            t.cpu_used_p95_millicores
        );
    }
}

fn print_advice(c: &CapacityView) {
    let advice: Vec<&str> = c.tiers.iter().filter_map(|t| t.advice.as_deref()).collect();
    if advice.is_empty() {
        berth_shared::outln!(
            "no advice: every tier's CPU request is within half and one and a half times its tenants' p95 (or fewer than {} of its tenants run)",
            berth_coordinator::capacity::MIN_MEASURED
        );
    }
    for line in advice {
        berth_shared::outln!("{line}");
    }
}

fn print_hosts(hosts: &[HostView]) {
    berth_shared::outln!(
        "{:<24} {:<8} {:<14} {:<9} {:>14} {:>7} {:>11}",
        "HOST",
        "PROVIDER",
        "REGION",
        "STATE",
        "RAM USED/TOTAL",
        "TENANTS",
        "LAST REPORT"
    );
    for h in hosts {
        let age = h
            .last_report_age_ms
            .map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0))
            .unwrap_or_else(|| "never".into());
        let ram = format!(
            "{}/{} GiB",
            gib(h.memory_used_bytes),
            gib(h.memory_total_bytes)
        );
        berth_shared::outln!(
            "{:<24} {:<8} {:<14} {:<9} {:>14} {:>7} {:>11}",
            h.host_id,
            h.provider,
            h.region,
            h.state,
            ram,
            h.tenant_count,
            age
        );
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let options = ClientOptions {
        coordinator: cli.coordinator.clone(),
        ca_cert: cli.ca_cert.clone(),
        ca_fingerprint: cli.ca_fingerprint.clone(),
        token: std::env::var("BERTH_TOKEN").ok().filter(|t| !t.is_empty()),
        token_file: cli.token_file.clone(),
        cert: cli.cert.clone(),
        key: cli.key.clone(),
    };
    let mut client = connect(&options)?;
    match cli.command {
        Command::Hosts => {
            let hosts = client
                .list_hosts(proto::ListHostsRequest {})
                .await?
                .into_inner()
                .hosts;
            let now = now_ms();
            let views: Vec<HostView> = hosts.iter().map(|h| HostView::new(h, now)).collect();
            if cli.json {
                berth_shared::outln!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                print_hosts(&views);
            }
        }
        Command::Capacity { advice } => {
            let report = client
                .get_capacity(proto::CapacityRequest {})
                .await?
                .into_inner();
            let view = CapacityView::from(&report);
            if cli.json {
                berth_shared::outln!("{}", serde_json::to_string_pretty(&view)?);
            } else if advice {
                print_advice(&view);
            } else {
                print_capacity(&view);
            }
        }
        Command::Cordon { host } | Command::Uncordon { host } if host.is_empty() => {
            anyhow::bail!("HOST must not be empty")
        }
        Command::Cordon { host } => {
            let h = client
                .cordon_host(HostRef { host_id: host })
                .await?
                .into_inner();
            print_one(cli.json, &HostView::new(&h, now_ms()))?;
        }
        Command::Place { spec } => {
            let spec = read_spec(&spec)?;
            let mut request = tonic::Request::new(proto::PlaceTenantRequest { spec: Some(spec) });
            request.metadata_mut().insert(
                berth_shared::spec::SPEC_FORMAT_HEADER,
                tonic::metadata::MetadataValue::from_static("file"),
            );
            let placement = client.place_tenant(request).await?.into_inner();
            print_placement(cli.json, &placement, |v| {
                format!(
                    "placed {} on {} (generation {}, {})",
                    v.tenant_id, v.host_id, v.generation, v.state
                )
            })?;
        }
        Command::Remove { tenant, purge } => {
            let removed = client
                .remove_tenant(proto::RemoveTenantRequest {
                    tenant_id: tenant,
                    purge,
                })
                .await?
                .into_inner();
            let view = RemovalView::from(&removed);
            if cli.json {
                berth_shared::outln!("{}", serde_json::to_string(&view)?);
            } else {
                berth_shared::outln!("{}", view.summary());
            }
        }
        Command::Egress {
            action: EgressAction::Set { tenant, entries },
        } => {
            let egress = entries
                .into_iter()
                .enumerate()
                .map(|(i, e)| EgressFile::Short(e).to_proto(i))
                .collect::<Result<Vec<_>, _>>()?;
            let placement = client
                .set_egress(proto::SetEgressRequest {
                    tenant_id: tenant,
                    egress,
                })
                .await?
                .into_inner();
            print_placement(cli.json, &placement, |v| {
                format!(
                    "egress of {} set (host {}, generation {})",
                    v.tenant_id, v.host_id, v.generation
                )
            })?;
        }
        Command::Egress {
            action: EgressAction::Show { tenant },
        } => {
            let t = client
                .get_tenant(proto::TenantRef { tenant_id: tenant })
                .await?
                .into_inner();
            print_egress(cli.json, &TenantView::from(&t))?;
        }
        Command::Drain {
            host,
            dry_run,
            deadline,
            max_parallel,
            force_lost,
            empty,
            no_precopy,
            wait,
        } => {
            let request = proto::DrainRequest {
                host_id: host,
                dry_run,
                deadline_ms: deadline.as_millis() as u64,
                max_parallel,
                force_lost,
                no_precopy,
                empty,
            };
            drain(&mut client, request, wait, cli.json).await?;
        }
        Command::Compact {
            dry_run,
            max_moves,
            providers,
            headroom,
            deadline,
            max_parallel,
            now,
            wait,
        } => {
            let request = proto::CompactRequest {
                now,
                dry_run,
                max_moves,
                providers,
                headroom_percent: Some(headroom),
                deadline_ms: deadline.as_millis() as u64,
                max_parallel,
            };
            compact(&mut client, request, wait, cli.json).await?;
        }
        Command::DrainStatus { host } => {
            let status = client
                .get_drain_status(HostRef { host_id: host })
                .await?
                .into_inner();
            print_drain(cli.json, &status)?;
        }
        Command::DrainAbort { host } => {
            let status = client
                .abort_drain(HostRef { host_id: host })
                .await?
                .into_inner();
            print_drain(cli.json, &status)?;
        }
        Command::Restart { tenant } => {
            let done = client
                .restart_tenant(proto::RestartTenantRequest { tenant_id: tenant })
                .await?
                .into_inner();
            print_restart(cli.json, &RestartView::from(&done))?;
        }
        Command::Backup { tenant } => {
            let done = client
                .backup_tenant(proto::TenantRef { tenant_id: tenant })
                .await?
                .into_inner();
            print_backup(cli.json, &BackupView::from(&done))?;
        }
        Command::Export {
            tenant,
            snapshot,
            output,
        } => {
            // Where it goes is checked before the host is asked for anything.
            let mut sink = ExportSink::open(output.as_deref())?;
            let stream = client
                .export_tenant(proto::ExportTenantRequest {
                    tenant_id: tenant.clone(),
                    snapshot_id: snapshot.unwrap_or_default(),
                })
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(status) => {
                    sink.discard();
                    return Err(status.into());
                }
            };
            let mut bytes = 0u64;
            let ended = loop {
                match stream.message().await {
                    Ok(Some(chunk)) => {
                        bytes += chunk.data.len() as u64;
                        sink.write(&chunk.data)?;
                    }
                    Ok(None) => break Ok(()),
                    Err(status) => break Err(status),
                }
            };
            match ended {
                Ok(()) => {
                    sink.keep()?;
                    eprintln!("exported {tenant}: {bytes} bytes of tar");
                }
                Err(status) => {
                    sink.discard();
                    return Err(status.into());
                }
            }
        }
        Command::Restore {
            tenant,
            snapshot,
            to_host,
        } => {
            let done = client
                .restore_tenant(proto::RestoreTenantRequest {
                    tenant_id: tenant,
                    snapshot_id: snapshot.unwrap_or_default(),
                    to_host_id: to_host.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_restore(cli.json, &RestoreView::from(&done))?;
        }
        Command::Backups { tenant } => {
            let listed = client
                .list_backups(proto::TenantRef { tenant_id: tenant })
                .await?
                .into_inner();
            print_backups(cli.json, &listed)?;
        }
        Command::Tenants { host } => {
            let tenants = client
                .list_tenants(proto::ListTenantsRequest {
                    host_id: host.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .tenants;
            let views: Vec<TenantView> = tenants.iter().map(TenantView::from).collect();
            if cli.json {
                berth_shared::outln!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                print_tenants(&views);
            }
        }
        Command::Uncordon { host } => {
            let h = client
                .uncordon_host(HostRef { host_id: host })
                .await?
                .into_inner();
            print_one(cli.json, &HostView::new(&h, now_ms()))?;
        }
    }
    Ok(())
}

/// Starts a drain; with `wait`, follows it until it ends (the table printed when a move
/// changes phase, else every few seconds) and fails unless it is done.
async fn drain(
    client: &mut OperatorClient,
    request: proto::DrainRequest,
    wait: bool,
    json: bool,
) -> anyhow::Result<()> {
    let host = request.host_id.clone();
    let mut status = client.drain_host(request).await?.into_inner();
    // Looked at often on the one connection (cheap, and the end is seen at once).
    let phases = |s: &proto::DrainStatus| -> Vec<(String, String)> {
        s.moves
            .iter()
            .map(|m| (m.tenant_id.clone(), m.phase.clone()))
            .collect()
    };
    let mut printed = (phases(&status), std::time::Instant::now());
    while wait && status.phase == "running" {
        tokio::time::sleep(DRAIN_POLL).await;
        status = client
            .get_drain_status(HostRef {
                host_id: host.clone(),
            })
            .await?
            .into_inner();
        let now = phases(&status);
        if !json
            && (now != printed.0 || printed.1.elapsed() >= DRAIN_PRINT_EVERY)
            && status.phase == "running"
        {
            berth_shared::outln!("{}\n", DrainView::from(&status).table());
            printed = (now, std::time::Instant::now());
        }
    }
    print_drain(json, &status)?;
    if wait && status.phase != "done" {
        anyhow::bail!("the drain of {host} ended {}", status.phase);
    }
    Ok(())
}

/// Plans or starts a compaction; with `wait`, follows each emptied host's drain until it
/// ends and fails unless all are done.
async fn compact(
    client: &mut OperatorClient,
    request: proto::CompactRequest,
    wait: bool,
    json: bool,
) -> anyhow::Result<()> {
    let dry_run = request.dry_run;
    let response = client.compact(request).await?.into_inner();
    let view = CompactionView::from(&response);
    if json && !wait {
        berth_shared::outln!("{}", serde_json::to_string_pretty(&view)?);
    } else if !json {
        berth_shared::outln!("{}", view.table());
    }
    if !wait || dry_run {
        return Ok(());
    }
    let mut finals = Vec::new();
    for emptied in &response.emptied {
        let host = HostRef {
            host_id: emptied.host_id.clone(),
        };
        let status = loop {
            let status = client.get_drain_status(host.clone()).await?.into_inner();
            if status.phase != "running" {
                break status;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        };
        if !json {
            berth_shared::outln!("{}", DrainView::from(&status).table());
        }
        finals.push(status);
    }
    if json {
        let views: Vec<DrainView> = finals.iter().map(DrainView::from).collect();
        berth_shared::outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "compaction": view,
                "drains": views,
            }))?
        );
    }
    let unfinished: Vec<String> = finals
        .iter()
        .filter(|s| s.phase != "done")
        .map(|s| format!("{} ({})", s.host_id, s.phase))
        .collect();
    if !unfinished.is_empty() {
        anyhow::bail!("not emptied: {}", unfinished.join(", "));
    }
    if !json {
        berth_shared::outln!(
            "emptied and cordoned, ready to return: {}",
            finals
                .iter()
                .map(|s| s.host_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// A tenant's allowlist with each entry's hits and addresses.
fn print_egress(json: bool, view: &TenantView) -> anyhow::Result<()> {
    if json {
        berth_shared::outln!("{}", serde_json::to_string_pretty(&view.egress)?);
        return Ok(());
    }
    berth_shared::outln!("{:<40} {:>10} ADDRESSES", "ENTRY", "HITS");
    for e in &view.egress {
        let detail = if e.error.is_empty() {
            e.addresses.join(", ")
        } else {
            format!("{} ({})", e.addresses.join(", "), e.error)
        };
        berth_shared::outln!("{:<40} {:>10} {}", e.entry, e.hits, detail.trim());
    }
    berth_shared::outln!("denied packets: {}", view.egress_denied_packets);
    Ok(())
}

fn print_restart(json: bool, view: &RestartView) -> anyhow::Result<()> {
    if json {
        berth_shared::outln!("{}", serde_json::to_string_pretty(view)?);
    } else {
        berth_shared::outln!(
            "restarted {} on {}: healthy again after {:.1} s",
            view.tenant_id,
            view.host_id,
            view.downtime_ms as f64 / 1000.0
        );
    }
    Ok(())
}

/// Where an export goes: a new file (written beside it first, and renamed only once whole) or
/// stdout (never a terminal).
enum ExportSink {
    File {
        partial: PathBuf,
        path: PathBuf,
        file: std::fs::File,
    },
    Stdout(std::io::Stdout),
}

impl ExportSink {
    fn open(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        use std::io::IsTerminal;
        let Some(path) = path else {
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                anyhow::bail!(
                    "stdout is a terminal: redirect it (> tenant.tar) or pass --output FILE"
                );
            }
            return Ok(Self::Stdout(stdout));
        };
        if path.exists() {
            anyhow::bail!(
                "{}: exists; an export never overwrites a file",
                path.display()
            );
        }
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|e| anyhow::anyhow!("{}: {e}", partial.display()))?;
        Ok(Self::File {
            partial,
            path: path.to_path_buf(),
            file,
        })
    }

    fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        use std::io::Write;
        match self {
            Self::File { partial, file, .. } => file
                .write_all(data)
                .map_err(|e| anyhow::anyhow!("{}: {e}", partial.display())),
            Self::Stdout(out) => out
                .write_all(data)
                .map_err(|e| anyhow::anyhow!("stdout: {e}")),
        }
    }

    /// The export is whole: the file gets its name.
    fn keep(self) -> anyhow::Result<()> {
        use std::io::Write;
        match self {
            Self::File {
                partial,
                path,
                file,
            } => {
                file.sync_all()
                    .map_err(|e| anyhow::anyhow!("{}: {e}", partial.display()))?;
                std::fs::rename(&partial, &path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
            }
            Self::Stdout(mut out) => out.flush().map_err(|e| anyhow::anyhow!("stdout: {e}")),
        }
    }

    /// The export stopped: no partial file is left.
    fn discard(self) {
        if let Self::File { partial, .. } = self {
            let _ = std::fs::remove_file(partial);
        }
    }
}

fn print_backup(json: bool, view: &BackupView) -> anyhow::Result<()> {
    if json {
        berth_shared::outln!("{}", serde_json::to_string_pretty(view)?);
    } else {
        berth_shared::outln!(
            "backed up {} on {}: snapshot {}, {} new and {} changed files, {} bytes added of {} read, {:.1} s",
            view.tenant_id,
            view.host_id,
            view.snapshot_id,
            view.files_new,
            view.files_changed,
            view.bytes_added,
            view.bytes_processed,
            view.duration_ms as f64 / 1000.0
        );
    }
    Ok(())
}

fn print_backups(json: bool, listed: &proto::ListBackupsResponse) -> anyhow::Result<()> {
    let snapshots: Vec<SnapshotView> = listed.snapshots.iter().map(SnapshotView::from).collect();
    if json {
        berth_shared::outln!("{}", serde_json::to_string_pretty(&snapshots)?);
    } else {
        berth_shared::outln!("{:<10} TIME", "SNAPSHOT");
        for s in &snapshots {
            berth_shared::outln!("{:<10} {}", s.short_id, s.time);
        }
    }
    Ok(())
}

fn print_restore(json: bool, view: &RestoreView) -> anyhow::Result<()> {
    if json {
        berth_shared::outln!("{}", serde_json::to_string_pretty(view)?);
    } else {
        let (id, time) = view
            .restored
            .as_ref()
            .map_or(("?", "?"), |s| (s.short_id.as_str(), s.time.as_str()));
        berth_shared::outln!(
            "restored {} on {} from snapshot {id} of {time}: it runs again",
            view.tenant_id,
            view.host_id
        );
        if let Some(from) = &view.moved_from {
            match view.old_copy_deleted {
                true => berth_shared::outln!("its old copy on {from} is deleted"),
                false => berth_shared::outln!(
                    "its old copy on {from} could not be deleted: see that host's agent log"
                ),
            }
        }
    }
    Ok(())
}

/// Prints a placement as JSON, or as the line `text` makes of it.
fn print_placement(
    json: bool,
    placement: &proto::Placement,
    text: impl Fn(&PlacementView) -> String,
) -> anyhow::Result<()> {
    let view = PlacementView::from(placement);
    if json {
        berth_shared::outln!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        berth_shared::outln!("{}", text(&view));
    }
    Ok(())
}

fn print_one(json: bool, host: &HostView) -> anyhow::Result<()> {
    if json {
        berth_shared::outln!("{}", serde_json::to_string_pretty(host)?);
    } else {
        berth_shared::outln!("host {} is {}", host.host_id, host.state);
    }
    Ok(())
}

fn one_line(e: &anyhow::Error) -> String {
    if let Some(status) = e.downcast_ref::<tonic::Status>() {
        let mut text = format!("{:?}: {}", status.code(), status.message());
        let mut source = std::error::Error::source(status);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        return text;
    }
    format!("{e:#}").replace('\n', " ")
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    berth_shared::tls::install_crypto_provider();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
