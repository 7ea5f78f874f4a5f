//! Changesets: what one backend changed in its content — paths added,
//! changed and removed, with the hash each had before — and the rules that turn a changeset
//! into a release: applied whole or not at all, and on the hub, with concurrent edits of one
//! path resolved *last writer by hub time wins*.
//!
//! A changeset is named by its origin agent and that agent's sequence number; the hub keeps the
//! highest sequence it has applied per origin (a version vector, [`Applied`]), which is how an
//! agent knows the hub's release includes everything it has installed itself.
//!
//! Pure: no I/O, time is a field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::manifest::{Entry, Hash, Manifest, ManifestError, ReleaseId, MAX_BLOB_BYTES};

/// Most paths one changeset may touch (a bigger change is a release: `lockstep publish`).
pub const MAX_CHANGES: usize = 100_000;
/// Most bytes of new content one changeset may carry.
pub const MAX_CHANGESET_BYTES: u64 = 1024 * 1024 * 1024;

/// How far a changeset's `seq` and `detected_us` may be ahead of the receiver's clock (the
/// hub's receive time, or a peer's estimate of hub time), µs.
///
/// Both numbers are hub time as the origin estimated it when it detected the edit, and the
/// edit travels after it was detected, so an honest one is *behind* the receiver's clock
/// except for clock error: each agent's estimate is good to ε, half the round trip of the best
/// of eight `/time` samples (well under a millisecond on a LAN, a few ms across sites,
/// [`crate::sync::clock`]), re-measured every 30 s, drifting at most a few ms in between
/// (100 ppm); a peer adds its own ε. One second is hundreds of times that, so no honest
/// changeset comes near it, while a forged `seq = u64::MAX` (which would answer every later
/// edit of that origin "duplicate") or a `detected_us` a day ahead (which would win every
/// conflict and never be pruned) is refused.
pub const MAX_AHEAD_US: u64 = 1_000_000;

/// What a detected change becomes (`watch.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Published to the hub: every backend activates it at the next shared instant.
    Scheduled,
    /// Forwarded to every other agent, which installs it at once.
    Immediate,
}

/// One path's change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// The new file; `None` = removed.
    pub entry: Option<Entry>,
    /// The hash the origin had for the path before (None = it had no such file): a receiver
    /// holding something else has a concurrent edit.
    pub prev: Option<Hash>,
}

/// A changeset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Changeset {
    /// The agent it was detected on.
    pub origin: String,
    /// That agent's sequence number (from 1, increasing).
    pub seq: u64,
    /// Scheduled or immediate.
    pub mode: Mode,
    /// The release the origin served when it detected the change.
    pub base: Option<ReleaseId>,
    /// When it was detected, µs on the hub's clock as the origin estimates it.
    pub detected_us: u64,
    /// The changes by path.
    pub changes: BTreeMap<String, Change>,
}

/// Why a changeset is refused (whole: nothing of it is applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChangesetError {
    /// No changes.
    #[error("changeset {0} changes nothing")]
    Empty(String),
    /// Too many paths or bytes.
    #[error("changeset {name}: {what}; send a release with `lockstep publish` instead")]
    TooBig {
        /// origin/seq.
        name: String,
        /// What is over.
        what: String,
    },
    /// The origin name is not a valid agent name.
    #[error("changeset origin `{0}` is not a valid agent name")]
    Origin(String),
    /// A path or the resulting tree is refused.
    #[error("changeset {name} refused: {source}")]
    Manifest {
        /// origin/seq.
        name: String,
        /// Why.
        source: ManifestError,
    },
    /// A number is ahead of the receiver's clock by more than [`MAX_AHEAD_US`].
    #[error(
        "changeset {name} refused: {field} {value} is beyond {bound}, the receiver's hub time \
         plus {allowance} s for clock error ({field} is hub time in µs when the edit was detected)",
        allowance = MAX_AHEAD_US as f64 / 1e6
    )]
    Ahead {
        /// origin/seq.
        name: String,
        /// Which number.
        field: TimeField,
        /// Its value.
        value: u64,
        /// The largest value accepted at that moment.
        bound: u64,
    },
}

/// The numbers of a changeset that are hub time, bounded by [`Changeset::check_time`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeField {
    /// [`Changeset::seq`].
    Seq,
    /// [`Changeset::detected_us`].
    DetectedUs,
}

impl TimeField {
    /// The field's name on the wire (and in metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            TimeField::Seq => "seq",
            TimeField::DetectedUs => "detected_us",
        }
    }
}

impl std::fmt::Display for TimeField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Changeset {
    /// `origin/seq`, for logs.
    pub fn name(&self) -> String {
        format!("{}/{}", self.origin, self.seq)
    }

    /// Checks what does not depend on a base: an origin name, at least one change, valid
    /// paths and sizes, the limits.
    pub fn check(&self) -> Result<(), ChangesetError> {
        if !valid_origin(&self.origin) || self.seq == 0 {
            return Err(ChangesetError::Origin(self.origin.clone()));
        }
        if self.changes.is_empty() {
            return Err(ChangesetError::Empty(self.name()));
        }
        if self.changes.len() > MAX_CHANGES {
            return Err(ChangesetError::TooBig {
                name: self.name(),
                what: format!("{} paths (at most {MAX_CHANGES})", self.changes.len()),
            });
        }
        let mut bytes = 0u64;
        for (path, change) in &self.changes {
            let bad = |source| ChangesetError::Manifest {
                name: self.name(),
                source,
            };
            super::manifest::check_path(path).map_err(bad)?;
            if let Some(e) = &change.entry {
                if e.size > MAX_BLOB_BYTES {
                    return Err(bad(ManifestError::TooLarge {
                        path: path.clone(),
                        size: e.size,
                        max: MAX_BLOB_BYTES,
                    }));
                }
                bytes = bytes.saturating_add(e.size);
            }
        }
        if bytes > MAX_CHANGESET_BYTES {
            return Err(ChangesetError::TooBig {
                name: self.name(),
                what: format!("{bytes} bytes of content (at most {MAX_CHANGESET_BYTES})"),
            });
        }
        Ok(())
    }

    /// Checks that its hub-time numbers (`seq`, `detected_us`) are not ahead of `now_us`, the
    /// receiver's hub time, by more than [`MAX_AHEAD_US`]: the whole changeset is refused
    /// otherwise. Numbers in the past are fine (an edit may wait in an outbox for days).
    pub fn check_time(&self, now_us: u64) -> Result<(), ChangesetError> {
        let bound = now_us.saturating_add(MAX_AHEAD_US);
        for (field, value) in [
            (TimeField::Seq, self.seq),
            (TimeField::DetectedUs, self.detected_us),
        ] {
            if value > bound {
                return Err(ChangesetError::Ahead {
                    name: self.name(),
                    field,
                    value,
                    bound,
                });
            }
        }
        Ok(())
    }

    /// The blobs its new files need, each once.
    pub fn blobs(&self) -> Vec<(Hash, u64)> {
        let mut seen = std::collections::BTreeSet::new();
        self.changes
            .values()
            .filter_map(|c| c.entry.as_ref())
            .filter(|e| seen.insert(e.hash))
            .map(|e| (e.hash, e.size))
            .collect()
    }
}

/// The sequence number of the next changeset an agent emits: above its own last one
/// (`last_seq`, from its store), above the hub's record of this origin (`hub_applied`, the
/// highest sequence of it the hub applied: what a reinstalled or restored agent resumes from),
/// and at least hub time now (`hub_now`, the agent's estimate), so a wiped store never reuses
/// a number. `None` while either the hub's record or a clock estimate is missing: the agent
/// must not number an edit before it has both (a number below the hub's record is answered
/// "duplicate" and the edit dropped; one from a wrong clock is refused as ahead).
pub fn next_seq(last_seq: u64, hub_applied: Option<u64>, hub_now: Option<u64>) -> Option<u64> {
    let (applied, now) = (hub_applied?, hub_now?);
    Some(
        last_seq
            .saturating_add(1)
            .max(applied.saturating_add(1))
            .max(now),
    )
}

/// Agent names: 1–64 bytes of `[A-Za-z0-9._-]` (they are path segments and metric labels).
pub fn valid_origin(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The changes between two file maps (`old` → `new`), with `prev` filled from `old`.
pub fn diff(
    old: &BTreeMap<String, Entry>,
    new: &BTreeMap<String, Entry>,
) -> BTreeMap<String, Change> {
    let mut out = BTreeMap::new();
    for (path, entry) in new {
        let before = old.get(path);
        if before != Some(entry) {
            out.insert(
                path.clone(),
                Change {
                    entry: Some(entry.clone()),
                    prev: before.map(|e| e.hash),
                },
            );
        }
    }
    for (path, entry) in old {
        if !new.contains_key(path) {
            out.insert(
                path.clone(),
                Change {
                    entry: None,
                    prev: Some(entry.hash),
                },
            );
        }
    }
    out
}

/// `base` with `changes` applied: whole, or an error and `base` untouched (a file that would
/// also be a directory, too many files).
pub fn apply<'a>(
    base: &Manifest,
    changes: impl IntoIterator<Item = (&'a String, &'a Option<Entry>)>,
) -> Result<Manifest, ManifestError> {
    let mut files = base.files().clone();
    for (path, entry) in changes {
        match entry {
            Some(e) => {
                files.insert(path.clone(), e.clone());
            }
            None => {
                files.remove(path);
            }
        }
    }
    Manifest::new(files)
}

/// The last write of a path through a changeset, as the hub recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stamp {
    /// Hub time of the write (the changeset's `detected_us`).
    pub at_us: u64,
    /// The origin agent.
    pub origin: String,
}

impl Stamp {
    fn key(&self) -> (u64, &str) {
        (self.at_us, &self.origin)
    }
}

/// Last writes by path.
pub type Stamps = BTreeMap<String, Stamp>;

/// Highest sequence applied per origin.
pub type Applied = BTreeMap<String, u64>;

/// Whether `hub` includes everything in `ours` (every origin's sequence at least as high).
pub fn covers(hub: &Applied, ours: &Applied) -> bool {
    ours.iter()
        .all(|(origin, seq)| hub.get(origin).is_some_and(|h| h >= seq))
}

/// Two writes of one path that crossed: the earlier by hub time lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conflict {
    /// The path.
    pub path: String,
    /// The write kept.
    pub winner: Stamp,
    /// The write dropped.
    pub loser: Stamp,
}

/// What the hub makes of a changeset against its current release.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// The changes to apply.
    pub apply: BTreeMap<String, Option<Entry>>,
    /// Concurrent writes, resolved.
    pub conflicts: Vec<Conflict>,
}

/// Resolves `cs` against `current` (the release it will be applied to) and the hub's `stamps`.
///
/// A change whose `prev` is what `current` holds applies (the origin saw the latest state);
/// one that `current` already holds is a no-op. Otherwise another write crossed it: the later
/// by hub time wins (ties by origin name) — the last writer's stamp, or "before any changeset"
/// when the path was last set by a publish. Either way the loser is in `conflicts`.
pub fn resolve(current: &Manifest, stamps: &Stamps, cs: &Changeset) -> Resolution {
    let mut out = Resolution::default();
    let incoming = Stamp {
        at_us: cs.detected_us,
        origin: cs.origin.clone(),
    };
    for (path, change) in &cs.changes {
        let held = current.get(path).map(|e| e.hash);
        let wanted = change.entry.as_ref().map(|e| e.hash);
        if held == wanted {
            if current.get(path) != change.entry.as_ref() {
                // Same bytes, other content type: take the new entry.
                out.apply.insert(path.clone(), change.entry.clone());
            }
            continue;
        }
        if held == change.prev {
            out.apply.insert(path.clone(), change.entry.clone());
            continue;
        }
        let last = stamps.get(path).cloned().unwrap_or(Stamp {
            at_us: 0,
            origin: String::new(),
        });
        if incoming.key() > last.key() {
            out.apply.insert(path.clone(), change.entry.clone());
            out.conflicts.push(Conflict {
                path: path.clone(),
                winner: incoming.clone(),
                loser: last,
            });
        } else {
            out.conflicts.push(Conflict {
                path: path.clone(),
                winner: last,
                loser: incoming.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(data: &str) -> Entry {
        Entry {
            hash: Hash::of(data.as_bytes()),
            size: data.len() as u64,
            content_type: "text/plain".into(),
        }
    }

    fn files(items: &[(&str, &str)]) -> BTreeMap<String, Entry> {
        items.iter().map(|(p, d)| (p.to_string(), e(d))).collect()
    }

    fn cs(origin: &str, at: u64, changes: BTreeMap<String, Change>) -> Changeset {
        Changeset {
            origin: origin.into(),
            seq: 1,
            mode: Mode::Immediate,
            base: None,
            detected_us: at,
            changes,
        }
    }

    #[test]
    fn diff_lists_added_changed_and_removed_with_their_previous_hash() {
        let old = files(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let new = files(&[("a", "1"), ("b", "22"), ("d", "4")]);
        let d = diff(&old, &new);
        assert_eq!(d.len(), 3);
        assert_eq!(d["b"].prev, Some(Hash::of(b"2")));
        assert_eq!(d["b"].entry, Some(e("22")));
        assert_eq!(d["c"].entry, None);
        assert_eq!(d["c"].prev, Some(Hash::of(b"3")));
        assert_eq!(d["d"].prev, None);
        assert!(diff(&old, &old).is_empty());
    }

    #[test]
    fn apply_is_whole_or_nothing() {
        let base = Manifest::new(files(&[("a", "1"), ("dir/x", "2")])).unwrap();
        let ok: BTreeMap<String, Option<Entry>> =
            [("a".to_string(), None), ("b".to_string(), Some(e("3")))].into();
        let m = apply(&base, &ok).unwrap();
        assert_eq!(m.files(), &files(&[("b", "3"), ("dir/x", "2")]));
        // `dir` as a file while `dir/x` exists: refused, nothing applied.
        let clash: BTreeMap<String, Option<Entry>> =
            [("b".to_string(), None), ("dir".to_string(), Some(e("4")))].into();
        assert!(matches!(
            apply(&base, &clash),
            Err(ManifestError::FileAndDirectory(_))
        ));
    }

    #[test]
    fn a_change_made_on_the_current_state_applies_without_conflict() {
        let current = Manifest::new(files(&[("a", "1")])).unwrap();
        let c = cs(
            "n1",
            10,
            diff(&files(&[("a", "1")]), &files(&[("a", "2"), ("b", "3")])),
        );
        let r = resolve(&current, &Stamps::new(), &c);
        assert!(r.conflicts.is_empty());
        assert_eq!(r.apply.len(), 2);
        // The same changeset again changes nothing (idempotent).
        let after = apply(&current, &r.apply).unwrap();
        let again = resolve(&after, &Stamps::new(), &c);
        assert!(again.apply.is_empty() && again.conflicts.is_empty());
    }

    #[test]
    fn crossed_writes_resolve_later_by_hub_time_and_report_the_loser() {
        // n1 and n2 both edited `a` (was "1"); the hub got n2's first.
        let current = Manifest::new(files(&[("a", "n2")])).unwrap();
        let stamps: Stamps = [(
            "a".to_string(),
            Stamp {
                at_us: 200,
                origin: "n2".into(),
            },
        )]
        .into();
        let change = diff(&files(&[("a", "1")]), &files(&[("a", "n1")]));
        // n1 wrote earlier: it loses.
        let r = resolve(&current, &stamps, &cs("n1", 100, change.clone()));
        assert!(r.apply.is_empty());
        assert_eq!(r.conflicts.len(), 1);
        assert_eq!(r.conflicts[0].loser.origin, "n1");
        assert_eq!(r.conflicts[0].winner.origin, "n2");
        // n1 wrote later: it wins, n2 is reported.
        let r = resolve(&current, &stamps, &cs("n1", 300, change.clone()));
        assert_eq!(r.apply["a"], Some(e("n1")));
        assert_eq!(r.conflicts[0].loser.origin, "n2");
        // Same instant: the origin name breaks the tie, the same way everywhere.
        let r = resolve(&current, &stamps, &cs("n3", 200, change));
        assert_eq!(r.conflicts[0].winner.origin, "n3");
    }

    #[test]
    fn an_edit_crossing_a_publish_wins() {
        // A publish changed `a` (no stamp); an edit made on the old content arrives after.
        let current = Manifest::new(files(&[("a", "published")])).unwrap();
        let change = diff(&files(&[("a", "1")]), &files(&[("a", "edited")]));
        let r = resolve(&current, &Stamps::new(), &cs("n1", 5, change));
        assert_eq!(r.apply["a"], Some(e("edited")));
        assert_eq!(r.conflicts[0].loser.origin, "");
    }

    #[test]
    fn coverage_is_per_origin() {
        let hub: Applied = [("a".into(), 3), ("b".into(), 1)].into();
        assert!(covers(&hub, &Applied::new()));
        assert!(covers(&hub, &[("a".into(), 3)].into()));
        assert!(!covers(&hub, &[("a".into(), 4)].into()));
        assert!(!covers(&hub, &[("c".into(), 1)].into()));
    }

    #[test]
    fn numbers_ahead_of_the_receivers_clock_are_refused_naming_the_field_and_bound() {
        let now = 1_700_000_000_000_000;
        let mut c = cs("n1", now, diff(&BTreeMap::new(), &files(&[("a", "1")])));
        c.seq = now;
        assert!(c.check_time(now).is_ok());
        // Within the allowance for clock error, and anything in the past: fine.
        c.seq = now + MAX_AHEAD_US;
        c.detected_us = now + MAX_AHEAD_US;
        assert!(c.check_time(now).is_ok());
        c.seq = 1;
        c.detected_us = 0;
        assert!(c.check_time(now).is_ok());
        // seq = u64::MAX would silence the origin for good.
        c.seq = u64::MAX;
        let e = c.check_time(now).unwrap_err();
        assert_eq!(
            e,
            ChangesetError::Ahead {
                name: format!("n1/{}", u64::MAX),
                field: TimeField::Seq,
                value: u64::MAX,
                bound: now + MAX_AHEAD_US,
            }
        );
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "seq {} is beyond {}",
                u64::MAX,
                now + MAX_AHEAD_US
            )),
            "{text}"
        );
        // A day ahead would win every conflict.
        c.seq = now;
        c.detected_us = now + 86_400_000_000;
        assert!(matches!(
            c.check_time(now),
            Err(ChangesetError::Ahead {
                field: TimeField::DetectedUs,
                ..
            })
        ));
        // One µs over the bound is over; a clock at the end of time does not overflow.
        c.detected_us = now + MAX_AHEAD_US + 1;
        assert!(c.check_time(now).is_err());
        assert!(c.check_time(u64::MAX).is_ok());
    }

    #[test]
    fn sequence_numbers_resume_above_the_hubs_record_and_wait_for_it_and_the_clock() {
        // A reinstalled agent (nothing in its store) whose estimate of hub time is behind what
        // the hub recorded of its earlier life: it numbers above the record.
        assert_eq!(next_seq(0, Some(5_000), Some(4_000)), Some(5_001));
        // Normally hub time leads.
        assert_eq!(next_seq(0, Some(5_000), Some(9_000)), Some(9_000));
        // Its own last number, when the hub has not heard of it yet (the outbox).
        assert_eq!(next_seq(9_500, Some(5_000), Some(9_000)), Some(9_501));
        // A hub that has no record of it: 0.
        assert_eq!(next_seq(0, Some(0), Some(7)), Some(7));
        // Not before both are known.
        assert_eq!(next_seq(9_500, None, Some(9_000)), None);
        assert_eq!(next_seq(9_500, Some(5_000), None), None);
        assert_eq!(next_seq(u64::MAX, Some(u64::MAX), Some(1)), Some(u64::MAX));
    }

    #[test]
    fn checks_refuse_bad_origins_paths_and_empty_changesets() {
        let good = cs("n1", 1, diff(&BTreeMap::new(), &files(&[("a", "1")])));
        assert!(good.check().is_ok());
        assert_eq!(good.blobs(), vec![(Hash::of(b"1"), 1)]);
        let mut bad = good.clone();
        bad.origin = "../x".into();
        assert!(matches!(bad.check(), Err(ChangesetError::Origin(_))));
        let mut bad = good.clone();
        bad.changes.clear();
        assert!(matches!(bad.check(), Err(ChangesetError::Empty(_))));
        let mut bad = good.clone();
        let c = bad.changes.remove("a").unwrap();
        bad.changes.insert("../etc/passwd".into(), c);
        assert!(matches!(bad.check(), Err(ChangesetError::Manifest { .. })));
        let mut bad = good;
        bad.changes
            .get_mut("a")
            .unwrap()
            .entry
            .as_mut()
            .unwrap()
            .size = MAX_BLOB_BYTES + 1;
        assert!(matches!(bad.check(), Err(ChangesetError::Manifest { .. })));
    }
}
