use std::collections::HashMap;

use super::*;

fn id(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn window(s: &str) -> Window {
    s.parse().unwrap()
}

fn zone(name: &str) -> TimeZone {
    TimeZone::get(name).unwrap()
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn date(s: &str) -> civil::Date {
    s.parse().unwrap()
}

/// Local civil minutes after midnight of `t` in `tz`.
fn local_minute(t: Timestamp, tz: &TimeZone) -> i32 {
    let dt = tz.to_datetime(t);
    i32::from(dt.hour()) * 60 + i32::from(dt.minute())
}

#[test]
fn a_slot_is_deterministic_inside_the_window_and_spread_by_tenant() {
    let (w, tz) = (window("02:00-05:00"), zone("Europe/Berlin"));
    let night = date("2026-11-22");
    let a = slot_on(&id("acme"), w, &tz, night).unwrap();
    assert_eq!(a, slot_on(&id("acme"), w, &tz, night).unwrap());
    assert_eq!(a.closes, ts("2026-11-22T04:00:00Z"), "05:00 CET");
    let minutes: Vec<i32> = (0..200)
        .map(|i| slot_on(&id(&format!("t{i}")), w, &tz, night).unwrap().at)
        .map(|at| {
            assert!(at >= ts("2026-11-22T01:00:00Z") && at < ts("2026-11-22T04:00:00Z"));
            local_minute(at, &tz)
        })
        .collect();
    // Spread: every hour of the window has a fair share.
    for hour in 2..4 {
        let n = minutes.iter().filter(|m| **m / 60 == hour).count();
        assert!((60..=110).contains(&n), "hour {hour}: {n} of 200");
    }
    // A window across midnight that opened yesterday is still the current one.
    let late = window("23:00-01:00");
    let s = current_slot(&id("acme"), late, &zone("UTC"), ts("2026-11-22T00:30:00Z")).unwrap();
    assert_eq!(s.night, date("2026-11-21"));
    assert_eq!(s.closes, ts("2026-11-22T01:00:00Z"));
    // Once closed, the next night's.
    let s = current_slot(&id("acme"), late, &zone("UTC"), ts("2026-11-22T01:00:00Z")).unwrap();
    assert_eq!(s.night, date("2026-11-22"));
}

#[test]
fn daylight_saving_nights_keep_every_slot_inside_the_real_window() {
    let tz = zone("Europe/Berlin");
    let w = window("02:00-05:00");
    // Clocks forward at 02:00 → 03:00: the window is 03:00–05:00 local, 2 h long.
    let (opens, closes) = window_on(w, &tz, date("2026-03-29")).unwrap();
    assert_eq!(
        (opens, closes),
        (ts("2026-03-29T01:00:00Z"), ts("2026-03-29T03:00:00Z"))
    );
    // Clocks back at 03:00 → 02:00: 02:00 CEST to 05:00 CET, 4 h long.
    let (opens, closes) = window_on(w, &tz, date("2026-10-25")).unwrap();
    assert_eq!(
        (opens, closes),
        (ts("2026-10-25T00:00:00Z"), ts("2026-10-25T04:00:00Z"))
    );
    // A window wholly inside the skipped hour still exists, for its civil length.
    let gap = window("02:00-02:30");
    let (opens, closes) = window_on(gap, &tz, date("2026-03-29")).unwrap();
    assert_eq!(
        (opens, closes),
        (ts("2026-03-29T01:00:00Z"), ts("2026-03-29T01:30:00Z"))
    );
    for i in 0..50 {
        let s = slot_on(&id(&format!("t{i}")), gap, &tz, date("2026-03-29")).unwrap();
        assert!(s.at >= opens && s.at < closes);
    }
}

struct Tenant {
    clock: TenantClock,
    window: Window,
    restarts: Vec<(Timestamp, civil::Date)>,
}

/// Simulates `from`..`to` in steps of `step`, each restart taking 20–110 s (by tenant), and returns each
/// tenant with its restarts; asserts on every step that no more than `k` run at once.
fn simulate(
    tenants: &mut [Tenant],
    k: usize,
    from: Timestamp,
    to: Timestamp,
    step: SignedDuration,
) -> usize {
    let mut scheduler = Scheduler::new(k, SignedDuration::from_hours(12));
    let mut running: HashMap<TenantId, Timestamp> = HashMap::new();
    let mut peak = 0;
    let mut now = from;
    while now < to {
        // Restarts end after a duration that depends on the tenant.
        let ended: Vec<TenantId> = running
            .iter()
            .filter(|(t, started)| {
                let secs = 20 + (position(t) % 91) as i64;
                now.duration_since(**started) >= SignedDuration::from_secs(secs)
            })
            .map(|(t, _)| t.clone())
            .collect();
        for t in ended {
            let started = running.remove(&t).unwrap();
            let tenant = tenants.iter_mut().find(|x| x.clock.tenant == t).unwrap();
            tenant.clock.started_at = Some(started);
            scheduler.finished(&t, now, Ok(now.duration_since(started)));
        }
        let clocks: Vec<TenantClock> = tenants.iter().map(|t| t.clock.clone()).collect();
        let (starts, refused) = scheduler.tick(now, &clocks);
        assert!(refused.is_empty());
        for s in starts {
            let Reason::Nightly(slot) = s.reason else {
                panic!("only nightly restarts here")
            };
            assert!(
                now >= slot.at && now < slot.closes,
                "{} started outside its slot",
                s.tenant
            );
            let tenant = tenants
                .iter_mut()
                .find(|x| x.clock.tenant == s.tenant)
                .unwrap();
            tenant.restarts.push((now, slot.night));
            running.insert(s.tenant, now);
        }
        assert!(
            running.len() <= k,
            "{} restarts at once at {now}",
            running.len()
        );
        assert_eq!(scheduler.running(), running.len());
        peak = peak.max(running.len());
        now = now.checked_add(step).unwrap();
    }
    peak
}

/// 40 tenants, a 3-hour window each, five time zones (three with a DST change on the tested
/// nights, in both directions); each tenant restarts exactly once on the night, never more than
/// K at once, and inside its window in its own local time.
#[test]
fn a_simulated_night_restarts_each_tenant_once_in_its_own_zone_including_dst_nights() {
    let zones = [
        ("Europe/Berlin", "02:00-05:00"),
        ("America/New_York", "00:30-03:30"),
        ("Australia/Sydney", "01:30-04:30"),
        ("Asia/Kolkata", "03:00-06:00"),
        ("UTC", "22:00-01:00"),
    ];
    // Nights with a DST change: Berlin forward and back, New York forward and back, Sydney
    // back (April) and forward (October); plus an ordinary night.
    let nights = [
        "2026-03-29",
        "2026-10-25",
        "2026-03-08",
        "2026-11-01",
        "2026-04-05",
        "2026-10-04",
        "2026-11-21",
    ];
    for k in [1, 2] {
        for night in nights {
            let night = date(night);
            let mut tenants: Vec<Tenant> = (0..40)
                .map(|i| {
                    let (z, w) = zones[i % zones.len()];
                    Tenant {
                        clock: TenantClock {
                            tenant: id(&format!("tenant-{i:02}")),
                            plan: Some((window(w), zone(z))),
                            running: true,
                            started_at: Some(ts("2026-01-01T00:00:00Z")),
                        },
                        window: window(w),
                        restarts: Vec::new(),
                    }
                })
                .collect();
            // From noon UTC the day before to noon UTC the day after covers the night in every
            // zone from UTC+11 to UTC−5.
            let from = night
                .yesterday()
                .unwrap()
                .at(12, 0, 0, 0)
                .to_zoned(TimeZone::UTC)
                .unwrap()
                .timestamp();
            let to = night
                .tomorrow()
                .unwrap()
                .at(12, 0, 0, 0)
                .to_zoned(TimeZone::UTC)
                .unwrap()
                .timestamp();
            let peak = simulate(&mut tenants, k, from, to, SignedDuration::from_secs(10));
            assert!(peak <= k);
            for t in &tenants {
                let (_, tz) = t.clock.plan.as_ref().unwrap();
                let on_night: Vec<_> = t.restarts.iter().filter(|(_, n)| *n == night).collect();
                assert_eq!(
                    on_night.len(),
                    1,
                    "{} on {night} ({}): {:?}",
                    t.clock.tenant,
                    tz.iana_name().unwrap(),
                    t.restarts
                );
                let mut nights: Vec<_> = t.restarts.iter().map(|(_, n)| *n).collect();
                nights.dedup();
                assert_eq!(
                    nights.len(),
                    t.restarts.len(),
                    "one restart per night: {:?}",
                    t.restarts
                );
                // Inside the window in local civil time (a window across midnight wraps).
                let (at, _) = on_night[0];
                let start = i32::from(t.window.start_minute());
                let into = (local_minute(*at, tz) - start).rem_euclid(24 * 60);
                assert!(
                    into < i32::from(t.window.length_minutes()),
                    "{} restarted at local {} outside {}",
                    t.clock.tenant,
                    tz.to_datetime(*at),
                    t.window
                );
            }
        }
    }
}

fn clock(tenant: &str, started_at: Option<&str>, running: bool) -> TenantClock {
    TenantClock {
        tenant: id(tenant),
        plan: Some((window("02:00-05:00"), zone("UTC"))),
        running,
        started_at: started_at.map(ts),
    }
}

#[test]
fn recently_started_or_stopped_tenants_are_skipped_that_night_and_come_back_the_next() {
    let mut s = Scheduler::new(1, SignedDuration::from_hours(12));
    let night = date("2026-11-22");
    let recent = slot_on(&id("recent"), window("02:00-05:00"), &zone("UTC"), night).unwrap();
    let tenants = [
        // Restarted (crash, deploy) 3 hours before its slot.
        clock(
            "recent",
            Some(
                &recent
                    .at
                    .checked_sub(SignedDuration::from_hours(3))
                    .unwrap()
                    .to_string(),
            ),
            true,
        ),
        clock("stopped", Some("2026-11-01T00:00:00Z"), false),
    ];
    let (starts, _) = s.tick(
        ts("2026-11-22T06:00:00Z")
            .checked_sub(SignedDuration::from_hours(5))
            .unwrap(),
        &tenants,
    );
    assert!(starts.is_empty());
    let (starts, _) = s.tick(ts("2026-11-22T04:59:00Z"), &tenants);
    assert!(starts.is_empty(), "{starts:?}");
    let note = s.view(&id("recent")).note;
    assert!(
        note.starts_with("skipped the night of 2026-11-22: the container started at"),
        "{note}"
    );
    assert!(note.ends_with("within 12.0 h of its slot"), "{note}");
    assert_eq!(
        s.view(&id("stopped")).note,
        "skipped the night of 2026-11-22: the container is not running"
    );
    let next = s.view(&id("recent")).next.unwrap();
    assert_eq!(
        next,
        slot_on(
            &id("recent"),
            window("02:00-05:00"),
            &zone("UTC"),
            date("2026-11-23")
        )
        .unwrap()
        .at
    );
    // The next night it runs.
    let (starts, _) = s.tick(next, &tenants);
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0].tenant, id("recent"));
}

#[test]
fn a_tenant_that_cannot_get_a_place_before_its_window_closes_is_reported_missed() {
    let mut s = Scheduler::new(1, SignedDuration::ZERO);
    let tenants = [clock("a", None, true), clock("b", None, true)];
    let night = date("2026-11-22");
    let w = window("02:00-05:00");
    let (sa, sb) = (
        slot_on(&id("a"), w, &zone("UTC"), night).unwrap(),
        slot_on(&id("b"), w, &zone("UTC"), night).unwrap(),
    );
    let (first, second) = if sa.at < sb.at {
        ("a", "b")
    } else {
        ("b", "a")
    };
    let (starts, _) = s.tick(sa.at.max(sb.at), &tenants);
    assert_eq!(starts.len(), 1, "K = 1");
    assert_eq!(starts[0].tenant, id(first), "earliest slot first");
    // The first restart never becomes healthy before the window closes.
    let (starts, _) = s.tick(ts("2026-11-22T05:00:00Z"), &tenants);
    assert!(starts.is_empty());
    assert_eq!(
        s.view(&id(second)).note,
        "missed the window of 2026-11-22: it closed while 1 restart(s) ran"
    );
    assert!(s.view(&id(first)).in_progress);
    s.finished(
        &id(first),
        ts("2026-11-22T05:01:00Z"),
        Err("not healthy after 5 min"),
    );
    let note = s.view(&id(first)).note;
    assert!(
        note.starts_with("nightly restart at 2026-11-22T0"),
        "{note}"
    );
    let ran = ts("2026-11-22T05:01:00Z").duration_since(sa.at.max(sb.at));
    assert!(
        note.ends_with(&format!(
            " failed after {}: not healthy after 5 min",
            humanize(ran)
        )),
        "{note}"
    );
    assert_eq!(s.running(), 0);
}

#[test]
fn requested_restarts_share_the_places_and_are_refused_for_stopped_or_unknown_tenants() {
    let mut s = Scheduler::new(1, SignedDuration::from_hours(12));
    let tenants = [
        clock("a", Some("2026-11-21T10:00:00Z"), true),
        clock("b", Some("2026-11-21T10:00:00Z"), true),
        clock("down", None, false),
    ];
    let now = ts("2026-11-21T12:00:00Z");
    s.tick(now, &tenants);
    s.request(id("a"), 1);
    s.request(id("b"), 2);
    s.request(id("down"), 3);
    s.request(id("elsewhere"), 4);
    let (starts, refused) = s.tick(now, &tenants);
    assert_eq!(
        starts,
        vec![Start {
            tenant: id("a"),
            reason: Reason::Requested(1)
        }]
    );
    assert_eq!(
        refused,
        vec![
            (id("down"), 3, "the container is not running".to_string()),
            (
                id("elsewhere"),
                4,
                "the tenant is not placed on this host".to_string()
            ),
        ]
    );
    // b waits for a's place.
    let (starts, _) = s.tick(now, &tenants);
    assert!(starts.is_empty());
    s.finished(&id("a"), now, Ok(SignedDuration::from_millis(800)));
    assert_eq!(
        s.view(&id("a")).note,
        format!("requested restart at {now}: healthy again after 0.8 s")
    );
    let (starts, _) = s.tick(now, &tenants);
    assert_eq!(
        starts,
        vec![Start {
            tenant: id("b"),
            reason: Reason::Requested(2)
        }]
    );
    // A requested restart leaves the nightly slot where it was.
    assert_eq!(
        s.view(&id("a")).next,
        Some(
            current_slot(&id("a"), window("02:00-05:00"), &zone("UTC"), now)
                .unwrap()
                .at
        )
    );
}

#[test]
fn a_changed_window_or_zone_moves_the_next_slot_and_off_means_none() {
    let mut s = Scheduler::new(1, SignedDuration::from_hours(12));
    let now = ts("2026-11-21T12:00:00Z");
    let mut t = clock("a", None, true);
    s.tick(now, std::slice::from_ref(&t));
    let utc = s.view(&id("a")).next.unwrap();
    t.plan = Some((window("02:00-05:00"), zone("Asia/Tokyo")));
    s.tick(now, std::slice::from_ref(&t));
    let tokyo = s.view(&id("a")).next.unwrap();
    assert_eq!(
        utc.duration_since(tokyo),
        SignedDuration::from_hours(9),
        "same local time, 9 h earlier"
    );
    t.plan = None;
    s.tick(now, std::slice::from_ref(&t));
    assert_eq!(s.view(&id("a")).next, None);
    // Gone from the desired state: forgotten.
    s.tick(now, &[]);
    assert_eq!(s.view(&id("a")), RestartView::default());
}
