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

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// First back-off after a failed accept.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest back-off.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

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
        match on_conn(io, peer) {
            Accepted::Serve(f) => {
                tracker.spawn(f);
            }
            Accepted::Refuse => {
                debug!(listener = %what, "connection cap reached; closed a new connection");
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
