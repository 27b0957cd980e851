//! The open agent sessions (at most one per host; a newer session supersedes an older one)
//! and the commands sent to agents and not answered yet.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_shared::ids::HostId;
use berth_shared::proto;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::{AgentCommand, AgentLink, AgentReply, Answer, LinkError};

#[derive(Debug)]
struct SessionEntry {
    id: u64,
    serial: String,
    close: oneshot::Sender<Status>,
    outbound: SessionSender,
    /// Where other agents push volumes to this host (from its hello).
    transfer_address: Option<std::net::SocketAddr>,
}

/// What a session sends its agent.
pub type SessionSender = mpsc::Sender<Result<proto::CoordinatorMessage, Status>>;

/// The receiving side of a session's forced close.
pub type CloseSignal = oneshot::Receiver<Status>;

/// The link over the agents' gRPC sessions.
#[derive(Debug, Default)]
pub struct SessionHub {
    next_id: AtomicU64,
    sessions: Mutex<HashMap<HostId, SessionEntry>>,
    next_request: AtomicU64,
    pending: Mutex<HashMap<u64, (HostId, oneshot::Sender<AgentReply>)>>,
}

/// Forgets a pending command when its caller stops waiting, however that happens.
struct PendingCommand<'a> {
    hub: &'a SessionHub,
    request_id: u64,
}

impl Drop for PendingCommand<'_> {
    fn drop(&mut self) {
        self.hub
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.request_id);
    }
}

impl SessionHub {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<HostId, SessionEntry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn outbound(&self, host: &HostId) -> Option<SessionSender> {
        self.sessions().get(host).map(|e| e.outbound.clone())
    }

    /// Registers a session; returns its id and the signal that closes it.
    pub fn register(
        &self,
        host: &HostId,
        serial: &str,
        outbound: SessionSender,
        transfer_address: Option<std::net::SocketAddr>,
    ) -> (u64, CloseSignal) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (close, signal) = oneshot::channel();
        let entry = SessionEntry {
            id,
            serial: serial.to_string(),
            close,
            outbound,
            transfer_address,
        };
        if let Some(old) = self.sessions().insert(host.clone(), entry) {
            let _ = old.close.send(Status::aborted(
                "superseded by a newer session of the same host",
            ));
        }
        (id, signal)
    }

    /// Removes a session if it is still the registered one.
    pub fn unregister(&self, host: &HostId, id: u64) {
        let mut sessions = self.sessions();
        if sessions.get(host).is_some_and(|e| e.id == id) {
            sessions.remove(host);
        }
    }

    /// Hands an agent's answer to its waiting caller; an answer to another host's request, or
    /// to one nobody waits for any more, is dropped (and `false` returned).
    pub fn complete(&self, host: &HostId, reply: AgentReply) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let request_id = reply.request_id();
        match pending.get(&request_id) {
            Some((asked, _)) if asked == host => match pending.remove(&request_id) {
                Some((_, tx)) => tx.send(reply).is_ok(),
                None => false,
            },
            _ => false,
        }
    }

    async fn send_and_wait(
        &self,
        host: &HostId,
        command: AgentCommand,
        wait: Duration,
    ) -> Result<AgentReply, LinkError> {
        let what = command.what();
        let outbound = self.outbound(host).ok_or_else(|| LinkError::NotConnected {
            host: host.clone(),
            what,
        })?;
        // Unique across coordinator restarts too, so a late answer to an old request never
        // completes a new one.
        let sequence = self.next_request.fetch_add(1, Ordering::Relaxed) & 0xfffff;
        let now = berth_shared::clock::Clock::now_unix_ms(&berth_shared::clock::SystemClock);
        let request_id = ((now as u64) << 20) | sequence;
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(request_id, (host.clone(), tx));
        let _pending = PendingCommand {
            hub: self,
            request_id,
        };
        let message = proto::CoordinatorMessage {
            body: Some(command.message(request_id)),
        };
        outbound
            .send(Ok(message))
            .await
            .map_err(|_| LinkError::SessionClosed { host: host.clone() })?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(LinkError::Lost {
                host: host.clone(),
                what,
            }),
            Err(_) => Err(LinkError::NoAnswer {
                host: host.clone(),
                what,
                wait,
            }),
        }
    }

    /// Sends `message` on `outbound` without waiting (inside a runtime only).
    fn send_later(outbound: SessionSender, message: proto::CoordinatorMessage) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = outbound.send(Ok(message)).await;
            });
        }
    }
}

impl AgentLink for SessionHub {
    fn is_connected(&self, host: &HostId) -> bool {
        self.sessions().contains_key(host)
    }

    fn transfer_address(&self, host: &HostId) -> Option<std::net::SocketAddr> {
        self.sessions().get(host).and_then(|e| e.transfer_address)
    }

    fn ask<'a>(&'a self, host: &'a HostId, command: AgentCommand, wait: Duration) -> Answer<'a> {
        Box::pin(self.send_and_wait(host, command, wait))
    }

    fn cancel_transfer(&self, host: &HostId, transfer_id: u64) {
        let Some(outbound) = self.outbound(host) else {
            return;
        };
        let command = proto::CoordinatorMessage {
            body: Some(proto::coordinator_message::Body::Volume(
                proto::VolumeCommand {
                    action: proto::VolumeAction::Cancel as i32,
                    transfer_id,
                    ..Default::default()
                },
            )),
        };
        Self::send_later(outbound, command);
    }

    fn broadcast(&self, body: proto::coordinator_message::Body) {
        let outbound: Vec<SessionSender> = self
            .sessions()
            .values()
            .map(|e| e.outbound.clone())
            .collect();
        for tx in outbound {
            let message = proto::CoordinatorMessage {
                body: Some(body.clone()),
            };
            Self::send_later(tx, message);
        }
    }

    fn close_revoked(&self, serials: &[String]) -> Vec<HostId> {
        let mut sessions = self.sessions();
        let hosts: Vec<HostId> = sessions
            .iter()
            .filter(|(_, e)| serials.contains(&e.serial))
            .map(|(h, _)| h.clone())
            .collect();
        for host in &hosts {
            if let Some(entry) = sessions.remove(host) {
                let _ = entry
                    .close
                    .send(Status::unauthenticated("certificate revoked"));
            }
        }
        hosts
    }
}

#[cfg(test)]
mod tests {
    use berth_shared::ids::TenantId;

    use super::*;

    #[tokio::test]
    async fn a_restart_goes_to_the_hosts_session_and_only_that_host_answers_it() {
        let hub = std::sync::Arc::new(SessionHub::default());
        let (a, b) = (HostId::new("a").unwrap(), HostId::new("b").unwrap());
        let tenant = TenantId::new("t1").unwrap();
        let link: &dyn AgentLink = hub.as_ref();
        let err = link
            .restart(&a, &tenant, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "host \"a\" is not connected: the restart cannot be delivered"
        );
        let (tx, mut rx) = mpsc::channel(4);
        hub.register(&a, "s1", tx, None);
        let waiting = {
            let (hub, a, tenant) = (hub.clone(), a.clone(), tenant.clone());
            tokio::spawn(async move {
                let link: &dyn AgentLink = hub.as_ref();
                link.restart(&a, &tenant, Duration::from_secs(30)).await
            })
        };
        let Some(proto::coordinator_message::Body::Restart(command)) =
            rx.recv().await.unwrap().unwrap().body
        else {
            panic!("a restart command")
        };
        assert_eq!(command.tenant_id, "t1");
        let result = proto::RestartResult {
            tenant_id: "t1".into(),
            request_id: command.request_id,
            ok: true,
            error: String::new(),
            downtime_ms: 640,
        };
        assert!(
            !hub.complete(&b, AgentReply::Restart(result.clone())),
            "another host cannot answer it"
        );
        assert!(hub.complete(&a, AgentReply::Restart(result.clone())));
        assert_eq!(waiting.await.unwrap().unwrap(), result);
        assert!(
            !hub.complete(&a, AgentReply::Restart(result)),
            "answered once"
        );
        // Nobody answers: a deadline, and the request is forgotten.
        let err = link
            .restart(&a, &tenant, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, LinkError::NoAnswer { .. }), "{err}");
        assert!(hub.pending.lock().unwrap().is_empty());
    }

    #[test]
    fn newer_session_supersedes_and_revocation_closes() {
        let hub = SessionHub::default();
        let host = HostId::new("a").unwrap();
        let (first, mut first_signal) = hub.register(&host, "s1", mpsc::channel(1).0, None);
        let (second, mut second_signal) = hub.register(&host, "s2", mpsc::channel(1).0, None);
        assert_eq!(
            first_signal.try_recv().unwrap().code(),
            tonic::Code::Aborted
        );
        hub.unregister(&host, first);
        assert!(
            hub.is_connected(&host),
            "a stale unregister must not remove the newer session"
        );
        assert!(hub.close_revoked(&["s1".into()]).is_empty());
        let closed = hub.close_revoked(&["s2".into()]);
        assert_eq!(closed, vec![host.clone()]);
        assert_eq!(
            second_signal.try_recv().unwrap().code(),
            tonic::Code::Unauthenticated
        );
        hub.unregister(&host, second);
        assert!(!hub.is_connected(&host));
    }
}
