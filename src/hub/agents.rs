//! Agents as the hub hears of them: their reports (bounded in number and size, names checked
//! because they are URL segments and metric labels, `serve` an `ip:port`), the fleet view
//! `lockstep status` shows (reports older than `report_expiry` marked stale), and the set of
//! agents behind the fleet's release, decided by [`super::fleet`].

use std::collections::HashSet;

use tracing::{info, warn};

use super::fleet::Admit;
use super::{fleet, Hub, HubError};
use crate::sync::protocol::{AgentView, Fleet, Report, SharedReport};

/// Most agents the hub keeps reports of (a peer cannot grow the map without bound). When it is
/// full, a new name takes the place of the oldest stale report, never of a fresh one
/// ([`fleet::admit`]).
pub const MAX_AGENTS: usize = 4096;
/// Longest `error` text kept from a report.
const MAX_REPORT_ERROR: usize = 1024;
/// Longest `hub` URL kept from a report.
const MAX_REPORT_HUB: usize = 256;

/// Cuts a report's free texts to what the hub keeps.
fn bound(report: &mut Report) {
    if let Some(e) = report.error.as_mut() {
        truncate(e, MAX_REPORT_ERROR);
    }
    if let Some(h) = report.hub.as_mut() {
        truncate(h, MAX_REPORT_HUB);
    }
}

impl Hub {
    /// Records an agent's report. Refused: a bad name or `serve` address (400), a new name
    /// while `MAX_AGENTS` (4096) reports still count (409).
    pub fn report(&self, name: &str, mut report: Report) -> Result<(), HubError> {
        check_agent_name(name)?;
        report
            .serve_addr()
            .map_err(|e| HubError::Bad(format!("report of {name}: {e}")))?;
        bound(&mut report);
        let now = self.now_us();
        self.record(name, report.clone(), now)?;
        if self.store.standing().is_some() {
            let shared = SharedReport {
                agent: name.to_string(),
                report,
                at_us: now,
            };
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.share_report(&shared) {
                    warn!(agent = %shared.agent, error = %e, "the other hubs will see this agent's report later");
                }
            });
        }
        Ok(())
    }

    /// Takes a report another hub received (checked as this hub checks its own).
    pub(super) fn adopt_report(&self, shared: SharedReport) {
        let SharedReport {
            agent,
            mut report,
            at_us,
        } = shared;
        if check_agent_name(&agent).is_err() || report.serve_addr().is_err() {
            warn!(agent = %agent, "ignoring a shared report that this hub would refuse");
            return;
        }
        bound(&mut report);
        let newer = self
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&agent)
            .is_none_or(|(_, at)| *at < at_us);
        if newer {
            let _ = self.record(&agent, report, at_us);
        }
    }

    /// Keeps `report` of agent `name`, received at hub time `now`, within [`MAX_AGENTS`].
    fn record(&self, name: &str, report: Report, now: u64) -> Result<(), HubError> {
        let expiry = self.settings().report_expiry_us();
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        match fleet::admit(&reports, name, now, expiry, MAX_AGENTS) {
            Admit::Insert => {}
            Admit::Evict(old) => {
                reports.remove(&old);
                self.metrics.forget_agent(&old);
                info!(agent = %old, new = %name, "the agent table is full: forgot the oldest stale report for a new agent");
            }
            Admit::Full => {
                drop(reports);
                self.metrics.reports_refused.inc();
                warn!(agent = %name, "report refused: the hub already tracks {MAX_AGENTS} agents whose reports still count");
                return Err(HubError::Conflict(format!(
                    "the hub already tracks {MAX_AGENTS} agents whose reports still count; a new one is taken in place of one silent for sync.report_expiry"
                )));
            }
        }
        self.metrics.observe_report(name, &report);
        reports.insert(name.to_string(), (report, now));
        drop(reports);
        self.reports_changed.notify_one();
        Ok(())
    }

    /// The fleet as the hub last heard of it.
    pub fn fleet(&self) -> Fleet {
        let schedule = self.schedule();
        let now = schedule.now_us;
        let release = fleet::fleet_release(&self.state(), now);
        let expiry = self.settings().report_expiry_us();
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        Fleet {
            cluster: self.cluster(),
            agents: reports
                .iter()
                .map(|(name, (r, at))| {
                    let stale = !fleet::fresh(*at, now, expiry);
                    AgentView {
                        name: name.clone(),
                        report: r.clone(),
                        reported_us: *at,
                        current: !stale && release.is_some() && r.active == release,
                        stale,
                    }
                })
                .collect(),
            schedule,
            conflicts: self
                .conflicts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect(),
        }
    }

    /// The agents behind the fleet's release now (stale reports left out), how many reports
    /// are stale, and when the first report still counting expires.
    pub(super) fn compute_behind(&self) -> Behind {
        let state = self.state();
        let now = self.now_us();
        let expiry = self.settings().report_expiry_us();
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let arrivals = || reports.values().map(|(_, at)| *at);
        Behind {
            names: fleet::behind(
                &state,
                now,
                expiry,
                reports.iter().map(|(n, (r, at))| (n, r, *at)),
            ),
            stale: arrivals()
                .filter(|at| !fleet::fresh(*at, now, expiry))
                .count(),
            next_expiry: fleet::next_expiry(arrivals(), now, expiry),
        }
    }
}

/// What [`Hub::compute_behind`] found.
pub(super) struct Behind {
    /// The agents behind the fleet's release.
    pub names: HashSet<String>,
    /// Reports that no longer count.
    pub stale: usize,
    /// When the first report still counting expires (hub time, µs).
    pub next_expiry: Option<u64>,
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Agent names are URL path segments and metric labels: keep them plain.
fn check_agent_name(name: &str) -> Result<(), HubError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(HubError::Bad(format!(
            "agent name `{}` must be 1–64 letters, digits, `-`, `_` or `.`",
            name.chars().take(70).collect::<String>()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::testing::{self, manual, release, set, REPORT_EXPIRY, S};
    use crate::sync::cycle::Advancer;

    #[tokio::test]
    async fn a_report_shared_by_another_hub_counts_unless_this_hub_has_a_newer_one() {
        let (clock, _now) = manual(100 * S);
        let fx = testing::hub(clock);
        let shared = |agent: &str, at_us, error: &str| SharedReport {
            agent: agent.into(),
            report: Report {
                error: Some(error.into()),
                ..Report::default()
            },
            at_us,
        };
        let error_of = |name: &str| {
            let f = fx.hub.fleet();
            f.agents
                .iter()
                .find(|a| a.name == name)
                .and_then(|a| a.report.error.clone())
        };
        fx.hub.adopt_report(shared("web1", 90 * S, "from hub B"));
        assert_eq!(error_of("web1").as_deref(), Some("from hub B"));
        // This hub's own, newer, stays over an older one from elsewhere.
        fx.hub
            .report(
                "web1",
                Report {
                    error: Some("here".into()),
                    ..Report::default()
                },
            )
            .unwrap();
        fx.hub.adopt_report(shared("web1", 95 * S, "older"));
        assert_eq!(error_of("web1").as_deref(), Some("here"));
        // What this hub would refuse from an agent it refuses from a hub too.
        fx.hub.adopt_report(shared("a/b", 99 * S, "bad name"));
        assert!(fx.hub.fleet().agents.iter().all(|a| a.name != "a/b"));
    }

    #[tokio::test]
    async fn reports_are_checked_cut_and_shown_in_the_fleet() {
        let (clock, now) = manual(100 * S);
        let fx = testing::hub(clock);
        for bad in ["", "a/b", "web 1", &"x".repeat(65)] {
            let e = fx.hub.report(bad, Report::default()).unwrap_err();
            assert!(matches!(e, HubError::Bad(_)), "{bad:?}: {e:?}");
        }
        let v1 = release(&fx.hub, &[("index.html", "v1")]).await;
        fx.hub.commit(v1, None, vec![]).await.unwrap();
        set(&now, 110 * S);
        fx.hub.advance(0, Advancer::Agent).await.unwrap();
        let long = format!("{}é", "e".repeat(MAX_REPORT_ERROR - 1));
        let on = |active, error: Option<String>| Report {
            active,
            error,
            ..Report::default()
        };
        fx.hub.report("web1", on(Some(v1), Some(long))).unwrap();
        fx.hub.report("web2", on(None, None)).unwrap();
        let fleet = fx.hub.fleet();
        let view: Vec<(&str, bool, u64)> = fleet
            .agents
            .iter()
            .map(|a| (a.name.as_str(), a.current, a.reported_us))
            .collect();
        assert_eq!(view, [("web1", true, 110 * S), ("web2", false, 110 * S)]);
        // Cut to at most 1024 bytes without splitting the two-byte `é`.
        let kept = fleet.agents[0].report.error.as_deref().unwrap();
        assert_eq!(kept, "e".repeat(MAX_REPORT_ERROR - 1));
        assert_eq!(fx.hub.compute_behind().names, ["web2".to_string()].into());
    }

    /// A `serve` that is not an `ip:port` is refused whole: peers would send changesets and
    /// the agent token there.
    #[tokio::test]
    async fn a_serve_address_must_be_ip_port() {
        let (clock, _) = manual(100 * S);
        let fx = testing::hub(clock);
        let serving = |serve: &str| Report {
            serve: Some(serve.into()),
            ..Report::default()
        };
        for bad in ["attacker.example:80", "10.0.0.1", "http://10.0.0.1:8081"] {
            let e = fx.hub.report("web1", serving(bad)).unwrap_err();
            assert!(
                matches!(&e, HubError::Bad(m) if m.contains("is not an ip:port")),
                "{bad}: {e:?}"
            );
        }
        assert!(fx.hub.fleet().agents.is_empty(), "nothing recorded");
        fx.hub.report("web1", serving("10.0.0.1:8081")).unwrap();
        fx.hub.report("web2", serving("[fd00::2]:8081")).unwrap();
        assert_eq!(fx.hub.fleet().agents.len(), 2);
    }

    /// A report nobody renews goes stale after `report_expiry`: shown as such, neither current
    /// nor behind; the agent's next report counts again.
    #[tokio::test]
    async fn reports_expire_into_stale_and_count_again_when_renewed() {
        let (clock, now) = manual(100 * S);
        let fx = testing::hub(clock);
        let v1 = release(&fx.hub, &[("index.html", "v1")]).await;
        fx.hub.commit(v1, None, vec![]).await.unwrap();
        set(&now, 110 * S);
        fx.hub.advance(0, Advancer::Agent).await.unwrap();
        let on = |active| Report {
            active,
            ..Report::default()
        };
        fx.hub.report("web1", on(None)).unwrap();
        fx.hub.report("web2", on(Some(v1))).unwrap();
        let expiry = REPORT_EXPIRY.as_micros() as u64;
        let b = fx.hub.compute_behind();
        assert_eq!(b.names, ["web1".to_string()].into());
        assert_eq!((b.stale, b.next_expiry), (0, Some(110 * S + expiry)));

        set(&now, 110 * S + expiry);
        let b = fx.hub.compute_behind();
        assert!(b.names.is_empty(), "an expired report is not behind");
        assert_eq!((b.stale, b.next_expiry), (2, None));
        let fleet = fx.hub.fleet();
        let view: Vec<(&str, bool, bool)> = fleet
            .agents
            .iter()
            .map(|a| (a.name.as_str(), a.current, a.stale))
            .collect();
        assert_eq!(view, [("web1", false, true), ("web2", false, true)]);

        fx.hub.report("web1", on(None)).unwrap();
        assert_eq!(fx.hub.compute_behind().names, ["web1".to_string()].into());
        assert!(!fx.hub.fleet().agents[0].stale);
    }

    /// A flood of names fills the table's free places, but never pushes out a live agent; a
    /// new agent takes the place of a flooded name once that one is stale.
    #[tokio::test]
    async fn a_flood_of_names_cannot_push_out_live_agents() {
        let (clock, now) = manual(100 * S);
        let fx = testing::hub(clock);
        fx.hub.report("live", Report::default()).unwrap();
        for i in 1..MAX_AGENTS {
            fx.hub
                .report(&format!("flood-{i}"), Report::default())
                .unwrap();
        }
        let e = fx.hub.report("newcomer", Report::default()).unwrap_err();
        assert!(matches!(e, HubError::Conflict(_)), "{e:?}");
        assert_eq!(fx.metrics.reports_refused.get(), 1);
        // `live` renews its report; the flood stops.
        let expiry = REPORT_EXPIRY.as_micros() as u64;
        set(&now, 100 * S + expiry / 2);
        fx.hub.report("live", Report::default()).unwrap();
        set(&now, 100 * S + expiry);
        fx.hub.report("newcomer", Report::default()).unwrap();
        let names: HashSet<String> = fx.hub.fleet().agents.into_iter().map(|a| a.name).collect();
        assert_eq!(names.len(), MAX_AGENTS);
        assert!(names.contains("live") && names.contains("newcomer"));
        assert!(!names.contains("flood-1"), "the oldest stale name went");
    }
}
