//! Restarts on the real Docker engine: a nightly restart in its window (a window opened this
//! minute, with a tenant id whose slot falls a few seconds ahead), exactly once, behind the
//! health gate, with the tenant's downtime measured from outside; and `berthctl restart`.

use std::time::Duration;

use berth_tests::docker::inspect;
use berth_tests::fleet::{Fleet, Outage, fleet_with, nightly_slot_soon, unique};
use berth_tests::wait_for;
use jiff::Timestamp;

fn started_at(container: &str) -> Timestamp {
    berth_tests::docker::started_at(container).parse().unwrap()
}

fn timestamp(view: &serde_json::Value, field: &str) -> Option<Timestamp> {
    view[field].as_str().map(|s| s.parse().unwrap())
}

/// A fleet whose agent also restarts containers that started recently (every test tenant
/// did), so the nightly restart is not skipped.
fn restart_fleet() -> Option<Fleet> {
    fleet_with("[restarts]\nskip_if_started_within = \"0s\"\n")
}

/// A 128 MiB test tenant placed and running: its id (from `prefix`) and published port.
fn running_tenant(f: &Fleet, prefix: &str) -> (String, u16) {
    let tenant = unique(prefix);
    f.place(&tenant, "128MiB");
    let view = f.wait_serving(&tenant, Duration::from_secs(10));
    (tenant, view["published_port"].as_u64().unwrap() as u16)
}

#[test]
fn a_nightly_restart_runs_once_in_its_slot_behind_the_health_gate() {
    let Some(f) = restart_fleet() else { return };
    let (tenant, window, slot) = nightly_slot_soon(
        &unique("night"),
        Duration::from_secs(12),
        Duration::from_secs(40),
    );
    f.place_with_window(&tenant, &window);
    let view = f.wait_serving(&tenant, Duration::from_secs(10));
    let port = view["published_port"].as_u64().unwrap() as u16;
    let container = f.container(&tenant);
    let first_start = berth_tests::docker::started_at(&container);
    // The agent reports the slot the test computed, to the second.
    let reported = wait_for("the next restart reported", Duration::from_secs(10), || {
        f.tenant(&tenant)
            .and_then(|t| timestamp(&t, "next_restart"))
    });
    assert!(
        reported.duration_since(slot).abs() <= jiff::SignedDuration::from_secs(1),
        "reported {reported}, slot {slot}"
    );

    let outage = Outage::watch(port);
    // The driver gives the place back only when the gateway answers again.
    let (restarted, after) = f.wait_nightly_restart(&tenant, &first_start, Duration::from_secs(60));
    let restarted: Timestamp = restarted.parse().unwrap();
    assert!(
        restarted >= slot,
        "restarted at {restarted}, before its slot {slot}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let down = outage.stop();
    let note = after["restart_note"].as_str().unwrap();
    assert!(note.contains(": healthy again after "), "{note}");
    eprintln!("nightly restart: the tenant did not answer for {down:?}; the agent says: {note}");
    assert!(down > Duration::ZERO, "a restart is seen from outside");
    assert!(
        down < Duration::from_secs(5),
        "down for {down:?}\n{}",
        f.path_report(&tenant, port)
    );
    // Exactly once: the next one is tomorrow's, and nothing restarts it again meanwhile.
    let next = timestamp(&after, "next_restart").unwrap();
    assert!(
        next.duration_since(slot) > jiff::SignedDuration::from_hours(23),
        "next {next} after slot {slot}"
    );
    // The container's start as Docker saw it, once the agent has looked again.
    wait_for("the last restart reported", Duration::from_secs(15), || {
        f.tenant(&tenant)
            .and_then(|t| timestamp(&t, "last_restart"))
            .filter(|t| *t == restarted.round(jiff::Unit::Second).unwrap())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(started_at(&container), restarted, "restarted once");
    assert_eq!(
        inspect(&container).unwrap()["RestartCount"],
        0,
        "Docker's own restart policy never fired"
    );
}

#[test]
fn berthctl_restart_waits_for_the_health_gate_and_refuses_unknown_tenants() {
    let Some(f) = restart_fleet() else { return };
    let (tenant, port) = running_tenant(&f, "now");
    let container = f.container(&tenant);
    let before = started_at(&container);

    let outage = Outage::watch(port);
    let (ok, out, err) = f.coordinator.berthctl(&["--json", "restart", &tenant]);
    assert!(ok, "{err}");
    // Answered only once healthy: the gateway answers right away.
    let answer = berth_tests::fleet::http_get(port, "/healthz");
    assert_eq!(
        answer.as_deref(),
        Some("ok\n"),
        "{}",
        f.path_report(&tenant, port)
    );
    std::thread::sleep(Duration::from_millis(200));
    let down = outage.stop();
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["tenant_id"], tenant.as_str());
    assert_eq!(done["host_id"], f.agent.host_id.as_str());
    let reported = Duration::from_millis(done["downtime_ms"].as_u64().unwrap());
    eprintln!("berthctl restart: the agent measured {reported:?}; outside, no answer for {down:?}");
    assert!(reported > Duration::ZERO && reported < Duration::from_secs(5));
    assert!(down < Duration::from_secs(5));
    assert!(started_at(&container) > before);

    // The text form and the tenant list.
    let (ok, out, err) = f.coordinator.berthctl(&["restart", &tenant]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!(
            "restarted {tenant} on {}: healthy again after ",
            f.agent.host_id
        )),
        "{out}"
    );
    // The next report carries the note.
    let line = wait_for(
        "the restart in the tenant list",
        Duration::from_secs(10),
        || {
            let (ok, out, _) = f.coordinator.berthctl(&["tenants"]);
            assert!(ok);
            assert!(
                out.lines().next().unwrap().contains("LAST RESTART"),
                "{out}"
            );
            out.lines()
                .find(|l| l.starts_with(&tenant) && l.contains("requested restart at"))
                .map(String::from)
        },
    );
    assert!(line.contains("healthy again after"), "{line}");

    // REST: the same operation and errors.
    let path = format!("/v1/tenants/{tenant}/restart");
    let (code, body) = f.coordinator.rest("POST", &path, None, true);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["tenant_id"], tenant.as_str());
    assert!(body["downtime_ms"].as_u64().unwrap() > 0);
    let (code, body) = f
        .coordinator
        .rest("POST", "/v1/tenants/nosuch/restart", None, true);
    assert_eq!(
        (code, body["code"].as_str()),
        (404, Some("NotFound")),
        "{body}"
    );
    let (code, _) = f.coordinator.rest("POST", &path, None, false);
    assert_eq!(code, 401);

    let (ok, _, err) = f.coordinator.berthctl(&["restart", "nosuch"]);
    assert!(!ok);
    assert!(err.contains("unknown tenant \"nosuch\""), "{err}");
    let (ok, _, err) = f.coordinator.berthctl(&["restart", "Bad/Id"]);
    assert!(!ok);
    assert!(err.contains("tenant_id"), "{err}");
}

/// A gateway that leaves SIGTERM alone (as a Node.js process does unless it handles it) still
/// ends at once on a restart: Docker's init, PID 1 in every tenant container, passes the
/// signal on. As PID 1 itself the gateway would ignore it, and every stop would wait out the
/// 10 s grace period and then kill it.
#[test]
fn a_gateway_that_does_not_handle_sigterm_still_stops_at_once() {
    let Some(f) = restart_fleet() else { return };
    let tenant = unique("noterm");
    f.place_toml(
        &tenant,
        "128MiB",
        (250, 0),
        &[],
        "[env]\nTEST_TENANT_SIGTERM = \"default\"\n",
    );
    f.wait_serving(&tenant, Duration::from_secs(10));
    let container = f.container(&tenant);
    let c = inspect(&container).expect("the container");
    assert_eq!(c["HostConfig"]["Init"], true, "{c}");
    assert!(
        c["Config"]["Env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "TEST_TENANT_SIGTERM=default"),
        "{c}"
    );
    let before = started_at(&container);
    let (ok, out, err) = f.coordinator.berthctl(&["--json", "restart", &tenant]);
    assert!(ok, "{err}");
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    let downtime = Duration::from_millis(done["downtime_ms"].as_u64().unwrap());
    assert!(
        downtime < Duration::from_secs(5),
        "{downtime:?}: the stop waited out the grace period"
    );
    assert!(started_at(&container) > before);
}

/// Clients that knock on a gateway's published port while it restarts get through as soon as
/// it is healthy again. Their connections made the host look up the container's address while
/// nothing answered it; without an announcement from the container, the host's entry would
/// stay unresolved until its next ARP retry (about a second) and hold every connection back.
/// (A CI run once found no entry at all: no client had got through Docker's proxy to the
/// container before the restart was over; one client now knocks at the container's address.)
#[test]
fn clients_that_knocked_during_a_restart_get_through_once_it_is_healthy() {
    let Some(f) = restart_fleet() else { return };
    let (tenant, port) = running_tenant(&f, "knock");
    let c = inspect(&f.container(&tenant)).expect("the container");
    let endpoint = &c["NetworkSettings"]["Networks"][f.network(&tenant)];
    let (address, mac) = (
        endpoint["IPAddress"].as_str().unwrap().to_string(),
        endpoint["MacAddress"].as_str().unwrap().to_string(),
    );
    let bridge = f.bridge(&tenant);

    // Clients through the published port, and one at the container's address on its network:
    // Docker's proxy for the port may come up only as the gateway does, so its clients alone
    // may not make the host look the address up before the restart is over; the direct one
    // does, as soon as the container's new interface is on the bridge.
    let gateway: u16 = c["Config"]["ExposedPorts"]
        .as_object()
        .and_then(|p| p.keys().next())
        .and_then(|p| p.strip_suffix("/tcp"))
        .and_then(|p| p.parse().ok())
        .expect("the gateway port");
    let knocking = Outage::watch(port);
    let knocking_directly =
        Outage::watch_at((address.parse::<std::net::Ipv4Addr>().unwrap(), gateway).into());
    let (ok, out, err) = f.coordinator.berthctl(&["--json", "restart", &tenant]);
    assert!(ok, "{err}");
    // At once, before any retry of the host's own: its entry for the address is resolved.
    let neighbour = std::process::Command::new("ip")
        .args(["neigh", "show", &address, "dev", &bridge])
        .output()
        .expect("ip");
    let neighbour = String::from_utf8_lossy(&neighbour.stdout).to_string();
    assert!(
        neighbour.contains(&format!("lladdr {mac}")),
        "the host's entry for {address} on {bridge}: {neighbour:?}\n{}",
        f.path_report(&tenant, port)
    );
    assert_eq!(
        berth_tests::fleet::http_get(port, "/healthz").as_deref(),
        Some("ok\n")
    );
    let down = knocking.stop();
    let down_directly = knocking_directly.stop();
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!(
        "the agent measured {} ms; the knocking clients, no answer for {down:?} (at the container's address: {down_directly:?})",
        done["downtime_ms"]
    );
}
