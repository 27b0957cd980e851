//! Runs the restarts the [`Scheduler`] asks for, nightly and requested: `docker restart`, then
//! a health gate (the image's Docker healthcheck, or else a TCP connect to the gateway port on
//! the tenant's own network) before its place goes to the next one. A nightly restart whose
//! tenant's backup is due stops the container, backs its volume up, and starts it again (see
//! [`crate::backup::schedule`]); between restarts the driver starts the live backups that are
//! due.
//!
//! Ensures: at most `max_concurrent` restarts run on the host; a restart counts as done only
//! once the container is healthy again, and a failing check is reported in the tenant's status
//! and retried with backoff until `health_timeout`; the reconciler leaves a container alone
//! while it is being restarted; every requested restart gets exactly one result.

pub mod announce;
pub mod health;
pub mod schedule;

use std::collections::{BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_shared::clock::Clock;
use berth_shared::ids::{HostId, TenantId};
use berth_shared::proto;
use berth_shared::spec::{RestartPolicy, TenantSpec, Window, ZoneName};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backup::schedule::Backups;
use crate::desired::Desired;
use crate::restarts::schedule::{Reason, Scheduler, Start, TenantClock, humanize};
use crate::runtime::{ContainerRuntime, RuntimeError};

/// The `[restarts]` section: host-wide defaults and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartSettings {
    /// For tenants whose spec names no window.
    pub window: Window,
    /// For tenants whose spec names no time zone.
    pub time_zone: ZoneName,
    /// Restarts running at the same time on this host (K).
    pub max_concurrent: usize,
    /// A container that started this long before its slot is not restarted that night.
    pub skip_if_started_within: Duration,
    /// How long a restarted container may take to pass its health check.
    pub health_timeout: Duration,
}

impl Default for RestartSettings {
    fn default() -> Self {
        Self {
            window: "02:00-05:00".parse().unwrap_or_else(|_| unreachable!()),
            time_zone: ZoneName::new("UTC").unwrap_or_else(|_| unreachable!()),
            max_concurrent: 1,
            skip_if_started_within: Duration::from_secs(12 * 3600),
            health_timeout: Duration::from_secs(300),
        }
    }
}

impl RestartSettings {
    /// The window and zone `policy` resolves to on this host; `None` when it is off.
    pub fn plan(&self, policy: &RestartPolicy) -> Option<(Window, TimeZone)> {
        if !policy.enabled {
            return None;
        }
        let zone = policy.time_zone.as_ref().unwrap_or(&self.time_zone);
        let tz = zone.time_zone().ok()?;
        Some((policy.window.unwrap_or(self.window), tz))
    }
}

/// Why a probe from inside a tenant's network namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is there but not bound to the namespace: Docker bound it after this process
    /// got its own mount namespace, which sees later mounts only where / is mounted shared (as
    /// systemd mounts it).
    #[error("{0} is no network namespace in the agent's mount namespace (is / mounted shared?)")]
    NotBound(PathBuf),
    #[error("entering {path}: {errno}")]
    Enter {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error("probe thread: {0}")]
    Thread(std::io::Error),
    #[error("the probe thread died")]
    ThreadDied,
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    #[error(transparent)]
    Connect(std::io::Error),
    #[error("{0}: tenant networks are IPv4 only")]
    NotIpv4(IpAddr),
    #[error(transparent)]
    Announce(#[from] crate::restarts::announce::AnnounceError),
}

/// Why one health check did not pass.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("not running (exit code {0})")]
    NotRunning(i64),
    #[error("Docker healthcheck says {0}")]
    Unhealthy(String),
    #[error("no address on its tenant network")]
    NoAddress,
    #[error("no network namespace")]
    NoNetns,
    #[error("gateway port {port}: {source}")]
    Gateway { port: u16, source: ProbeError },
}

/// Why a restart did not end healthy.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("the container is gone")]
    Gone,
    #[error("not healthy {after} after the restart ({checks} checks; last: {last})")]
    NotHealthy {
        after: String,
        checks: u32,
        last: CheckError,
    },
}

/// Connects to a tenant's gateway port, and announces its address once it answers (a trait so
/// the health gate is tested without sockets).
#[tonic::async_trait]
pub trait Probe: Send + Sync + std::fmt::Debug {
    /// Connects to `address` from inside the network namespace at `netns`.
    async fn connect(&self, netns: &Path, address: SocketAddr) -> Result<(), ProbeError>;
    /// Announces `address` on its network from inside the network namespace at `netns` (see
    /// [`crate::restarts::announce`]).
    async fn announce(&self, netns: &Path, address: IpAddr) -> Result<(), ProbeError>;
}

/// A plain TCP connect with a timeout, made from inside the container's own network namespace:
/// the agent may run in another one (or have no route to the tenant networks at all), and the
/// published port is no proof (Docker's proxy answers it while the tenant is down). The
/// announcement leaves from there too, for the same reasons.
#[derive(Debug, Clone, Copy)]
pub struct NetnsProbe {
    pub timeout: Duration,
}

/// Runs `work` on a thread of its own inside the network namespace at `netns`.
async fn in_netns<T: Send + 'static>(
    netns: &Path,
    work: impl FnOnce() -> Result<T, ProbeError> + Send + 'static,
) -> Result<T, ProbeError> {
    let netns = netns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own, which ends with the work: a thread that entered another namespace
    // must never run anything else (a pooled one would).
    std::thread::Builder::new()
        .name("berth-probe".into())
        .spawn(move || {
            let done = std::fs::File::open(&netns)
                .map_err(|source| ProbeError::Open {
                    path: netns.clone(),
                    source,
                })
                .and_then(|ns| {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                        |e| match e {
                            nix::errno::Errno::EINVAL => ProbeError::NotBound(netns.clone()),
                            errno => ProbeError::Enter {
                                path: netns.clone(),
                                errno,
                            },
                        },
                    )
                })
                .and_then(|()| work());
            let _ = tx.send(done);
        })
        .map_err(ProbeError::Thread)?;
    rx.await.map_err(|_| ProbeError::ThreadDied)?
}

#[tonic::async_trait]
impl Probe for NetnsProbe {
    async fn connect(&self, netns: &Path, address: SocketAddr) -> Result<(), ProbeError> {
        let timeout = self.timeout;
        in_netns(netns, move || {
            std::net::TcpStream::connect_timeout(&address, timeout)
                .map(drop)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::TimedOut => ProbeError::NoAnswer(timeout),
                    _ => ProbeError::Connect(e),
                })
        })
        .await
    }

    async fn announce(&self, netns: &Path, address: IpAddr) -> Result<(), ProbeError> {
        let IpAddr::V4(address) = address else {
            return Err(ProbeError::NotIpv4(address));
        };
        in_netns(netns, move || {
            Ok(crate::restarts::announce::announce(address)?)
        })
        .await
    }
}

/// How a restarted container is checked: often at first (so the measured downtime is close to
/// the real one), then with growing pauses.
#[derive(Debug, Clone, Copy)]
pub struct HealthGate {
    pub every: Duration,
    /// Checks stay `every` apart this long after the restart, then back off.
    pub fast_for: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
}

impl HealthGate {
    pub fn new(timeout: Duration) -> Self {
        Self {
            every: Duration::from_millis(50),
            fast_for: Duration::from_secs(10),
            max_backoff: Duration::from_secs(15),
            timeout,
        }
    }
}

/// One health check: Docker's healthcheck verdict when the image has one, else a TCP connect to
/// the gateway port at the container's address on its tenant network (not the published port,
/// which Docker's proxy answers even while the tenant is down). A check that passes also has
/// the container announce its address (see [`crate::restarts::announce`]): clients' connections that
/// waited on the host for it go through now rather than at the host's next ARP retry. A failed
/// announcement is logged; the check still passes.
pub(crate) async fn check(
    runtime: &dyn ContainerRuntime,
    probe: &dyn Probe,
    container: &str,
    gateway_port: u16,
) -> Result<(), CheckError> {
    let d = runtime.details(container).await?;
    if !d.running {
        return Err(CheckError::NotRunning(d.exit_code));
    }
    match d.health.as_deref() {
        Some("healthy") => {}
        Some(other) => return Err(CheckError::Unhealthy(other.to_string())),
        None => {
            let address = d.address.ok_or(CheckError::NoAddress)?;
            let netns = d.netns.as_deref().ok_or(CheckError::NoNetns)?;
            probe
                .connect(netns, SocketAddr::new(address, gateway_port))
                .await
                .map_err(|source| CheckError::Gateway {
                    port: gateway_port,
                    source,
                })?;
        }
    }
    if let (Some(address), Some(netns)) = (d.address, d.netns.as_deref())
        && let Err(e) = probe.announce(netns, address).await
    {
        tracing::warn!(container, error = %e, "the container's address was not announced");
    }
    Ok(())
}

/// Restarts `container` and waits until it is healthy again; returns the downtime (from the
/// restart until the first passing check). `progress` hears each failed check once the gate
/// has started backing off.
pub async fn restart_and_wait(
    runtime: &dyn ContainerRuntime,
    probe: &dyn Probe,
    gate: HealthGate,
    container: &str,
    gateway_port: u16,
    progress: impl Fn(String),
) -> Result<Duration, RestartError> {
    let no_work: Option<std::future::Ready<()>> = None;
    restart_around(
        runtime,
        probe,
        gate,
        (container, gateway_port),
        no_work,
        progress,
    )
    .await
}

/// [`restart_and_wait`] with `while_stopped` done between the stop and the start (the
/// downtime includes it); without it, one `docker restart`.
pub async fn restart_around(
    runtime: &dyn ContainerRuntime,
    probe: &dyn Probe,
    gate: HealthGate,
    (container, gateway_port): (&str, u16),
    while_stopped: Option<impl std::future::Future<Output = ()>>,
    progress: impl Fn(String),
) -> Result<Duration, RestartError> {
    let began = Instant::now();
    match while_stopped {
        None => runtime.restart(container).await?,
        Some(work) => {
            runtime.stop(container).await?;
            work.await;
            runtime.start(container).await?;
        }
    }
    await_health(
        runtime,
        probe,
        gate,
        container,
        gateway_port,
        began,
        progress,
    )
    .await
}

/// Checks `container` until it is healthy (or the gate's timeout passed since `began`).
async fn await_health(
    runtime: &dyn ContainerRuntime,
    probe: &dyn Probe,
    gate: HealthGate,
    container: &str,
    gateway_port: u16,
    began: Instant,
    progress: impl Fn(String),
) -> Result<Duration, RestartError> {
    let mut pause = gate.every;
    let mut checks = 0u32;
    loop {
        let result = check(runtime, probe, container, gateway_port).await;
        checks += 1;
        let elapsed = began.elapsed();
        let error = match result {
            Ok(()) => return Ok(elapsed),
            Err(e) => e,
        };
        if elapsed >= gate.timeout {
            return Err(RestartError::NotHealthy {
                after: humanize(
                    SignedDuration::try_from(gate.timeout).unwrap_or(SignedDuration::MAX),
                ),
                checks,
                last: error,
            });
        }
        if elapsed >= gate.fast_for {
            pause = (pause * 2).min(gate.max_backoff);
            progress(format!(
                "restarted {} ago, not healthy yet: {error}; next check in {}",
                humanize(SignedDuration::try_from(elapsed).unwrap_or(SignedDuration::MAX)),
                humanize(SignedDuration::try_from(pause).unwrap_or(SignedDuration::MAX))
            ));
        }
        tokio::time::sleep(pause.min(gate.timeout.saturating_sub(elapsed))).await;
    }
}

/// The agent's restart state, shared by the driver, the session and the reconciler.
#[derive(Debug)]
pub struct Restarts {
    settings: RestartSettings,
    scheduler: Mutex<Scheduler>,
    results: Mutex<VecDeque<proto::RestartResult>>,
    results_ready: Notify,
    requested: Notify,
    /// Tenants whose container is being restarted: the reconciler leaves them alone.
    busy: Arc<Mutex<BTreeSet<String>>>,
}

/// Results kept for a session that is down; older ones are dropped (the coordinator has given
/// up on them by then).
const MAX_PENDING_RESULTS: usize = 256;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Restarts {
    pub fn new(settings: RestartSettings) -> Self {
        let skip = SignedDuration::try_from(settings.skip_if_started_within)
            .unwrap_or(SignedDuration::MAX);
        Self {
            scheduler: Mutex::new(Scheduler::new(settings.max_concurrent, skip)),
            settings,
            results: Mutex::new(VecDeque::new()),
            results_ready: Notify::new(),
            requested: Notify::new(),
            busy: Arc::default(),
        }
    }

    /// The set of tenants being restarted, for the reconciler.
    pub fn busy(&self) -> Arc<Mutex<BTreeSet<String>>> {
        self.busy.clone()
    }

    /// Queues a restart the coordinator asked for; its result comes out of [`Self::take_results`].
    pub fn request(&self, tenant: &str, request_id: u64) {
        match TenantId::new(tenant) {
            Ok(id) => {
                lock(&self.scheduler).request(id, request_id);
                self.requested.notify_one();
            }
            Err(e) => self.push_result(proto::RestartResult {
                tenant_id: tenant.chars().take(64).collect(),
                request_id,
                ok: false,
                error: format!("tenant_id: {e}"),
                downtime_ms: 0,
            }),
        }
    }

    fn push_result(&self, result: proto::RestartResult) {
        let mut results = lock(&self.results);
        if results.len() >= MAX_PENDING_RESULTS {
            results.pop_front();
        }
        results.push_back(result);
        drop(results);
        self.results_ready.notify_one();
    }

    /// Waits until a result is ready to send.
    pub async fn results_ready(&self) {
        self.results_ready.notified().await
    }

    pub fn take_results(&self) -> Vec<proto::RestartResult> {
        lock(&self.results).drain(..).collect()
    }

    /// Adds the next restart and the scheduler's note to a tenant's status.
    pub fn annotate(&self, status: &mut proto::TenantStatus) {
        let Ok(tenant) = TenantId::new(&status.tenant_id) else {
            return;
        };
        let view = lock(&self.scheduler).view(&tenant);
        status.next_restart_unix_ms = view.next.map_or(0, |t| t.as_millisecond());
        status.restart_window_opens_unix_ms = view.window_opens.map_or(0, |t| t.as_millisecond());
        status.restart_note = view.note;
    }

    /// One scheduling pass at `now`: returns what must start (already holding their places).
    fn plan(
        &self,
        now: Timestamp,
        desired: &Desired,
        statuses: &[proto::TenantStatus],
    ) -> Vec<Start> {
        let clocks: Vec<TenantClock> = desired
            .tenants
            .iter()
            .map(|spec| {
                let status = statuses
                    .iter()
                    .find(|s| s.tenant_id == spec.tenant_id.as_str());
                TenantClock {
                    tenant: spec.tenant_id.clone(),
                    plan: self.settings.plan(&spec.restart),
                    running: status.is_some_and(|s| s.state == proto::TenantState::Running as i32),
                    started_at: status
                        .filter(|s| s.last_restart_unix_ms > 0)
                        .and_then(|s| Timestamp::from_millisecond(s.last_restart_unix_ms).ok()),
                }
            })
            .collect();
        let (starts, refused) = lock(&self.scheduler).tick(now, &clocks);
        for (tenant, request_id, error) in refused {
            self.push_result(proto::RestartResult {
                tenant_id: tenant.to_string(),
                request_id,
                ok: false,
                error,
                downtime_ms: 0,
            });
        }
        starts
    }

    /// Runs one restart to its end and records it; `backup`: the tenant's volume is backed
    /// up meanwhile, its container stopped.
    async fn execute(
        &self,
        start: Start,
        gateway_port: u16,
        backup: Option<(Backups, TenantSpec)>,
        driver: &Driver,
    ) {
        let (host, runtime, probe, clock) = (
            &driver.host,
            driver.runtime.as_ref(),
            driver.probe.as_ref(),
            driver.clock.as_ref(),
        );
        let tenant = start.tenant.clone();
        lock(&self.busy).insert(tenant.to_string());
        let container = runtime
            .list(host)
            .await
            .map_err(RestartError::from)
            .and_then(|all| {
                all.into_iter()
                    .find(|c| c.tenant == tenant.as_str())
                    .map(|c| c.id)
                    .ok_or(RestartError::Gone)
            });
        let outcome = match container {
            Ok(id) => {
                tracing::info!(%tenant, reason = ?start.reason, backup = backup.is_some(), "restarting");
                let gate = HealthGate::new(self.settings.health_timeout);
                let progress = |note: String| {
                    tracing::warn!(%tenant, %note, "restart health check");
                    lock(&self.scheduler).progress(&tenant, note);
                };
                // Backed up while stopped; its outcome is recorded and reported, and the
                // restart goes on either way.
                let back_up = backup.clone().map(|(backups, spec)| async move {
                    let _ = tokio::task::spawn_blocking(move || backups.back_up(&spec, true)).await;
                });
                restart_around(runtime, probe, gate, (&id, gateway_port), back_up, progress).await
            }
            Err(e) => Err(e),
        };
        lock(&self.busy).remove(tenant.as_str());
        let now = Timestamp::from_millisecond(clock.now_unix_ms()).unwrap_or(Timestamp::UNIX_EPOCH);
        let error = outcome.as_ref().err().map(ToString::to_string);
        let down = match (&outcome, &error) {
            (Ok(d), _) => Ok(SignedDuration::try_from(*d).unwrap_or(SignedDuration::MAX)),
            (Err(_), error) => Err(error.as_deref().unwrap_or_default()),
        };
        match &outcome {
            Ok(d) => {
                tracing::info!(%tenant, downtime_ms = d.as_millis() as u64, "restarted and healthy")
            }
            Err(e) => tracing::warn!(%tenant, error = %e, "restart failed"),
        }
        lock(&self.scheduler).finished(&tenant, now, down);
        // Old snapshots go once the tenant runs again, not during its downtime.
        if let Some((backups, spec)) = backup {
            let _ = tokio::task::spawn_blocking(move || backups.prune_if_due(&spec)).await;
        }
        if let Reason::Requested(request_id) = start.reason {
            self.push_result(proto::RestartResult {
                tenant_id: tenant.to_string(),
                request_id,
                ok: outcome.is_ok(),
                error: error.unwrap_or_default(),
                downtime_ms: outcome.map_or(0, |d| d.as_millis() as u64),
            });
        }
    }
}

/// How often the driver looks at the clock without a request.
const TICK: Duration = Duration::from_secs(1);

/// What the driver needs from the agent.
#[derive(Debug, Clone)]
pub struct Driver {
    pub restarts: Arc<Restarts>,
    pub runtime: Arc<dyn ContainerRuntime>,
    pub probe: Arc<dyn Probe>,
    pub clock: Arc<dyn Clock>,
    pub host: HostId,
    /// Scheduled backups (none on a fleet without a backup repository: no access comes).
    pub backups: Option<Backups>,
}

impl Driver {
    /// One pass: starts what is due, each in its own task; returns the tasks.
    pub fn step(
        &self,
        desired: &Desired,
        statuses: &[proto::TenantStatus],
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let now =
            Timestamp::from_millisecond(self.clock.now_unix_ms()).unwrap_or(Timestamp::UNIX_EPOCH);
        self.restarts
            .plan(now, desired, statuses)
            .into_iter()
            .map(|start| {
                let spec = desired.tenants.iter().find(|t| t.tenant_id == start.tenant);
                let port = spec.map_or(0, |t| t.gateway_port);
                let backup = match (&start.reason, &self.backups, spec) {
                    (Reason::Nightly(_), Some(backups), Some(spec))
                        if backups.due_in_restart(spec) =>
                    {
                        Some((backups.clone(), spec.clone()))
                    }
                    _ => None,
                };
                let driver = self.clone();
                tokio::spawn(
                    async move { driver.restarts.execute(start, port, backup, &driver).await },
                )
            })
            .collect()
    }

    /// Starts a live backup if one is due, of a tenant that runs and is not being restarted.
    pub fn back_up_due(
        &self,
        desired: &Desired,
        statuses: &[proto::TenantStatus],
    ) -> Option<tokio::task::JoinHandle<()>> {
        let backups = self.backups.as_ref()?;
        let busy = lock(&self.restarts.busy).clone();
        let running: Vec<&TenantSpec> = desired
            .tenants
            .iter()
            .filter(|spec| {
                !busy.contains(spec.tenant_id.as_str())
                    && statuses.iter().any(|s| {
                        s.tenant_id == spec.tenant_id.as_str()
                            && s.state == proto::TenantState::Running as i32
                    })
            })
            .collect();
        backups.start_live(&running)
    }

    /// Runs forever: a pass every second and at once on a request.
    pub async fn run(self, current: impl Fn() -> (Desired, Vec<proto::TenantStatus>)) {
        loop {
            let (desired, statuses) = current();
            self.step(&desired, &statuses);
            self.back_up_due(&desired, &statuses);
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = self.restarts.requested.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
