//! Misbehaving clients against one HTTP listener, for `bench/soak.sh` and
//! `bench/attack-p99.sh` (loopback only, bounded in time and count).
//!
//! ```text
//! soakattack PORT IDLE SLOWLORIS H2C SECONDS
//! ```
//!
//! Holds IDLE keep-alive connections (one request answered, then silence), SLOWLORIS
//! connections (a request head sent one byte every 3 s, never finished) and H2C idle
//! connections (the h2 preface and SETTINGS, then silence) against 127.0.0.1:PORT for SECONDS
//! (SIGTERM ends it early, with its report), reopening whatever the server closes so that the
//! pressure stays: 0.5 s after a timeout closed it, 5 s after it was refused (reset, or closed
//! without an answer within a second). Source addresses are spread over 127.1.0.0/16 so that
//! tens of thousands of connections do not run out of ports. Prints one JSON line: per kind,
//! how many were opened, refused, answered, closed later by the server (idle and header
//! timeouts), and alive at the end.
//!
//! Compiled rather than scripted because the attackers share the machine's two cores with the
//! load generator and the backends: a Python asyncio attacker holding 10 000 connections took
//! half a core by itself, which inflated the tail of a path without lockstep in it 3.3× and
//! so measured the harness, not the proxy (BENCHMARKS.md, issue 15).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[derive(Clone, Copy)]
enum Kind {
    Idle,
    Slowloris,
    H2c,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::Slowloris => "slowloris",
            Kind::H2c => "h2c",
        }
    }
    fn first_bytes(self) -> &'static [u8] {
        match self {
            Kind::Idle => b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n",
            Kind::Slowloris => b"GET / HTTP/1.1\r\nHost: soak\r\n",
            Kind::H2c => H2_PREFACE,
        }
    }
}

#[derive(Default)]
struct Stats {
    opened: AtomicI64,
    refused: AtomicI64,
    answered: AtomicI64,
    closed_later: AtomicI64,
    alive: AtomicI64,
}

impl Stats {
    fn json(&self, alive: i64) -> serde_json::Value {
        serde_json::json!({
            "opened": self.opened.load(Relaxed),
            "refused": self.refused.load(Relaxed),
            "answered": self.answered.load(Relaxed),
            "closed_later": self.closed_later.load(Relaxed),
            "alive": alive,
        })
    }
}

/// The next source address in 127.1.0.0/16 (60 000 of them, port chosen by the kernel).
fn source(next: &AtomicU32) -> SocketAddr {
    let n = next.fetch_add(1, Relaxed) % 60_000;
    SocketAddr::from((
        Ipv4Addr::new(127, 1, (n / 250) as u8, (n % 250 + 1) as u8),
        0,
    ))
}

async fn connect(port: u16, next: &AtomicU32) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(source(next))?;
    s.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
}

/// How one connection ended.
enum End {
    /// The attack is over.
    Stopped,
    /// Refused: reset, or closed without an answer within a second.
    Refused,
    /// Closed by the server later (a timeout).
    ClosedLater,
}

/// Holds one connection of `kind` until the server closes it or `stop`.
async fn hold(
    kind: Kind,
    phase: Duration,
    mut c: TcpStream,
    s: &Stats,
    stop: &CancellationToken,
) -> End {
    let opened_at = Instant::now();
    let mut got_answer = false;
    if c.write_all(kind.first_bytes()).await.is_err() {
        return End::Refused;
    }
    s.alive.fetch_add(1, Relaxed);
    // Each slowloris connection keeps its own phase within the 3 s (clients that come and go
    // are not in step; all in step, they would be one burst every 3 s).
    let mut wait = phase;
    let mut buf = vec![0u8; 4096];
    let end = loop {
        let read = tokio::select! {
            _ = stop.cancelled() => break End::Stopped,
            r = c.read(&mut buf) => r,
            _ = tokio::time::sleep(wait), if matches!(kind, Kind::Slowloris) => {
                wait = Duration::from_secs(3);
                if c.write_all(b"X").await.is_err() {
                    break if got_answer { End::ClosedLater } else { End::Refused };
                }
                continue;
            }
        };
        match read {
            Ok(0) => {
                let refused = !got_answer && opened_at.elapsed() < Duration::from_secs(1);
                break if refused {
                    End::Refused
                } else {
                    End::ClosedLater
                };
            }
            Ok(_) => {
                if !got_answer {
                    got_answer = true;
                    s.answered.fetch_add(1, Relaxed);
                }
            }
            // A reset before any answer is the cap's refusal (lockstep resets refused
            // connections); after one, a close.
            Err(_) => {
                break if got_answer {
                    End::ClosedLater
                } else {
                    End::Refused
                }
            }
        }
    };
    if !matches!(end, End::Stopped) {
        s.alive.fetch_sub(1, Relaxed);
    }
    end
}

/// One attacker slot: connects, holds, and comes back after the server closes it.
async fn slot(
    kind: Kind,
    i: u64,
    port: u16,
    s: Arc<Stats>,
    next: Arc<AtomicU32>,
    stop: CancellationToken,
) {
    // Spread over the 3 s by the slot's number (a multiplicative hash, no randomness needed).
    let phase = Duration::from_millis(i.wrapping_mul(2_654_435_761) % 3000);
    let pause = |d: u64| {
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(d)) => {}
            }
        }
    };
    while !stop.is_cancelled() {
        let c = tokio::select! {
            _ = stop.cancelled() => return,
            c = connect(port, &next) => c,
        };
        let Ok(c) = c else {
            // Refused (reset) during the handshake: back after 5 s.
            s.refused.fetch_add(1, Relaxed);
            pause(5000).await;
            continue;
        };
        s.opened.fetch_add(1, Relaxed);
        match hold(kind, phase, c, &s, &stop).await {
            End::Stopped => return,
            End::Refused => {
                s.refused.fetch_add(1, Relaxed);
                pause(4500).await; // a refused attacker comes back, not in a spin
            }
            End::ClosedLater => {
                s.closed_later.fetch_add(1, Relaxed);
            }
        }
        pause(500).await;
    }
}

fn main() {
    const USAGE: &str = "usage: soakattack PORT IDLE SLOWLORIS H2C SECONDS (whole numbers)";
    let args: Option<Vec<u64>> = std::env::args().skip(1).map(|a| a.parse().ok()).collect();
    let (port, idle, slow, h2c, seconds) = match args.as_deref() {
        Some(&[port, idle, slow, h2c, seconds]) => match u16::try_from(port) {
            Ok(port) => (port, idle, slow, h2c, seconds),
            Err(_) => {
                eprintln!("{USAGE}: PORT {port} is not a TCP port");
                std::process::exit(2);
            }
        },
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let stop = CancellationToken::new();
        let next = Arc::new(AtomicU32::new(0));
        let kinds = [
            (Kind::Idle, idle),
            (Kind::Slowloris, slow),
            (Kind::H2c, h2c),
        ];
        let stats: Vec<Arc<Stats>> = kinds.iter().map(|_| Arc::default()).collect();
        let mut started = 0u64;
        for ((kind, n), s) in kinds.iter().zip(&stats) {
            for _ in 0..*n {
                tokio::spawn(slot(
                    *kind,
                    started,
                    port,
                    s.clone(),
                    next.clone(),
                    stop.clone(),
                ));
                started += 1;
                if started % 200 == 0 {
                    // Do not SYN-flood our own backlog.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
        }
        // What is alive is counted before the stop wakes the connections' tasks.
        let alive: Vec<i64> = stats.iter().map(|s| s.alive.load(Relaxed)).collect();
        stop.cancel();
        let mut out = serde_json::Map::new();
        out.insert("port".into(), port.into());
        for (((kind, _), s), alive) in kinds.iter().zip(&stats).zip(alive) {
            out.insert(kind.name().into(), s.json(alive));
        }
        println!("{}", serde_json::Value::Object(out));
    });
}
