//! Egress allowlists on the real Docker engine and the real nft: tenants reach only what their
//! allowlist names, updates apply within a second without restarting anything, and berth
//! leaves dockerd's tables as it found them. Every server connected to is one this test
//! started: in a network namespace routed from the host, on the host's own address, or
//! another tenant; names are answered by a DNS server on loopback that the test runs.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_node_agent::testing::dns::TestNameServer;
use berth_tests::docker::inspect;
use berth_tests::fleet::{Fleet, fleet_with, http_get, unique};
use berth_tests::netns::RoutedNet;
use berth_tests::procs::bin;
use berth_tests::{missing_component, wait_for};

/// The test's name server on 127.0.0.1 (NXDOMAIN for names not set).
struct TestDns(TestNameServer);

impl TestDns {
    fn start() -> Self {
        Self(TestNameServer::start())
    }

    fn set(&self, name: &str, addresses: &[&str]) {
        let addresses: Vec<Ipv4Addr> = addresses.iter().map(|a| a.parse().unwrap()).collect();
        self.0.set(name, &addresses, 60);
    }
}

fn nft(args: &[&str]) -> String {
    let out = Command::new("nft").args(args).output().expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// dockerd's own tables as they settle: two reads half a second apart that agree. dockerd
/// re-inserts its `jump DOCKER-USER` rule (delete, then insert) each time a network is
/// created, so a single read taken while a test alongside creates one can miss that line.
fn docker_tables() -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = docker_tables_now();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = docker_tables_now();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// dockerd's own tables without counters (they move with traffic), and without the lines of
/// tenant bridges and tenant addresses (`bt…` and the default pool `10.213.0.0/16`: Docker's
/// per-network and per-published-port rules, which come and go with the tenants of tests
/// running alongside; the forward guard's rule names the bridges too).
fn docker_tables_now() -> String {
    let mut all = String::new();
    for table in [["ip", "filter"], ["ip", "nat"]] {
        let text = nft(&["list", "table", table[0], table[1]]);
        all.push_str(&text);
    }
    all.lines()
        .filter(|l| !l.contains("\"bt") && !l.contains(" 10.213."))
        .map(without_counts)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `counter packets N bytes M` → `counter`.
fn without_counts(line: &str) -> String {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let mut out = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        out.push(tokens[i]);
        i += if tokens[i] == "counter" && tokens.get(i + 1) == Some(&"packets") {
            5
        } else {
            1
        };
    }
    out.join(" ")
}

/// Lines of berth's table naming a tenant's chain or set (`t_<digest>`).
fn tenant_lines(table: &str) -> usize {
    table
        .lines()
        .filter(|l| {
            ["chain t_", "set t_", "jump t_", "@t_"]
                .iter()
                .any(|p| l.contains(p))
        })
        .count()
}

/// Lines only in one of the two texts, marked `-` (before) or `+` (after).
fn diff_lines(before: &str, after: &str) -> Vec<String> {
    let b: Vec<&str> = before.lines().collect();
    let a: Vec<&str> = after.lines().collect();
    let gone = b
        .iter()
        .filter(|l| !a.contains(l))
        .map(|l| format!("- {l}"));
    let new = a
        .iter()
        .filter(|l| !b.contains(l))
        .map(|l| format!("+ {l}"));
    gone.chain(new).collect()
}

struct Egress {
    f: Fleet,
    dns: TestDns,
    net: RoutedNet,
}

impl Egress {
    fn gateway_port(&self, tenant: &str) -> u16 {
        self.f.tenant(tenant).unwrap()["published_port"]
            .as_u64()
            .unwrap() as u16
    }

    /// Asks `tenant` to open a connection to `addr`: "connected" or "refused: ...".
    fn connect(&self, tenant: &str, addr: &str) -> String {
        http_get(self.gateway_port(tenant), &format!("/connect?addr={addr}"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    fn egress_set(&self, tenant: &str, entries: &[&str]) -> Instant {
        let mut args = vec!["egress", "set", tenant];
        args.extend_from_slice(entries);
        let (ok, _, err) = self.f.coordinator.berthctl(&args);
        assert!(ok, "{err}");
        Instant::now()
    }

    /// Polls `tenant` connecting to `addr` until the outcome is `want`; the time it took.
    fn until(&self, tenant: &str, addr: &str, want: bool, since: Instant) -> Duration {
        let port = self.gateway_port(tenant);
        loop {
            let r = http_get(port, &format!("/connect?addr={addr}")).unwrap_or_default();
            if r.starts_with("connected") == want {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < Duration::from_secs(10),
                "{tenant} → {addr}: still {r:?} after 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn table(&self) -> String {
        nft(&["list", "table", "inet", &self.f.agent.nft_table()])
    }
}

fn setup() -> Option<Egress> {
    if !berth_tests::is_root() {
        missing_component("root (nft, network namespaces)", "not root");
        return None;
    }
    let net = match RoutedNet::new() {
        Ok(n) => n,
        Err(e) => {
            missing_component("network namespaces", &e);
            return None;
        }
    };
    let dns = TestDns::start();
    let f = fleet_with(&format!(
        "[egress]\nname_servers = [\"127.0.0.1:{}\"]\ntenant_resolvers = []\nttl_floor = \"1s\"\n",
        dns.0.addr().port()
    ))?;
    Some(Egress { f, dns, net })
}

#[test]
fn allowlists_confine_tenants_and_change_live() {
    let Some(mut e) = setup() else { return };
    let server = bin("berth-test-tenant");
    e.net.serve(&server, 8080);
    e.net.serve(&server, 9090);
    let (allowed, other) = (e.net.address(2), e.net.address(3));
    e.dns.set("allowed.test", &[&allowed]);
    wait_for("the test servers", Duration::from_secs(5), || {
        Command::new("ip")
            .args(["netns", "exec", &e.net.netns, "ss", "-ltn"])
            .output()
            .ok()
            .filter(|o| {
                let s = String::from_utf8_lossy(&o.stdout);
                s.contains(":8080") && s.contains(":9090")
            })
    });
    let docker_before = docker_tables();

    let a = unique("ega");
    let b = unique("egb");
    e.f.place_spec(&a, "64MiB", 100, &["allowed.test:8080"]);
    e.f.place_spec(&b, "64MiB", 100, &[]);
    e.f.wait_serving(&a, Duration::from_secs(10));
    e.f.wait_serving(&b, Duration::from_secs(10));
    let container_a = e.f.container(&a);
    let started = inspect(&container_a).unwrap()["State"]["StartedAt"].clone();

    // IPv6 is off inside the tenant: no address at all, so no link-local path to the host.
    let pid = inspect(&container_a).unwrap()["State"]["Pid"]
        .as_u64()
        .unwrap();
    let inet6 = std::fs::read_to_string(format!("/proc/{pid}/net/if_inet6")).unwrap_or_default();
    assert!(
        inet6.trim().is_empty(),
        "IPv6 addresses in the tenant: {inet6}"
    );

    // Allowed by name; a non-allowed server in the same network, and a non-allowed port of
    // the allowed server, are refused.
    assert_eq!(e.connect(&a, &format!("{allowed}:8080")), "connected");
    for denied in [format!("{other}:8080"), format!("{allowed}:9090")] {
        let r = e.connect(&a, &denied);
        assert!(r.starts_with("refused"), "{a} → {denied}: {r}");
    }
    // B allows nothing.
    let r = e.connect(&b, &format!("{allowed}:8080"));
    assert!(r.starts_with("refused"), "{r}");
    // Not the other tenant, not the host: its address on the tenant bridge, on the routed
    // link, and a listener the test opens on every host address.
    let b_ip = inspect(&e.f.container(&b)).unwrap()["NetworkSettings"]["Networks"][e.f.network(&b)]
        ["IPAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let a_gateway = inspect(&container_a).unwrap()["NetworkSettings"]["Networks"][e.f.network(&a)]
        ["Gateway"]
        .as_str()
        .unwrap()
        .to_string();
    let host_listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    for target in [
        format!("{b_ip}:18789"),
        format!("{a_gateway}:{host_port}"),
        format!("{}:{host_port}", e.net.address(1)),
    ] {
        let r = e.connect(&a, &target);
        assert!(r.starts_with("refused"), "{a} → {target}: {r}");
    }

    // Hits per entry and denials are reported.
    let view = wait_for("hits reported", Duration::from_secs(15), || {
        e.f.tenant(&a).filter(|t| {
            t["egress"][0]["hits"].as_u64() > Some(0)
                && t["egress_denied_packets"].as_u64() > Some(0)
        })
    });
    assert_eq!(view["egress"][0]["entry"], "allowed.test:8080/tcp");
    assert_eq!(view["egress"][0]["addresses"][0], allowed.as_str());

    // An established connection, then an unrelated update adding an entry: it takes effect
    // within a second, the connection survives, the container is the same.
    let held = http_get(e.gateway_port(&a), &format!("/hold?addr={allowed}:8080")).unwrap();
    assert_eq!(held.trim(), "held 0");
    let since = e.egress_set(&a, &["allowed.test:8080", &format!("{other}:8080")]);
    let took = e.until(&a, &format!("{other}:8080"), true, since);
    assert!(took < Duration::from_secs(1), "adding took {took:?}");
    let check = http_get(e.gateway_port(&a), "/check?id=0").unwrap();
    assert_eq!(check.trim(), "alive", "the established connection survives");
    // Removing an entry also within a second.
    let since = e.egress_set(&a, &["allowed.test:8080"]);
    let took = e.until(&a, &format!("{other}:8080"), false, since);
    assert!(took < Duration::from_secs(1), "removing took {took:?}");
    assert_eq!(
        inspect(&container_a).unwrap()["State"]["StartedAt"],
        started,
        "no restart for an allowlist change"
    );

    // A name that stops resolving keeps its addresses for the grace period and says why; a
    // name that never resolved allows nothing and is named in the status.
    e.egress_set(&a, &["allowed.test:8080", "nosuch.test:443"]);
    let view = wait_for(
        "the unresolvable name reported",
        Duration::from_secs(10),
        || {
            e.f.tenant(&a)
                .filter(|t| t["egress"][1]["error"] == "does not resolve (NXDOMAIN)")
        },
    );
    assert!(
        view["message"]
            .as_str()
            .unwrap()
            .contains("egress nosuch.test:443/tcp: does not resolve (NXDOMAIN)"),
        "{view}"
    );
    assert_eq!(e.connect(&a, &format!("{allowed}:8080")), "connected");

    // A name whose answer is the cloud metadata service allows nothing, and says why.
    e.dns.set("metadata.test", &["169.254.169.254"]);
    e.egress_set(&a, &["allowed.test:8080", "metadata.test:80"]);
    wait_for(
        "the metadata name reported",
        Duration::from_secs(10),
        || {
            e.f.tenant(&a).filter(|t| {
                t["egress"][1]["error"]
                    == "metadata.test resolves to 169.254.169.254, which is link-local (the cloud metadata service is 169.254.169.254): never allowed"
            })
        },
    );
    assert!(!e.table().contains("169.254"), "{}", e.table());

    // Bad entries are refused by name and change nothing.
    e.egress_set(&a, &["allowed.test:8080"]);
    let before = e.table();
    for (entries, expected) in [
        (&["10.0.0.0/33:443"][..], "invalid egress[0].destination"),
        (&["203.0.113.1:0"], "invalid egress[0].port"),
        (&["203.0.113.1:65536"], "invalid egress[0].port"),
        (&["0.0.0.0/0:443"], "allows the whole Internet"),
        (&["api.example.test"], "invalid egress[0]"),
        (
            &["169.254.169.254:80"],
            "invalid egress[0].destination: 169.254.169.254/32 includes link-local (the cloud metadata service is 169.254.169.254) addresses: never allowed",
        ),
        (
            &["10.213.0.0/16:443"],
            "invalid egress[0].destination: 10.213.0.0/16 overlaps the tenant networks 10.213.0.0/16: never allowed",
        ),
        (
            &["0.0.0.0/1:443", "128.0.0.0/1:443"],
            "invalid egress[0].destination: 0.0.0.0/1 includes \"this network\"",
        ),
        (
            &["64.0.0.0/3:443", "160.0.0.0/5:443"],
            "invalid egress: the entries cover 15.6250 % of the IPv4 space together",
        ),
    ] {
        let mut args = vec!["egress", "set", a.as_str()];
        args.extend_from_slice(entries);
        let (ok, _, err) = e.f.coordinator.berthctl(&args);
        assert!(!ok && err.contains(expected), "{entries:?}: {err}");
    }

    // The agent killed and restarted: rules stay in force meanwhile and after.
    let rules_before = tenant_lines(&e.table());
    e.f.agent.kill9();
    assert!(
        e.connect(&a, &format!("{other}:8080"))
            .starts_with("refused")
    );
    assert_eq!(e.connect(&a, &format!("{allowed}:8080")), "connected");
    e.f.agent.start_with_docker(true);
    std::thread::sleep(Duration::from_secs(2));
    assert!(rules_before >= 8, "{}", e.table());
    assert_eq!(tenant_lines(&e.table()), rules_before, "{}", e.table());
    assert_eq!(e.connect(&a, &format!("{allowed}:8080")), "connected");
    assert_eq!(before.lines().count(), e.table().lines().count());

    // Removal leaves no chain or set of the tenants; dockerd's tables are as before.
    for t in [&a, &b] {
        let (ok, _, err) = e.f.coordinator.berthctl(&["remove", t]);
        assert!(ok, "{err}");
    }
    wait_for("the rules removed", Duration::from_secs(15), || {
        let t = e.table();
        (tenant_lines(&t) == 0).then_some(())
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while docker_tables() != docker_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = docker_tables();
    let changed: Vec<String> = diff_lines(&docker_before, &after);
    assert!(changed.is_empty(), "dockerd's tables changed: {changed:#?}");
}

/// Fail closed: with berth's table deleted and the agent stopped, a tenant reaches nothing,
/// not even what its allowlist names (Docker's DOCKER-USER chain drops what berth's table did
/// not mark as accepted); with the agent back, its table and its allowlist are back.
#[test]
fn with_its_table_deleted_and_the_agent_stopped_a_tenant_reaches_nothing() {
    let Some(mut e) = setup() else { return };
    let server = bin("berth-test-tenant");
    e.net.serve(&server, 8080);
    let allowed = e.net.address(2);
    wait_for("the test server", Duration::from_secs(5), || {
        Command::new("ip")
            .args(["netns", "exec", &e.net.netns, "ss", "-ltn"])
            .output()
            .ok()
            .filter(|o| String::from_utf8_lossy(&o.stdout).contains(":8080"))
    });
    let a = unique("egf");
    e.f.place_spec(&a, "64MiB", 100, &[&format!("{allowed}:8080")]);
    e.f.wait_serving(&a, Duration::from_secs(10));
    assert_eq!(e.connect(&a, &format!("{allowed}:8080")), "connected");
    let guard = Command::new("iptables")
        .args(["-S", "DOCKER-USER"])
        .output()
        .unwrap();
    let guard = String::from_utf8_lossy(&guard.stdout).to_string();
    assert!(
        guard.contains("-A DOCKER-USER -i bt+ -m mark ! --mark 0x10000000/0x10000000 -j DROP"),
        "{guard}"
    );

    e.f.agent.kill9();
    let table = e.f.agent.nft_table();
    let deleted = Command::new("nft")
        .args(["delete", "table", "inet", &table])
        .status()
        .unwrap();
    assert!(deleted.success());
    let r = e.connect(&a, &format!("{allowed}:8080"));
    assert!(
        r.starts_with("refused"),
        "with no table and no agent the tenant still got out: {r}"
    );

    e.f.agent.start_with_docker(true);
    let back = e.until(&a, &format!("{allowed}:8080"), true, Instant::now());
    assert!(back < Duration::from_secs(10), "{back:?}");
    assert!(tenant_lines(&e.table()) > 0, "{}", e.table());
    let (ok, _, err) = e.f.coordinator.berthctl(&["remove", &a]);
    assert!(ok, "{err}");
}
