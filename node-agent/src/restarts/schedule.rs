//! When each tenant restarts: one slot per local night inside its maintenance window, spread
//! across the window by a hash of its id, in its own time zone; and the scheduler that turns
//! slots into restarts, never more than K at once. Pure: time comes in as an argument.
//!
//! Ensures: exactly one slot per night, also on the nights a daylight-saving change removes or
//! repeats part of the window (the window is measured in real time that night and the slots
//! spread over it, so every slot lies inside it); a tenant due while K restarts run waits, and
//! one that could not start before its window closed is skipped and reported; a tenant whose
//! container started within `skip_if_started_within` before its slot (restarted for another
//! reason) is skipped that night; a tenant not running is never restarted.

use std::collections::{BTreeMap, HashMap, VecDeque};

use berth_shared::ids::TenantId;
use berth_shared::spec::Window;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, civil};
use sha2::{Digest, Sha256};

/// The part of the window slots are spread over (numerator, denominator).
const SPREAD: (u128, u128) = (4, 5);

/// One night's restart of one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The local date the window opens on.
    pub night: civil::Date,
    /// When the window opens.
    pub opens: Timestamp,
    pub at: Timestamp,
    /// When the window closes: a restart not started by then is skipped that night.
    pub closes: Timestamp,
}

/// The tenant's place in the window as a fraction of it, in parts per 2⁶⁴: the same every night
/// and on every host, and independent of the other tenants.
fn position(tenant: &TenantId) -> u64 {
    let digest = Sha256::digest(tenant.as_str().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The window that opens on local date `night`, in real time. In a gap (clocks forward) a local
/// time moves later by the gap; in a fold (clocks back) it is the first occurrence. A window
/// that lies wholly in a gap keeps its civil length from where it lands.
fn window_on(window: Window, tz: &TimeZone, night: civil::Date) -> Option<(Timestamp, Timestamp)> {
    let start_minute = i64::from(window.start_minute());
    let length = SignedDuration::from_mins(i64::from(window.length_minutes()));
    let start_civil = night
        .at(0, 0, 0, 0)
        .checked_add(SignedDuration::from_mins(start_minute))
        .ok()?;
    let end_civil = start_civil.checked_add(length).ok()?;
    let opens = tz.to_timestamp(start_civil).ok()?;
    let closes = tz.to_timestamp(end_civil).ok()?;
    if closes > opens {
        Some((opens, closes))
    } else {
        Some((opens, opens.checked_add(length).ok()?))
    }
}

/// `tenant`'s slot on local date `night`.
pub fn slot_on(
    tenant: &TenantId,
    window: Window,
    tz: &TimeZone,
    night: civil::Date,
) -> Option<Slot> {
    let (opens, closes) = window_on(window, tz, night)?;
    // Slots fill the first SPREAD of the real length; the rest absorbs restarts that waited for
    // a place. position / 2⁶⁴ of it: always inside [opens, closes).
    let span = closes.duration_since(opens).as_millis().unsigned_abs() * SPREAD.0 / SPREAD.1;
    let offset = (u128::from(position(tenant)) * span) >> 64;
    let at = opens
        .checked_add(SignedDuration::from_millis(offset as i64))
        .ok()?;
    Some(Slot {
        night,
        opens,
        at,
        closes,
    })
}

/// The first slot of `tenant` whose window is still open after `now` (it may be due already).
pub fn current_slot(
    tenant: &TenantId,
    window: Window,
    tz: &TimeZone,
    now: Timestamp,
) -> Option<Slot> {
    let today = tz.to_datetime(now).date();
    // A window that crosses midnight may have opened yesterday.
    let mut night = today.yesterday().ok()?;
    for _ in 0..4 {
        let slot = slot_on(tenant, window, tz, night)?;
        if slot.closes > now {
            return Some(slot);
        }
        night = night.tomorrow().ok()?;
    }
    None
}

/// What the scheduler needs to know of one desired tenant.
#[derive(Debug, Clone)]
pub struct TenantClock {
    pub tenant: TenantId,
    /// The effective window and zone; `None`: nightly restarts are off for this tenant.
    pub plan: Option<(Window, TimeZone)>,
    pub running: bool,
    /// When its container last started (for any reason).
    pub started_at: Option<Timestamp>,
}

/// Why a restart runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Nightly(Slot),
    /// `berthctl restart`, with the coordinator's request id.
    Requested(u64),
}

/// A restart the caller must run now (it holds one of the K places until [`Scheduler::finished`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub tenant: TenantId,
    pub reason: Reason,
}

#[derive(Debug, Clone)]
struct Entry {
    plan: Option<(Window, TimeZone)>,
    next: Option<Slot>,
    /// The restart running now, and when it started.
    running: Option<(Reason, Timestamp)>,
    note: String,
}

/// What is reported of a tenant's restarts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestartView {
    pub next: Option<Timestamp>,
    /// When the window of the next restart opens.
    pub window_opens: Option<Timestamp>,
    pub note: String,
    pub in_progress: bool,
}

/// The per-host restart scheduler. Feed it the desired tenants with [`Scheduler::tick`]; run
/// what it returns; report each end with [`Scheduler::finished`].
#[derive(Debug)]
pub struct Scheduler {
    max_concurrent: usize,
    skip_if_started_within: SignedDuration,
    entries: BTreeMap<TenantId, Entry>,
    requested: VecDeque<(TenantId, u64)>,
}

fn same_plan(a: &Option<(Window, TimeZone)>, b: &Option<(Window, TimeZone)>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some((wa, za)), Some((wb, zb))) => wa == wb && za.iana_name() == zb.iana_name(),
        _ => false,
    }
}

impl Scheduler {
    pub fn new(max_concurrent: usize, skip_if_started_within: SignedDuration) -> Self {
        Self {
            max_concurrent: max_concurrent.max(1),
            skip_if_started_within,
            entries: BTreeMap::new(),
            requested: VecDeque::new(),
        }
    }

    /// Restarts running now.
    pub fn running(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.running.is_some())
            .count()
    }

    /// Queues a requested restart; it starts at the next tick with a free place.
    pub fn request(&mut self, tenant: TenantId, request_id: u64) {
        if let Some(e) = self.entries.get_mut(&tenant) {
            e.note = "restart requested: waiting for a free place".into();
        }
        self.requested.push_back((tenant, request_id));
    }

    /// Brings the entries in line with `tenants` and returns the restarts to start now.
    /// Requests dropped here (tenant gone or not running) are returned as refusals.
    pub fn tick(
        &mut self,
        now: Timestamp,
        tenants: &[TenantClock],
    ) -> (Vec<Start>, Vec<(TenantId, u64, String)>) {
        let clocks: HashMap<&TenantId, &TenantClock> =
            tenants.iter().map(|t| (&t.tenant, t)).collect();
        self.entries
            .retain(|id, e| e.running.is_some() || clocks.contains_key(id));
        for t in tenants {
            let entry = self
                .entries
                .entry(t.tenant.clone())
                .or_insert_with(|| Entry {
                    plan: None,
                    next: None,
                    running: None,
                    note: String::new(),
                });
            if !same_plan(&entry.plan, &t.plan) || (entry.next.is_none() && t.plan.is_some()) {
                entry.plan = t.plan.clone();
                entry.next = t
                    .plan
                    .as_ref()
                    .and_then(|(w, tz)| current_slot(&t.tenant, *w, tz, now));
            }
        }
        let mut starts = Vec::new();
        let mut refused = Vec::new();
        let mut free = self.max_concurrent.saturating_sub(self.running());
        // Requested restarts first, in order.
        let mut waiting = VecDeque::new();
        while let Some((tenant, id)) = self.requested.pop_front() {
            let clock = clocks.get(&tenant).copied();
            let Some(entry) = self.entries.get_mut(&tenant) else {
                refused.push((tenant, id, "the tenant is not placed on this host".into()));
                continue;
            };
            if !clock.is_some_and(|c| c.running) {
                refused.push((tenant, id, "the container is not running".into()));
            } else if entry.running.is_some() {
                refused.push((
                    tenant,
                    id,
                    "a restart of this tenant is already running".into(),
                ));
            } else if free > 0 {
                free -= 1;
                entry.running = Some((Reason::Requested(id), now));
                entry.note = format!("requested restart started at {}", seconds(now));
                starts.push(Start {
                    tenant,
                    reason: Reason::Requested(id),
                });
            } else {
                waiting.push_back((tenant, id));
            }
        }
        self.requested = waiting;
        // Then nightly slots that are due, earliest first.
        let mut due: Vec<(Timestamp, TenantId)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.running.is_none())
            .filter_map(|(id, e)| {
                e.next
                    .as_ref()
                    .filter(|s| s.at <= now)
                    .map(|s| (s.at, id.clone()))
            })
            .collect();
        due.sort();
        let busy = self.running();
        for (_, tenant) in due {
            let clock = clocks.get(&tenant).copied();
            let skip = self.skip_if_started_within;
            let Some(entry) = self.entries.get_mut(&tenant) else {
                continue;
            };
            let Some(slot) = entry.next.clone() else {
                continue;
            };
            let recent_start = clock
                .and_then(|c| c.started_at)
                .filter(|s| slot.at.duration_since(*s) < skip);
            let skipped = if now >= slot.closes {
                Some(format!(
                    "missed the window of {}: it closed while {busy} restart(s) ran",
                    slot.night
                ))
            } else if !clock.is_some_and(|c| c.running) {
                Some(format!(
                    "skipped the night of {}: the container is not running",
                    slot.night
                ))
            } else {
                recent_start.map(|started| {
                    format!(
                        "skipped the night of {}: the container started at {}, within {} of its slot",
                        slot.night,
                        seconds(started),
                        humanize(skip)
                    )
                })
            };
            if let Some(note) = skipped {
                entry.note = note;
                entry.next = entry
                    .plan
                    .as_ref()
                    .and_then(|(w, tz)| slot_on(&tenant, *w, tz, slot.night.tomorrow().ok()?));
                continue;
            }
            if free == 0 {
                continue;
            }
            free -= 1;
            entry.running = Some((Reason::Nightly(slot.clone()), now));
            entry.note = format!("nightly restart started at {}", seconds(now));
            starts.push(Start {
                tenant,
                reason: Reason::Nightly(slot),
            });
        }
        (starts, refused)
    }

    /// Records the end of a restart `tick` started: frees its place and, for a nightly one,
    /// moves the tenant to the next night.
    pub fn finished(
        &mut self,
        tenant: &TenantId,
        now: Timestamp,
        outcome: Result<SignedDuration, &str>,
    ) {
        let Some(entry) = self.entries.get_mut(tenant) else {
            return;
        };
        let Some((reason, started)) = entry.running.take() else {
            return;
        };
        let kind = match &reason {
            Reason::Nightly(_) => "nightly",
            Reason::Requested(_) => "requested",
        };
        let at = seconds(started);
        entry.note = match outcome {
            Ok(down) => format!(
                "{kind} restart at {at}: healthy again after {}",
                humanize(down)
            ),
            Err(e) => format!(
                "{kind} restart at {at} failed after {}: {e}",
                humanize(now.duration_since(started))
            ),
        };
        if let Reason::Nightly(slot) = reason {
            entry.next = entry
                .plan
                .as_ref()
                .and_then(|(w, tz)| slot_on(tenant, *w, tz, slot.night.tomorrow().ok()?));
        }
    }

    /// Replaces the note of a restart in progress (a health check still failing).
    pub fn progress(&mut self, tenant: &TenantId, note: String) {
        if let Some(e) = self.entries.get_mut(tenant).filter(|e| e.running.is_some()) {
            e.note = note;
        }
    }

    pub fn view(&self, tenant: &TenantId) -> RestartView {
        self.entries
            .get(tenant)
            .map(|e| RestartView {
                next: e.next.as_ref().map(|s| s.at),
                window_opens: e.next.as_ref().map(|s| s.opens),
                note: e.note.clone(),
                in_progress: e.running.is_some(),
            })
            .unwrap_or_default()
    }
}

/// A time in notes: UTC, to the second.
fn seconds(t: Timestamp) -> Timestamp {
    t.round(jiff::Unit::Second).unwrap_or(t)
}

/// `1.2 s`, `12 h`: durations as operators read them in notes.
pub fn humanize(d: SignedDuration) -> String {
    let ms = d.as_millis();
    if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min", ms / 60_000)
    } else {
        format!("{:.1} h", ms as f64 / 3_600_000.0)
    }
}

#[cfg(test)]
mod tests;
