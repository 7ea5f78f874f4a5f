//! Agents as the hub hears of them: their reports (bounded in number and size, names checked
//! because they are URL segments and metric labels), the fleet view `lockstep status` shows,
//! and the set of agents behind the fleet's release, decided by [`super::fleet`].

use std::collections::HashSet;

use super::{fleet, Hub, HubError};
use crate::sync::protocol::{AgentView, Fleet, Report};

/// Most agents the hub keeps reports of (a peer cannot grow the map without bound).
pub const MAX_AGENTS: usize = 4096;
/// Longest `error` text kept from a report.
const MAX_REPORT_ERROR: usize = 1024;

impl Hub {
    /// Records an agent's report.
    pub fn report(&self, name: &str, mut report: Report) -> Result<(), HubError> {
        check_agent_name(name)?;
        if let Some(e) = report.error.as_mut() {
            truncate(e, MAX_REPORT_ERROR);
        }
        let now = self.now_us();
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        if !reports.contains_key(name) && reports.len() >= MAX_AGENTS {
            return Err(HubError::Conflict(format!(
                "the hub already tracks {MAX_AGENTS} agents; restart it to forget old names"
            )));
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
        let release = fleet::fleet_release(&self.state(), schedule.now_us);
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        Fleet {
            agents: reports
                .iter()
                .map(|(name, (r, at))| AgentView {
                    name: name.clone(),
                    report: r.clone(),
                    reported_us: *at,
                    current: release.is_some() && r.active == release,
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

    /// The agents behind the fleet's release now.
    pub(super) fn compute_behind(&self) -> HashSet<String> {
        let state = self.state();
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        fleet::behind(
            &state,
            self.now_us(),
            reports.iter().map(|(n, (r, _))| (n, r)),
        )
    }
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
    use crate::hub::testing::{self, manual, release, set, S};
    use crate::sync::cycle::Advancer;

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
        assert_eq!(fx.hub.compute_behind(), ["web2".to_string()].into());
    }
}
