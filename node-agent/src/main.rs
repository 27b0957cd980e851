//! berth-agent: `enroll` this host, then `run` the daemon.

use std::path::PathBuf;

use anyhow::Context;
use berth_node_agent::config::{AgentConfig, DEFAULT_STATE_DIR};
use berth_node_agent::session::identity;
use berth_shared::pki::Fingerprint;
use berth_shared::transport::CoordinatorUrl;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "berth-agent", version, about = "berth's host agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll this host: make its key pair here, get a certificate for a one-time token.
    Enroll {
        /// The coordinator's operator port, e.g. https://coordinator.example.com:7444; a
        /// fleet's coordinators comma-separated (the agent keeps them all, and talks to
        /// whichever leads).
        #[arg(long)]
        coordinator: String,
        /// The one-time token from `berth-coordinator token create`.
        #[arg(long, env = "BERTH_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// SHA-256 fingerprint of the fleet CA (`berth-coordinator ca fingerprint`).
        #[arg(long)]
        ca_fingerprint: String,
        /// Where the identity is kept.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the agent daemon.
    Run {
        #[arg(long, default_value = "/etc/berth/agent.toml")]
        config: PathBuf,
    },
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll {
            coordinator,
            token,
            ca_fingerprint,
            state_dir,
            json,
        } => {
            let fingerprint = Fingerprint::parse(&ca_fingerprint)
                .map_err(|e| anyhow::anyhow!("--ca-fingerprint: {e}"))?;
            let urls = CoordinatorUrl::parse_list("--coordinator", &coordinator)?;
            if token.trim().is_empty() {
                anyhow::bail!("invalid --token: must not be empty");
            }
            let enrollment = identity::enroll(&state_dir, &urls, token.trim(), fingerprint)
                .await
                .context("enrollment failed")?;
            if json {
                berth_shared::outln!("{}", serde_json::to_string(&enrollment)?);
            } else {
                berth_shared::outln!(
                    "enrolled as host {} (agent endpoint {}); identity in {}",
                    enrollment.host_id,
                    enrollment.agent_endpoint,
                    state_dir.display()
                );
            }
        }
        Command::Run { config } => {
            berth_shared::cli::protect_memory();
            let open_files = berth_shared::cli::raise_open_files_limit();
            tracing::debug!(open_files, "open files limit");
            let config = AgentConfig::load(&config)?;
            berth_node_agent::agent::run(config).await?;
        }
    }
    Ok(())
}

/// One malloc arena for the whole agent. glibc gives each thread that allocates while another
/// holds the arena an arena of its own, each keeping its own free pages and fragments: with
/// one, an agent of 50 tenants holds about 1.1 MiB less. An agent waits most of the time, so
/// there is no contention to spread.
fn one_malloc_arena() {
    // SAFETY: mallopt takes two integers and changes only glibc's allocator settings; it runs
    // before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> std::process::ExitCode {
    one_malloc_arena();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("berth-agent: cannot start its runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        berth_shared::tls::install_crypto_provider();
        berth_shared::cli::init_logging();
        berth_shared::cli::finish(run(Cli::parse()).await)
    })
}
