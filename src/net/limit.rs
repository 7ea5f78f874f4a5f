//! Connection caps: how many connections one listener holds open at once, shared by every
//! worker that accepts on it (`SO_REUSEPORT` sockets of the same listener share one gate).
//!
//! The open-connection gauge is the counter: admitting is one atomic add on it, and an
//! admitted connection holds a [`Permit`] that gives its place back when dropped, whether the
//! connection ended, its task was dropped, or an upgraded tunnel it turned into closed. A
//! connection over the cap is closed at once (not left in the kernel's backlog, where it
//! would wait without a timeout) and counted in `refused`; the accept loop paces those
//! refusals when a flood is far over the cap ([`super::accept::RefusalPace`]).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// The open-connection count and refusal counter of one listener (clones share them).
#[derive(Clone, Debug, Default)]
pub struct ConnGate {
    /// Connections open now (also exported as a metric by whoever registered it).
    pub open: Gauge,
    /// Connections closed at accept because `open` had reached the cap.
    pub refused: Counter,
}

/// A listener's cap and the gate that counts against it.
#[derive(Clone, Debug)]
pub struct Cap {
    /// Most connections open at once.
    pub max: usize,
    /// The count and the refusals.
    pub gate: ConnGate,
}

impl Cap {
    /// `max` connections counted in `gate`.
    pub fn new(max: usize, gate: ConnGate) -> Cap {
        Cap { max, gate }
    }

    /// Admits a connection under the cap (see [`ConnGate::admit`]).
    pub fn admit(&self) -> Option<Permit> {
        self.gate.admit(self.max)
    }
}

/// An admitted connection's place under the cap, given back on drop.
#[derive(Debug)]
pub struct Permit {
    open: Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl ConnGate {
    /// A gate counting in `open` and `refused` (metrics registered by the caller).
    pub fn new(open: Gauge, refused: Counter) -> ConnGate {
        ConnGate { open, refused }
    }

    /// Admits a connection when fewer than `max` are open; otherwise counts a refusal.
    pub fn admit(&self, max: usize) -> Option<Permit> {
        // `inc` returns the count before this connection: one atomic step, so concurrent
        // accepts on several workers can never admit more than `max` together.
        let before = self.open.inc();
        if before < 0 || before as u64 >= max as u64 {
            self.open.dec();
            self.refused.inc();
            return None;
        }
        Some(Permit {
            open: self.open.clone(),
        })
    }

    /// Connections open now.
    pub fn open_now(&self) -> i64 {
        self.open.get()
    }
}

/// Descriptors kept aside from client connections: logs, the store, backend health checks,
/// the blobs being staged.
pub const RESERVED_FDS: u64 = 256;

/// Raises this process's soft open-file limit to its hard limit (what systemd's
/// `LimitNOFILE=` or `ulimit -Hn` allows) and returns the soft limit now in force. Outside
/// systemd the soft limit is often 1024, which a few hundred idle clients would exhaust.
pub fn raise_nofile() -> std::io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        setrlimit(Resource::Nofile, lim).map_err(std::io::Error::from)?;
    }
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

/// The warning to give when caps adding up to `needed` descriptors (plus [`RESERVED_FDS`])
/// do not fit in the open-file limit `limit` (pure).
pub fn fd_shortfall(needed: u64, limit: u64) -> Option<String> {
    let want = needed.saturating_add(RESERVED_FDS);
    (want > limit).then(|| {
        format!("the connection caps allow {needed} open descriptors but the open-file limit is {limit}: accepts will fail (and back off) before the caps refuse; raise LimitNOFILE to at least {want} or lower max_connections")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_cap_and_counts_the_rest() {
        let gate = ConnGate::default();
        let a = gate.admit(2).expect("first");
        let b = gate.admit(2).expect("second");
        assert!(gate.admit(2).is_none());
        assert!(gate.admit(2).is_none());
        assert_eq!(gate.open_now(), 2);
        assert_eq!(gate.refused.get(), 2);
        drop(a);
        assert_eq!(gate.open_now(), 1);
        let c = gate.admit(2).expect("a place was given back");
        drop((b, c));
        assert_eq!(gate.open_now(), 0);
    }

    #[test]
    fn clones_share_one_count() {
        let gate = ConnGate::default();
        let other = gate.clone();
        let _a = gate.admit(1).expect("first");
        assert!(
            other.admit(1).is_none(),
            "the second worker sees the first's connection"
        );
        assert_eq!(gate.refused.get(), 1);
    }

    #[test]
    fn shortfall_only_past_the_limit() {
        assert_eq!(fd_shortfall(1000, 65536), None);
        let w = fd_shortfall(40_000, 1024).expect("over");
        assert!(w.contains("40256"), "{w}");
        assert_eq!(fd_shortfall(1024 - RESERVED_FDS, 1024), None);
    }

    #[test]
    fn raising_keeps_at_least_the_soft_limit() {
        use rustix::process::{getrlimit, Resource};
        let before = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        let now = raise_nofile().expect("raising to the hard limit is always allowed");
        assert!(now >= before);
        let after = getrlimit(Resource::Nofile);
        assert_eq!(Some(now), after.current.or(Some(u64::MAX)));
        assert_eq!(after.current, after.maximum, "soft raised to hard");
    }

    #[test]
    fn zero_admits_nothing() {
        let gate = ConnGate::default();
        assert!(gate.admit(0).is_none());
        assert_eq!(gate.open_now(), 0);
    }

    #[test]
    fn many_threads_never_exceed_the_cap() {
        let gate = ConnGate::default();
        use std::sync::atomic::{AtomicI64, Ordering::SeqCst};
        // Permits held at once, counted apart from the gauge (which a refused attempt raises
        // for an instant).
        let (held, peak) = (AtomicI64::new(0), AtomicI64::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (gate, held, peak) = (gate.clone(), &held, &peak);
                s.spawn(move || {
                    for _ in 0..10_000 {
                        if let Some(p) = gate.admit(3) {
                            peak.fetch_max(held.fetch_add(1, SeqCst) + 1, SeqCst);
                            held.fetch_sub(1, SeqCst);
                            drop(p);
                        }
                    }
                });
            }
        });
        assert!(peak.load(SeqCst) <= 3);
        assert!(peak.load(SeqCst) >= 1);
        assert_eq!(gate.open_now(), 0);
    }
}
