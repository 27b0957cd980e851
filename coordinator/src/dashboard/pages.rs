//! The dashboard's HTML: server-rendered with maud, charts as inline SVG, one small script that
//! swaps `<main>` for a fresh copy every few seconds (no full-page reload, no build step).

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::figures::{FleetFigures, HostRow, Snapshot, Totals};
use crate::api::views::{DrainView, TenantView};

/// How often an open page refreshes itself.
pub const REFRESH_SECONDS: u32 = 5;

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}\
header{background:#1d2330;color:#fff;padding:10px 20px}header a{color:#fff;text-decoration:none;font-weight:600}\
main{padding:12px 20px}h2{font-size:16px;margin:18px 0 8px}\
table{border-collapse:collapse;background:#fff}td,th{padding:3px 8px;border-bottom:1px solid #e3e6eb;text-align:left;white-space:nowrap}\
th{font-weight:600;background:#eef0f3}td.n,th.n{text-align:right}\
.cards{display:flex;gap:10px;flex-wrap:wrap}.card{background:#fff;padding:8px 12px;border:1px solid #e3e6eb;min-width:130px}\
.card b{display:block;font-size:20px}\
svg.bar{background:#d9f0dd;width:100px;height:10px}svg.bar rect{height:10px}\
td.msg{white-space:normal;min-width:12em;max-width:32em;overflow-wrap:anywhere}\
#hosts td:nth-child(n+4),#hosts th:nth-child(n+4){text-align:right}.u{fill:#2f6fd1}.c{fill:#9cbcf0}.r{fill:#b9bec7}\
.down td{color:#a11}tr.down td:nth-child(3),tr.cordoned td:nth-child(3),tr.draining td:nth-child(3){font-weight:700}\
tr.cordoned td:nth-child(3){color:#a60}tr.draining td:nth-child(3){color:#74c}\
tr.backup-overdue td.backup{color:#a11;font-weight:700}\
.key span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}small{color:#667}";

const REFRESH: &str = "setInterval(async()=>{try{const r=await fetch(location.href,{cache:'no-store'});\
if(!r.ok)return;const d=new DOMParser().parseFromString(await r.text(),'text/html');\
const m=d.querySelector('main');if(m)document.querySelector('main').replaceWith(m)}catch(e){}},";

fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " — berth" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header { a href="/" { "berth" } " · " (title) }
                (body)
                script { (PreEscaped(REFRESH)) (REFRESH_SECONDS * 1000) ")" }
            }
        }
    }
}

pub fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 30))
}

/// Millicores as cores, one decimal.
fn cores(millicores: u64) -> String {
    format!("{:.1}", millicores as f64 / 1000.0)
}

fn money(cents: f64, currency: &str) -> String {
    format!("{:.2} {currency}", cents / 100.0)
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "–".into()
    } else {
        format!("{:.0} %", part as f64 * 100.0 / whole as f64)
    }
}

/// A 100 × 10 stacked bar (sized by the style sheet): used, committed but unused, free (the background), reserved.
/// Numbers only go into it, so it is written directly.
pub fn ram_bar(total: u64, reserved: u64, committed: u64, used: u64) -> Markup {
    let scale = |b: u64| {
        if total == 0 {
            0
        } else {
            (b.min(total) as f64 * 100.0 / total as f64).round() as u64
        }
    };
    let used_w = scale(used);
    let committed_w = scale(committed.max(used)).saturating_sub(used_w);
    let reserved_w = scale(reserved);
    let mut svg = String::from(r#"<svg class="bar">"#);
    if used_w > 0 {
        svg.push_str(&format!(r#"<rect width="{used_w}" class="u"/>"#));
    }
    if committed_w > 0 {
        svg.push_str(&format!(
            r#"<rect x="{used_w}" width="{committed_w}" class="c"/>"#
        ));
    }
    if reserved_w > 0 {
        svg.push_str(&format!(
            r#"<rect x="{}" width="{reserved_w}" class="r"/>"#,
            100 - reserved_w
        ));
    }
    svg.push_str("</svg>");
    PreEscaped(svg)
}

fn legend() -> Markup {
    html! {
        p.key {
            small {
                span style="background:#2f6fd1" {} "used"
                span style="background:#9cbcf0" {} "committed, unused"
                span style="background:#d9f0dd" {} "free"
                span style="background:#b9bec7" {} "reserved for the host"
            }
        }
    }
}

fn totals_row(name: &str, t: &Totals, currency: &str) -> Markup {
    html! {
        tr {
            td { (name) }
            td.n { (t.hosts) }
            td.n { (t.tenants) }
            td.n { (format!("{:.1}", t.density())) }
            td.n { (gib(t.memory_capacity)) }
            td.n { (gib(t.memory_committed)) " (" (percent(t.memory_committed, t.memory_capacity)) ")" }
            td.n { (gib(t.memory_used)) " (" (percent(t.memory_used, t.memory_capacity)) ")" }
            td.n { (money(t.monthly_cost_cents as f64, currency)) }
            td.n { (t.cost_per_tenant_cents().map_or("–".into(), |c| money(c, currency))) }
        }
    }
}

fn report_age(ms: Option<i64>) -> String {
    match ms {
        None => "never".into(),
        Some(ms) if ms < 120_000 => format!("{} s", ms / 1000),
        Some(ms) => format!("{} min", ms / 60_000),
    }
}

/// `/`: totals overall and by provider and region, what still fits, and every host.
pub fn fleet(snapshot: &Snapshot) -> Markup {
    let f = FleetFigures::of(snapshot);
    let o = &f.overall;
    let currency = f.currency.as_str();
    let state_count = |s: &str| o.states.get(s).copied().unwrap_or(0);
    page(
        "fleet",
        html! {
            main {
                div.cards {
                    div.card { small { "hosts" } b { (o.hosts) }
                        small { (state_count("ready")) " ready · " (state_count("cordoned")) " cordoned · "
                            (state_count("draining")) " draining · " (state_count("down")) " down" } }
                    div.card { small { "tenants" } b { (o.tenants) } small { (format!("{:.1}", o.density())) " per host" } }
                    div.card { small { "RAM for tenants (GiB)" } b { (gib(o.memory_capacity)) }
                        small { (gib(o.memory_committed)) " committed · " (gib(o.memory_used)) " used" } }
                    div.card { small { "RAM" } b { (ram_bar(o.memory_total, o.memory_reserved, o.memory_committed, o.memory_used)) }
                        small { (percent(o.memory_committed, o.memory_capacity)) " committed · " (percent(o.memory_used, o.memory_capacity)) " used" } }
                    div.card { small { "monthly cost" } b { (money(o.monthly_cost_cents as f64, currency)) }
                        small { (o.cost_per_tenant_cents().map_or("–".into(), |c| money(c, currency))) " per tenant" } }
                    div.card #saving { small { "a compaction saves now" } b { (money(snapshot.saving.monthly_cost_cents as f64, currency)) }
                        small { @if snapshot.saving.hosts.is_empty() { "no host can be emptied" }
                            @else { (snapshot.saving.hosts.len()) " hosts, " (snapshot.saving.moves) " moves: " code { "berthctl compact" } } } }
                }
                h2 { "By provider and region" }
                table #groups {
                    tr { th { "" } th.n { "hosts" } th.n { "tenants" } th.n { "per host" } th.n { "RAM GiB" }
                         th.n { "committed" } th.n { "used" } th.n { "cost / month" } th.n { "per tenant" } }
                    (totals_row("all", o, currency))
                    @for (provider, t) in &f.by_provider { (totals_row(provider, t, currency)) }
                    @for (region, t) in &f.by_region { (totals_row(region, t, currency)) }
                }
                h2 { "What still fits" }
                table #fits {
                    tr { th { "tier" } th.n { "more tenants" } th { "where (most room first)" } }
                    @for fit in &f.fits {
                        tr {
                            td { (fit.tier.name) " " small { (fit.tier.resources.memory_bytes >> 20) " MiB, " (fit.tier.resources.cpu_millicores) " mCPU" } }
                            td.n { (fit.total) }
                            td {
                                @if fit.regions.is_empty() { "nowhere: add a host" }
                                @for r in &fit.regions {
                                    b { (r.region) } " " (r.tenants) " ("
                                    @for (i, (host, k)) in r.hosts.iter().enumerate() {
                                        @if i > 0 { ", " }
                                        a href={ "/hosts/" (host) } { (host) } " " (k)
                                    }
                                    ") "
                                }
                            }
                        }
                    }
                }
                h2 { "CPU by tier" }
                table #tier-cpu {
                    tr { th { "tier" } th.n { "requested mCPU" } th.n { "limit mCPU" } th.n { "measured" }
                         th.n { "used p95 mCPU" } th { "advice" } }
                    @for t in &snapshot.tier_cpu {
                        tr { td { (t.tier) } td.n { (t.cpu_request_millicores) } td.n { (t.cpu_limit_millicores) }
                             td.n { (t.tenants_measured) } td.n { (t.cpu_used_p95_millicores) } td { (t.advice) } }
                    }
                }
                h2 { "Hosts" }
                (legend())
                table #hosts {
                    tr { th { "host" } th { "provider region type" } th { "state" } th { "tenants" }
                         th { "RAM" } th { "used / committed / for tenants GiB" } th { "CPU used / requested / cores" }
                         th { "cost" } th { "report" } }
                    // 500 rows must stay small: no classes on cells (the style sheet aligns by
                    // column) and a row class only for hosts that are not ready.
                    @for h in &snapshot.hosts {
                        tr class=[(h.state != "ready").then_some(h.state)] {
                            td { a href={ "/hosts/" (h.host_id) } { (h.host_id) } }
                            td { (h.provider) " " (h.region) " " (h.instance_type) }
                            td { (h.state) }
                            td { (h.tenants) }
                            td { (ram_bar(h.memory_total, h.memory_reserved, h.memory_committed, h.memory_used)) }
                            td { (gib(h.memory_used)) "/" (gib(h.memory_committed)) "/" (gib(h.memory_capacity())) }
                            td { (cores(h.cpu_used_millicores)) "/" (cores(h.cpu_committed_millicores)) "/" (cores(h.cpu_millicores)) }
                            td { (format!("{:.2}", h.monthly_cost_cents as f64 / 100.0)) }
                            td { (report_age(h.report_age_ms)) }
                        }
                    }
                }
                p { small { "as of " (jiff::Timestamp::from_millisecond(snapshot.now_ms).map(|t| t.to_string()).unwrap_or_default())
                    ", refreshed every " (REFRESH_SECONDS) " s" } }
            }
        },
    )
}

/// `/hosts/{id}`: one host and its tenants.
/// `now_ms` tells which tenants' backups are overdue (they stand out).
pub fn host(h: &HostRow, tenants: &[TenantView], drain: Option<&DrainView>, now_ms: i64) -> Markup {
    let currency = h.currency.as_str();
    page(
        &h.host_id,
        html! {
            main {
                div.cards {
                    div.card { small { "state" } b { (h.state) } small { "report " (report_age(h.report_age_ms)) " ago" } }
                    div.card { small { "host" } b { (h.provider) " " (h.region) } small { (h.instance_type) " · " (money(h.monthly_cost_cents as f64, currency)) " / month" } }
                    div.card { small { "tenants" } b { (h.tenants) } small { (h.running) " running · " (h.oom_kills) " OOM kills" } }
                    div.card { small { "RAM (GiB)" } b { (ram_bar(h.memory_total, h.memory_reserved, h.memory_committed, h.memory_used)) }
                        small { (gib(h.memory_used)) " used · " (gib(h.memory_committed)) " committed · " (gib(h.memory_capacity())) " for tenants · " (gib(h.memory_total)) " total" } }
                }
                @if let Some(d) = drain {
                    h2 { "Drain: " (d.phase) }
                    p { small { "started " (d.started.as_deref().unwrap_or("–")) " · deadline "
                        (d.deadline.as_deref().unwrap_or("–")) " · " (d.max_parallel) " at once" } }
                    table #drain {
                        tr { th { "tenant" } th { "target" } th { "phase" } th.n { "copied MiB" }
                             th.n { "of MiB" } th.n { "after stop MiB" } th.n { "ETA s" }
                             th { "note" } }
                        @for m in &d.moves {
                            tr {
                                td { (m.tenant_id) }
                                td { a href={ "/hosts/" (m.target_host_id) } { (m.target_host_id) } }
                                td { (m.phase) }
                                td.n { (m.bytes_copied >> 20) }
                                td.n { (m.bytes_total.div_ceil(1 << 20)) }
                                td.n { (format!("{:.1}", m.bytes_after_stop as f64 / f64::from(1 << 20))) }
                                td.n { @if m.eta_ms > 0 { (m.eta_ms.div_ceil(1000)) } @else { "–" } }
                                td.msg { small { (m.error) } }
                            }
                        }
                    }
                }
                h2 { "Tenants" }
                table #tenants {
                    tr { th { "tenant" } th { "state" } th { "tier" } th { "RAM used / cap" } th.n { "MiB" }
                         th.n { "OOM kills" } th { "last restart" } th { "next restart" } th { "last good backup" } th.n { "egress denied" } th { "message" } }
                    @for t in tenants {
                        tr class=[t.backup_overdue(now_ms).then_some("backup-overdue")] {
                            td { (t.tenant_id) }
                            td { (t.state) }
                            td { (t.tier) }
                            // Used against its cap: a tenant commits nothing beyond what it uses.
                            td { (ram_bar(t.memory_cap_bytes, 0, 0, t.memory_used_bytes)) }
                            td.n { (t.memory_used_bytes >> 20) " / " (t.memory_cap_bytes >> 20) }
                            td.n { (t.oom_kills) }
                            td { (t.last_restart.as_deref().unwrap_or("–")) }
                            td { (t.next_restart.as_deref().unwrap_or("–")) }
                            td.backup { (t.backup_text()) }
                            td.n { (t.egress_denied_packets) }
                            td.msg { small { (t.message) @if !t.restart_note.is_empty() { " " (t.restart_note) } } }
                        }
                    }
                }
            }
        },
    )
}
