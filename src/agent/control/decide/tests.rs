//! The decision core's rules, each driven with injected instants: no clock, no sockets.
use std::collections::BTreeMap;

use bytes::Bytes;

use super::*;
use crate::sync::changeset::{Changeset, Mode};
use crate::sync::manifest::{Entry, Hash, Manifest};
use crate::sync::store::FsStore;

/// A release with one file holding `n` (built from memory: the store is never read).
fn release(n: u8) -> Arc<Release> {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FsStore::open(dir.path()).unwrap());
    let data = Bytes::from(vec![n]);
    let hash = Hash::of(&data);
    let entry = Entry {
        hash,
        size: 1,
        content_type: crate::sync::manifest::content_type("a.txt"),
    };
    let manifest = Manifest::new(BTreeMap::from([("a.txt".to_string(), entry)])).unwrap();
    let fresh = HashMap::from([(hash, data)]);
    Arc::new(Release::build_reusing(&store, manifest, None, &fresh).unwrap())
}

/// Hub time equals local time: `Anchor` at wall 0, offset 0.
fn anchor(t0: Instant) -> Anchor {
    Anchor {
        wall_us: 0,
        mono: t0,
    }
}

const EXACT: Offset = Offset {
    offset_us: 0,
    error_us: 0,
};
const NO_GC: Gc = Gc {
    interval: Duration::ZERO,
    grace: Duration::ZERO,
};

fn core(t0: Instant, current: Option<Arc<Release>>, applied: Applied) -> Core {
    let start = Start {
        current,
        previous: None,
        applied,
    };
    let mut c = Core::new(anchor(t0), NO_GC, start, t0);
    c.on_clock(EXACT);
    c
}

fn schedule(active: &Arc<Release>, staged: Option<(&Arc<Release>, u64)>, now_us: u64) -> Schedule {
    Schedule {
        version: 1,
        cycle: 7,
        active: Some(active.id()),
        staged: staged.map(|(r, _)| r.id()),
        activation_us: staged.map(|(_, at)| at),
        queued: None,
        previous: None,
        now_us,
        applied: Applied::new(),
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// A cancel that wins, counting its calls.
fn cancels(n: &mut u32) -> impl FnMut() -> bool + '_ {
    move || {
        *n += 1;
        true
    }
}

fn arms(actions: &[Action]) -> Vec<(ReleaseId, Instant)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Arm { plan, deadline, .. } => Some((plan.id, *deadline)),
            _ => None,
        })
        .collect()
}

fn stages(actions: &[Action]) -> Vec<ReleaseId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Stage(id) => Some(*id),
            _ => None,
        })
        .collect()
}

fn activates(actions: &[Action]) -> Vec<ReleaseId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Activate(r) => Some(r.id()),
            _ => None,
        })
        .collect()
}

fn install(origin: &str, seq: u64) -> Install {
    Install {
        cs: Changeset {
            origin: origin.into(),
            seq,
            mode: Mode::Immediate,
            base: None,
            detected_us: 0,
            changes: BTreeMap::new(),
        },
        remote: true,
        blobs: Vec::new(),
    }
}

fn none_staging() -> HashSet<ReleaseId> {
    HashSet::new()
}

#[test]
fn a_staged_release_is_fetched_then_armed_for_its_instant() {
    let t0 = Instant::now();
    let (one, two) = (release(1), release(2));
    let mut c = core(t0, Some(one.clone()), Applied::new());
    let at = t0 + Duration::from_secs(10);
    c.on_schedule(schedule(&one, Some((&two, us(at - t0))), 0), t0);
    let a = c.replan(t0, &none_staging(), &mut || unreachable!("nothing armed"));
    assert_eq!(stages(&a), vec![two.id()]);
    assert!(arms(&a).is_empty(), "not armed before it is staged");
    c.on_staged(two.id(), two.clone());
    let a = c.replan(t0, &HashSet::new(), &mut || unreachable!("nothing armed"));
    assert_eq!(arms(&a), vec![(two.id(), at)]);
    assert!(stages(&a).is_empty());
    // Reported as staged (ready, not served).
    assert!(matches!(a.last(), Some(Action::Staged(Some(id))) if *id == two.id()));
    // Nothing changes: nothing is done again.
    let a = c.replan(t0, &HashSet::new(), &mut || unreachable!("not re-armed"));
    assert!(arms(&a).is_empty());
}

#[test]
fn a_staged_release_whose_activation_has_passed_flips_at_once() {
    let t0 = Instant::now();
    let (zero, one, two) = (release(0), release(1), release(2));
    // Serving 0 while the fleet serves 1 and 2 was due 5 s ago: straight to 2.
    let mut c = core(t0, Some(zero), Applied::new());
    let now = t0 + Duration::from_secs(10);
    c.on_schedule(
        schedule(&one, Some((&two, us(Duration::from_secs(5)))), us(now - t0)),
        now,
    );
    c.on_staged(one.id(), one.clone());
    c.on_staged(two.id(), two.clone());
    let a = c.replan(now, &none_staging(), &mut || unreachable!());
    assert!(activates(&a).is_empty(), "no useless step through 1");
    let armed = arms(&a);
    assert_eq!(armed.len(), 1);
    assert_eq!(armed[0].0, two.id());
    assert!(
        armed[0].1 <= now,
        "a past deadline: the flip thread fires at once"
    );
    assert!(
        !a.iter().any(|a| matches!(a, Action::Measure)),
        "too late to measure"
    );
}

#[test]
fn a_replan_cancels_the_flip_armed_for_a_superseded_release() {
    let t0 = Instant::now();
    let (one, two, three) = (release(1), release(2), release(3));
    let mut c = core(t0, Some(one.clone()), Applied::new());
    c.on_staged(two.id(), two.clone());
    c.on_schedule(schedule(&one, Some((&two, 10_000_000)), 0), t0);
    let a = c.replan(t0, &none_staging(), &mut || unreachable!());
    assert_eq!(arms(&a).len(), 1);
    // The hub stages 3 instead, not yet held: 2's flip is cancelled, nothing armed.
    c.on_schedule(schedule(&one, Some((&three, 20_000_000)), 0), t0);
    let mut cancelled = 0;
    let a = c.replan(t0, &none_staging(), &mut cancels(&mut cancelled));
    assert_eq!(cancelled, 1);
    assert!(c.armed().is_none());
    assert!(arms(&a).is_empty());
    assert_eq!(stages(&a), vec![three.id()]);
    // Once 3 is staged it is armed.
    c.on_staged(three.id(), three.clone());
    let a = c.replan(t0, &HashSet::from([three.id()]), &mut || unreachable!());
    assert_eq!(arms(&a), vec![(three.id(), t0 + Duration::from_secs(20))]);
    // Replaced while armed: cancelled, told, re-armed.
    c.on_staged(two.id(), two.clone());
    c.on_schedule(schedule(&one, Some((&two, 10_000_000)), 0), t0);
    let mut cancelled = 0;
    let a = c.replan(t0, &none_staging(), &mut cancels(&mut cancelled));
    assert_eq!(cancelled, 1);
    assert!(a.iter().any(
        |a| matches!(a, Action::Superseded { was, by } if *was == three.id() && *by == two.id())
    ));
    assert_eq!(arms(&a), vec![(two.id(), t0 + Duration::from_secs(10))]);
}

#[test]
fn a_staging_no_longer_wanted_is_aborted() {
    let t0 = Instant::now();
    let (one, two, three) = (release(1), release(2), release(3));
    let mut c = core(t0, Some(one.clone()), Applied::new());
    c.on_schedule(schedule(&one, Some((&three, 10_000_000)), 0), t0);
    let a = c.replan(t0, &HashSet::from([two.id(), three.id()]), &mut || true);
    let aborted: Vec<_> = a
        .iter()
        .filter_map(|a| match a {
            Action::Abort(id) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(aborted, vec![two.id()]);
    assert!(stages(&a).is_empty(), "3 is being staged already");
}

#[test]
fn a_flip_that_fired_before_its_cancel_is_accounted_for_before_a_bootstrap() {
    let t0 = Instant::now();
    let (one, two, three) = (release(1), release(2), release(3));
    let mut c = core(t0, Some(one.clone()), Applied::new());
    c.on_staged(two.id(), two.clone());
    c.on_schedule(schedule(&one, Some((&two, 1_000_000)), 0), t0);
    c.replan(t0, &none_staging(), &mut || unreachable!());
    let plan = c.armed().unwrap().plan;
    // The fleet moved to 3 (held) while 2's flip thread fired: the cancel loses.
    c.on_staged(three.id(), three.clone());
    c.on_schedule(schedule(&three, None, 2_000_000), t0);
    let a = c.replan(t0, &none_staging(), &mut || false);
    assert!(
        activates(&a).is_empty(),
        "no bootstrap over a flip not accounted for"
    );
    // Its Fired arrives: 2 is served, then the bootstrap to 3 goes ahead.
    let f = c.on_fired(Fired {
        release: two.clone(),
        at: t0 + Duration::from_secs(1),
        tag: Tag::Scheduled(plan),
    });
    assert!(!f.was_armed);
    assert_eq!(c.current().map(|r| r.id()), Some(two.id()));
    let a = c.replan(t0, &none_staging(), &mut || unreachable!());
    assert_eq!(activates(&a), vec![three.id()]);
    assert_eq!(c.current().map(|r| r.id()), Some(three.id()));
}

#[test]
fn a_scheduled_flip_moves_active_to_previous_and_measures_its_lateness() {
    let t0 = Instant::now();
    let (one, two) = (release(1), release(2));
    let mut c = core(t0, Some(one.clone()), Applied::new());
    c.on_staged(two.id(), two.clone());
    let mut s = schedule(&one, Some((&two, 1_000_000)), 0);
    s.applied = Applied::from([("b".to_string(), 4)]);
    c.on_schedule(s, t0);
    c.replan(t0, &none_staging(), &mut || unreachable!());
    let plan = c.armed().unwrap().plan;
    // What the flip's recorder writes before the controller hears of the flip.
    let recorded = c.state_after(&two, &Tag::Scheduled(plan));
    let f = c.on_fired(Fired {
        release: two.clone(),
        at: t0 + Duration::from_micros(1_000_250),
        tag: Tag::Scheduled(plan),
    });
    assert_eq!(
        recorded,
        AgentState {
            active: Some(two.id()),
            previous: f.previous,
            applied: f.applied.clone(),
        },
        "the flip thread's record is the controller's"
    );
    assert!(f.was_armed);
    assert!(c.armed().is_none());
    assert_eq!(f.previous, Some(one.id()));
    assert_eq!(f.lateness_us, Some(250));
    // The hub's release includes what its schedule says.
    assert_eq!(f.applied, Applied::from([("b".to_string(), 4)]));
    // After the flip, before the hub advances: nothing to do, nothing reported staged.
    let a = c.replan(
        t0 + Duration::from_secs(2),
        &none_staging(),
        &mut || unreachable!(),
    );
    assert!(activates(&a).is_empty() && arms(&a).is_empty() && stages(&a).is_empty());
    assert!(matches!(a.last(), Some(Action::Staged(None))));
}

#[test]
fn a_bootstrap_serves_the_hubs_active_release_once_staged() {
    let t0 = Instant::now();
    let one = release(1);
    let mut c = core(t0, None, Applied::new());
    c.on_schedule(schedule(&one, None, 0), t0);
    let a = c.replan(t0, &none_staging(), &mut || unreachable!());
    assert_eq!(stages(&a), vec![one.id()]);
    assert!(activates(&a).is_empty());
    c.on_staged(one.id(), one.clone());
    let a = c.replan(t0, &none_staging(), &mut || unreachable!());
    assert_eq!(activates(&a), vec![one.id()]);
    let flipped: Vec<_> = a
        .iter()
        .filter_map(|a| match a {
            Action::Flipped(f) => Some((f.release.id(), f.tag, f.previous)),
            _ => None,
        })
        .collect();
    assert_eq!(flipped, vec![(one.id(), Tag::Now, None)]);
}

#[test]
fn the_hubs_release_is_adopted_only_when_its_version_vector_covers_ours() {
    let t0 = Instant::now();
    let (mine, hubs) = (release(1), release(2));
    // This agent installed b/5 directly; the hub's release includes only b/4.
    let ours = Applied::from([("b".to_string(), 5)]);
    let mut c = core(t0, Some(mine.clone()), ours);
    let mut s = schedule(&hubs, None, 0);
    s.applied = Applied::from([("b".to_string(), 4)]);
    c.on_schedule(s.clone(), t0);
    c.on_staged(hubs.id(), hubs.clone());
    let a = c.replan(t0, &none_staging(), &mut || unreachable!());
    assert!(
        activates(&a).is_empty(),
        "the hub has not heard of b/5: keep ours"
    );
    // The loop wakes when waiting would end.
    assert_eq!(c.next_wake(t0), t0 + ADOPT_ANYWAY);
    let a = c.replan(
        t0 + ADOPT_ANYWAY - Duration::from_millis(1),
        &none_staging(),
        &mut || unreachable!(),
    );
    assert!(activates(&a).is_empty());
    // The hub now includes b/5 (and more): adopted.
    s.applied = Applied::from([("b".to_string(), 5), ("c".to_string(), 1)]);
    c.on_schedule(s, t0);
    // (Held back, it was not kept in memory: fetched again, then served.)
    let later = t0 + Duration::from_secs(1);
    let a = c.replan(later, &none_staging(), &mut || unreachable!());
    assert_eq!(stages(&a), vec![hubs.id()]);
    assert!(!a.iter().any(|a| matches!(a, Action::AdoptAnyway)));
    c.on_staged(hubs.id(), hubs.clone());
    let a = c.replan(later, &none_staging(), &mut || unreachable!());
    assert_eq!(activates(&a), vec![hubs.id()]);
}

#[test]
fn a_hub_that_never_covers_ours_is_adopted_after_adopt_anyway() {
    let t0 = Instant::now();
    let (mine, hubs) = (release(1), release(2));
    let mut c = core(t0, Some(mine), Applied::from([("b".to_string(), 5)]));
    c.on_schedule(schedule(&hubs, None, 0), t0);
    c.on_staged(hubs.id(), hubs.clone());
    assert!(activates(&c.replan(t0, &none_staging(), &mut || true)).is_empty());
    let a = c.replan(t0 + ADOPT_ANYWAY, &none_staging(), &mut || true);
    assert!(a.iter().any(|a| matches!(a, Action::AdoptAnyway)));
    assert_eq!(stages(&a), vec![hubs.id()]);
    c.on_staged(hubs.id(), hubs.clone());
    let a = c.replan(t0 + ADOPT_ANYWAY, &none_staging(), &mut || true);
    assert_eq!(activates(&a), vec![hubs.id()]);
}

#[test]
fn installs_queued_during_an_install_are_applied_in_order_after_it() {
    let t0 = Instant::now();
    let one = release(1);
    let mut c = core(t0, Some(one.clone()), Applied::new());
    assert!(c.next_install().is_none(), "nothing queued");
    c.queue_install(install("b", 1));
    let (base, batch) = c.next_install().unwrap();
    assert_eq!(base.map(|r| r.id()), Some(one.id()));
    assert_eq!(batch.iter().map(|j| j.cs.seq).collect::<Vec<_>>(), vec![1]);
    c.queue_install(install("b", 2));
    c.queue_install(install("c", 1));
    assert!(c.next_install().is_none(), "one install at a time");
    // The batch built on 1 is swapped in; the next batch is the queue, in order, on it.
    assert!(c.may_swap(Some(one.id()), Some(one.id())));
    let built = release(11);
    let f = c.installed(&batch, built.clone(), t0);
    assert_eq!(
        (f.tag, f.previous, f.lateness_us),
        (Tag::Installed, Some(one.id()), None)
    );
    assert_eq!(f.applied, Applied::from([("b".to_string(), 1)]));
    c.install_done();
    let (base, batch) = c.next_install().unwrap();
    assert_eq!(base.map(|r| r.id()), Some(built.id()));
    let names: Vec<_> = batch.iter().map(|j| j.cs.name()).collect();
    assert_eq!(
        names,
        vec![install("b", 2).cs.name(), install("c", 1).cs.name()]
    );
}

#[test]
fn an_install_overtaken_by_a_flip_is_applied_again_first() {
    let t0 = Instant::now();
    let (one, two) = (release(1), release(2));
    let mut c = core(t0, Some(one.clone()), Applied::new());
    c.queue_install(install("b", 1));
    let (_, batch) = c.next_install().unwrap();
    c.queue_install(install("b", 2));
    // A flip to 2 lands while the batch is built on 1: the batch must not overwrite it.
    c.on_fired(Fired {
        release: two.clone(),
        at: t0,
        tag: Tag::Now,
    });
    assert!(!c.may_swap(Some(one.id()), Some(two.id())));
    c.install_done();
    c.requeue(batch);
    let (base, batch) = c.next_install().unwrap();
    assert_eq!(base.map(|r| r.id()), Some(two.id()));
    assert_eq!(
        batch.iter().map(|j| j.cs.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[test]
fn failed_stagings_back_off_and_are_retried_when_due() {
    let t0 = Instant::now();
    let (one, two) = (release(1), release(2));
    let mut c = core(t0, Some(one.clone()), Applied::new());
    c.on_schedule(schedule(&one, Some((&two, 100_000_000)), 0), t0);
    assert_eq!(
        stages(&c.replan(t0, &none_staging(), &mut || true)),
        vec![two.id()]
    );
    assert_eq!(c.on_stage_failed(two.id(), t0), (1, STAGE_RETRY_BASE));
    let a = c.replan(t0, &none_staging(), &mut || true);
    assert!(stages(&a).is_empty(), "waits before retrying");
    assert!(
        !a.iter().any(|a| matches!(a, Action::StagingSettled)),
        "the error stays reported"
    );
    assert_eq!(c.next_wake(t0), t0 + STAGE_RETRY_BASE);
    let again = t0 + STAGE_RETRY_BASE;
    assert_eq!(
        stages(&c.replan(again, &none_staging(), &mut || true)),
        vec![two.id()]
    );
    assert_eq!(
        c.on_stage_failed(two.id(), again),
        (2, STAGE_RETRY_BASE * 2)
    );
    // The hub drops 2: the failure is history.
    c.on_schedule(schedule(&one, None, 0), again);
    let a = c.replan(again, &none_staging(), &mut || true);
    assert!(a.iter().any(|a| matches!(a, Action::StagingSettled)));
    assert!(c.next_wake(again) > again + STAGE_RETRY_MAX);
}

#[test]
fn the_clock_is_measured_again_before_an_armed_flip_and_a_new_estimate_moves_it() {
    let t0 = Instant::now();
    let (one, two) = (release(1), release(2));
    let mut c = core(t0, Some(one.clone()), Applied::new());
    c.on_staged(two.id(), two.clone());
    c.on_schedule(schedule(&one, Some((&two, 10_000_000)), 0), t0);
    let a = c.replan(t0, &none_staging(), &mut || true);
    assert!(
        !a.iter().any(|a| matches!(a, Action::Measure)),
        "far off: measured later"
    );
    let deadline = t0 + Duration::from_secs(10);
    assert_eq!(c.next_wake(t0), deadline - PREMEASURE);
    assert!(c
        .on_wake(deadline - PREMEASURE - Duration::from_millis(1))
        .is_empty());
    let a = c.on_wake(deadline - PREMEASURE);
    assert!(matches!(a[..], [Action::Measure]));
    assert!(c.on_wake(deadline - PREMEASURE).is_empty(), "once");
    // The hub's clock is 2 ms ahead of ours: the flip moves 2 ms earlier.
    let moved = c.on_clock(Offset {
        offset_us: 2_000,
        error_us: 100,
    });
    assert_eq!(moved, Some(deadline - Duration::from_millis(2)));
    assert_eq!(
        c.armed().unwrap().deadline,
        deadline - Duration::from_millis(2)
    );
}

#[test]
fn without_a_clock_a_schedule_asks_for_one_and_a_flip_waits_for_it() {
    let t0 = Instant::now();
    let (one, two) = (release(1), release(2));
    let mut c = Core::new(
        anchor(t0),
        NO_GC,
        Start {
            current: Some(one.clone()),
            ..Start::default()
        },
        t0,
    );
    assert!(c.on_schedule(schedule(&one, Some((&two, 10_000_000)), 0), t0));
    // The rough offset from the schedule is enough to arm.
    c.on_staged(two.id(), two.clone());
    let a = c.replan(t0, &none_staging(), &mut || true);
    assert_eq!(arms(&a), vec![(two.id(), t0 + Duration::from_secs(10))]);
    c.on_clock(EXACT);
    assert!(
        !c.on_schedule(schedule(&one, Some((&two, 10_000_000)), 0), t0),
        "measured already"
    );
}

#[test]
fn the_store_is_collected_on_its_interval_keeping_what_is_held() {
    let t0 = Instant::now();
    let (one, two) = (release(1), release(2));
    let gc = Gc {
        interval: Duration::from_secs(600),
        grace: Duration::from_secs(3600),
    };
    let start = Start {
        current: Some(one.clone()),
        ..Start::default()
    };
    let mut c = Core::new(anchor(t0), gc, start, t0);
    c.on_staged(two.id(), two.clone());
    assert_eq!(c.next_wake(t0), t0 + gc.interval);
    assert!(c.on_wake(t0 + Duration::from_secs(599)).is_empty());
    let a = c.on_wake(t0 + gc.interval);
    let [Action::Collect { keep, grace }] = &a[..] else {
        panic!("expected one collection, got {a:?}");
    };
    let mut keep = keep.clone();
    keep.sort();
    let mut want = vec![one.id(), two.id()];
    want.sort();
    assert_eq!((keep, *grace), (want, gc.grace));
    assert_eq!(c.next_wake(t0 + gc.interval), t0 + gc.interval * 2);
}
