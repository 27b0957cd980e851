//! The coordinator's link to its agents: what it asks of a host's agent and how it learns
//! whether that host is there.
//!
//! Ensures: a command goes only to the host it names and only that host's answer completes it;
//! every wait for an answer is bounded; a host that is not connected is said to be, never
//! waited for. [`SessionHub`] is the link over the agents' gRPC sessions;
//! `testing::agents` plays whole agents in process behind the same trait, so the drain is
//! tested without root.

mod hub;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use berth_shared::ids::{HostId, TenantId};
use berth_shared::proto;

pub use hub::{CloseSignal, SessionHub, SessionSender};

/// Something to ask of a host's agent; the link fills in the request id.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentCommand {
    Restart(TenantId),
    Volume(proto::VolumeCommand),
}

impl AgentCommand {
    /// What the command is, in an error message.
    pub fn what(&self) -> &'static str {
        match self {
            Self::Restart(_) => "restart",
            Self::Volume(_) => "volume command",
        }
    }

    /// The message that carries this command as request `request_id`.
    pub fn message(&self, request_id: u64) -> proto::coordinator_message::Body {
        match self {
            Self::Restart(tenant) => {
                proto::coordinator_message::Body::Restart(proto::RestartCommand {
                    tenant_id: tenant.to_string(),
                    request_id,
                })
            }
            Self::Volume(command) => {
                proto::coordinator_message::Body::Volume(proto::VolumeCommand {
                    request_id,
                    ..command.clone()
                })
            }
        }
    }
}

/// An agent's answer to a command of the coordinator.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentReply {
    Restart(proto::RestartResult),
    Volume(proto::VolumeResult),
}

impl AgentReply {
    pub fn request_id(&self) -> u64 {
        match self {
            AgentReply::Restart(r) => r.request_id,
            AgentReply::Volume(r) => r.request_id,
        }
    }
}

/// Why a command got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("host {:?} is not connected: the {what} cannot be delivered", host.as_str())]
    NotConnected { host: HostId, what: &'static str },
    #[error("host {:?}: session closed", host.as_str())]
    SessionClosed { host: HostId },
    #[error("host {:?}: the {what} result was lost", host.as_str())]
    Lost { host: HostId, what: &'static str },
    #[error(
        "host {:?} did not answer within {wait:?}; the {what} may still finish: see berthctl tenants",
        host.as_str()
    )]
    NoAnswer {
        host: HostId,
        what: &'static str,
        wait: Duration,
    },
    #[error("host {:?} answered the {what} with another kind of result", host.as_str())]
    Mismatched { host: HostId, what: &'static str },
}

/// What an [`AgentLink::ask`] resolves to.
pub type Answer<'a> = Pin<Box<dyn Future<Output = Result<AgentReply, LinkError>> + Send + 'a>>;

/// The coordinator's side of its agents.
pub trait AgentLink: Send + Sync + std::fmt::Debug {
    /// Whether `host`'s agent holds a session now.
    fn is_connected(&self, host: &HostId) -> bool;

    /// Where `host`'s transfer port is, while it is connected and serves one.
    fn transfer_address(&self, host: &HostId) -> Option<SocketAddr>;

    /// Sends `host` the command and waits up to `wait` for its answer.
    fn ask<'a>(&'a self, host: &'a HostId, command: AgentCommand, wait: Duration) -> Answer<'a>;

    /// Tells `host` to stop transfer `transfer_id`, without waiting (its agent does not
    /// answer; a host that is not connected has cancelled its transfers already).
    fn cancel_transfer(&self, host: &HostId, transfer_id: u64);

    /// Sends `body` to every connected agent, without waiting (a host that is not connected
    /// hears the whole of what concerns it at its next session).
    fn broadcast(&self, body: proto::coordinator_message::Body);

    /// Closes the sessions authenticated by any of the revoked `serials`; returns their hosts.
    fn close_revoked(&self, serials: &[String]) -> Vec<HostId>;
}

impl dyn AgentLink {
    /// Asks `host`'s agent to restart `tenant` now and waits up to `wait` for the result.
    pub async fn restart(
        &self,
        host: &HostId,
        tenant: &TenantId,
        wait: Duration,
    ) -> Result<proto::RestartResult, LinkError> {
        let command = AgentCommand::Restart(tenant.clone());
        match self.ask(host, command, wait).await? {
            AgentReply::Restart(result) => Ok(result),
            other => Err(mismatched(host, "restart", &other)),
        }
    }

    /// Asks `host`'s agent to run a volume command and waits up to `wait`.
    pub async fn volume(
        &self,
        host: &HostId,
        command: proto::VolumeCommand,
        wait: Duration,
    ) -> Result<proto::VolumeResult, LinkError> {
        match self.ask(host, AgentCommand::Volume(command), wait).await? {
            AgentReply::Volume(result) => Ok(result),
            other => Err(mismatched(host, "volume command", &other)),
        }
    }
}

/// An agent answered a command with the result of another kind.
fn mismatched(host: &HostId, what: &'static str, reply: &AgentReply) -> LinkError {
    tracing::warn!(%host, what, ?reply, "agent answered with the wrong kind of result");
    LinkError::Mismatched {
        host: host.clone(),
        what,
    }
}
