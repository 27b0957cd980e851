use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::Request as HttpRequest;
use berth_shared::metrics::testing;
use berth_shared::proto;
use tower::ServiceExt;

use super::*;
use crate::api::views::rfc3339;
use crate::dashboard::pages::gib;
use crate::testing::seed;

/// The fleet as the placements and the registry hold it, summed here independently of the
/// dashboard: (hosts per state, tenants, committed bytes, used bytes) and per host
/// (tenants, committed, used).
struct Truth {
    states: BTreeMap<&'static str, usize>,
    tenants: usize,
    committed: u64,
    used: u64,
    per_host: BTreeMap<String, (u32, u64, u64)>,
}

fn truth(c: &Coordinator) -> Truth {
    let now = c.registry.now();
    let mut states = BTreeMap::new();
    for h in c.registry.hosts().unwrap() {
        *states
            .entry(h.state(now, c.config.down_after).as_str())
            .or_default() += 1;
    }
    let tenants = c.placements.tenants(None);
    let mut per_host: BTreeMap<String, (u32, u64, u64)> = BTreeMap::new();
    let (mut committed, mut used) = (0, 0);
    for t in &tenants {
        let cap = t.spec.as_ref().unwrap().resources.unwrap().memory_bytes;
        let u = t.status.as_ref().unwrap().memory_used_bytes;
        let host = t.placement.as_ref().unwrap().host_id.clone();
        let e = per_host.entry(host).or_default();
        *e = (e.0 + 1, e.1 + cap, e.2 + u);
        committed += cap;
        used += u;
    }
    Truth {
        states,
        tenants: tenants.len(),
        committed,
        used,
        per_host,
    }
}

#[test]
fn the_fleet_page_shows_the_seeded_fleets_figures() {
    let c = seed::seeded(40, 600).unwrap();
    let t = truth(&c);
    assert_eq!(t.tenants, 600, "everything fits in 40 hosts");
    assert_eq!(t.states.get("cordoned"), Some(&2), "hosts 3 and 28");
    assert_eq!(t.states.get("down"), Some(&1), "host 7");
    let html = fleet_page(&c).unwrap();
    // Cards.
    assert!(html.contains("<small>hosts</small><b>40</b><small>37 ready · 2 cordoned · 0 draining · 1 down</small>"), "{html}");
    assert!(html.contains(&format!(
        "<small>tenants</small><b>600</b><small>{:.1} per host</small>",
        600.0 / 40.0
    )));
    assert!(html.contains(&format!(
        "<small>{} committed · {} used</small>",
        gib(t.committed),
        gib(t.used)
    )));
    // The cost: every seeded host's price, summed from the registry.
    let cost: u64 = c
        .registry
        .hosts()
        .unwrap()
        .iter()
        .map(|h| h.facts.as_ref().unwrap().monthly_cost_cents)
        .sum();
    assert!(html.contains(&format!(
        "<small>monthly cost</small><b>{:.2} EUR</b><small>{:.2} EUR per tenant</small>",
        cost as f64 / 100.0,
        cost as f64 / 100.0 / 600.0
    )));
    // The "all" row of the groups table, and one row per provider.
    assert!(html.contains("<tr><td>all</td><td class=\"n\">40</td><td class=\"n\">600</td>"));
    let hetzner: u32 = t
        .per_host
        .iter()
        .filter(|(h, _)| h.starts_with("hetzner-"))
        .map(|(_, v)| v.0)
        .sum();
    let hetzner_hosts = c
        .registry
        .hosts()
        .unwrap()
        .iter()
        .filter(|h| h.host_id.as_str().starts_with("hetzner-"))
        .count();
    assert!(html.contains(&format!(
        "<tr><td>hetzner</td><td class=\"n\">{hetzner_hosts}</td><td class=\"n\">{hetzner}</td>"
    )));
    // Every host has its row, with its own figures and state.
    for h in c.registry.hosts().unwrap() {
        let id = h.host_id.as_str();
        let (n, committed, used) = t.per_host.get(id).copied().unwrap_or_default();
        let state = h.state(c.registry.now(), c.config.down_after).as_str();
        let facts = h.facts.as_ref().unwrap();
        let class = if state == "ready" {
            String::new()
        } else {
            format!(" class=\"{state}\"")
        };
        let row = format!(
            "<tr{class}><td><a href=\"/hosts/{id}\">{id}</a></td><td>{} {} {}</td><td>{state}</td><td>{n}</td>",
            facts.provider.as_str(),
            facts.region,
            facts.instance_type
        );
        assert!(html.contains(&row), "{row}");
        let figures = format!(
            "</svg></td><td>{}/{}/{}</td>",
            gib(used),
            gib(committed),
            gib(facts.memory_total_bytes - facts.memory_reserved_bytes)
        );
        assert!(html.contains(&figures), "{id}: {figures}");
    }
    assert_eq!(
        html.matches("<tr><td><a href=\"/hosts/").count(),
        37,
        "ready hosts"
    );
    assert_eq!(html.matches("<tr class=\"cordoned\">").count(), 2);
    assert_eq!(html.matches("<tr class=\"down\">").count(), 1);
}

#[test]
fn what_still_fits_counts_room_on_ready_hosts_by_memory_cpu_and_disk() {
    let c = seed::seeded(40, 600).unwrap();
    let snapshot = snapshot(&c).unwrap();
    let figures = figures::FleetFigures::of(&snapshot);
    let now = c.registry.now();
    let loads = c.placements.host_loads();
    for (tier, fit) in c.config.tiers.iter().zip(&figures.fits) {
        let r = tier.tier.resources;
        let mut expected = 0;
        for h in c.registry.hosts().unwrap() {
            if h.state(now, c.config.down_after).as_str() != "ready" {
                continue;
            }
            let f = h.facts.as_ref().unwrap();
            let load = loads.get(&h.host_id).copied().unwrap_or_default();
            let memory = (f.memory_total_bytes - f.memory_reserved_bytes - load.memory_committed)
                / r.memory_bytes;
            let cpu = (u64::from(f.cpu_count) * 1000 - load.cpu_committed_millicores)
                / u64::from(r.cpu_millicores);
            let disk = (f.disk_total_bytes / 10 * 9 - load.disk_committed) / r.volume_bytes;
            expected += memory.min(cpu).min(disk);
        }
        assert_eq!(fit.total, expected, "{}", tier.tier.name);
        assert!(expected > 0);
        assert_eq!(fit.regions.iter().map(|r| r.tenants).sum::<u64>(), expected);
    }
    let html = pages::fleet(&snapshot).into_string();
    let pro = &figures.fits[2];
    assert!(html.contains(&format!("<td class=\"n\">{}</td>", pro.total)));
    // A full fleet says where to add capacity.
    let full = seed::seeded(2, 10_000).unwrap();
    let html = fleet_page(&full).unwrap();
    assert!(html.contains("nowhere: add a host"), "{html}");
}

#[test]
fn a_host_page_lists_its_tenants_with_their_figures() {
    let b = seed::backend(10, 120).unwrap();
    let c = &b.coordinator;
    let host = c
        .registry
        .hosts()
        .unwrap()
        .into_iter()
        .map(|h| h.host_id)
        .find(|h| !c.placements.tenants(Some(h)).is_empty())
        .expect("a host with tenants");
    let html = host_page(&b.drainer, &host).unwrap().unwrap();
    let tenants = c.placements.tenants(Some(&host));
    assert_eq!(html.matches("<tr><td>tenant-").count(), tenants.len());
    for t in tenants {
        let v = TenantView::from(&t);
        // The bar is its use against its cap (nothing committed beyond use).
        let row = format!(
            "<td>{}</td><td class=\"n\">{} / {}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td class=\"backup\">-</td><td class=\"n\">{}</td>",
            super::pages::ram_bar(v.memory_cap_bytes, 0, 0, v.memory_used_bytes).into_string(),
            v.memory_used_bytes >> 20,
            v.memory_cap_bytes >> 20,
            v.oom_kills,
            v.last_restart.as_deref().unwrap(),
            v.next_restart.as_deref().unwrap(),
            v.egress_denied_packets
        );
        assert!(html.contains(&format!("<tr><td>{}</td><td>running</td>", v.tenant_id)));
        assert!(html.contains(&row), "{row}");
    }
    assert_eq!(
        host_page(&b.drainer, &HostId::new("nosuch").unwrap()).unwrap(),
        None
    );
    // Messages wrap in their column instead of widening the table.
    assert!(html.contains("<td class=\"msg\">"));
}

/// Tenants whose last good backup is older than two intervals (or who never had one though
/// their host tried) stand out on their host's page; /metrics has each one's last good backup.
#[tokio::test]
async fn tenants_whose_backups_are_overdue_stand_out() {
    let b = seed::backend(2, 6).unwrap();
    let c = &b.coordinator;
    let host = c.registry.hosts().unwrap()[0].host_id.clone();
    let now = c.registry.now();
    let hour = 3_600_000;
    let mut statuses: Vec<proto::TenantStatus> = c
        .placements
        .tenants(Some(&host))
        .into_iter()
        .filter_map(|t| t.status)
        .collect();
    assert!(statuses.len() >= 3);
    let report = |ok: bool, last_good: i64| proto::BackupReport {
        unix_ms: now - hour,
        ok,
        snapshot_id: if ok { "cabe28d5".into() } else { String::new() },
        error: if ok {
            String::new()
        } else {
            "restic backup in /srv: Fatal: unable to open config file".into()
        },
        last_good_unix_ms: last_good,
        ..Default::default()
    };
    statuses[0].last_backup = Some(report(true, now - hour));
    statuses[1].last_backup = Some(report(false, now - 49 * hour));
    statuses[2].last_backup = Some(report(false, 0));
    let ids: Vec<String> = statuses.iter().map(|s| s.tenant_id.clone()).collect();
    c.placements.record_statuses(&host, statuses);
    let html = host_page(&b.drainer, &host).unwrap().unwrap();
    let good = rfc3339(now - hour).unwrap();
    assert!(
        html.contains(&format!("<tr><td>{}</td>", ids[0])),
        "a good one does not stand out"
    );
    assert!(html.contains(&format!("<td class=\"backup\">{good}</td>")));
    for (id, text) in [
        (
            &ids[1],
            format!("{} (last failed)", rfc3339(now - 49 * hour).unwrap()),
        ),
        (&ids[2], "never (failed)".to_string()),
    ] {
        assert!(
            html.contains(&format!("<tr class=\"backup-overdue\"><td>{id}</td>")),
            "{id} stands out"
        );
        assert!(
            html.contains(&format!("<td class=\"backup\">{text}</td>")),
            "{text}"
        );
    }
    let (status, _, text) = get(router(b.clone(), HttpAccess::Loopback), "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    let last_good = |id: &str| {
        testing::value(
            &text,
            "berth_tenant_last_backup_timestamp_seconds",
            &[("tenant", id), ("host", host.as_str())],
        )
    };
    assert_eq!(last_good(&ids[0]), ((now - hour) / 1000) as f64);
    assert_eq!(last_good(&ids[2]), 0.0);
    let ok = |id: &str| {
        testing::value(
            &text,
            "berth_tenant_last_backup_ok",
            &[("tenant", id), ("host", host.as_str())],
        )
    };
    assert_eq!((ok(&ids[0]), ok(&ids[1])), (1.0, 0.0));
}

#[test]
fn a_tenants_bar_shows_its_use_against_its_cap_and_is_empty_at_zero_use() {
    assert_eq!(
        super::pages::ram_bar(512 << 20, 0, 0, 0).into_string(),
        r#"<svg class="bar"></svg>"#,
        "nothing used: all free"
    );
}

async fn get(router: Router, path: &str, auth: Option<&str>) -> (StatusCode, HeaderMap, String) {
    get_as(router, "127.0.0.1:7480", path, auth).await
}

/// A GET with `host` as its `Host` header.
async fn get_as(
    router: Router,
    host: &str,
    path: &str,
    auth: Option<&str>,
) -> (StatusCode, HeaderMap, String) {
    let mut request = HttpRequest::get(path).header(header::HOST, host);
    if let Some(a) = auth {
        request = request.header(header::AUTHORIZATION, a);
    }
    let response = router
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 24).await.unwrap();
    (
        parts.status,
        parts.headers,
        String::from_utf8(bytes.to_vec()).unwrap(),
    )
}

#[tokio::test]
async fn off_loopback_every_page_needs_a_read_token() {
    let b = seed::backend(3, 10).unwrap();
    let c = b.coordinator.clone();
    let day = std::time::Duration::from_secs(86_400);
    let name = |n: &str| berth_shared::ids::HostId::new(n).unwrap();
    let (token, _) = c
        .registry
        .create_operator_token(&name("viewer"), Scope::Read, day)
        .unwrap();
    let (admin, _) = c
        .registry
        .create_operator_token(&name("ops"), Scope::Admin, day)
        .unwrap();
    let guarded = router(b.clone(), HttpAccess::ReadToken);
    for path in ["/", "/hosts/hetzner-fsn1-000", "/metrics"] {
        let (status, headers, _) = get(guarded.clone(), path, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            headers[header::WWW_AUTHENTICATE],
            "Basic realm=\"berth\", charset=\"UTF-8\""
        );
        let (status, _, _) = get(guarded.clone(), path, Some("Bearer bto_wrong")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        // A credential that could change the fleet is refused here, so it never travels to
        // this port's clients (a Prometheus scrape over plain HTTP, say).
        let (status, _, body) = get(guarded.clone(), path, Some(&format!("Bearer {admin}"))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert!(body.contains("takes read tokens only"), "{body}");
    }
    let (status, _, body) = get(guarded.clone(), "/", Some(&format!("Bearer {token}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("<small>hosts</small><b>3</b>"));
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("alice:{token}"));
    let (status, _, _) = get(guarded.clone(), "/metrics", Some(&format!("Basic {basic}"))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = get(guarded.clone(), "/healthz", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
    // Revoked: refused at once.
    c.registry.revoke_operator_tokens(&name("viewer")).unwrap();
    let (status, _, body) = get(guarded, "/", Some(&format!("Bearer {token}"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("invalid, revoked or expired"), "{body}");
}

/// On loopback the pages are open, to loopback names only: a page on another origin whose
/// name resolves to 127.0.0.1 (DNS rebinding) gets nothing.
#[tokio::test]
async fn on_loopback_the_pages_answer_only_to_loopback_names() {
    let open = router(seed::backend(3, 10).unwrap(), HttpAccess::Loopback);
    for host in [
        "127.0.0.1:7480",
        "localhost:7480",
        "LOCALHOST",
        "[::1]:7480",
        "127.0.0.2",
    ] {
        let (status, _, _) = get_as(open.clone(), host, "/", None).await;
        assert_eq!(status, StatusCode::OK, "{host}");
    }
    for host in [
        "evil.example:7480",
        "127.0.0.1.evil.example",
        "10.0.0.1:7480",
        "",
    ] {
        let (status, _, body) = get_as(open.clone(), host, "/metrics", None).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{host}");
        assert!(body.contains("answers only to localhost"), "{body}");
    }
    let (status, _, _) = get_as(open, "evil.example", "/healthz", None).await;
    assert_eq!(status, StatusCode::OK, "health stays open");
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_match_the_fleet() {
    let b = seed::backend(20, 300).unwrap();
    let c = b.coordinator.clone();
    let t = truth(&c);
    let (status, headers, text) =
        get(router(b.clone(), HttpAccess::Loopback), "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers[header::CONTENT_TYPE],
        berth_shared::metrics::CONTENT_TYPE
    );
    let value = |name: &str, labels: &[(&str, &str)]| testing::value(&text, name, labels);
    assert_eq!(value("berth_coordinator_leading", &[]), 1.0);
    for (state, n) in &t.states {
        assert_eq!(value("berth_hosts", &[("state", state)]), *n as f64);
    }
    for (host, (n, committed, used)) in &t.per_host {
        assert_eq!(
            value("berth_host_tenants", &[("host", host)]),
            f64::from(*n)
        );
        let memory = |kind| value("berth_host_memory_bytes", &[("host", host), ("kind", kind)]);
        assert_eq!(memory("committed"), *committed as f64);
        assert_eq!(memory("used"), *used as f64);
    }
    let tenant = c.placements.tenants(None).remove(0);
    let v = TenantView::from(&tenant);
    let labels = [
        ("tenant", v.tenant_id.as_str()),
        ("host", v.host_id.as_str()),
    ];
    assert_eq!(
        value("berth_tenant_memory_cap_bytes", &labels),
        v.memory_cap_bytes as f64
    );
    assert_eq!(
        value("berth_tenant_oom_kills_total", &labels),
        v.oom_kills as f64
    );
    // Every host reported 3 s ago, but host 7, which stopped a minute before.
    for h in c.registry.hosts().unwrap() {
        let expected = if h.host_id.as_str().ends_with("-007") {
            63.0
        } else {
            3.0
        };
        assert_eq!(
            value(
                "berth_host_report_age_seconds",
                &[("host", h.host_id.as_str())]
            ),
            expected
        );
    }
    // The placement histogram counts what goes through the API path.
    let spec = berth_shared::proto::TenantSpec {
        tenant_id: "via-api".into(),
        image: "ghcr.io/openclaw/gateway:1".into(),
        tier: "individual".into(),
        ..Default::default()
    };
    c.place(spec).await.unwrap();
    c.place(berth_shared::proto::TenantSpec::default())
        .await
        .unwrap_err();
    let text = crate::dashboard::prometheus::render(&c).unwrap();
    let buckets = testing::histogram(&text, "berth_placement_duration_seconds");
    assert_eq!(
        buckets.len(),
        berth_shared::metrics::LATENCY_BUCKETS.len() + 1
    );
    assert_eq!(buckets.last().unwrap().1, 1.0, "one placement made");
    assert!(text.contains("berth_placement_duration_seconds_count 1\n"));
    assert!(text.contains("berth_placements_refused_total 1\n"));
}

#[tokio::test]
async fn a_draining_hosts_page_shows_each_moves_target_and_phase() {
    let b = seed::backend(10, 60).unwrap();
    let c = &b.coordinator;
    let host = c
        .registry
        .hosts()
        .unwrap()
        .into_iter()
        .map(|h| h.host_id)
        .max_by_key(|h| c.placements.host_usage(h).0)
        .unwrap();
    let before = host_page(&b.drainer, &host).unwrap().unwrap();
    assert!(!before.contains("Drain:"), "no drain, no drain section");
    let status = b
        .drainer
        .drain(crate::drain::DrainOptions {
            host: host.clone(),
            dry_run: false,
            deadline: std::time::Duration::from_secs(600),
            max_parallel: 2,
            force_lost: false,
            empty: false,
            no_precopy: false,
        })
        .await
        .unwrap();
    assert!(!status.moves.is_empty());
    let html = host_page(&b.drainer, &host).unwrap().unwrap();
    assert!(html.contains("<h2>Drain: running</h2>"), "{html}");
    for m in &status.moves {
        let row = format!(
            "<tr><td>{}</td><td><a href=\"/hosts/{}\">{}</a></td><td>planned</td>",
            m.tenant_id, m.target_host_id, m.target_host_id
        );
        assert!(html.contains(&row), "{row}");
    }
}

#[test]
fn the_fleet_page_shows_what_a_compaction_saves_and_each_hosts_cpu_requested_and_used() {
    // Few tenants on many hosts: most hosts can be emptied into the others.
    let c = seed::seeded(40, 120).unwrap();
    let plan = c.placements.plan_compaction(
        &crate::placement::compaction::CompactOptions::default(),
        false,
    );
    assert!(
        !plan.emptied.is_empty() && plan.saving_cents() > 0,
        "{plan:?}"
    );
    let snapshot = snapshot(&c).unwrap();
    assert_eq!(snapshot.saving.monthly_cost_cents, plan.saving_cents());
    let html = pages::fleet(&snapshot).into_string();
    assert!(
        html.contains(&format!(
            "a compaction saves now</small><b>{:.2} EUR</b><small>{} hosts, {} moves: <code>berthctl compact</code>",
            plan.saving_cents() as f64 / 100.0,
            plan.emptied.len(),
            plan.moves()
        )),
        "{html}"
    );
    let loads = c.placements.host_loads();
    for h in c.registry.hosts().unwrap() {
        let load = loads.get(&h.host_id).copied().unwrap_or_default();
        let cores = |m: u64| format!("{:.1}", m as f64 / 1000.0);
        let cell = format!(
            "<td>{}/{}/{}</td>",
            cores(load.cpu_used_millicores),
            cores(load.cpu_committed_millicores),
            cores(u64::from(h.facts.as_ref().unwrap().cpu_count) * 1000)
        );
        assert!(html.contains(&cell), "{}: {cell}", h.host_id);
    }
    let table = &html[html.find("id=\"tier-cpu\"").unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    assert_eq!(
        table.matches("<tr><td>").count(),
        c.config.tiers.len(),
        "a CPU row per tier"
    );
    for t in &c.config.tiers {
        assert!(
            table.contains(&format!(
                "<tr><td>{}</td><td class=\"n\">{}</td>",
                t.tier.name, t.tier.resources.cpu_millicores
            )),
            "{table}"
        );
    }
}
