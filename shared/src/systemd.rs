//! The systemd notification protocol (`sd_notify`) without libsystemd: a daemon started with
//! `Type=notify` says `READY=1` once it serves, `WATCHDOG=1` at half the unit's `WatchdogSec`,
//! and `STOPPING=1` on its way out.
//!
//! Ensures: outside systemd (no `NOTIFY_SOCKET`) every call is a no-op; a watchdog meant for
//! another process (`WATCHDOG_PID`) is ignored.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where notifications go: the socket systemd passed in `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    target: Option<SocketAddr>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let watchdog_for_us = var("WATCHDOG_PID")
            .is_none_or(|pid| pid.parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = var("WATCHDOG_USEC")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|us| *us > 0 && watchdog_for_us)
            .map(Duration::from_micros);
        Self::new(var("NOTIFY_SOCKET").as_deref(), watchdog)
    }

    /// Notifications to `socket` (a path, or `@name` for an abstract socket); `watchdog`: the
    /// unit's watchdog interval.
    pub fn new(socket: Option<&str>, watchdog: Option<Duration>) -> Self {
        let target = socket.and_then(|s| match s.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes()).ok()
            }
            None => SocketAddr::from_pathname(s).ok(),
        });
        Self { target, watchdog }
    }

    /// Sends `state` (such as `READY=1`); `Ok` without a socket.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), target)?;
        Ok(())
    }

    /// How often to send `WATCHDOG=1`: half the unit's interval; `None` without a watchdog.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.target.as_ref()?;
        self.watchdog.map(|w| w / 2)
    }

    /// Says `READY=1` (with a status line), logging rather than failing: a daemon that cannot
    /// reach systemd still runs.
    pub fn ready(&self, status: &str) {
        if let Err(e) = self.notify(&format!("READY=1\nSTATUS={status}")) {
            tracing::warn!(error = %e, "sd_notify READY failed");
        }
    }

    /// Sends `WATCHDOG=1` for as long as the runtime runs (a hung runtime stops the pings and
    /// systemd restarts the daemon).
    pub fn spawn_watchdog(self: std::sync::Arc<Self>) {
        let Some(every) = self.watchdog_every() else {
            return;
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = self.notify("WATCHDOG=1") {
                    tracing::warn!(error = %e, "sd_notify WATCHDOG failed");
                }
            }
        });
    }

    pub fn stopping(&self) {
        let _ = self.notify("STOPPING=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket_and_nothing_happens_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str(), Some(Duration::from_secs(30)));
        n.ready("serving");
        n.notify("WATCHDOG=1").unwrap();
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        assert_eq!(n.watchdog_every(), Some(Duration::from_secs(15)));

        let outside = Notifier::new(None, Some(Duration::from_secs(30)));
        outside.notify("READY=1").unwrap();
        assert_eq!(outside.watchdog_every(), None);
    }

    #[test]
    fn abstract_sockets_work_too() {
        let name = format!("berth-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        Notifier::new(Some(&format!("@{name}")), None)
            .notify("STOPPING=1")
            .unwrap();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }
}
