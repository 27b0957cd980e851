//! The session with the coordinator: one mTLS stream that sends the hello and a report every
//! interval, takes desired states, keys and commands, and renews the certificate at two
//! thirds of its life; `agent::run` reconnects it with the jittered exponential backoff here.

pub mod identity;

use std::time::Duration;

use berth_shared::clock::{Clock, SystemClock};
use berth_shared::leader::{Coordinators, FleetChannel, STANDBY_HEADER};
use berth_shared::proto::agent_message::Body as AgentBody;
use berth_shared::proto::agent_service_client::AgentServiceClient;
use berth_shared::proto::coordinator_message::Body as CoordinatorBody;
use berth_shared::proto::{self, AgentMessage};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::AgentConfig;
use std::sync::Arc;

use crate::enforce::Enforcement;
use crate::host::facts::{Meter, host_facts};
use crate::metrics::Telemetry;
use crate::session::identity::Identity;
use std::sync::atomic::Ordering;

/// Full-jitter exponential backoff: the n-th wait is uniform in [0, min(cap, base·2ⁿ)].
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next wait (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    pub fn next_wait(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(rng.random_range(0..=ceiling.as_millis() as u64))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What a session connects with: this host's identity, and the coordinators it may reach
/// (kept from one session to the next: where a standby said the leader is).
pub(crate) struct Link {
    pub identity: Identity,
    pub coordinators: Arc<Coordinators>,
}

/// Why a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// The certificate was renewed; reconnect at once with the new one.
    Renewed,
    /// The session was accepted and later lost: retry soon.
    Lost(String),
    /// It never got accepted.
    Failed(String),
    /// A standby coordinator answered (naming the leader, or that one is being elected): the
    /// next session goes to the leader soon, without the backoff growing.
    Standby(String),
}

/// One session, from connecting to its end; afterwards nothing of it is left in force.
pub(crate) async fn run_session(
    config: &AgentConfig,
    link: &Link,
    transfer_port: u16,
    meter: &mut Meter,
    enforcement: &Arc<Enforcement>,
    telemetry: &Telemetry,
    backoff: &mut Backoff,
) -> SessionEnd {
    let end = session_loop(
        config,
        link,
        transfer_port,
        meter,
        enforcement,
        telemetry,
        backoff,
    )
    .await;
    telemetry.connected.store(false, Ordering::Relaxed);
    enforcement.set_peer_tls(None);
    // A renewal reconnects at once, and the coordinator hears of the transfers over the new
    // session; a lost session's transfers could end unheard.
    if !matches!(end, SessionEnd::Renewed) {
        enforcement.cancel_transfers();
    }
    end
}

/// Starts an export: uploaded on a stream of its own (the session carries on meanwhile), and
/// answered with a volume result once it ended.
fn export(
    enforcement: &Arc<Enforcement>,
    client: AgentServiceClient<FleetChannel>,
    command: proto::VolumeCommand,
) {
    let mut result = proto::VolumeResult {
        tenant_id: command.tenant_id.clone(),
        request_id: command.request_id,
        ..Default::default()
    };
    let job = match enforcement.export_job(&command) {
        Ok(job) => job,
        Err(e) => {
            tracing::warn!(tenant = %result.tenant_id.chars().take(64).collect::<String>(), error = %e, "export refused");
            result.error = e.to_string();
            enforcement.push_volume_result(result);
            return;
        }
    };
    let enforcement = enforcement.clone();
    tokio::spawn(async move {
        match crate::backup::export::upload(client, command.export_id, job).await {
            Ok(bytes) => {
                tracing::info!(tenant = %result.tenant_id, bytes, "export uploaded");
                result.ok = true;
                result.data_bytes = bytes;
            }
            Err(e) => {
                tracing::warn!(tenant = %result.tenant_id, error = %e, "export failed");
                result.error = e.to_string();
            }
        }
        enforcement.push_volume_result(result);
    });
}

async fn session_loop(
    config: &AgentConfig,
    link: &Link,
    transfer_port: u16,
    meter: &mut Meter,
    enforcement: &Arc<Enforcement>,
    telemetry: &Telemetry,
    backoff: &mut Backoff,
) -> SessionEnd {
    let identity = &link.identity;
    let channel = match identity.channel(&link.coordinators) {
        Ok(c) => c,
        Err(e) => return SessionEnd::Failed(e.to_string()),
    };
    let host_id = identity.host_id().to_string();
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    let facts = host_facts(config, meter).await;
    let hello = AgentMessage {
        body: Some(AgentBody::Hello(proto::AgentHello {
            host_id: host_id.clone(),
            facts: Some(facts),
            applied_generation: enforcement.current().generation,
            transfer_port: u32::from(transfer_port),
            transfer_host: config
                .transfer_advertise
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
        })),
    };
    if tx.send(hello).await.is_err() {
        return SessionEnd::Failed("session channel closed".into());
    }
    let mut client = AgentServiceClient::new(channel.clone())
        .max_decoding_message_size(berth_shared::transport::SESSION_MESSAGE_BYTES)
        .max_encoding_message_size(berth_shared::transport::SESSION_MESSAGE_BYTES);
    let mut inbound = match client.session(ReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.metadata().contains_key(STANDBY_HEADER) => {
            return SessionEnd::Standby(status.message().to_string());
        }
        Err(status) => return SessionEnd::Failed(crate::session::identity::status_error(&status)),
    };
    let interval = match inbound.message().await {
        Ok(Some(proto::CoordinatorMessage {
            body: Some(CoordinatorBody::Accepted(accepted)),
        })) => config
            .report_interval
            .unwrap_or(Duration::from_millis(u64::from(
                accepted.report_interval_ms.max(100),
            ))),
        Ok(_) => return SessionEnd::Failed("the coordinator did not accept the session".into()),
        Err(status) => return SessionEnd::Failed(crate::session::identity::status_error(&status)),
    };
    backoff.reset();
    telemetry.connected.store(true, Ordering::Relaxed);
    enforcement.set_peer_tls(Some(Arc::new(identity.peer_tls())));
    tracing::info!(host = %host_id, interval_ms = interval.as_millis() as u64, "session accepted");

    let renew_in = Duration::from_millis(
        identity
            .renew_at_unix_ms()
            .saturating_sub(SystemClock.now_unix_ms())
            .max(0) as u64,
    );
    let renew = tokio::time::sleep(renew_in);
    tokio::pin!(renew);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    loop {
        tokio::select! {
            _ = async {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = enforcement.states_changed() => ticker.reset(),
                }
            } => {
                sequence += 1;
                let m = meter.measure();
                let (generation, statuses) = enforcement.statuses();
                let report = proto::HostReport {
                    host_id: host_id.clone(),
                    sequence,
                    sent_unix_ms: SystemClock.now_unix_ms(),
                    memory_total_bytes: m.memory_total_bytes,
                    memory_available_bytes: m.memory_available_bytes,
                    disk_available_bytes: m.disk_available_bytes,
                    tenants: statuses,
                    applied_generation: generation,
                };
                let sent = (report.sent_unix_ms, report.memory_total_bytes, report.memory_available_bytes);
                if tx.send(AgentMessage { body: Some(AgentBody::Report(report)) }).await.is_err() {
                    return SessionEnd::Lost("outbound stream closed".into());
                }
                telemetry.reported(sent.0, sent.1, sent.2);
            }
            message = inbound.message() => match message {
                Ok(Some(proto::CoordinatorMessage { body: Some(CoordinatorBody::DesiredState(state)) })) => {
                    let generation = state.generation;
                    let ack = match enforcement.accept(state) {
                        Ok(tenants) => {
                            tracing::info!(generation, tenants, "desired state accepted");
                            proto::DesiredStateAck { generation, accepted: true, error: String::new() }
                        }
                        Err(e) => {
                            tracing::warn!(generation, error = %e, "desired state refused");
                            proto::DesiredStateAck { generation, accepted: false, error: e.to_string() }
                        }
                    };
                    if tx.send(AgentMessage { body: Some(AgentBody::Ack(ack)) }).await.is_err() {
                        return SessionEnd::Lost("outbound stream closed".into());
                    }
                }
                Ok(Some(proto::CoordinatorMessage { body: Some(CoordinatorBody::Revoked(revoked)) })) => {
                    tracing::info!(serials = revoked.serials.len(), replace = revoked.replace, "revoked certificates received");
                    // Serials are hex; anything else cannot name a certificate.
                    let serials = revoked
                        .serials
                        .into_iter()
                        .filter(|s| s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit()));
                    if revoked.replace {
                        enforcement.denied.replace(serials);
                    } else {
                        for serial in serials {
                            enforcement.denied.insert(serial);
                        }
                    }
                }
                Ok(Some(proto::CoordinatorMessage { body: Some(CoordinatorBody::VolumeKeys(keys)) })) => {
                    match enforcement.set_volume_keys(keys) {
                        Ok(held) => tracing::debug!(held, "volume keys received"),
                        Err(e) => tracing::warn!(error = %e, "volume keys refused"),
                    }
                }
                Ok(Some(proto::CoordinatorMessage { body: Some(CoordinatorBody::Restart(command)) })) => {
                    tracing::info!(tenant = %command.tenant_id.chars().take(64).collect::<String>(), request = command.request_id, "restart requested");
                    enforcement.restarts.request(&command.tenant_id, command.request_id);
                }
                Ok(Some(proto::CoordinatorMessage { body: Some(CoordinatorBody::Volume(command)) })) => {
                    tracing::info!(tenant = %command.tenant_id.chars().take(64).collect::<String>(), request = command.request_id, action = command.action, "volume command");
                    if command.action == proto::VolumeAction::ExportFiles as i32 {
                        export(enforcement, client.clone(), command);
                    } else {
                        enforcement.request_volume(command);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return SessionEnd::Lost("the coordinator closed the session".into()),
                Err(status) => return SessionEnd::Lost(crate::session::identity::status_error(&status)),
            },
            () = enforcement.restarts.results_ready() => {
                for result in enforcement.restarts.take_results() {
                    if tx.send(AgentMessage { body: Some(AgentBody::RestartResult(result)) }).await.is_err() {
                        return SessionEnd::Lost("outbound stream closed".into());
                    }
                }
            }
            () = enforcement.volume_messages_ready() => {
                for body in enforcement.take_volume_messages() {
                    if tx.send(AgentMessage { body: Some(body) }).await.is_err() {
                        return SessionEnd::Lost("outbound stream closed".into());
                    }
                }
            }
            () = &mut renew => {
                return match identity.renew(channel.clone(), &config.state_dir).await {
                    Ok(renewed) => {
                        tracing::info!(serial = %renewed.cert_info.serial, not_after_unix_ms = renewed.cert_info.not_after_unix_ms, "certificate renewed");
                        SessionEnd::Renewed
                    }
                    Err(e) => SessionEnd::Lost(format!("certificate renewal failed: {e}")),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let ceiling = backoff.ceiling();
            let wait = backoff.next_wait(&mut rng);
            assert!(wait <= ceiling);
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(&ceilings[..5], &[250, 500, 1000, 2000, 4000]);
        assert_eq!(*ceilings.last().unwrap(), 30_000);
        let waits: Vec<_> = (0..20).map(|_| backoff.next_wait(&mut rng)).collect();
        assert!(waits.windows(2).any(|w| w[0] != w[1]), "jittered");
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(250));
    }
}
