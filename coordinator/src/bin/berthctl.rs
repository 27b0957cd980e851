//! berthctl: the operator's CLI for the coordinator's operator API.

use std::path::PathBuf;

use berth_coordinator::client::{ClientOptions, connect};
use berth_shared::proto::{self, HostRef};
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(name = "berthctl", version, about = "Operate a berth fleet")]
struct Cli {
    /// The coordinator's operator port.
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
    /// Stop placing new tenants on a host.
    Cordon { host: String },
    /// Allow placements on a host again.
    Uncordon { host: String },
}

/// The JSON shape of a host.
#[derive(Debug, Serialize)]
struct HostView {
    host_id: String,
    state: &'static str,
    provider: String,
    region: String,
    instance_type: String,
    memory_total_bytes: u64,
    memory_used_bytes: u64,
    memory_reserved_bytes: u64,
    cpu_count: u32,
    tenant_count: u32,
    /// Milliseconds since the last report; null when it never reported.
    last_report_age_ms: Option<i64>,
    capabilities: CapabilitiesView,
    agent_version: String,
}

#[derive(Debug, Serialize)]
struct CapabilitiesView {
    cgroup: &'static str,
    dm_crypt: bool,
    nftables: bool,
    docker_version: String,
}

fn state_name(state: i32) -> &'static str {
    match proto::HostState::try_from(state) {
        Ok(proto::HostState::Ready) => "ready",
        Ok(proto::HostState::Cordoned) => "cordoned",
        Ok(proto::HostState::Draining) => "draining",
        Ok(proto::HostState::Down) => "down",
        _ => "unknown",
    }
}

fn view(host: &proto::Host, now_ms: i64) -> HostView {
    let facts = host.facts.clone().unwrap_or_default();
    let caps = facts.capabilities.clone().unwrap_or_default();
    HostView {
        host_id: host.host_id.clone(),
        state: state_name(host.state),
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

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 30))
}

fn print_hosts(hosts: &[HostView]) {
    println!(
        "{:<24} {:<8} {:<14} {:<9} {:>14} {:>7} {:>11}",
        "HOST", "PROVIDER", "REGION", "STATE", "RAM USED/TOTAL", "TENANTS", "LAST REPORT"
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
        println!(
            "{:<24} {:<8} {:<14} {:<9} {:>14} {:>7} {:>11}",
            h.host_id, h.provider, h.region, h.state, ram, h.tenant_count, age
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
            let views: Vec<HostView> = hosts.iter().map(|h| view(h, now)).collect();
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                print_hosts(&views);
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
            print_one(cli.json, &view(&h, now_ms()))?;
        }
        Command::Uncordon { host } => {
            let h = client
                .uncordon_host(HostRef { host_id: host })
                .await?
                .into_inner();
            print_one(cli.json, &view(&h, now_ms()))?;
        }
    }
    Ok(())
}

fn print_one(json: bool, host: &HostView) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(host)?);
    } else {
        println!("host {} is {}", host.host_id, host.state);
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
