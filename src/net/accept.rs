//! The accept loop: one for every listener of the process (proxy, admin, reload socket, sync
//! hub, agent, demo backends).
//!
//! Accept errors (EMFILE, ENFILE, ECONNABORTED, ENOBUFS…) back off exponentially from 5 ms to
//! 1 s instead of spinning, and the delay resets at the next accepted connection. Each
//! connection's future runs on the caller's `TaskTracker`, so a shutdown can wait for the
//! connections to drain; the loop itself ends at `shutdown` or when the connection callback
//! says the listener is gone (a reload removed it). A callback that refuses a connection (its
//! listener is at its cap, see [`super::limit`]) has it closed at once, with a reset
//! ([`Accepted::refuse`]).
//!
//! Refusing costs both sides a handshake, an accept and a reset, and a flood far over a cap
//! makes that churn the load: in `bench/soak.sh`'s phase B (four listeners flooded, three of
//! them over their caps) the unpaced loops had the kernel set up ~5 200 connections a second,
//! which cost the serve process 17.5 % of a core and the kernel's irq and softirq time 13 %;
//! paced, 600 a second, 2.9 % and 3.3 % (BENCHMARKS.md). So each loop refuses at once up to [`REFUSALS_PER_SECOND`] (after a
//! burst of [`REFUSAL_BURST`]); past that it stops accepting until its budget allows the next
//! refusal ([`RefusalPace`]). New
//! connections then wait in the kernel's backlog, are admitted there if a place frees, and
//! once the backlog is full the kernel drops their SYNs and the clients' own retransmission
//! (1 s, 3 s, …) slows the flood for free — HAProxy's behaviour at `maxconn`. Every
//! connection is still counted: refused by the metric, dropped by the kernel
//! (`ListenOverflows` in `nstat`).

#![allow(clippy::disallowed_methods)] // I/O shell: the refusal pace reads the clock at each refusal

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// First back-off after a failed accept.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest back-off.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Refusals one accept loop makes per second, once its burst is spent, before it pauses.
pub const REFUSALS_PER_SECOND: u32 = 200;
/// Refusals one accept loop makes at once before the rate applies.
pub const REFUSAL_BURST: u32 = 100;

/// A token bucket of refusals (pure: time is passed in).
#[derive(Debug, Clone)]
pub struct RefusalPace {
    /// Refusals allowed now (up to `burst`).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
    rate: f64,
    burst: f64,
}

impl RefusalPace {
    /// `rate` refusals per second after a burst of `burst`, full at `now`.
    pub fn new(rate: u32, burst: u32, now: Instant) -> RefusalPace {
        let burst = f64::from(burst.max(1));
        RefusalPace {
            tokens: burst,
            at: now,
            rate: f64::from(rate.max(1)),
            burst,
        }
    }

    /// Counts a refusal made at `now`; returns how long to stop accepting when it spent the
    /// last of the budget (until one more refusal is allowed), or `None` to go on at once.
    pub fn refused(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now.max(self.at);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        (self.tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }
}

/// A listening socket the loop can accept from.
pub trait Listen {
    /// A connection.
    type Io: Send + 'static;
    /// The peer's address.
    type Addr: Send + 'static;
    /// Waits for the next connection.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;
}

impl Listen for TcpListener {
    type Io = TcpStream;
    type Addr = std::net::SocketAddr;
    async fn accept(&self) -> io::Result<(TcpStream, std::net::SocketAddr)> {
        let (s, a) = TcpListener::accept(self).await?;
        // Small answers must not wait for Nagle; every listener of lockstep wants this.
        let _ = s.set_nodelay(true);
        Ok((s, a))
    }
}

impl Listen for UnixListener {
    type Io = UnixStream;
    type Addr = ();
    async fn accept(&self) -> io::Result<(UnixStream, ())> {
        UnixListener::accept(self).await.map(|(s, _)| (s, ()))
    }
}

/// What to do with an accepted connection.
pub enum Accepted<F> {
    /// Serve it with this future (spawned on the tracker).
    Serve(F),
    /// Close it at once and go on accepting: the listener is at its connection cap.
    Refuse,
    /// Drop it and stop accepting: the listener is no longer configured.
    Stop,
}

impl<F> Accepted<F> {
    /// Refuses `stream` at the cap: closed at once with a reset rather than a FIN, so that a
    /// flood of refused connections leaves no TIME_WAIT state behind on this side (the client
    /// sees "connection reset"; nothing was read from it or written to it).
    pub fn refuse(stream: TcpStream) -> Accepted<F> {
        let _ = stream.set_zero_linger();
        Accepted::Refuse
    }
}

/// The next back-off after `current` (pure).
pub fn next_backoff(current: Option<Duration>) -> Duration {
    current.map_or(BACKOFF_MIN, |d| (d * 2).min(BACKOFF_MAX))
}

/// Accepts on `listener` until `shutdown` (or until `on_conn` answers [`Accepted::Stop`]),
/// spawning each connection's future on `tracker`. `what` names the listener in logs.
pub async fn accept_loop<L, F, Fut>(
    listener: &L,
    what: &str,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    mut on_conn: F,
) where
    L: Listen,
    F: FnMut(L::Io, L::Addr) -> Accepted<Fut>,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = None;
    let mut pace = RefusalPace::new(REFUSALS_PER_SECOND, REFUSAL_BURST, Instant::now());
    loop {
        let (io, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    let wait = next_backoff(backoff);
                    backoff = Some(wait);
                    warn!(listener = %what, error = %e, retry_in = ?wait, "accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            },
        };
        backoff = None;
        // A burst of accepts is work like any other: a thread on short slices pauses here.
        super::slice::checkpoint();
        match on_conn(io, peer) {
            Accepted::Serve(f) => {
                tracker.spawn(f);
            }
            Accepted::Refuse => {
                debug!(listener = %what, "connection cap reached; closed a new connection");
                if let Some(pause) = pace.refused(Instant::now()) {
                    debug!(listener = %what, ?pause, "refusing too fast; accepting paused");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
            Accepted::Stop => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling() {
        let mut b = None;
        let mut seen = Vec::new();
        for _ in 0..12 {
            let d = next_backoff(b);
            seen.push(d);
            b = Some(d);
        }
        assert_eq!(seen[0], BACKOFF_MIN);
        assert_eq!(seen[1], BACKOFF_MIN * 2);
        assert_eq!(*seen.last().unwrap(), BACKOFF_MAX);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn refusals_pause_past_the_burst_at_the_rate() {
        let t0 = Instant::now();
        let mut pace = RefusalPace::new(100, 3, t0);
        // The burst goes at once; the refusal that spends the last of it asks for a pause of
        // one refusal's worth (10 ms at 100/s).
        assert_eq!(pace.refused(t0), None);
        assert_eq!(pace.refused(t0), None);
        let p = pace.refused(t0).expect("the burst is spent");
        assert!((p.as_secs_f64() - 0.010).abs() < 1e-9, "{p:?}");
        // After that pause one more goes, and asks for the next pause.
        let t1 = t0 + p;
        let p = pace.refused(t1).expect("still at the rate");
        assert!((p.as_secs_f64() - 0.010).abs() < 1e-9, "{p:?}");
        // A quiet second refills the burst, never past it.
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(pace.refused(t2), None);
        assert_eq!(pace.refused(t2), None);
        assert!(pace.refused(t2).is_some());
    }

    #[test]
    fn refusals_under_the_rate_never_pause() {
        let t0 = Instant::now();
        let mut pace = RefusalPace::new(100, 2, t0);
        for i in 1..1000u32 {
            // One every 20 ms: half the rate.
            assert_eq!(pace.refused(t0 + Duration::from_millis(20) * i), None);
        }
    }

    #[tokio::test]
    async fn a_flood_over_the_cap_is_refused_at_the_rate_not_faster() {
        // The backlog the appliance's listeners have (tokio's default, 128, is too short).
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = s.listen(4096).unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = {
            let (stop, tracker, refused) = (stop.clone(), tracker.clone(), refused.clone());
            tokio::spawn(async move {
                accept_loop(&l, "test", &stop, &tracker, |io, _| {
                    refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Accepted::<std::future::Ready<()>>::refuse(io)
                })
                .await
            })
        };
        // Twice the burst, opened before the loop runs (blocking connects on this one-thread
        // runtime; the kernel completes them into the backlog): the burst is refused at once,
        // the rest waits in the backlog and is taken at the rate.
        let n = 2 * REFUSAL_BURST as usize;
        let conns: Vec<_> = (0..n)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let count = || refused.load(std::sync::atomic::Ordering::SeqCst);
        let wait_for = |k: usize| {
            let count = &count;
            async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                while count() < k {
                    assert!(Instant::now() < deadline, "{} of {k} refused", count());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        // The burst goes at once, then the rest of the backlog at the rate: the last
        // REFUSAL_BURST take at least REFUSAL_BURST / REFUSALS_PER_SECOND (0.5 s; refused at
        // once, as before the pace, they took a few milliseconds).
        wait_for(REFUSAL_BURST as usize).await;
        let after_burst = Instant::now();
        wait_for(n).await;
        let took = after_burst.elapsed().as_secs_f64();
        let min = (n - REFUSAL_BURST as usize) as f64 / f64::from(REFUSALS_PER_SECOND);
        assert!(
            took >= min * 0.8,
            "the last {} refused in {took:.3} s: faster than the rate",
            n - REFUSAL_BURST as usize
        );
        drop(conns);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_connection_is_reset_not_closed() {
        use tokio::io::AsyncReadExt;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        let task = {
            let (stop, tracker) = (stop.clone(), tracker.clone());
            tokio::spawn(async move {
                accept_loop(&l, "test", &stop, &tracker, |io, _| {
                    Accepted::<std::future::Ready<()>>::refuse(io)
                })
                .await
            })
        };
        // Nothing written: a close with unread bytes would be a reset anyway.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("refused at once");
        // A FIN would read as Ok(0); the reset is an error.
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "a refused connection is reset"
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn serves_each_connection_and_stops_at_shutdown() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = {
            let (stop, tracker) = (stop.clone(), tracker.clone());
            tokio::spawn(async move {
                accept_loop(&l, "test", &stop, &tracker, |_io, peer| {
                    let tx = tx.clone();
                    Accepted::Serve(async move {
                        let _ = tx.send(peer);
                    })
                })
                .await
            })
        };
        let c1 = TcpStream::connect(addr).await.unwrap();
        let c2 = TcpStream::connect(addr).await.unwrap();
        let got = [rx.recv().await.unwrap(), rx.recv().await.unwrap()];
        let mut want = [c1.local_addr().unwrap(), c2.local_addr().unwrap()];
        let mut got_sorted = got;
        got_sorted.sort();
        want.sort();
        assert_eq!(got_sorted, want);
        stop.cancel();
        task.await.unwrap();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn stop_ends_the_loop() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        let task = tokio::spawn(async move {
            accept_loop(&l, "test", &stop, &tracker, |_, _| {
                Accepted::<std::future::Ready<()>>::Stop
            })
            .await
        });
        let _c = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the loop stopped")
            .unwrap();
    }
}
