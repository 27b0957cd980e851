//! The reconciler: makes the host match the desired state, level-triggered (on every change
//! and every few seconds), whether or not the coordinator is reachable.
//!
//! Ensures: per tenant the order is volume → network → egress rules → container, and teardown
//! is the reverse (a container whose egress rules cannot be applied is not started); a
//! container whose spec is unchanged is adopted, never restarted (an agent restart leaves
//! tenants running); a stopped one is started; a container of a tenant no longer desired
//! is removed with its network; containers without this host's berth labels are never listed,
//! so never touched. A new tenant's container is made in the background, so tenants arriving
//! together, or while another starts, start side by side; the rules of a tenant being created
//! stay, and work waiting for a teardown waits for its creation too. A leaving tenant's
//! container is stopped and its rules and volume released in the pass, then the container and
//! its network are removed in the background, so the next tenant to leave is stopped at once;
//! a tenant staged for a move gets its network in the background too; a pass never waits on a
//! container or network being made or removed (Docker holds a container until then).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use berth_shared::ids::{HostId, TenantId};
use berth_shared::proto;
use berth_shared::spec::TenantSpec;

use crate::backup::restore::{RestoreError, Restorer};
use crate::desired::Desired;
use crate::egress::{EgressError, EgressReport, EgressStep};
use crate::host::cgroup::CgroupReader;
use crate::restarts::health::{Health, HealthWatch};
use crate::runtime::container_spec;
use crate::runtime::subnets::SubnetPool;
use crate::runtime::{ContainerRuntime, ManagedContainer, RuntimeError};
use crate::volume::{PrepareError, VolumeError, VolumeStep};

/// Why a tenant is not running: failed, or waiting for its volume key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub state: proto::TenantState,
    pub message: String,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self {
            state: proto::TenantState::Failed,
            message,
        }
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

/// Why a step of making or removing a tenant failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("egress: {0}")]
    Egress(#[from] EgressError),
    #[error("volume: {0}")]
    Volume(#[from] VolumeError),
    #[error("the tenant network pool (tenant_subnets) is exhausted")]
    SubnetsExhausted,
    #[error("image {image} is not present and cannot be pulled: {message}")]
    Pull { image: String, message: String },
    #[error("no free gateway port in 20000-29999")]
    NoPort,
    #[error("the agent is shutting down")]
    ShuttingDown,
}

impl From<StepError> for Failure {
    fn from(e: StepError) -> Self {
        e.to_string().into()
    }
}

impl From<RuntimeError> for Failure {
    fn from(e: RuntimeError) -> Self {
        StepError::from(e).into()
    }
}

impl From<RestoreError> for Failure {
    fn from(e: RestoreError) -> Self {
        let state = match e {
            RestoreError::WaitingForAccess => proto::TenantState::WaitingForKey,
            _ => proto::TenantState::Failed,
        };
        Self {
            state,
            message: e.to_string(),
        }
    }
}

impl From<PrepareError> for Failure {
    fn from(e: PrepareError) -> Self {
        let state = match e {
            PrepareError::WaitingForKey => proto::TenantState::WaitingForKey,
            PrepareError::NoDmCrypt | PrepareError::Volume(_) => proto::TenantState::Failed,
        };
        let message = match e {
            PrepareError::Volume(e) => StepError::Volume(e).to_string(),
            e => e.to_string(),
        };
        Self { state, message }
    }
}

/// What a pass's teardown did: the containers it stopped and released (to be removed), whether
/// every one that had to go went, and the tenants whose teardown failed (their rules stay).
struct Teardown<'a> {
    released: Vec<&'a ManagedContainer>,
    all_released: bool,
    failed: Vec<TenantId>,
}

/// Counts reconcile passes, and tells work that must wait until a tenant just removed from the
/// desired state has no running container and no open volume (or no container at all) any more
/// when it may run: once a pass that read that desired state's generation, or a later one, has
/// got that far in its teardown.
#[derive(Debug)]
pub struct Passes {
    started: std::sync::atomic::AtomicU64,
    torn_down: tokio::sync::watch::Sender<TornDown>,
}

/// How far the teardown of what the desired state no longer wants has come: per step, the
/// highest desired-state generation for which it is complete.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TornDown {
    /// Every leaving tenant's container has stopped and its egress rules and volume are
    /// released: its volume may be copied.
    pub released: u64,
    /// Their containers are removed as well: their volumes may be deleted.
    pub removed: u64,
}

impl TornDown {
    /// Both steps complete for `generation`.
    pub fn complete(generation: u64) -> Self {
        Self {
            released: generation,
            removed: generation,
        }
    }
}

impl Default for Passes {
    fn default() -> Self {
        Self {
            started: Default::default(),
            torn_down: tokio::sync::watch::Sender::new(TornDown::default()),
        }
    }
}

impl Passes {
    /// The pass that starts next.
    pub fn next(&self) -> u64 {
        self.started.load(std::sync::atomic::Ordering::SeqCst) + 1
    }

    /// Starts a pass; read the desired state only after this.
    pub fn start(&self) -> u64 {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }

    /// How far the teardown has come, watched.
    pub fn torn_down(&self) -> tokio::sync::watch::Receiver<TornDown> {
        self.torn_down.subscribe()
    }

    /// A pass that read the desired state of `generation` stopped and released all it no
    /// longer wants.
    pub fn finish_release(&self, generation: u64) {
        self.torn_down
            .send_modify(|t| t.released = t.released.max(generation));
    }

    /// A pass that read the desired state of `generation` removed all it no longer wants.
    pub fn finish_teardown(&self, generation: u64) {
        self.torn_down.send_modify(|t| {
            t.released = t.released.max(generation);
            t.removed = t.removed.max(generation);
        });
    }
}

/// Containers an agent creates, or stops and removes, at once. Two side by side take about
/// the time of one on a small host; dozens at once (a host coming up with all its tenants)
/// would slow every container on the engine, other hosts' included where engines are shared.
pub const SIDE_BY_SIDE: usize = 2;

/// Host ports the agent publishes gateways on (127.0.0.1 only).
pub const PORT_RANGE: std::ops::RangeInclusive<u16> = 20000..=29999;

#[derive(Debug)]
pub struct Reconciler {
    pub host: HostId,
    pub runtime: Arc<dyn ContainerRuntime>,
    pub volumes: Arc<dyn VolumeStep>,
    /// Restores the desired state asks for, into a volume before its container starts.
    pub restores: Restorer,
    pub egress: Arc<dyn EgressStep>,
    pub cgroups: Option<CgroupReader>,
    /// OOM kills seen in Docker's event stream, per tenant, since the agent started.
    pub oom_events: Arc<Mutex<HashMap<String, u64>>>,
    /// Whether a port is free on 127.0.0.1 (tests replace it).
    pub port_free: fn(u16) -> bool,
    /// Where tenant networks get their /28s.
    pub subnets: SubnetPool,
    /// Tenants whose container the restart driver is restarting: not started from here.
    pub restarting: Arc<Mutex<BTreeSet<String>>>,
    pub passes: Arc<Passes>,
    /// Whether each running container passed its health check since it started.
    pub health: Arc<HealthWatch>,
    /// New tenants' containers being made in the background.
    pub creations: Mutex<Creations>,
    /// Containers of tenants that left, released and being removed in the background (id →
    /// tenant): Docker takes a while to remove one and its network, and the next tenant to
    /// leave (a drain's next move) should not wait for that to be stopped.
    pub removals: Mutex<BTreeMap<String, String>>,
    /// Woken when a background creation or removal ends (the reconcile loop waits on it).
    pub wake: Arc<tokio::sync::Notify>,
}

/// New tenants' containers being made outside the pass, and how the last ones ended.
#[derive(Debug)]
pub struct Creations {
    /// Those waiting for one of the [`SIDE_BY_SIDE`] slots included.
    under_way: BTreeSet<String>,
    slots: Arc<tokio::sync::Semaphore>,
    /// Per tenant, how its last creation ended, with the first pass whose listing shows what
    /// it made; kept until a pass reports it.
    ended: HashMap<String, (u64, Result<EgressReport, Failure>)>,
    /// Gateway ports taken by creations under way (Docker lists them only once created).
    ports: BTreeSet<u16>,
    /// Staged tenants whose image, network and rules are being made outside the pass.
    staging: BTreeSet<String>,
    /// Where the search for the next gateway port starts: ports are handed out round-robin,
    /// so a port freed a moment ago (a crashed container Docker is about to restart, a tenant
    /// that just moved away) is the last one given out again.
    next_port: u16,
}

impl Default for Creations {
    fn default() -> Self {
        Self {
            under_way: BTreeSet::new(),
            slots: Arc::new(tokio::sync::Semaphore::new(SIDE_BY_SIDE)),
            ended: HashMap::new(),
            ports: BTreeSet::new(),
            staging: BTreeSet::new(),
            next_port: *PORT_RANGE.start(),
        }
    }
}

pub fn port_free_on_loopback(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn status(
    tenant: &TenantId,
    generation: u64,
    state: proto::TenantState,
    message: String,
) -> proto::TenantStatus {
    proto::TenantStatus {
        tenant_id: tenant.to_string(),
        state: state as i32,
        generation,
        message,
        ..Default::default()
    }
}

impl Reconciler {
    /// Stops a container, releases its tenant's egress rules and volume, then removes the
    /// container and its network (the reverse of the order they were made in).
    async fn teardown(&self, container: &ManagedContainer) -> Result<(), StepError> {
        self.release_tenant(container).await?;
        self.runtime.remove(&container.id).await?;
        self.remove_network(container).await
    }

    /// Stops the container of a tenant that leaves this host, then releases the tenant's egress
    /// rules and volume. The container itself is removed after, apart: Docker takes down its
    /// network endpoint and root filesystem after its processes exited, and a drain need not
    /// wait for that to copy the volume.
    async fn release_tenant(&self, container: &ManagedContainer) -> Result<(), StepError> {
        self.runtime.stop(&container.id).await?;
        // A container whose tenant label is not a valid id had no rules or network made.
        if let Ok(tenant) = TenantId::new(&container.tenant) {
            self.egress.release(&tenant).await?;
        }
        Ok(self.volumes.release(&container.tenant).await?)
    }

    /// Removes the network of a removed container's tenant (under its current or legacy name).
    async fn remove_network(&self, container: &ManagedContainer) -> Result<(), StepError> {
        let Ok(tenant) = TenantId::new(&container.tenant) else {
            return Ok(());
        };
        for name in [
            container_spec::network_name(&self.host, &tenant),
            container_spec::legacy_network_name(&tenant),
        ] {
            self.runtime.remove_network(&name).await?;
        }
        Ok(())
    }

    /// A free gateway port, taken until [`Self::give_back_port`] or until a listing shows a
    /// container publishing it. The search goes round the range from after the last port given.
    fn take_port(&self, used: &[u16]) -> Option<u16> {
        let mut creations = self.creations();
        let start = creations.next_port;
        let port = (start..=*PORT_RANGE.end())
            .chain(*PORT_RANGE.start()..start)
            .find(|p| !used.contains(p) && !creations.ports.contains(p) && (self.port_free)(*p))?;
        creations.ports.insert(port);
        creations.next_port = if port == *PORT_RANGE.end() {
            *PORT_RANGE.start()
        } else {
            port + 1
        };
        Some(port)
    }

    fn give_back_port(&self, port: u16) {
        self.creations().ports.remove(&port);
    }

    fn creations(&self) -> std::sync::MutexGuard<'_, Creations> {
        self.creations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the tenant's network on the first free /28 of the pool. Another network may
    /// take the same slice between the listing and the creation: then the next one is tried.
    async fn create_network(&self, spec: &TenantSpec) -> Result<String, StepError> {
        let mut last_error = StepError::SubnetsExhausted;
        for attempt in 0..32u64 {
            if attempt > 0 {
                // Let a concurrent creation finish so the next listing shows it.
                tokio::time::sleep(std::time::Duration::from_millis(20 + 10 * attempt)).await;
            }
            let used: Vec<String> = self
                .runtime
                .networks()
                .await?
                .into_values()
                .flatten()
                .collect();
            let subnet = self
                .subnets
                .next_free(&used)
                .ok_or(StepError::SubnetsExhausted)?;
            match self
                .runtime
                .create_network(container_spec::network(&self.host, spec, &subnet))
                .await
            {
                Ok(()) => return Ok(subnet),
                Err(e @ RuntimeError::SubnetOverlaps(_)) => last_error = e.into(),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_error)
    }

    /// The subnet of the tenant's network on this host (under its current or legacy name), if
    /// `networks` lists it.
    fn listed_subnet<'a>(
        &self,
        spec: &TenantSpec,
        networks: &'a HashMap<String, Vec<String>>,
    ) -> Option<&'a String> {
        networks
            .get(&container_spec::network_name(&self.host, &spec.tenant_id))
            .or_else(|| networks.get(&container_spec::legacy_network_name(&spec.tenant_id)))
            .and_then(|s| s.first())
    }

    /// The tenant's network (made when missing), then its egress rules for that network.
    async fn network_and_egress(
        &self,
        spec: &TenantSpec,
        networks: &HashMap<String, Vec<String>>,
    ) -> Result<EgressReport, StepError> {
        let subnet = match self.listed_subnet(spec, networks) {
            Some(subnet) => subnet.clone(),
            None => self.create_network(spec).await?,
        };
        Ok(self.egress.apply(spec, &subnet).await?)
    }

    /// The image, the network and the egress rules of a tenant about to arrive, made outside
    /// the pass (the tenant is busy meanwhile: not created, its network not swept). The pass
    /// after a staging that succeeded sees its network; one that failed is retried by the next
    /// pass on its own schedule, not at once.
    fn stage_in_background(
        self: &Arc<Self>,
        spec: &TenantSpec,
        networks: &HashMap<String, Vec<String>>,
    ) {
        if !self.creations().staging.insert(spec.tenant_id.to_string()) {
            return;
        }
        let (this, spec, networks) = (self.clone(), spec.clone(), networks.clone());
        tokio::spawn(async move {
            let staged = async {
                this.ensure_image(&spec).await?;
                this.network_and_egress(&spec, &networks).await.map(|_| ())
            }
            .await;
            this.creations().staging.remove(spec.tenant_id.as_str());
            match staged {
                Ok(()) => this.wake.notify_one(),
                Err(e) => {
                    tracing::warn!(tenant = %spec.tenant_id, error = %e, "staging failed; retried next pass")
                }
            }
        });
    }

    async fn ensure_image(&self, spec: &TenantSpec) -> Result<(), StepError> {
        if !self.runtime.image_present(&spec.image).await? {
            self.runtime
                .pull(&spec.image)
                .await
                .map_err(|e| StepError::Pull {
                    image: spec.image.clone(),
                    message: e.message().to_string(),
                })?;
        }
        Ok(())
    }

    /// Volume (restored first when the spec asks) → network → egress → container.
    async fn create(
        &self,
        spec: &TenantSpec,
        generation: u64,
        networks: &HashMap<String, Vec<String>>,
    ) -> Result<EgressReport, Failure> {
        self.ensure_image(spec).await?;
        let volume = self.volumes.prepare(spec).await?;
        if self.restores.pending(spec) {
            let (restores, asked, into) = (self.restores.clone(), spec.clone(), volume.clone());
            tokio::task::spawn_blocking(move || restores.restore(&asked, &into))
                .await
                .map_err(|e| Failure::from(format!("restore: {e}")))??;
        }
        let report = self.network_and_egress(spec, networks).await?;
        // Listed now, not by the pass that asked for the container: a creation may wait seconds
        // for its slot, and a port claimed meanwhile is taken even while nothing listens on it
        // (a crashed container Docker is about to start again would lose it).
        let mut used_ports = self.runtime.published_ports().await?;
        // A port free on loopback may still be reserved by Docker for another container: then
        // the next one is tried.
        let mut last_error = StepError::NoPort;
        for _ in 0..16 {
            let port = self.take_port(&used_ports).ok_or(StepError::NoPort)?;
            used_ports.push(port);
            let body = container_spec::container(&self.host, spec, generation, port, &volume);
            let created = self
                .runtime
                .create_and_start(
                    &container_spec::container_name(&self.host, &spec.tenant_id),
                    body,
                )
                .await;
            if created.is_err() {
                // Taken by someone else, it stays in `used_ports` here.
                self.give_back_port(port);
            }
            match created {
                Ok(_) => {
                    tracing::info!(tenant = %spec.tenant_id, port, "tenant container started");
                    return Ok(report);
                }
                Err(e @ RuntimeError::PortTaken(_)) => last_error = e.into(),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_error.into())
    }

    /// One pass over `desired`, and if it started creations or removals, another once they
    /// have ended: the statuses once the containers asked for exist and the others are gone.
    #[cfg(test)]
    pub async fn reconcile(self: &Arc<Self>, desired: &Desired) -> Vec<proto::TenantStatus> {
        let statuses = self.reconcile_current(|| desired.clone()).await;
        if self.busy_tenants().is_empty() {
            return statuses;
        }
        self.settled().await;
        self.reconcile_current(|| desired.clone()).await
    }

    /// Returns once no container is being made or removed outside a pass.
    #[cfg(test)]
    pub async fn settled(&self) {
        while !self.busy_tenants().is_empty() {
            // A failed removal wakes no pass: look again every millisecond as well.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(1), self.wake.notified())
                .await;
        }
    }

    /// One pass over the desired state `read` returns, read after the pass has started (see
    /// [`Passes`]).
    pub async fn reconcile_current(
        self: &Arc<Self>,
        read: impl FnOnce() -> Desired,
    ) -> Vec<proto::TenantStatus> {
        let pass = self.passes.start();
        let desired = read();
        self.pass(&desired, pass).await
    }

    /// Makes a new tenant's container in the background (see the module doc); returns how the
    /// last creation ended if a pass has not reported it yet, else `Ok` (pending) while one
    /// is under way. A failure is reported once; the pass after that tries again.
    fn create_in_background(
        self: &Arc<Self>,
        spec: &TenantSpec,
        generation: u64,
        networks: &HashMap<String, Vec<String>>,
    ) -> Result<EgressReport, Failure> {
        let tenant = spec.tenant_id.to_string();
        let mut creations = self.creations();
        if creations.under_way.contains(&tenant) {
            return Ok(EgressReport::default());
        }
        if let Some((_, ended)) = creations.ended.remove(&tenant) {
            return ended;
        }
        creations.under_way.insert(tenant.clone());
        let slots = creations.slots.clone();
        drop(creations);
        let (this, spec, networks) = (self.clone(), spec.clone(), networks.clone());
        tokio::spawn(async move {
            let outcome = match slots.acquire_owned().await {
                Ok(_slot) => this.create(&spec, generation, &networks).await,
                Err(_) => Err(StepError::ShuttingDown.into()),
            };
            let mut creations = this.creations();
            creations.under_way.remove(&tenant);
            creations
                .ended
                .insert(tenant, (this.passes.next(), outcome));
            drop(creations);
            this.wake.notify_one();
        });
        Ok(EgressReport::default())
    }

    /// Tenants whose container is being made or removed, or who are being staged, outside the
    /// pass.
    fn busy_tenants(&self) -> BTreeSet<String> {
        let creations = self.creations();
        let mut busy: BTreeSet<String> = creations
            .under_way
            .union(&creations.staging)
            .cloned()
            .collect();
        drop(creations);
        busy.extend(self.removing().values().cloned());
        busy
    }

    fn removing(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.removals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes released containers and their networks, [`SIDE_BY_SIDE`] at once, outside the
    /// pass. The teardown of `generation` is finished once they and every other removal under
    /// way are done, if the pass released all it no longer wants (`complete`). A container
    /// not removed is torn down again by a later pass; a network left behind is swept by one.
    fn remove_in_background(
        self: &Arc<Self>,
        released: Vec<ManagedContainer>,
        generation: u64,
        complete: bool,
    ) {
        self.removing()
            .extend(released.iter().map(|c| (c.id.clone(), c.tenant.clone())));
        let this = self.clone();
        tokio::spawn(async move {
            let mut all_removed = true;
            for some in released.chunks(SIDE_BY_SIDE) {
                let removed = some.iter().map(|c| async {
                    let removed = this.runtime.remove(&c.id).await;
                    if let Err(e) = &removed {
                        tracing::warn!(tenant = %c.tenant, error = %e, "tenant container not removed; retried next pass");
                    } else {
                        tracing::info!(tenant = %c.tenant, container = %c.id, "tenant container removed");
                        if let Err(e) = this.remove_network(c).await {
                            tracing::warn!(tenant = %c.tenant, error = %e, "tenant network not removed");
                        }
                    }
                    this.removing().remove(&c.id);
                    removed.is_ok()
                });
                all_removed &= futures::future::join_all(removed)
                    .await
                    .into_iter()
                    .all(|ok| ok);
            }
            // A pass now finishes what is left (staged work, the report); after a failure the
            // next pass on its own schedule retries, not one at once (a removal Docker keeps
            // refusing would be retried in a loop).
            if all_removed {
                if complete && this.removing().is_empty() {
                    this.passes.finish_teardown(generation);
                }
                this.wake.notify_one();
            }
        });
    }

    /// Tenants whose containers creations under way, or ended after `pass`'s listing, may
    /// have made without that listing showing them.
    fn unlisted_creations(&self, pass: u64) -> BTreeSet<String> {
        let creations = self.creations();
        let ended_since = creations
            .ended
            .iter()
            .filter(|(_, (seen_from, _))| *seen_from > pass)
            .map(|(t, _)| t);
        creations
            .under_way
            .iter()
            .chain(ended_since)
            .cloned()
            .collect()
    }

    async fn pass(self: &Arc<Self>, desired: &Desired, pass: u64) -> Vec<proto::TenantStatus> {
        let generation = desired.generation;
        let actual = match self.runtime.list(&self.host).await {
            Ok(a) => a,
            Err(e) => {
                return desired
                    .tenants
                    .iter()
                    .map(|t| {
                        status(
                            &t.tenant_id,
                            generation,
                            proto::TenantState::Failed,
                            e.to_string(),
                        )
                    })
                    .collect();
            }
        };
        let wanted: BTreeMap<&str, &TenantSpec> = desired
            .tenants
            .iter()
            .map(|t| (t.tenant_id.as_str(), t))
            .collect();
        let mut by_tenant: HashMap<&str, Vec<&ManagedContainer>> = HashMap::new();
        for c in &actual {
            by_tenant.entry(c.tenant.as_str()).or_default().push(c);
        }
        // Without a readable table no container is created (its rules could not be put in
        // place first), while running ones keep the rules they have.
        let egress_ready = self.egress.refresh().await;
        if let Err(e) = &egress_ready {
            tracing::warn!(error = %e, "cannot read the egress rules");
        }
        // Tear down what is no longer desired, and duplicates. Rules of a tenant whose
        // container could not be removed stay.
        let busy = self.busy_tenants();
        let Teardown {
            released,
            mut all_released,
            failed,
        } = self
            .tear_down_unwanted(&actual, &wanted, &by_tenant, &busy)
            .await;
        let mut keep_rules: BTreeSet<TenantId> =
            wanted.values().map(|s| s.tenant_id.clone()).collect();
        keep_rules.extend(failed);
        // A container this listing may have missed (a creation under way or just ended) keeps
        // its rules, and one of a tenant no longer desired keeps this teardown unfinished: a
        // later pass tears it down.
        let unlisted = self.unlisted_creations(pass);
        if unlisted.iter().any(|t| !wanted.contains_key(t.as_str())) {
            all_released = false;
        }
        keep_rules.extend(unlisted.iter().filter_map(|t| TenantId::new(t).ok()));
        // Work waiting for this teardown runs only if nothing undesired is left: a copy of a
        // volume once the containers stopped; a deletion once they are removed too, which,
        // with their networks, Docker takes longer for.
        if all_released {
            self.passes.finish_release(generation);
        }
        if released.is_empty() {
            if all_released && self.removing().is_empty() {
                self.passes.finish_teardown(generation);
            }
        } else {
            let released: Vec<ManagedContainer> = released.into_iter().cloned().collect();
            self.remove_in_background(released, generation, all_released);
        }
        // Ports Docker lists now (every container's, berth's in any state) need no claim.
        let listed = self.runtime.published_ports().await.unwrap_or_default();
        self.creations().ports.retain(|p| !listed.contains(p));
        let networks = self.runtime.networks().await.unwrap_or_default();
        let mut statuses = Vec::with_capacity(wanted.len());
        for (&tenant, &spec) in &wanted {
            let existing = by_tenant.get(tenant).and_then(|v| v.first()).copied();
            let outcome = match busy.contains(tenant) {
                // Its creation is under way: the container it lists as created is being started
                // (and Docker holds it until then), not one to start here. Or its old container
                // (it left and came back) is being removed: a new one once that is done.
                true => Ok(EgressReport::default()),
                false => {
                    let egress_ready = egress_ready.as_ref().map(|_| ());
                    self.converge(spec, existing, generation, &networks, egress_ready)
                        .await
                }
            };
            let mut s = match outcome {
                Err(f) => {
                    tracing::warn!(%tenant, error = %f.message, "tenant not running");
                    status(&spec.tenant_id, generation, f.state, f.message)
                }
                Ok(report) => {
                    let mut s = status(
                        &spec.tenant_id,
                        generation,
                        proto::TenantState::Pending,
                        report.problems.join("; "),
                    );
                    s.egress = report.entries;
                    s.egress_denied_packets = report.denied_packets;
                    s
                }
            };
            s.memory_cap_bytes = spec.resources.memory_bytes;
            if let Some(restored) = self.restores.source.restored(&spec.tenant_id) {
                s.restore_id = restored.id;
                s.restored = Some(proto::BackupSnapshot {
                    id: restored.snapshot.id,
                    short_id: restored.snapshot.short_id,
                    time: restored.snapshot.time,
                });
            }
            statuses.push(s);
        }
        // Ended creations this listing showed are reported, or their containers were.
        self.creations()
            .ended
            .retain(|_, (seen_from, _)| *seen_from > pass);
        // Staged tenants (their volume on its way here) get everything but volume and
        // container, so they start as fast as a restart once it arrives. One without its
        // network yet is staged outside the pass: Docker takes 0.1-0.3 s for a network, and a
        // tenant arriving meanwhile (a drain's previous move) would wait for it.
        for spec in &desired.staged {
            if wanted.contains_key(spec.tenant_id.as_str()) {
                continue;
            }
            keep_rules.insert(spec.tenant_id.clone());
            if egress_ready.is_err() || busy.contains(spec.tenant_id.as_str()) {
                continue;
            }
            let staged = match self.listed_subnet(spec, &networks) {
                // Only its rules to apply: no Docker call.
                Some(_) => self.network_and_egress(spec, &networks).await.map(|_| ()),
                None => {
                    self.stage_in_background(spec, &networks);
                    Ok(())
                }
            };
            if let Err(e) = staged {
                tracing::warn!(tenant = %spec.tenant_id, error = %e, "staging failed; retried next pass");
            }
        }
        if egress_ready.is_ok()
            && let Err(e) = self.egress.sweep(&keep_rules).await
        {
            tracing::warn!(error = %e, "removing stale egress rules failed; retried next pass");
        }
        self.remove_orphaned_networks(&networks, &keep_rules, &by_tenant)
            .await;
        self.observe_all(&mut statuses, &wanted).await;
        statuses
    }

    /// Stops and releases the containers of tenants that leave (and removes stray
    /// duplicates of those that stay), a few side by side. Not a container being made: Docker
    /// would stop it only once it started, and the pass would wait for that; the pass after
    /// its creation ends tears it down (the teardown stays unfinished until then). Nor one
    /// being removed.
    async fn tear_down_unwanted<'a>(
        &self,
        actual: &'a [ManagedContainer],
        wanted: &BTreeMap<&str, &TenantSpec>,
        by_tenant: &HashMap<&str, Vec<&ManagedContainer>>,
        busy: &BTreeSet<String>,
    ) -> Teardown<'a> {
        let mut teardown = Teardown {
            released: Vec::new(),
            all_released: true,
            failed: Vec::new(),
        };
        // Each with whether its tenant leaves (else it is a stray duplicate of one that runs on).
        let doomed: Vec<(&ManagedContainer, bool)> = actual
            .iter()
            .filter(|c| !busy.contains(&c.tenant))
            .filter_map(|c| {
                let leaves = !wanted.contains_key(c.tenant.as_str());
                let kept = !leaves
                    && by_tenant[c.tenant.as_str()]
                        .first()
                        .is_some_and(|first| first.id == c.id);
                (!kept).then_some((c, leaves))
            })
            .collect();
        let mut outcomes = Vec::with_capacity(doomed.len());
        for some in doomed.chunks(SIDE_BY_SIDE) {
            // A stray duplicate of a tenant that runs on goes alone: the tenant's rules and
            // volume are the running container's.
            let released = some.iter().map(|&(c, leaves)| async move {
                match leaves {
                    true => self.release_tenant(c).await,
                    false => self.runtime.remove(&c.id).await.map_err(StepError::from),
                }
            });
            outcomes.extend(futures::future::join_all(released).await);
        }
        for ((c, leaves), outcome) in doomed.into_iter().zip(outcomes) {
            match outcome {
                Ok(()) if leaves => {
                    tracing::info!(tenant = %c.tenant, container = %c.id, "tenant container stopped and released");
                    teardown.released.push(c);
                }
                Ok(()) => {
                    tracing::info!(tenant = %c.tenant, container = %c.id, "duplicate container removed");
                }
                Err(e) => {
                    teardown.failed.extend(TenantId::new(&c.tenant));
                    teardown.all_released = false;
                    tracing::warn!(tenant = %c.tenant, error = %e, "teardown failed; retried next pass")
                }
            }
        }
        teardown
    }

    /// Brings one wanted tenant to running: adopts its container when the spec is unchanged
    /// (starting it behind its rules and volume if it stopped), recreates it when the spec
    /// changed, creates it in the background when there is none. `egress_ready` is whether
    /// the table could be read this pass: without it no container is created.
    async fn converge(
        self: &Arc<Self>,
        spec: &TenantSpec,
        existing: Option<&ManagedContainer>,
        generation: u64,
        networks: &HashMap<String, Vec<String>>,
        egress_ready: Result<(), &EgressError>,
    ) -> Result<EgressReport, Failure> {
        let tenant = spec.tenant_id.as_str();
        let hash = container_spec::spec_hash(spec);
        match (egress_ready, existing) {
            (Err(e), None) => Err(format!("egress: {e}").into()),
            // A restore asked of a tenant that runs: its container goes, and a new one starts
            // on the restored volume (made outside the pass: restic takes its time).
            (_, Some(c)) if self.restores.pending(spec) => {
                tracing::info!(%tenant, "restore asked: stopping the container");
                self.teardown(c).await?;
                self.create_in_background(spec, generation, &self.without_network(networks, spec))
            }
            (_, Some(c)) if c.spec_hash == hash => {
                // Rules first: a stopped container starts only behind them.
                let report = self
                    .network_and_egress(spec, networks)
                    .await
                    .map_err(Failure::from);
                // Mid-restart a container is briefly stopped: the restart starts it.
                let stopped = (c.state == "exited" || c.state == "created")
                    && !self
                        .restarting
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(tenant);
                match (report, stopped) {
                    (report, false) => report,
                    (Err(e), true) => Err(e),
                    // And only with its volume attached (after a reboot: once its key came).
                    (Ok(report), true) => match self.volumes.prepare(spec).await {
                        Err(e) => Err(e.into()),
                        Ok(_) => match self.runtime.start(&c.id).await {
                            // While it was stopped another container took its port: a new
                            // container on a fresh port (the network stays).
                            Err(RuntimeError::PortTaken(_)) => {
                                tracing::info!(%tenant, port = c.port, "port taken while stopped: recreating on another port");
                                match self.runtime.remove(&c.id).await {
                                    Ok(()) => self.create(spec, generation, networks).await,
                                    Err(e) => Err(e.into()),
                                }
                            }
                            other => other.map(|()| report).map_err(Failure::from),
                        },
                    },
                }
            }
            (_, Some(c)) => {
                tracing::info!(%tenant, "spec changed: recreating the container");
                match self.teardown(c).await {
                    Ok(()) => {
                        self.create(spec, generation, &self.without_network(networks, spec))
                            .await
                    }
                    Err(e) => Err(e.into()),
                }
            }
            (_, None) => self.create_in_background(spec, generation, networks),
        }
    }

    /// `networks` without the tenant's, which a teardown removed with its container.
    fn without_network(
        &self,
        networks: &HashMap<String, Vec<String>>,
        spec: &TenantSpec,
    ) -> HashMap<String, Vec<String>> {
        let mut networks = networks.clone();
        networks.remove(&container_spec::network_name(&self.host, &spec.tenant_id));
        networks.remove(&container_spec::legacy_network_name(&spec.tenant_id));
        networks
    }

    /// Removes this host's networks of tenants with neither a container nor a place here:
    /// staged for a move that was called off, or left by a removal that failed half-way. Named
    /// as this host's, and (listed only when there are any, not every pass) labelled so.
    async fn remove_orphaned_networks(
        &self,
        networks: &HashMap<String, Vec<String>>,
        keep_rules: &BTreeSet<TenantId>,
        by_tenant: &HashMap<&str, Vec<&ManagedContainer>>,
    ) {
        let busy = self.busy_tenants();
        let orphans: Vec<&String> = networks
            .keys()
            .filter(|name| {
                container_spec::network_tenant(&self.host, name).is_some_and(|t| {
                    !keep_rules.contains(&t)
                        && !by_tenant.contains_key(t.as_str())
                        && !busy.contains(t.as_str())
                })
            })
            .collect();
        if orphans.is_empty() {
            return;
        }
        let labelled = self
            .runtime
            .host_networks(&self.host)
            .await
            .unwrap_or_default();
        for name in orphans.into_iter().filter(|n| labelled.contains(n)) {
            if let Err(e) = self.runtime.remove_network(name).await {
                tracing::warn!(network = %name, error = %e, "orphaned tenant network not removed; retried next pass");
            }
        }
    }

    /// Fills in the statuses from one more listing, which sees what this pass created.
    /// Concurrently: the report waits for this pass, and a drain for the report. Not a
    /// container being started: Docker answers an inspect of it only once it started, and the
    /// other tenants' statuses would wait for that (the pass after the creation reports it).
    async fn observe_all(
        &self,
        statuses: &mut [proto::TenantStatus],
        wanted: &BTreeMap<&str, &TenantSpec>,
    ) {
        let Ok(now) = self.runtime.list(&self.host).await else {
            return;
        };
        let busy = self.busy_tenants();
        futures::future::join_all(statuses.iter_mut().filter_map(|s| {
            if busy.contains(&s.tenant_id) {
                return None;
            }
            let c = now.iter().find(|c| c.tenant == s.tenant_id)?;
            let port = wanted.get(s.tenant_id.as_str())?.gateway_port;
            Some(self.observe(s, c, port))
        }))
        .await;
        self.health.retain(|tenant| {
            now.iter()
                .any(|c| c.tenant == tenant && c.state == "running")
        });
    }

    /// Fills in what Docker, the cgroup and the health check say of a tenant's container.
    async fn observe(&self, s: &mut proto::TenantStatus, c: &ManagedContainer, gateway_port: u16) {
        s.published_port = u32::from(c.port);
        let events = self
            .oom_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&s.tenant_id)
            .copied()
            .unwrap_or(0);
        s.oom_kills = events;
        if let Ok(d) = self.runtime.details(&c.id).await {
            s.restarts = d.restart_count as u32;
            s.last_restart_unix_ms = d.started().map_or(0, |t| t.as_millisecond());
            if d.oom_killed {
                s.oom_kills = s.oom_kills.max(1);
            }
            // Mid-restart the restart driver's own gate checks it.
            let restarting = self
                .restarting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&s.tenant_id);
            if d.running && !restarting {
                match self
                    .health
                    .healthy(&s.tenant_id, &c.id, &d.started_at, gateway_port)
                {
                    Health::Healthy => s.healthy = true,
                    Health::Checking => {}
                    Health::Failing(note) if s.message.is_empty() => s.message = note,
                    Health::Failing(note) => s.message = format!("{}; {note}", s.message),
                }
            }
        }
        if let Some(figures) = self.cgroups.as_ref().and_then(|r| r.memory(&c.id)) {
            s.memory_used_bytes = figures.used_bytes;
            if let Some(cap) = figures.cap_bytes {
                s.memory_cap_bytes = cap;
            }
            s.oom_kills = s.oom_kills.max(figures.oom_kills);
        }
        if let Some(used) = self.cgroups.as_ref().and_then(|r| r.cpu_millicores(&c.id)) {
            s.cpu_used_millicores = used;
        }
        if c.state == "running" && s.state != proto::TenantState::Failed as i32 {
            s.state = proto::TenantState::Running as i32;
        }
    }
}

#[cfg(test)]
mod tests;
