//! berth-coordinator: CA, enrollment tokens, revocation, and the control-plane server.

use std::path::PathBuf;

use anyhow::Context;
use berth_coordinator::api::admin::{self, AdminRequest, AdminResponse};
use berth_coordinator::config::CoordinatorConfig;
use berth_coordinator::config::StoreKind;
use berth_coordinator::coordinator::RevokeTarget;
use berth_coordinator::etcd::EtcdStore;
use berth_coordinator::keys::keyring::{BACKUP_KEYS_PREFIX, Keyring, VOLUME_KEYS_PREFIX};
use berth_coordinator::keys::{MasterKey, rewrap};
use berth_coordinator::registry::Scope;
use berth_coordinator::snapshot::{Snapshot, Summary};
use berth_shared::ids::HostId;
use berth_shared::pki::{self, CertificateAuthority, Subject, Validity};
use berth_shared::store::{SledStore, Store};
use berth_shared::units::parse_duration;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "berth-coordinator", version, about = "berth's control plane")]
struct Cli {
    /// Configuration file (TOML). Defaults apply without one.
    #[arg(long, global = true, env = "BERTH_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `state_dir` from the configuration.
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The fleet CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Run the control plane.
    Serve,
    /// One-time enrollment tokens for new hosts.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Bearer tokens for operators (berthctl, the placement API).
    OperatorToken {
        #[command(subcommand)]
        command: OperatorTokenCommand,
    },
    /// Client certificates for operators.
    OperatorCert {
        #[command(subcommand)]
        command: OperatorCertCommand,
    },
    /// Revoke certificates: a revoked certificate is refused on its next call and its open
    /// session is closed.
    Revoke {
        /// Every certificate issued to this host.
        #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
        host_id: Option<String>,
        /// One certificate, by serial number (hex).
        #[arg(long)]
        serial: Option<String>,
    },
    /// Write a snapshot of the whole state (fleet, tokens, revocations, placements, drains,
    /// wrapped keys, the CA with its key sealed) to a new file, from the running coordinator
    /// or, when none runs, from the files. The master key is not in it: keep it apart.
    Backup {
        /// The file to write (mode 0600); never replaced.
        #[arg(long, required_unless_present = "out_dir", conflicts_with = "out_dir")]
        out: Option<PathBuf>,
        /// A directory to write a new, time-named snapshot into instead (what the hourly
        /// timer runs), deleting the oldest there beyond `--keep`.
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// With `--out-dir`: how many snapshots to keep there.
        #[arg(long, default_value_t = 48, requires = "out_dir")]
        keep: usize,
    },
    /// Copy the fleet store from the embedded database into the etcd cluster of `[etcd]`
    /// (into an empty prefix, with the coordinator stopped); then set `store = "etcd"`.
    MigrateStore {
        /// The store to copy into.
        #[arg(long, value_parser = ["etcd"])]
        to: String,
    },
    /// Wrap every volume and backup key under a new master key, with every coordinator of the
    /// fleet stopped; master.key is replaced once every key is wrapped anew. Run it again if it
    /// was cut short.
    RotateMasterKey {
        /// Write the new key here instead of replacing master.key (when the unit passes the key
        /// as the systemd credential master-key: install this file as its source).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Make the state directory from a snapshot. The master key the snapshot was made under
    /// must be in place first; a directory that holds state is refused.
    Restore {
        /// A file from `berth-coordinator backup`.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create the fleet CA (ECDSA P-256) in <state_dir>/ca. Never overwrites.
    Init,
    /// Print the CA certificate's SHA-256 fingerprint (for `berth-agent enroll`).
    Fingerprint,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a one-time, expiring enrollment token for a host.
    Create {
        #[arg(long)]
        host_id: String,
        /// How long the token stays valid.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Debug, Subcommand)]
enum OperatorTokenCommand {
    /// Print a new operator bearer token.
    Create {
        /// Who the token is for (a lowercase label).
        #[arg(long)]
        name: String,
        /// How long the token stays valid.
        #[arg(long, default_value = "90d")]
        ttl: String,
        /// `admin` (everything) or `read` (listings, dashboard, /metrics: the only scope the
        /// HTTP port accepts).
        #[arg(long, default_value = "admin")]
        scope: String,
    },
    /// List operator tokens: name, scope, creation, expiry, last use (never the tokens).
    List,
    /// Revoke every token of an operator, at once on every port.
    Revoke {
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum OperatorCertCommand {
    /// Write operator.key (0600), operator.crt and ca.crt into a directory.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long, default_value = "90d")]
        ttl: String,
    },
}

/// What a snapshot holds, in a sentence.
fn describe(summary: &Summary) -> String {
    format!(
        "{} hosts, {} tenants, {} volume keys, {} backup keys ({} records), taken {}, CA {}",
        summary.hosts,
        summary.tenants,
        summary.volume_keys,
        summary.backup_keys,
        summary.records,
        expiry(summary.created_unix_ms),
        summary.ca_fingerprint
    )
}

fn print(json: bool, value: serde_json::Value, human: String) {
    if json {
        berth_shared::outln!("{value}");
    } else {
        berth_shared::outln!("{human}");
    }
}

fn expiry(unix_ms: i64) -> String {
    if unix_ms == 0 {
        return "never".into();
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Operator names follow the host id rules (they end up in certificate URIs).
fn operator_name(name: String) -> anyhow::Result<HostId> {
    HostId::new(name).map_err(|e| {
        anyhow::anyhow!(
            "--name: {}",
            e.to_string().replace("host id", "operator name")
        )
    })
}

/// Sends a token-creating request and prints the token: on stdout alone (for scripts), with
/// what it is for and its expiry on stderr.
async fn create_token(
    config: &CoordinatorConfig,
    request: &AdminRequest,
    json: bool,
    (key, subject, description): (&str, &str, String),
) -> anyhow::Result<()> {
    let AdminResponse::Token {
        token,
        expires_unix_ms,
    } = admin::call(config, request).await?
    else {
        anyhow::bail!("unexpected answer from the coordinator");
    };
    if json {
        berth_shared::outln!(
            "{}",
            serde_json::json!({ key: subject, "token": token, "expires_unix_ms": expires_unix_ms })
        );
    } else {
        berth_shared::outln!("{token}");
        eprintln!("{description}, valid until {}", expiry(expires_unix_ms));
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = CoordinatorConfig::load(cli.config.as_deref())?;
    if let Some(dir) = cli.state_dir {
        config.state_dir = dir;
    }
    match cli.command {
        Command::Ca {
            command: CaCommand::Init,
        } => {
            let ca = CertificateAuthority::init(&config.ca_dir())?;
            let fp = ca.fingerprint().to_string();
            let dir = config.ca_dir().display().to_string();
            print(
                cli.json,
                serde_json::json!({ "ca_dir": dir, "fingerprint": fp }),
                format!("created the fleet CA in {dir}\nfingerprint: {fp}"),
            );
        }
        Command::Ca {
            command: CaCommand::Fingerprint,
        } => {
            let ca = CertificateAuthority::load(&config.ca_dir())?;
            let fp = ca.fingerprint().to_string();
            print(
                cli.json,
                serde_json::json!({ "fingerprint": fp }),
                fp.clone(),
            );
        }
        Command::Serve => {
            berth_shared::cli::protect_memory();
            let open_files = berth_shared::cli::raise_open_files_limit();
            tracing::debug!(open_files, "open files limit");
            berth_coordinator::server::serve(config).await?
        }
        Command::Token {
            command: TokenCommand::Create { host_id, ttl },
        } => {
            let host_id = HostId::new(host_id).context("--host-id")?;
            let ttl = parse_duration("--ttl", &ttl)?;
            let request = AdminRequest::CreateEnrollmentToken {
                host_id: host_id.clone(),
                ttl_ms: ttl.as_millis() as u64,
            };
            let subject = (
                "host_id",
                host_id.as_str(),
                format!("one-time token for host {host_id}"),
            );
            create_token(&config, &request, cli.json, subject).await?;
        }
        Command::OperatorToken {
            command: OperatorTokenCommand::Create { name, ttl, scope },
        } => {
            let name = operator_name(name)?;
            let ttl = parse_duration("--ttl", &ttl)?;
            let scope = match scope.as_str() {
                "admin" => Scope::Admin,
                "read" => Scope::Read,
                other => anyhow::bail!("--scope: {other:?} is not a scope (admin or read)"),
            };
            let request = AdminRequest::CreateOperatorToken {
                name: name.clone(),
                scope,
                ttl_ms: ttl.as_millis().try_into().unwrap_or(u64::MAX),
            };
            let subject = (
                "name",
                name.as_str(),
                format!("{} operator token for {name}", scope.as_str()),
            );
            create_token(&config, &request, cli.json, subject).await?;
        }
        Command::OperatorToken {
            command: OperatorTokenCommand::List,
        } => {
            let AdminResponse::OperatorTokens { tokens } =
                admin::call(&config, &AdminRequest::ListOperatorTokens).await?
            else {
                anyhow::bail!("unexpected answer from the coordinator");
            };
            let mut table = format!(
                "{:<24} {:<6} {:<21} {:<21} {}",
                "NAME", "SCOPE", "CREATED", "EXPIRES", "LAST USED"
            );
            for t in &tokens {
                table.push_str(&format!(
                    "\n{:<24} {:<6} {:<21} {:<21} {}",
                    t.name,
                    t.scope.as_str(),
                    expiry(t.created_unix_ms),
                    expiry(t.expiry_unix_ms()),
                    if t.last_used_unix_ms == 0 {
                        "never".to_string()
                    } else {
                        expiry(t.last_used_unix_ms)
                    }
                ));
            }
            let json: Vec<_> = tokens
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "name": t.name,
                        "scope": t.scope.as_str(),
                        "created_unix_ms": t.created_unix_ms,
                        "expires_unix_ms": t.expiry_unix_ms(),
                        "last_used_unix_ms": t.last_used_unix_ms,
                    })
                })
                .collect();
            print(cli.json, serde_json::Value::Array(json), table);
        }
        Command::OperatorToken {
            command: OperatorTokenCommand::Revoke { name },
        } => {
            let name = operator_name(name)?;
            let AdminResponse::OperatorTokensRevoked { count } = admin::call(
                &config,
                &AdminRequest::RevokeOperatorTokens { name: name.clone() },
            )
            .await?
            else {
                anyhow::bail!("unexpected answer from the coordinator");
            };
            print(
                cli.json,
                serde_json::json!({ "name": name.as_str(), "revoked": count }),
                format!("revoked {count} token(s) of operator {name}"),
            );
        }
        Command::OperatorCert {
            command: OperatorCertCommand::Create { name, out_dir, ttl },
        } => {
            let name = operator_name(name)?;
            let ttl = parse_duration("--ttl", &ttl)?;
            let ca = CertificateAuthority::load(&config.ca_dir())?;
            let key = pki::generate_key()?;
            let now = berth_shared::clock::Clock::now_unix_ms(&berth_shared::clock::SystemClock);
            let cert = ca.issue_for_key(
                &key,
                &Subject::Operator(name.to_string()),
                Validity::starting_now(now, ttl),
            )?;
            // Recorded first, so `revoke --serial` knows every certificate that exists; through
            // the running server when there is one.
            let record = AdminRequest::RecordOperatorCert {
                name: name.clone(),
                serial: cert.serial.clone(),
                issued_unix_ms: now,
                not_after_unix_ms: cert.not_after_unix_ms,
            };
            admin::call(&config, &record)
                .await
                .context("the certificate could not be recorded, so it was not written")?;
            std::fs::create_dir_all(&out_dir).with_context(|| out_dir.display().to_string())?;
            pki::write_file_atomic(
                &out_dir.join("operator.key"),
                key.serialize_pem().as_bytes(),
                0o600,
            )?;
            pki::write_file_atomic(&out_dir.join("operator.crt"), cert.pem.as_bytes(), 0o644)?;
            pki::write_file_atomic(&out_dir.join("ca.crt"), ca.cert_pem().as_bytes(), 0o644)?;
            let dir = out_dir.display().to_string();
            print(
                cli.json,
                serde_json::json!({ "name": name.as_str(), "serial": cert.serial, "dir": dir, "not_after_unix_ms": cert.not_after_unix_ms }),
                format!(
                    "wrote operator.key, operator.crt and ca.crt to {dir} (serial {})",
                    cert.serial
                ),
            );
        }
        Command::Revoke { host_id, serial } => {
            let target = match (host_id, serial) {
                (Some(host), None) => RevokeTarget::Host(HostId::new(host).context("--host-id")?),
                (None, Some(serial)) => RevokeTarget::Serial(serial),
                _ => anyhow::bail!("give exactly one of --host-id or --serial"),
            };
            let AdminResponse::Revoked { serials } =
                admin::call(&config, &AdminRequest::Revoke { target }).await?
            else {
                anyhow::bail!("unexpected answer from the coordinator");
            };
            print(
                cli.json,
                serde_json::json!({ "revoked": serials }),
                format!(
                    "revoked {} certificate(s): {}",
                    serials.len(),
                    serials.join(", ")
                ),
            );
        }
        Command::Backup { out, out_dir, keep } => {
            if let Some(out) = &out
                && out.exists()
            {
                anyhow::bail!(
                    "--out: {} exists: a snapshot never replaces a file",
                    out.display()
                );
            }
            if let Some(dir) = &out_dir
                && !dir.is_dir()
            {
                anyhow::bail!("--out-dir: {} is not a directory", dir.display());
            }
            let AdminResponse::Snapshot { snapshot } =
                admin::call(&config, &AdminRequest::Snapshot).await?
            else {
                anyhow::bail!("unexpected answer from the coordinator");
            };
            let (file, deleted) = match (out, out_dir) {
                (Some(out), _) => {
                    snapshot.write(&out).context("--out")?;
                    (out, Vec::new())
                }
                (None, Some(dir)) => snapshot.write_into(&dir, keep).context("--out-dir")?,
                (None, None) => anyhow::bail!("give --out FILE or --out-dir DIR"),
            };
            let summary = snapshot.summary();
            let master = berth_coordinator::keys::master_key_path(&config.master_key_file());
            print(
                cli.json,
                serde_json::json!({ "file": file, "deleted": deleted, "summary": summary, "master_key": master }),
                format!(
                    "wrote {}: {}{}\nThe master key ({}) is not in it: without it the snapshot opens no key, with it every one. Keep a copy of each off this machine, apart from the other.",
                    file.display(),
                    describe(&summary),
                    if deleted.is_empty() {
                        String::new()
                    } else {
                        format!(" (deleted {} older)", deleted.len())
                    },
                    master.display()
                ),
            );
        }
        Command::MigrateStore { to: _ } => {
            let etcd = config.etcd.clone().context(
                "migrate-store --to etcd needs an [etcd] table (endpoints, prefix) in the configuration",
            )?;
            if std::os::unix::net::UnixStream::connect(config.admin_socket()).is_ok() {
                anyhow::bail!(
                    "berth-coordinator runs on {}: stop it first (the store is copied at rest)",
                    config.state_dir.display()
                );
            }
            let records = SledStore::open(&config.db_dir())
                .context("the embedded store")?
                .snapshot()?;
            if records.iter().any(|(k, _)| k.starts_with("volkey/")) {
                anyhow::bail!(
                    "the store still holds volume keys from an older version: start berth-coordinator once on it (it moves them to the keyring), then migrate"
                );
            }
            // The keyrings go into etcd with the fleet; their files go once etcd holds them.
            let keyrings = [
                (config.keyring_file(), VOLUME_KEYS_PREFIX),
                (config.backup_keyring_file(), BACKUP_KEYS_PREFIX),
            ];
            let mut records = records;
            let mut keys = 0;
            for (file, prefix) in &keyrings {
                for (tenant, blob) in Keyring::open(file)?.entries() {
                    records.push((format!("{prefix}{tenant}"), blob));
                    keys += 1;
                }
            }
            records.sort();
            let etcd_store = EtcdStore::connect(&etcd)?;
            let copied = etcd_store.fill(records.clone())?;
            if etcd_store.snapshot()? != records {
                anyhow::bail!(
                    "etcd does not hold what was copied into it; the keyring files are kept"
                );
            }
            for (file, _) in &keyrings {
                if file.exists() {
                    std::fs::remove_file(file).with_context(|| file.display().to_string())?;
                }
            }
            print(
                cli.json,
                serde_json::json!({ "records": copied, "keys": keys, "endpoints": etcd.endpoints, "prefix": etcd.prefix }),
                format!(
                    "copied {copied} records ({keys} of them wrapped keys, whose keyring files are removed) into etcd under {}\nSet store = \"etcd\" in the configuration and start berth-coordinator. {} is left as it was: remove it once the fleet runs on etcd.",
                    etcd.prefix,
                    config.db_dir().display()
                ),
            );
        }
        Command::RotateMasterKey { out } => {
            if std::os::unix::net::UnixStream::connect(config.admin_socket()).is_ok() {
                anyhow::bail!(
                    "berth-coordinator runs on {}: stop every coordinator of the fleet first",
                    config.state_dir.display()
                );
            }
            let current = berth_coordinator::keys::master_key_path(&config.master_key_file());
            let from_credential = current != config.master_key_file();
            if from_credential && out.is_none() {
                anyhow::bail!(
                    "the master key comes from the systemd credential {}: give --out FILE and install FILE as the credential's source",
                    current.display()
                );
            }
            let store = berth_coordinator::server::open_store(&config)?;
            if let (StoreKind::Etcd, Some(etcd)) = (config.store, &config.etcd)
                && let Some(leader) = EtcdStore::connect(etcd)?.leader()?
            {
                anyhow::bail!(
                    "a coordinator leads the fleet ({}): stop every coordinator first",
                    berth_coordinator::standby::Candidacy::parse(&leader)
                );
            }
            let old = MasterKey::load(&current)?;
            let next = out
                .clone()
                .unwrap_or_else(|| config.state_dir.join("master.key.next"));
            let new = MasterKey::load_or_create(&next)?;
            let (volume, backup) = berth_coordinator::server::open_keyrings(&config, &store)?;
            let volume_keys = rewrap(&volume, &old, &new)?;
            let backup_keys = rewrap(&backup, &old, &new)?;
            if out.is_none() {
                std::fs::rename(&next, &current).with_context(|| current.display().to_string())?;
                std::fs::File::open(&config.state_dir)
                    .and_then(|d| d.sync_all())
                    .with_context(|| config.state_dir.display().to_string())?;
            }
            let installed = out.unwrap_or(current);
            print(
                cli.json,
                serde_json::json!({ "volume_keys": volume_keys, "backup_keys": backup_keys, "master_key": installed }),
                format!(
                    "wrapped {volume_keys} volume keys and {backup_keys} backup keys anew; the new master key is {}\nCopy it to every coordinator of the fleet (and off this machine) before they start. Snapshots made before now open only with the old master key: keep that one as long as you keep them.",
                    installed.display()
                ),
            );
        }
        Command::Restore { file } => {
            let snapshot = Snapshot::read(&file)?;
            let summary = berth_coordinator::snapshot::restore(&snapshot, &config)?;
            let dir = config.state_dir.display().to_string();
            print(
                cli.json,
                serde_json::json!({ "state_dir": dir, "summary": summary }),
                format!(
                    "restored into {dir}: {}\nStart berth-coordinator: agents reconnect on their own and encrypted tenants get their keys.",
                    describe(&summary)
                ),
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    berth_shared::tls::install_crypto_provider();
    berth_shared::cli::init_logging();
    berth_shared::cli::finish(run(Cli::parse()).await)
}
