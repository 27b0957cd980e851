//! The daemons speak systemd's notification protocol as `Type=notify` units need: `READY=1`
//! once serving, `WATCHDOG=1` at half `WATCHDOG_USEC`, `STOPPING=1` on SIGTERM — checked on a
//! socket the test binds in place of systemd's.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use berth_tests::procs::{AgentProc, CoordinatorProc};

/// Collects what arrives on `socket` for `within`.
fn messages(socket: &UnixDatagram, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    out
}

fn sigterm(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

#[test]
fn both_daemons_say_ready_feed_the_watchdog_and_say_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator_socket = dir.path().join("coordinator.notify");
    let listener = UnixDatagram::bind(&coordinator_socket).unwrap();
    let path = coordinator_socket.to_str().unwrap().to_string();
    let mut coordinator = CoordinatorProc::start_with_env(
        None,
        "",
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "1000000")],
    );
    let said = messages(&listener, Duration::from_millis(1800));
    assert!(
        said[0].starts_with("READY=1\nSTATUS=agents on 127.0.0.1:"),
        "{said:?}"
    );
    let pings = said.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(pings >= 3, "a ping every 0.5 s: {said:?}");

    let agent_socket = dir.path().join("agent.notify");
    let agent_listener = UnixDatagram::bind(&agent_socket).unwrap();
    let mut agent = AgentProc::enroll(&coordinator, "notify-host", None);
    agent.env = vec![
        (
            "NOTIFY_SOCKET".into(),
            agent_socket.to_str().unwrap().into(),
        ),
        ("WATCHDOG_USEC".into(), "1000000".into()),
        // A watchdog meant for another process is not ours to feed.
        ("WATCHDOG_PID".into(), "1".into()),
    ];
    agent.start();
    let said = messages(&agent_listener, Duration::from_millis(1500));
    assert_eq!(said, vec!["READY=1\nSTATUS=enforcing as notify-host"]);

    sigterm(agent.pid().unwrap());
    assert_eq!(
        messages(&agent_listener, Duration::from_secs(3)),
        vec!["STOPPING=1"]
    );
    agent.kill9();
    let _ = messages(&listener, Duration::from_millis(10));
    sigterm(coordinator.pid().unwrap());
    let said = messages(&listener, Duration::from_secs(2));
    assert!(said.contains(&"STOPPING=1".to_string()), "{said:?}");
    coordinator.kill9();
}
