//! Local administration: enrollment tokens, operator tokens and certificates, revocation.
//!
//! sled allows one process per database, so while `berth-coordinator serve` runs these
//! requests go over its admin socket (`<state_dir>/admin.sock`, mode 0600: file permissions are
//! the authentication); when it does not run, the command opens the store itself. Both paths
//! execute the same [`AdminRequest`]. On etcd a request that writes is refused offline while
//! any coordinator of the fleet runs (a standby here, or a leader elsewhere): it would bypass
//! the leader, whose deny-list and sessions a revocation must reach.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_shared::clock::SystemClock;
use berth_shared::ids::HostId;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::{CoordinatorConfig, StoreKind};
use crate::coordinator::{Coordinator, RevokeTarget};
use crate::etcd::EtcdStore;
use crate::registry::{CertRecord, OperatorTokenRecord, Registry, RegistryError, Scope};
use crate::snapshot::{MAX_SNAPSHOT_BYTES, Snapshot, SnapshotError};
use crate::standby::Candidacy;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    CreateEnrollmentToken {
        host_id: HostId,
        ttl_ms: u64,
    },
    CreateOperatorToken {
        name: HostId,
        scope: Scope,
        ttl_ms: u64,
    },
    ListOperatorTokens,
    RevokeOperatorTokens {
        name: HostId,
    },
    /// An operator certificate made from the CA's files, recorded so it can be revoked.
    RecordOperatorCert {
        name: HostId,
        serial: String,
        issued_unix_ms: i64,
        not_after_unix_ms: i64,
    },
    Revoke {
        target: RevokeTarget,
    },
    /// The whole state, for `berth-coordinator backup`.
    Snapshot,
}

impl AdminRequest {
    /// Whether it changes the fleet's state (a snapshot and a listing only read it).
    pub fn writes(&self) -> bool {
        !matches!(self, Self::Snapshot | Self::ListOperatorTokens)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminResponse {
    Token { token: String, expires_unix_ms: i64 },
    OperatorTokens { tokens: Vec<OperatorTokenRecord> },
    OperatorTokensRevoked { count: usize },
    Recorded,
    Revoked { serials: Vec<String> },
    Snapshot { snapshot: Box<Snapshot> },
    Error { message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("admin socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("the coordinator answered: {0}")]
    Refused(String),
    #[error("the admin socket sent an unreadable answer: {0}")]
    Protocol(String),
    /// Offline, a request goes straight to the store: with a coordinator of the fleet up on
    /// etcd, that would bypass it (a revocation would not reach its deny-list or end its
    /// sessions).
    #[error(
        "a coordinator of this fleet is running ({0}): run this command on the machine of the one that leads (its admin socket answers there), or stop every coordinator first"
    )]
    FleetRunning(String),
}

/// Executes a request against a registry. `revoke` puts revocations into force in a running
/// server (deny-list, open sessions); offline there is nothing more to do. `snapshot` takes
/// the whole state, from the running server or from the files.
pub fn execute(
    registry: &Registry,
    request: &AdminRequest,
    revoke: impl FnOnce(&RevokeTarget) -> Result<Vec<String>, RegistryError>,
    snapshot: impl FnOnce() -> Result<Snapshot, SnapshotError>,
) -> Result<AdminResponse, AdminError> {
    Ok(match request {
        AdminRequest::CreateEnrollmentToken { host_id, ttl_ms } => {
            let (token, expires_unix_ms) =
                registry.create_enrollment_token(host_id, Duration::from_millis(*ttl_ms))?;
            tracing::info!(host = %host_id, "enrollment token created");
            AdminResponse::Token {
                token,
                expires_unix_ms,
            }
        }
        AdminRequest::CreateOperatorToken {
            name,
            scope,
            ttl_ms,
        } => {
            let (token, expires_unix_ms) =
                registry.create_operator_token(name, *scope, Duration::from_millis(*ttl_ms))?;
            tracing::info!(operator = %name, scope = scope.as_str(), "operator token created");
            AdminResponse::Token {
                token,
                expires_unix_ms,
            }
        }
        AdminRequest::ListOperatorTokens => AdminResponse::OperatorTokens {
            tokens: registry.operator_tokens()?,
        },
        AdminRequest::RevokeOperatorTokens { name } => {
            let count = registry.revoke_operator_tokens(name)?;
            tracing::warn!(operator = %name, count, "operator tokens revoked");
            AdminResponse::OperatorTokensRevoked { count }
        }
        AdminRequest::RecordOperatorCert {
            name,
            serial,
            issued_unix_ms,
            not_after_unix_ms,
        } => {
            registry.record_cert(&CertRecord {
                serial: serial.clone(),
                subject: format!("operator:{name}"),
                issued_unix_ms: *issued_unix_ms,
                not_after_unix_ms: *not_after_unix_ms,
            })?;
            tracing::info!(operator = %name, %serial, "operator certificate recorded");
            AdminResponse::Recorded
        }
        AdminRequest::Revoke { target } => {
            let serials = revoke(target)?;
            tracing::warn!(?target, ?serials, "certificates revoked");
            AdminResponse::Revoked { serials }
        }
        AdminRequest::Snapshot => {
            let snapshot = snapshot()?;
            let summary = snapshot.summary();
            tracing::info!(
                records = summary.records,
                tenants = summary.tenants,
                "state snapshot taken"
            );
            AdminResponse::Snapshot {
                snapshot: Box::new(snapshot),
            }
        }
    })
}

/// Serves the admin socket (from [`bind_private`]) until the task is dropped.
pub async fn serve_socket(
    listener: UnixListener,
    coordinator: Arc<Coordinator>,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let coordinator = coordinator.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            // One request line of at most 64 KiB.
            if BufReader::new(read.take(64 * 1024))
                .read_line(&mut line)
                .await
                .is_err()
            {
                return;
            }
            let response = match serde_json::from_str::<AdminRequest>(&line) {
                Err(e) => AdminResponse::Error {
                    message: format!("bad admin request: {e}"),
                },
                Ok(request) => execute(
                    &coordinator.registry,
                    &request,
                    |t| coordinator.revoke(t),
                    || coordinator.snapshot(),
                )
                .unwrap_or_else(|e| AdminResponse::Error {
                    message: e.to_string(),
                }),
            };
            let mut out = serde_json::to_vec(&response).unwrap_or_default();
            out.push(b'\n');
            let _ = write.write_all(&out).await;
        });
    }
}

/// Binds the admin socket at `path` (replacing a stale one) so that only its owner can connect
/// from the moment it exists: the process's umask is 0177 during the bind (a chmod afterwards
/// would leave a window). Call it before other threads create files: the umask is the
/// process's.
pub fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let previous = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(previous);
    bound
}

/// Sends `request` to a running coordinator, or executes it on the store when none runs.
pub async fn call(
    config: &CoordinatorConfig,
    request: &AdminRequest,
) -> Result<AdminResponse, AdminError> {
    let path = config.admin_socket();
    let socket_err = |source| AdminError::Socket {
        path: path.display().to_string(),
        source,
    };
    match UnixStream::connect(&path).await {
        Ok(stream) => {
            let (read, mut write) = stream.into_split();
            let mut out =
                serde_json::to_vec(request).map_err(|e| AdminError::Protocol(e.to_string()))?;
            out.push(b'\n');
            write.write_all(&out).await.map_err(socket_err)?;
            let mut line = String::new();
            // The largest answer is a snapshot, base64 inside JSON.
            BufReader::new(read.take(2 * MAX_SNAPSHOT_BYTES))
                .read_line(&mut line)
                .await
                .map_err(socket_err)?;
            match serde_json::from_str(&line).map_err(|e| AdminError::Protocol(e.to_string()))? {
                AdminResponse::Error { message } => Err(AdminError::Refused(message)),
                ok => Ok(ok),
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            if let (StoreKind::Etcd, Some(etcd)) = (config.store, &config.etcd)
                && request.writes()
                && let Some(candidacy) = EtcdStore::connect(etcd)
                    .and_then(|etcd| etcd.leader())
                    .map_err(RegistryError::from)?
            {
                return Err(AdminError::FleetRunning(
                    Candidacy::parse(&candidacy).to_string(),
                ));
            }
            let store = crate::server::open_store(config).map_err(RegistryError::from)?;
            let registry = Registry::new(store.clone(), Arc::new(SystemClock));
            execute(
                &registry,
                request,
                |target| match target {
                    RevokeTarget::Host(host) => registry.revoke_host(host),
                    RevokeTarget::Serial(serial) => registry.revoke_serial(serial).map(|s| vec![s]),
                },
                || crate::snapshot::take_offline(config, store.clone(), registry.now()),
            )
        }
        Err(e) => Err(socket_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_strict() {
        let err = serde_json::from_str::<AdminRequest>(
            r#"{"action":"create_enrollment_token","host_id":"../x","ttl_ms":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("invalid host id"), "{err}");
        let err = serde_json::from_str::<AdminRequest>(
            r#"{"action":"create_enrollment_token","host_id":"a","ttl_ms":1,"x":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let ok: AdminRequest =
            serde_json::from_str(r#"{"action":"revoke","target":{"serial":"ab"}}"#).unwrap();
        assert_eq!(
            ok,
            AdminRequest::Revoke {
                target: RevokeTarget::Serial("ab".into())
            }
        );
    }
}
