//! The drain against agents played in process (`testing::agents`): every path of a move —
//! plan refusal, reservation, rollback, abort, deadline, resume after a coordinator restart at
//! each persisted phase, a lost host and its return — with the real coordinator, its real
//! store and paused time. No root, no Docker, no network.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use berth_shared::clock::ManualClock;
use berth_shared::host::Provider;
use berth_shared::ids::{HostId, TenantId};
use berth_shared::proto;
use berth_shared::store::{MemStore, Store, Write};

use super::*;
use crate::keys::keyring::Keyring;
use crate::registry::HostState;
use crate::testing::agents::{CHANGES_BYTES, Effect, FakeAgents, Step, VOLUME_BYTES};
use crate::testing::seed;
use crate::testing::seed::tenant_spec as spec;

const GIB: u64 = 1 << 30;

/// A fleet of played hosts around a real coordinator.
struct Fleet {
    c: Arc<Coordinator>,
    d: Arc<Drainer>,
    agents: Arc<FakeAgents>,
    hosts: Vec<HostId>,
}

fn id(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn host(s: &str) -> HostId {
    HostId::new(s).unwrap()
}

impl Fleet {
    /// A coordinator over `store` whose hosts (`name`, GiB) are played by `agents`; the hosts
    /// are registered unless `store` holds them already.
    fn open(store: Arc<dyn Store>, agents: Arc<FakeAgents>, hosts: &[(&str, u64)]) -> Self {
        let clock = Arc::new(ManualClock::at(seed::SEED_TIME_MS));
        let c = Arc::new(
            seed::open(store.clone(), clock, Keyring::in_memory(), agents.clone())
                .expect("coordinator"),
        );
        let d = Drainer::open(c.clone(), store).expect("drainer");
        let hosts: Vec<HostId> = hosts
            .iter()
            .enumerate()
            .map(|(i, (name, gib))| {
                let h = host(name);
                if c.registry.host(&h).unwrap().is_none() {
                    let mut facts = seed::facts(&h, Provider::Hetzner, "fsn1", *gib, 8);
                    facts.monthly_cost_cents = gib * 300;
                    seed::enroll(&c, &h, &format!("{i:08x}"), facts).unwrap();
                    c.registry
                        .record_report(&h, gib * GIB / 2, 400 * GIB, |r| c.sync_host(r))
                        .unwrap();
                }
                agents.connect(&d, &h);
                h
            })
            .collect();
        Self {
            c,
            d,
            agents,
            hosts,
        }
    }

    fn new(hosts: &[(&str, u64)]) -> Self {
        Self::open(Arc::new(MemStore::default()), FakeAgents::new(), hosts)
    }

    /// Places `tenants` of `tier` on host `on` (the others cordoned meanwhile) and waits until
    /// each runs there, healthy.
    async fn place_on(&self, on: usize, tenants: &[&str], tier: &str, encrypted: bool) {
        let others: Vec<&HostId> = self
            .hosts
            .iter()
            .filter(|h| **h != self.hosts[on])
            .collect();
        for h in &others {
            self.c
                .registry
                .set_cordoned(h, true, |r| self.c.sync_host(r))
                .unwrap();
        }
        for t in tenants {
            self.c.place(spec(t, tier, encrypted)).await.unwrap();
        }
        for h in &others {
            self.c
                .registry
                .set_cordoned(h, false, |r| self.c.sync_host(r))
                .unwrap();
        }
        for t in tenants {
            self.until(|| self.runs_healthy(&id(t), &self.hosts[on]))
                .await;
        }
    }

    /// Whether `tenant` runs on `on` alone and its coordinator saw it healthy there.
    fn runs_healthy(&self, tenant: &TenantId, on: &HostId) -> bool {
        let seen = self.c.placements.tenant(tenant).is_some_and(|t| {
            t.placement.is_some_and(|p| p.host_id == on.as_str())
                && t.status.is_some_and(|s| s.healthy)
        });
        seen && self.agents.running(tenant) == [on.clone()]
    }

    /// Waits (in paused time) until `done`; fails the test after ten minutes.
    async fn until(&self, mut done: impl FnMut() -> bool) {
        for _ in 0..6000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("not reached within ten minutes");
    }

    fn options(&self, source: usize) -> DrainOptions {
        DrainOptions {
            host: self.hosts[source].clone(),
            dry_run: false,
            deadline: DEFAULT_DEADLINE,
            max_parallel: DEFAULT_MAX_PARALLEL,
            force_lost: false,
            empty: false,
            no_precopy: false,
        }
    }

    /// Drains and waits for the drain to end.
    async fn drain(&self, options: DrainOptions) -> proto::DrainStatus {
        let host = options.host.clone();
        self.d.drain(options).await.expect("drain starts");
        self.d.drains.wait_finished(&host).await;
        self.d.drain_status(&host).unwrap()
    }

    /// Waits until `tenant`'s move off `source` reached `phase`.
    async fn until_phase(&self, source: usize, tenant: &str, phase: MovePhase) {
        let source = self.hosts[source].clone();
        self.until(|| self.d.drains.phase_of(&source, &id(tenant)) == Some(phase))
            .await;
    }

    fn state(&self, h: usize) -> HostState {
        let record = self.c.registry.host(&self.hosts[h]).unwrap().unwrap();
        record.state(self.c.registry.now(), self.c.config.down_after)
    }

    fn placed_on(&self, tenant: &str) -> String {
        self.c
            .placements
            .tenant(&id(tenant))
            .and_then(|t| t.placement)
            .map(|p| p.host_id)
            .unwrap_or_default()
    }
}

/// Each move as (phase, error), by tenant.
fn moves(status: &proto::DrainStatus) -> BTreeMap<String, (String, String)> {
    status
        .moves
        .iter()
        .map(|m| (m.tenant_id.clone(), (m.phase.clone(), m.error.clone())))
        .collect()
}

/// A paused runtime of one thread, as `#[tokio::test(start_paused = true)]` makes.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_drain_moves_every_tenant_with_its_data_and_leaves_the_host_empty_and_cordoned() {
    let f = Fleet::new(&[("src", 16), ("dst-a", 16), ("dst-b", 16)]);
    let tenants = ["t1", "t2", "t3", "t4"];
    f.place_on(0, &tenants, "business", true).await;
    for (n, t) in tenants.iter().enumerate() {
        for _ in 0..=n {
            f.agents.write(&f.hosts[0], &id(t));
        }
    }
    let status = f.drain(f.options(0)).await;
    assert_eq!(status.phase, "done", "{status:?}");
    for (n, t) in tenants.iter().enumerate() {
        let m = status.moves.iter().find(|m| m.tenant_id == *t).unwrap();
        assert_eq!((m.phase.as_str(), m.error.as_str()), ("done", ""));
        let target = host(&m.target_host_id);
        assert_ne!(target, f.hosts[0]);
        assert_eq!(f.placed_on(t), target.as_str());
        assert!(f.runs_healthy(&id(t), &target));
        // The data that arrived is the data that left; only the changes since the pre-copy
        // travelled while it was down; the source's copy is gone.
        let arrived = f.agents.volume(&target, &id(t)).unwrap();
        assert_eq!(arrived.content, n as u64 + 1);
        assert_eq!(
            (m.bytes_total, m.bytes_after_stop),
            (VOLUME_BYTES, CHANGES_BYTES)
        );
        assert_eq!(f.agents.volume(&f.hosts[0], &id(t)), None);
        assert!(!f.agents.holds_precopy(&target, &id(t)));
    }
    assert_eq!(f.state(0), HostState::Cordoned);
    assert!(f.c.placements.tenants(Some(&f.hosts[0])).is_empty());
    assert_eq!(f.agents.overlaps(), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_cannot_place_every_tenant_is_refused_and_changes_nothing() {
    // 2 GiB to place on the only other host: two business tenants fit, the third does not.
    let f = Fleet::new(&[("src", 16), ("small", 4)]);
    f.place_on(0, &["t1", "t2", "t3"], "business", false).await;
    let err = f.d.drain(f.options(0)).await.unwrap_err();
    assert!(matches!(err, DrainError::Refused { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.starts_with(
            "cannot drain src: 1 of its tenants cannot move; nothing was changed:\n  t"
        ),
        "{message}"
    );
    // A dry run plans the same and changes nothing either.
    let err =
        f.d.drain(DrainOptions {
            dry_run: true,
            ..f.options(0)
        })
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), message);
    assert!(matches!(
        f.d.drain_status(&f.hosts[0]),
        Err(DrainError::NoDrain(_))
    ));
    assert_eq!(f.state(0), HostState::Ready);
    for t in ["t1", "t2", "t3"] {
        assert!(f.runs_healthy(&id(t), &f.hosts[0]));
    }
    assert!(f.agents.log().is_empty(), "{:?}", f.agents.log());
    // One host alone has nowhere to move its tenants to.
    let alone = Fleet::new(&[("only", 16)]);
    alone.place_on(0, &["t1"], "individual", false).await;
    let err = alone.d.drain(alone.options(0)).await.unwrap_err();
    assert!(
        err.to_string()
            .ends_with("t1: no other host in the fleet to move to"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_planned_moves_capacity_is_reserved_until_the_move_ends() {
    let f = Fleet::new(&[("src", 16), ("small", 4)]);
    f.place_on(0, &["t1", "t2"], "business", false).await;
    // The pre-copies never arrive: both moves stay planned or pre-copying.
    f.agents
        .inject(&f.hosts[1], Step::Import { precopy: true }, Effect::Hang);
    f.d.drain(f.options(0)).await.unwrap();
    f.until_phase(0, "t1", MovePhase::Precopying).await;
    // The small host's 2 GiB are the two moves': a new tenant does not fit.
    let refused = f.c.place(spec("new", "business", false)).await.unwrap_err();
    assert!(matches!(refused, PlaceError::NoFit(_)), "{refused}");
    // Aborted, the moves give their capacity back.
    let status = f.d.abort_drain(&f.hosts[0]).await.unwrap();
    assert_eq!(status.phase, "aborted");
    for (phase, error) in moves(&status).values() {
        assert_eq!(phase, "not_moved");
        assert!(error.starts_with("the drain was aborted before"), "{error}");
    }
    let placed = f.c.place(spec("new", "business", false)).await.unwrap();
    assert_eq!(placed.host_id, "small");
}

fn compaction(dry_run: bool) -> CompactRequest {
    CompactRequest {
        plan: CompactOptions::default(),
        dry_run,
        now: false,
        deadline: DEFAULT_DEADLINE,
        max_parallel: DEFAULT_MAX_PARALLEL,
    }
}

#[tokio::test(start_paused = true)]
async fn a_compaction_empties_the_hosts_it_planned_and_leaves_them_ready_to_return() {
    let f = Fleet::new(&[("full", 16), ("half", 16), ("light", 16)]);
    f.place_on(0, &["a1", "a2", "a3"], "business", true).await;
    f.place_on(1, &["b1", "b2"], "business", true).await;
    f.place_on(2, &["c1"], "business", false).await;
    for t in ["b1", "b2"] {
        f.agents.write(&f.hosts[1], &id(t));
    }
    let plan = f.d.compact(compaction(true)).await.unwrap();
    assert_eq!(plan.phase, "planned");
    let emptied: Vec<&str> = plan.emptied.iter().map(|e| e.host_id.as_str()).collect();
    // light first (48 EUR for one move), then half (24 EUR per move); full receives both.
    assert_eq!(emptied, ["light", "half"], "{plan:?}");
    assert_eq!((plan.saving_cents, plan.moves), (9600, 3));
    assert_eq!(plan.kept.len(), 1);
    assert_eq!(plan.kept[0].host_id, "full");
    // A dry run reserved nothing: the hosts still take new tenants.
    assert_eq!(f.state(1), HostState::Ready);

    let started = f.d.compact(compaction(false)).await.unwrap();
    assert_eq!(started.phase, "started");
    assert_eq!(started.emptied.len(), 2);
    for h in [&f.hosts[1], &f.hosts[2]] {
        f.d.drains.wait_finished(h).await;
        let status = f.d.drain_status(h).unwrap();
        assert_eq!(status.phase, "done", "{status:?}");
    }
    for t in ["a1", "a2", "a3", "b1", "b2", "c1"] {
        assert!(f.runs_healthy(&id(t), &f.hosts[0]), "{t}");
    }
    for t in ["b1", "b2"] {
        assert_eq!(f.agents.volume(&f.hosts[0], &id(t)).unwrap().content, 1);
    }
    assert_eq!(f.agents.overlaps(), Vec::<String>::new());
    assert_eq!(f.state(1), HostState::Cordoned);
    assert_eq!(f.state(2), HostState::Cordoned);
    // Nothing more to empty; both hosts are listed as ready to return.
    let after = f.d.compact(compaction(true)).await.unwrap();
    assert!(after.emptied.is_empty(), "{after:?}");
    let returnable: Vec<(&str, u64)> = after
        .returnable
        .iter()
        .map(|r| (r.host_id.as_str(), r.monthly_cost_cents))
        .collect();
    assert_eq!(returnable, [("half", 4800), ("light", 4800)]);
}

/// A store that refuses every write to one key once told to (a full disk, a lost quorum, for
/// that one record).
#[derive(Debug, Default)]
struct RefusingStore {
    inner: MemStore,
    refused_key: std::sync::Mutex<Option<String>>,
}

impl RefusingStore {
    fn refuse(&self, key: &str) {
        *self.refused_key.lock().unwrap() = Some(key.into());
    }
}

impl Store for RefusingStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.scan_prefix(prefix)
    }
    fn apply(&self, writes: Vec<Write>, durability: Durability) -> Result<(), StoreError> {
        let refused = self.refused_key.lock().unwrap().clone();
        let touches = |w: &Write| match w {
            Write::Put(k, _) | Write::Delete(k) => Some(k) == refused.as_ref(),
        };
        if writes.iter().any(touches) {
            return Err(StoreError::Io("no space left on device".into()));
        }
        self.inner.apply(writes, durability)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
    fn snapshot(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.snapshot()
    }
}

#[tokio::test(start_paused = true)]
async fn a_compaction_that_cannot_start_a_drain_names_the_ones_it_started_and_leaves_the_rest_as_it_was()
 {
    let store = Arc::new(RefusingStore::default());
    let f = Fleet::open(
        store.clone(),
        FakeAgents::new(),
        &[("full", 16), ("half", 16), ("light", 16)],
    );
    f.place_on(0, &["a1", "a2", "a3"], "business", false).await;
    f.place_on(1, &["b1", "b2"], "business", false).await;
    f.place_on(2, &["c1"], "business", false).await;
    // The plan empties light, then half; half's drain record cannot be written.
    store.refuse(&format!("{DRAIN_PREFIX}half"));
    let e = f.d.compact(compaction(false)).await.unwrap_err();
    match &e {
        DrainError::CompactionStopped {
            host,
            started,
            cause,
        } => {
            assert_eq!(
                (host.as_str(), started.as_slice()),
                ("half", &["light".to_string()][..])
            );
            assert!(
                matches!(**cause, DrainError::Store(StoreError::Io(_))),
                "{cause:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    let message = e.to_string();
    assert!(
        message.starts_with("compaction stopped at host half: store I/O: no space left on device; the drains of light were started and go on"),
        "{message}"
    );
    // light's drain runs to its end; half is untouched: not draining, taking tenants, its own
    // still on it, and what the plan reserved for them on full given back.
    f.d.drains.wait_finished(&f.hosts[2]).await;
    assert_eq!(f.d.drain_status(&f.hosts[2]).unwrap().phase, "done");
    assert!(f.runs_healthy(&id("c1"), &f.hosts[0]));
    assert_eq!(f.state(1), HostState::Ready);
    assert!(f.d.drain_status(&f.hosts[1]).is_err(), "no drain of half");
    for t in ["b1", "b2"] {
        assert!(f.runs_healthy(&id(t), &f.hosts[1]), "{t}");
    }
    assert_eq!(f.agents.overlaps(), Vec::<String>::new());
    let loads = f.c.placements.host_loads();
    let full = &loads[&f.hosts[0]];
    assert_eq!(
        full.tenants, 4,
        "a1-a3 and c1, nothing reserved for b1, b2: {full:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_compaction_moves_each_tenant_just_before_its_nightly_restart_inside_its_window() {
    let f = Fleet::new(&[("full", 16), ("light", 16)]);
    f.place_on(0, &["a1", "a2", "a3"], "business", false).await;
    f.place_on(1, &["c1", "c2"], "business", false).await;
    let now = f.c.registry.now();
    let hour = 3_600_000;
    // c1's window opens in 2 h, its restart at 2.5 h; c2 has nightly restarts off.
    f.agents
        .plan_restart(&id("c1"), now + 2 * hour, now + 5 * hour / 2);
    f.until(|| {
        f.c.placements
            .tenant(&id("c1"))
            .and_then(|t| t.status)
            .is_some_and(|s| s.next_restart_unix_ms > 0)
    })
    .await;
    let at = now + 5 * hour / 2 - 10 * 60_000;
    let plan = f.d.compact(compaction(true)).await.unwrap();
    let when: BTreeMap<&str, i64> = plan.emptied[0]
        .moves
        .iter()
        .map(|m| (m.tenant_id.as_str(), m.not_before_unix_ms))
        .collect();
    assert_eq!(when, BTreeMap::from([("c1", at), ("c2", 0)]));

    let began = tokio::time::Instant::now();
    f.d.compact(compaction(false)).await.unwrap();
    f.until(|| f.runs_healthy(&id("c2"), &f.hosts[0])).await;
    // Two hours on, c1 still runs where it was, its move not begun.
    tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
    assert_eq!(
        f.d.drains.phase_of(&f.hosts[1], &id("c1")),
        Some(MovePhase::Planned)
    );
    assert!(f.runs_healthy(&id("c1"), &f.hosts[1]));
    f.d.drains.wait_finished(&f.hosts[1]).await;
    let status = f.d.drain_status(&f.hosts[1]).unwrap();
    assert_eq!(status.phase, "done", "{status:?}");
    assert!(f.runs_healthy(&id("c1"), &f.hosts[0]));
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_millis((at - now) as u64),
        "moved after {waited:?}"
    );
    assert!(
        waited < Duration::from_millis((at - now) as u64 + 600_000),
        "{waited:?}"
    );
    assert_eq!(f.agents.overlaps(), Vec::<String>::new());
}

#[test]
fn a_move_in_the_window_starts_before_the_restart_but_never_before_the_window_opens() {
    let status = |opens: i64, at: i64| proto::TenantStatus {
        restart_window_opens_unix_ms: opens,
        next_restart_unix_ms: at,
        ..Default::default()
    };
    let min = 60_000;
    assert_eq!(cut_over_from(&status(100 * min, 130 * min), 0), 120 * min);
    // A restart 3 minutes into its window: the move starts as the window opens.
    assert_eq!(cut_over_from(&status(100 * min, 103 * min), 0), 100 * min);
    // Nightly restarts off, or the time has come: at once.
    assert_eq!(cut_over_from(&status(0, 0), 0), 0);
    assert_eq!(cut_over_from(&status(100 * min, 130 * min), 125 * min), 0);
}

#[tokio::test(start_paused = true)]
async fn a_compaction_request_names_the_field_it_refuses() {
    let refused =
        |r: proto::CompactRequest| CompactRequest::from_request(&r).unwrap_err().to_string();
    assert_eq!(
        refused(proto::CompactRequest {
            providers: vec!["hetzner".into(), "gcp".into()],
            ..Default::default()
        }),
        "invalid providers[1]: unknown provider \"gcp\" (expected hetzner, aws or other)"
    );
    assert_eq!(
        refused(proto::CompactRequest {
            headroom_percent: Some(95),
            ..Default::default()
        }),
        "headroom_percent: 95 is more than 90"
    );
    assert_eq!(
        refused(proto::CompactRequest {
            max_moves: 10_001,
            ..Default::default()
        }),
        "max_moves: 10001 is more than 10000"
    );
    assert_eq!(
        refused(proto::CompactRequest {
            deadline_ms: 10,
            ..Default::default()
        }),
        "deadline_ms: 10 ms is less than 1 s"
    );
    let defaults = CompactRequest::from_request(&proto::CompactRequest::default()).unwrap();
    assert_eq!(defaults.plan, CompactOptions::default());
}

/// Starts a drain of `src` (one business tenant `t1`, written once) towards `dst` with
/// `fault` injected, and returns the fleet.
async fn with_fault(fault_on_source: bool, step: Step, effect: Effect) -> Fleet {
    let f = Fleet::new(&[("src", 16), ("dst", 16)]);
    f.place_on(0, &["t1"], "business", false).await;
    f.agents.write(&f.hosts[0], &id("t1"));
    let on = if fault_on_source { 0 } else { 1 };
    f.agents.inject(&f.hosts[on], step, effect);
    f
}

/// After a move that did not happen: `t1` runs on the source alone, with its data, and the
/// target holds nothing of it.
fn assert_back_on_source(f: &Fleet) {
    assert!(f.runs_healthy(&id("t1"), &f.hosts[0]));
    assert_eq!(f.agents.volume(&f.hosts[0], &id("t1")).unwrap().content, 1);
    assert_eq!(f.agents.volume(&f.hosts[1], &id("t1")), None);
    assert!(!f.agents.holds_precopy(&f.hosts[1], &id("t1")));
    assert_eq!(f.agents.overlaps(), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn a_failed_pre_copy_only_makes_the_copy_after_the_stop_whole() {
    let failed = Effect::Fail("export: read error".into());
    let f = with_fault(true, Step::Export { precopy: true }, failed).await;
    let status = f.drain(f.options(0)).await;
    assert_eq!(status.phase, "done");
    let m = &status.moves[0];
    assert_eq!(
        m.bytes_after_stop, VOLUME_BYTES,
        "the whole volume after the stop"
    );
    assert_eq!(f.agents.volume(&f.hosts[1], &id("t1")).unwrap().content, 1);
}

#[tokio::test(start_paused = true)]
async fn a_source_that_does_not_stop_its_tenant_rolls_the_move_back() {
    let f = with_fault(true, Step::Ack, Effect::Hang).await;
    let status = f.drain(f.options(0)).await;
    assert_eq!(status.phase, "incomplete");
    let (phase, error) = &moves(&status)["t1"];
    assert_eq!(phase, "rolled_back");
    assert!(
        error.starts_with("stopping on src: the host did not acknowledge generation"),
        "{error}"
    );
    assert_eq!(f.placed_on("t1"), "src");
    assert_back_on_source(&f);
}

#[tokio::test(start_paused = true)]
async fn a_copy_that_fails_after_the_stop_rolls_the_move_back_with_the_data() {
    let failed = Effect::Fail("export: disk read error".into());
    let f = with_fault(true, Step::Export { precopy: false }, failed).await;
    let status = f.drain(f.options(0)).await;
    let (phase, error) = &moves(&status)["t1"];
    assert_eq!(
        (status.phase.as_str(), phase.as_str()),
        ("incomplete", "rolled_back")
    );
    assert_eq!(error, "copy (src): export: disk read error");
    // The copy on top of the pre-copy failed, then the whole one: two tries.
    let tries = f
        .agents
        .log()
        .iter()
        .filter(|l| *l == "src VOLUME_ACTION_EXPORT t1 failed")
        .count();
    assert_eq!(tries, 2);
    assert_back_on_source(&f);
}

#[tokio::test(start_paused = true)]
async fn a_tenant_that_never_turns_healthy_on_its_target_goes_back_to_its_source() {
    let f = with_fault(false, Step::Health, Effect::Hang).await;
    let status = f.drain(f.options(0)).await;
    let (phase, error) = &moves(&status)["t1"];
    assert_eq!(phase, "rolled_back");
    assert_eq!(
        error,
        "not healthy on dst within 120s: running but not healthy "
    );
    assert_back_on_source(&f);
}

/// An abort while `t1`'s move waits at `phase` (held there by `step` hanging): the move ends
/// as `ended`, `t1` back on its source with its data.
async fn abort_at(fault_on_source: bool, step: Step, phase: MovePhase, ended: &str) {
    let f = with_fault(fault_on_source, step, Effect::Hang).await;
    f.d.drain(f.options(0)).await.unwrap();
    f.until_phase(0, "t1", phase).await;
    let status = f.d.abort_drain(&f.hosts[0]).await.unwrap();
    assert_eq!(status.phase, "aborted");
    let (move_phase, error) = &moves(&status)["t1"];
    assert_eq!(move_phase, ended, "aborted while {phase:?}: {error}");
    assert!(error.starts_with("the drain was aborted"), "{error}");
    f.agents.heal(&f.hosts[0]);
    f.agents.heal(&f.hosts[1]);
    f.until(|| f.runs_healthy(&id("t1"), &f.hosts[0])).await;
    assert_back_on_source(&f);
    assert_eq!(f.state(0), HostState::Cordoned);
}

#[tokio::test(start_paused = true)]
async fn an_abort_while_pre_copying_leaves_the_tenant_where_it_runs() {
    abort_at(
        false,
        Step::Import { precopy: true },
        MovePhase::Precopying,
        "not_moved",
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_abort_while_the_source_stops_the_tenant_rolls_it_back() {
    abort_at(true, Step::Ack, MovePhase::Stopping, "rolled_back").await;
}

#[tokio::test(start_paused = true)]
async fn an_abort_while_copying_rolls_the_tenant_back() {
    abort_at(
        false,
        Step::Import { precopy: false },
        MovePhase::Copying,
        "rolled_back",
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_abort_while_copying_cancels_the_transfer_at_both_ends() {
    let f = with_fault(false, Step::Import { precopy: false }, Effect::Hang).await;
    f.d.drain(f.options(0)).await.unwrap();
    f.until_phase(0, "t1", MovePhase::Copying).await;
    f.d.abort_drain(&f.hosts[0]).await.unwrap();
    let cancels: Vec<String> = f
        .agents
        .log()
        .into_iter()
        .filter(|l| l.contains(" CANCEL "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(cancels, ["src", "dst"]);
}

#[tokio::test(start_paused = true)]
async fn an_abort_while_the_target_starts_the_tenant_rolls_it_back() {
    abort_at(false, Step::Health, MovePhase::Starting, "rolled_back").await;
}

#[tokio::test(start_paused = true)]
async fn an_abort_after_the_target_runs_the_tenant_finishes_the_move() {
    // The source cannot shred its old copy yet: the move is releasing when the abort comes.
    let f = with_fault(true, Step::Purge, Effect::Hang).await;
    f.d.drain(f.options(0)).await.unwrap();
    f.until_phase(0, "t1", MovePhase::Releasing).await;
    let status = f.d.abort_drain(&f.hosts[0]).await.unwrap();
    let (phase, error) = &moves(&status)["t1"];
    assert_eq!(
        phase, "done",
        "nothing rolls back once it runs on its target"
    );
    assert!(
        error.starts_with("its old copy on src is not deleted: host \"src\" did not answer"),
        "{error}"
    );
    assert_eq!(status.stale_copies, ["t1"]);
    assert!(f.runs_healthy(&id("t1"), &f.hosts[1]));
    // The source answers again at its next session: the stale copy goes.
    f.agents.heal(&f.hosts[0]);
    f.agents.connect(&f.d, &f.hosts[0]);
    f.until(|| f.agents.volume(&f.hosts[0], &id("t1")).is_none())
        .await;
    f.until(|| {
        f.d.drain_status(&f.hosts[0])
            .unwrap()
            .stale_copies
            .is_empty()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_reaches_its_deadline_rolls_back_what_is_under_way() {
    let f = with_fault(false, Step::Import { precopy: false }, Effect::Hang).await;
    let status = f
        .drain(DrainOptions {
            deadline: Duration::from_secs(90),
            ..f.options(0)
        })
        .await;
    assert_eq!(status.phase, "stopped_at_deadline");
    let (phase, error) = &moves(&status)["t1"];
    assert_eq!(
        (phase.as_str(), error.as_str()),
        ("rolled_back", "the drain's deadline passed")
    );
    f.agents.heal(&f.hosts[1]);
    assert_back_on_source(&f);
}

/// A coordinator killed while `t1`'s move is at `phase` (held there by `step` hanging), then
/// started again over the same store: the drain resumes where the move was and ends with
/// `t1` on its target, its data with it, never on two hosts at once.
fn resume_at(fault_on_source: bool, step: Step, phase: MovePhase) {
    let store = Arc::new(MemStore::default());
    let agents = FakeAgents::new();
    let hosts = [("src", 16), ("dst", 16)];
    let first = paused_runtime();
    first.block_on(async {
        let f = Fleet::open(store.clone(), agents.clone(), &hosts);
        f.place_on(0, &["t1"], "business", false).await;
        f.agents.write(&f.hosts[0], &id("t1"));
        let on = if fault_on_source { 0 } else { 1 };
        f.agents.inject(&f.hosts[on], step, Effect::Hang);
        f.d.drain(f.options(0)).await.unwrap();
        f.until_phase(0, "t1", phase).await;
    });
    // Killed: its tasks end where they are; the agents keep what they hold.
    drop(first);
    for (name, _) in hosts {
        agents.heal(&host(name));
    }
    paused_runtime().block_on(async {
        let f = Fleet::open(store, agents, &hosts);
        f.d.resume();
        f.until(|| f.d.drains.get(&f.hosts[0]).unwrap().phase != DrainPhase::Running)
            .await;
        let status = f.d.drain_status(&f.hosts[0]).unwrap();
        assert_eq!(status.phase, "done", "resumed at {phase:?}: {status:?}");
        assert!(f.runs_healthy(&id("t1"), &f.hosts[1]));
        assert_eq!(f.agents.volume(&f.hosts[1], &id("t1")).unwrap().content, 1);
        f.until(|| f.agents.volume(&f.hosts[0], &id("t1")).is_none())
            .await;
        assert_eq!(f.agents.overlaps(), Vec::<String>::new());
        assert_eq!(f.state(0), HostState::Cordoned);
    });
}

#[tokio::test(start_paused = true)]
async fn a_host_marked_draining_with_no_drain_running_is_left_cordoned_at_the_next_start() {
    // The coordinator stopped between marking src draining and recording its drain.
    let store: Arc<dyn Store> = Arc::new(MemStore::default());
    let hosts = [("src", 16), ("dst", 16)];
    let f = Fleet::open(store.clone(), FakeAgents::new(), &hosts);
    f.c.registry
        .set_draining(&f.hosts[0], true, |r| f.c.sync_host(r))
        .unwrap();
    assert!(
        f.d.abort_drain(&f.hosts[0]).await.is_err(),
        "no drain to abort"
    );
    let restarted = Fleet::open(store, FakeAgents::new(), &hosts);
    restarted.d.resume();
    assert_eq!(restarted.state(0), HostState::Cordoned);
    assert_eq!(restarted.state(1), HostState::Ready);
    restarted
        .c
        .registry
        .set_cordoned(&restarted.hosts[0], false, |r| restarted.c.sync_host(r))
        .unwrap();
    assert_eq!(restarted.state(0), HostState::Ready);
}

#[test]
fn a_drain_resumes_after_a_restart_while_pre_copying() {
    resume_at(false, Step::Import { precopy: true }, MovePhase::Precopying);
}

#[test]
fn a_drain_resumes_after_a_restart_while_the_source_stops_the_tenant() {
    resume_at(true, Step::Ack, MovePhase::Stopping);
}

#[test]
fn a_drain_resumes_after_a_restart_while_copying() {
    resume_at(false, Step::Import { precopy: false }, MovePhase::Copying);
}

#[test]
fn a_drain_resumes_after_a_restart_while_the_target_starts_the_tenant() {
    resume_at(false, Step::Health, MovePhase::Starting);
}

#[test]
fn a_drain_resumes_after_a_restart_while_the_source_releases_its_copy() {
    resume_at(true, Step::Purge, MovePhase::Releasing);
}

#[tokio::test(start_paused = true)]
async fn a_lost_hosts_tenants_stay_unless_forced_then_start_empty_and_its_copy_is_fenced() {
    let f = Fleet::new(&[("src", 16), ("dst", 16)]);
    f.place_on(0, &["t1"], "business", true).await;
    f.agents.write(&f.hosts[0], &id("t1"));
    let key = f.c.keys.get(&id("t1")).unwrap().unwrap();
    // Cut off, not dead: its tenant goes on running where nobody reaches it.
    f.agents.disconnect(&f.hosts[0], false);
    let status = f.drain(f.options(0)).await;
    assert_eq!(status.phase, "incomplete");
    let (phase, error) = &moves(&status)["t1"];
    assert_eq!(phase, "blocked");
    assert_eq!(
        error,
        "host src is unreachable: t1 stays assigned to it; `berthctl drain src --force-lost` starts it on dst restored from its latest backup"
    );
    assert_eq!(f.placed_on("t1"), "src");
    // On the operator's word: started on the target, empty, under a new key.
    let status = f
        .drain(DrainOptions {
            force_lost: true,
            empty: true,
            ..f.options(0)
        })
        .await;
    assert_eq!(status.phase, "done");
    let (phase, error) = &moves(&status)["t1"];
    assert_eq!(phase, "started_empty");
    assert_eq!(error, "src was lost: started on dst with an empty volume");
    assert_eq!(status.stale_copies, ["t1"]);
    assert_eq!(f.agents.volume(&f.hosts[1], &id("t1")).unwrap().content, 0);
    assert_ne!(f.c.keys.get(&id("t1")).unwrap().unwrap(), key, "a new key");
    assert_eq!(f.agents.running(&id("t1")), [host("dst"), host("src")]);
    // The lost host comes back: its desired state no longer has the tenant, so it stops it,
    // and its copy is deleted.
    f.agents.connect(&f.d, &f.hosts[0]);
    f.until(|| f.agents.running(&id("t1")) == [host("dst")])
        .await;
    f.until(|| f.agents.volume(&f.hosts[0], &id("t1")).is_none())
        .await;
    f.until(|| {
        f.d.drain_status(&f.hosts[0])
            .unwrap()
            .stale_copies
            .is_empty()
    })
    .await;
    assert!(f.runs_healthy(&id("t1"), &f.hosts[1]));
    assert_eq!(f.agents.overlaps(), Vec::<String>::new());
}

/// A lost host's tenants start elsewhere restored from their latest backups, each move
/// reporting its recovery point; one never backed up starts empty and says so; without
/// `--empty` and without a backup repository the drain is refused.
#[tokio::test(start_paused = true)]
async fn a_lost_hosts_tenants_start_elsewhere_from_their_latest_backups() {
    let f = Fleet::new(&[("src", 16), ("dst", 16)]);
    f.place_on(0, &["t1", "t2"], "business", true).await;
    f.agents.write(&f.hosts[0], &id("t1"));
    f.c.backup(&id("t1")).await.expect("first backup");
    f.agents.write(&f.hosts[0], &id("t1"));
    f.c.backup(&id("t1")).await.expect("second backup");
    let backed_up = f.agents.volume(&f.hosts[0], &id("t1")).unwrap().content;
    // Written after its last backup: lost with the host.
    f.agents.write(&f.hosts[0], &id("t1"));
    let listed = f.c.list_backups(&id("t1")).await.unwrap().snapshots;
    assert_eq!(listed.len(), 2);
    f.agents.disconnect(&f.hosts[0], true);

    let status = f
        .drain(DrainOptions {
            force_lost: true,
            ..f.options(0)
        })
        .await;
    assert_eq!(status.phase, "done", "{:?}", moves(&status));
    let all = moves(&status);
    let (phase, note) = &all["t1"];
    assert_eq!(phase, "restored");
    assert_eq!(
        note,
        &format!(
            "src was lost: restored on dst from snapshot {} of {}",
            listed[1].short_id, listed[1].time
        )
    );
    let point = status
        .moves
        .iter()
        .find(|m| m.tenant_id == "t1")
        .and_then(|m| m.restored.clone())
        .expect("a recovery point");
    assert_eq!(point.id, listed[1].id, "the latest snapshot");
    assert_eq!(
        f.agents.volume(&f.hosts[1], &id("t1")).unwrap().content,
        backed_up,
        "the data of its last backup"
    );
    let (phase, note) = &all["t2"];
    assert_eq!(phase, "started_empty");
    assert_eq!(
        note,
        "src was lost and t2 has no backup: started on dst with an empty volume"
    );
    assert!(f.runs_healthy(&id("t1"), &f.hosts[1]));
    // The restore is not asked again of a later move: the volume travels with the tenant.
    let record = f.c.placements.tenant_record(&id("t1")).unwrap();
    let moved =
        f.c.placements
            .relocate(&id("t1"), &f.hosts[1], false)
            .unwrap();
    assert!(record.spec.restore.is_some());
    assert_eq!(
        f.c.placements
            .tenant_record(&id("t1"))
            .unwrap()
            .spec
            .restore,
        None,
        "generation {}",
        moved.placement.generation
    );
}

#[tokio::test(start_paused = true)]
async fn a_restoring_drain_needs_a_backup_repository_and_empty_needs_force_lost() {
    let clock = Arc::new(ManualClock::at(seed::SEED_TIME_MS));
    let store: Arc<MemStore> = Arc::default();
    let mut c = seed::open(
        store.clone(),
        clock,
        Keyring::in_memory(),
        FakeAgents::new(),
    )
    .unwrap();
    c.config.backup_repository = None;
    let c = Arc::new(c);
    let h = host("src");
    seed::enroll(
        &c,
        &h,
        "00000000",
        seed::facts(&h, Provider::Hetzner, "fsn1", 16, 8),
    )
    .unwrap();
    let d = Drainer::open(c.clone(), store).unwrap();
    let err = d
        .drain(DrainOptions {
            host: h.clone(),
            dry_run: false,
            deadline: DEFAULT_DEADLINE,
            max_parallel: DEFAULT_MAX_PARALLEL,
            force_lost: true,
            empty: false,
            no_precopy: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot restore src's tenants: the coordinator's config has no [backup] repository; `berthctl drain src --force-lost --empty` starts them on empty volumes"
    );
    assert!(d.drain_status(&h).is_err(), "nothing started");
    let err = DrainOptions::from_request(&proto::DrainRequest {
        host_id: "src".into(),
        empty: true,
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "empty: only with force_lost (a reachable host's tenants move with their volumes)"
    );
}

/// `berthctl restore --to-host`: the tenant starts on the other host from its backup (checked
/// like a placement there), and its copy on the host it left is deleted once that stopped it;
/// an encrypted one gets a new key. A host that cannot take it, or a source that is not
/// connected, is refused before anything changes.
#[tokio::test(start_paused = true)]
async fn a_restore_onto_another_host_moves_the_tenant_without_its_old_copy() {
    let f = Fleet::new(&[("src", 16), ("dst", 16), ("full", 16)]);
    f.place_on(0, &["t1"], "business", true).await;
    f.agents.write(&f.hosts[0], &id("t1"));
    f.c.backup(&id("t1")).await.unwrap();
    let backed_up = f.agents.volume(&f.hosts[0], &id("t1")).unwrap().content;
    f.agents.write(&f.hosts[0], &id("t1"));
    let key = f.c.keys.get(&id("t1")).unwrap().unwrap();

    f.c.registry
        .set_cordoned(&f.hosts[2], true, |r| f.c.sync_host(r))
        .unwrap();
    let err =
        f.c.restore(&id("t1"), None, Some(&f.hosts[2]))
            .await
            .unwrap_err();
    assert_eq!(
        err.to_string(),
        "host full cannot take tenant t1: not ready (cordoned, draining or down)"
    );
    assert_eq!(f.placed_on("t1"), "src", "nothing changed");

    let done =
        f.c.restore(&id("t1"), None, Some(&f.hosts[1]))
            .await
            .unwrap();
    assert_eq!(done.host_id, "dst");
    assert_eq!(done.moved_from, "src");
    assert!(done.old_copy_deleted);
    assert_eq!(done.restored.unwrap().short_id, "00000001");
    assert_eq!(
        f.agents.volume(&f.hosts[1], &id("t1")).unwrap().content,
        backed_up
    );
    assert!(f.agents.volume(&f.hosts[0], &id("t1")).is_none(), "deleted");
    assert_eq!(f.agents.running(&id("t1")), [host("dst")]);
    assert_ne!(f.c.keys.get(&id("t1")).unwrap().unwrap(), key, "a new key");
    assert_eq!(f.agents.overlaps(), Vec::<String>::new());

    f.agents.disconnect(&f.hosts[1], false);
    let err =
        f.c.restore(&id("t1"), None, Some(&f.hosts[0]))
            .await
            .unwrap_err();
    assert_eq!(
        err.to_string(),
        "t1 runs on dst, which is not connected: `berthctl drain dst --force-lost` restores a lost host's tenants elsewhere"
    );
}
