//! Whether each tenant's container has been healthy since it last started, for the
//! coordinator: a drain starts a moved tenant on its target and releases the old copy only once
//! the target reports it healthy.
//!
//! Ensures: the first reconcile pass that sees a container start has it checked in the
//! background with the restarts' health gate (Docker's healthcheck when the image has one,
//! else a connect to the gateway port from inside the container's network namespace), every
//! 50 ms at first, then with growing pauses, until it passes or that start is over (the
//! container stopped, was replaced or is gone); a pass then runs at once to report it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::restarts::{HealthGate, Probe, check};
use crate::runtime::ContainerRuntime;

/// One start of one container.
/// What the checks of a tenant's current start found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Its checks are young: not passed yet, not failing long enough to say so.
    Checking,
    /// Failing past the gate's fast phase: why.
    Failing(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Start {
    container: String,
    started_at: String,
}

#[derive(Debug)]
struct Mark {
    start: Start,
    healthy: bool,
    /// Why its checks still fail, once they have failed past the gate's fast phase.
    failing: Option<String>,
}

#[derive(Debug)]
pub struct HealthWatch {
    runtime: Arc<dyn ContainerRuntime>,
    probe: Arc<dyn Probe>,
    gate: HealthGate,
    /// Per tenant: the start being checked or checked, and whether it passed.
    marks: Mutex<HashMap<String, Mark>>,
    /// Woken when a check passes (the reconcile loop waits on it).
    passed: Arc<Notify>,
}

impl HealthWatch {
    pub fn new(
        runtime: Arc<dyn ContainerRuntime>,
        probe: Arc<dyn Probe>,
        gate: HealthGate,
        passed: Arc<Notify>,
    ) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            probe,
            gate,
            marks: Mutex::default(),
            passed,
        })
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Mark>> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `tenant`'s running container passed its check since it started at
    /// `started_at`; a start not seen before begins to be checked.
    pub fn healthy(
        self: &Arc<Self>,
        tenant: &str,
        container: &str,
        started_at: &str,
        gateway_port: u16,
    ) -> Health {
        let start = Start {
            container: container.to_string(),
            started_at: started_at.to_string(),
        };
        let mut marks = self.marks();
        if let Some(mark) = marks.get(tenant).filter(|m| m.start == start) {
            return match (mark.healthy, &mark.failing) {
                (true, _) => Health::Healthy,
                (false, Some(failing)) => Health::Failing(failing.clone()),
                (false, None) => Health::Checking,
            };
        }
        marks.insert(
            tenant.to_string(),
            Mark {
                start: start.clone(),
                healthy: false,
                failing: None,
            },
        );
        drop(marks);
        tokio::spawn(self.clone().watch(tenant.to_string(), start, gateway_port));
        Health::Checking
    }

    /// Forgets the starts of tenants without a running container here; their checks end.
    pub fn retain(&self, running: impl Fn(&str) -> bool) {
        self.marks().retain(|tenant, _| running(tenant));
    }

    fn is_current(&self, tenant: &str, start: &Start) -> bool {
        self.marks().get(tenant).is_some_and(|m| m.start == *start)
    }

    async fn watch(self: Arc<Self>, tenant: String, start: Start, gateway_port: u16) {
        let began = Instant::now();
        let mut pause = self.gate.every;
        while self.is_current(&tenant, &start) {
            match check(&*self.runtime, &*self.probe, &start.container, gateway_port).await {
                Ok(()) => {
                    if let Some(mark) = self.marks().get_mut(&tenant).filter(|m| m.start == start) {
                        mark.healthy = true;
                    }
                    tracing::info!(%tenant, after_ms = began.elapsed().as_millis() as u64, "tenant healthy");
                    self.passed.notify_one();
                    return;
                }
                Err(e) if began.elapsed() >= self.gate.fast_for => {
                    pause = (pause * 2).min(self.gate.max_backoff);
                    let note = format!(
                        "not healthy {} s after its start: {e}",
                        began.elapsed().as_secs()
                    );
                    tracing::warn!(%tenant, %note, "health check");
                    if let Some(mark) = self.marks().get_mut(&tenant).filter(|m| m.start == start) {
                        mark.failing = Some(note);
                    }
                }
                Err(_) => {}
            }
            tokio::time::sleep(pause).await;
        }
    }
}

#[cfg(test)]
mod tests;
