//! `flipwatch`: watches several lockstep agents from outside and reports the instant each one
//! starts serving a new release — the measuring instrument of `bench/sync.sh`.
//!
//! One thread per agent sends `HEAD /` over a kept-alive connection and reads
//! `X-Lockstep-Release`. Every change is printed as a JSON line
//! `{"agent":I,"release":"…","lo_us":L,"hi_us":H}` (µs on this process's monotonic clock):
//! the agent answered the previous poll, sent at `L`, with the old release and this poll,
//! answered by `H`, with the new one, so it flipped inside `[L, H]` — the width of that window
//! is the resolution of the observation (it grows when the agent or the poller waits for a
//! core). At the end (after `--seconds`), one summary line per agent gives its poll count and
//! median poll round trip. The first line, `{"mono_start_ns":N,"wall_start_ns":W}`, is the
//! instant those µs count from on CLOCK_MONOTONIC and on the wall clock, so that the windows can
//! be set beside kernel timestamps and activation instants.
//!
//! With `--at-file F`, the pollers know when flips are due: `F` receives activation instants
//! (µs since the Unix epoch, the hub's clock — this host's, one per line, appended while it
//! runs). Away from them each thread polls every `--idle-us` (20 000); from `--lead-us` (2 000)
//! before an instant until it has seen the new release (or 100 ms later) it polls back to back,
//! so the windows are one or two round trips wide (~0.1 ms) while eight pollers cost the
//! agents' cores almost nothing between flips. Without it, every thread polls continuously
//! with `--pause-us` between polls.
//!
//! Usage: `flipwatch --seconds 60 [--at-file F] [--pause-us 200] 127.0.0.1:8101 …`

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn release_of(stream: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    stream
        .get_mut()
        .write_all(b"HEAD / HTTP/1.1\r\nHost: flipwatch\r\n\r\n")?;
    let mut release = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if stream.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("closed"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok(release);
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("x-lockstep-release") {
                release = v.trim().to_string();
            }
        }
    }
}

/// Activation instants read from the `--at-file`, on this process's monotonic clock.
#[derive(Default)]
struct Due {
    at: std::sync::Mutex<Vec<Instant>>,
}

impl Due {
    /// Whether a flip is due around `now`: from `lead` before an instant to `tail` after it.
    fn near(&self, now: Instant, lead: Duration, tail: Duration) -> bool {
        let at = self.at.lock().unwrap();
        at.iter().any(|&t| now + lead >= t && now <= t + tail)
    }

    /// The next instant after `now`, if one is known.
    fn next(&self, now: Instant) -> Option<Instant> {
        let at = self.at.lock().unwrap();
        at.iter().copied().filter(|&t| t > now).min()
    }
}

/// Reads new lines of `path` every 5 ms until `end`: µs since the epoch → monotonic instants.
fn follow(path: std::path::PathBuf, due: Arc<Due>, end: Instant) {
    // One reading of both clocks maps the hub's wall-clock instants onto Instant.
    let (wall0, mono0) = (std::time::SystemTime::now(), Instant::now());
    let wall0_us = wall0
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i128;
    let mut read = 0usize;
    while Instant::now() < end {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if text.len() > read {
                for line in text[read..].lines() {
                    if let Ok(us) = line.trim().parse::<i128>() {
                        let d = us - wall0_us;
                        let t = if d >= 0 {
                            mono0 + Duration::from_micros(d as u64)
                        } else {
                            mono0 - Duration::from_micros((-d) as u64)
                        };
                        due.at.lock().unwrap().push(t);
                    }
                }
                read = text.rfind('\n').map_or(read, |n| n + 1);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut seconds = 60u64;
    let mut pause = Duration::ZERO;
    let mut idle = Duration::from_millis(20);
    let mut lead = Duration::from_millis(2);
    let mut at_file: Option<std::path::PathBuf> = None;
    let mut agents: Vec<SocketAddr> = Vec::new();
    let us = |v: Option<String>, what: &str| {
        Duration::from_micros(
            v.and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{what} N")),
        )
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--pause-us" => pause = us(args.next(), "--pause-us"),
            "--idle-us" => idle = us(args.next(), "--idle-us"),
            "--lead-us" => lead = us(args.next(), "--lead-us"),
            "--at-file" => at_file = Some(args.next().expect("--at-file PATH").into()),
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds N")
            }
            _ => agents.push(a.parse().expect("agent address ip:port")),
        }
    }
    let start = Instant::now();
    // Instant is CLOCK_MONOTONIC on Linux: this line places the µs below on the kernel's clock,
    // where `bench/sync.sh`'s uprobe timestamps the agents' flips.
    // The wall clock read beside it maps activation instants (the hub's clock: this host's) onto
    // the same line.
    let ns = |t: rustix::time::Timespec| t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128;
    let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let wall = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    println!(
        "{{\"mono_start_ns\":{},\"wall_start_ns\":{}}}",
        ns(mono),
        ns(wall)
    );
    let end = start + Duration::from_secs(seconds);
    let tail = Duration::from_millis(100);
    let due = Arc::new(Due::default());
    let scheduled = at_file.is_some();
    if let Some(path) = at_file {
        let due = due.clone();
        std::thread::spawn(move || follow(path, due, end));
    }
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = agents
        .into_iter()
        .enumerate()
        .map(|(i, addr)| {
            let out = out.clone();
            let due = due.clone();
            std::thread::spawn(move || {
                let mut current = String::new();
                let mut intervals: Vec<u32> = Vec::new();
                let mut last_send: Option<Instant> = None;
                let mut conn: Option<BufReader<TcpStream>> = None;
                // In scheduled mode: the instant whose flip this thread has seen (no more
                // back-to-back polls for it).
                let mut seen_for: Option<Instant> = None;
                while Instant::now() < end {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match TcpStream::connect(addr) {
                            Ok(s) => {
                                let _ = s.set_nodelay(true);
                                conn.insert(BufReader::new(s))
                            }
                            Err(_) => {
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                        },
                    };
                    if scheduled {
                        let now = Instant::now();
                        let hot = due.near(now, lead, tail)
                            && seen_for.is_none_or(|t| now > t + tail || now + lead < t);
                        if !hot {
                            // Sleep until the next lead-in or one idle period, whichever is first.
                            let wake = due
                                .next(now)
                                .map(|t| t.checked_sub(lead).unwrap_or(t))
                                .filter(|w| *w > now)
                                .map_or(idle, |w| (w - now).min(idle));
                            // The previous poll still bounds the window: a flip seen by this
                            // poll reports the whole sleep as its uncertainty.
                            std::thread::sleep(wake);
                        }
                    } else if !pause.is_zero() {
                        std::thread::sleep(pause);
                    }
                    let sent = Instant::now();
                    match release_of(c) {
                        Ok(r) => {
                            let received = Instant::now();
                            intervals.push((received - sent).as_micros() as u32);
                            let lo = last_send.unwrap_or(sent);
                            last_send = Some(sent);
                            if r != current {
                                let (lo, hi) = ((lo - start).as_micros(), (received - start).as_micros());
                                let line = format!(
                                    "{{\"agent\":{i},\"release\":\"{r}\",\"lo_us\":{lo},\"hi_us\":{hi}}}\n"
                                );
                                let _ = out.lock().unwrap().write_all(line.as_bytes());
                                current = r;
                                if scheduled {
                                    seen_for = due.at.lock().unwrap().iter().copied().filter(|&t| received + lead >= t).max();
                                }
                            }
                        }
                        Err(_) => {
                            conn = None;
                            last_send = None;
                        }
                    }
                }
                intervals.sort_unstable();
                let median = intervals.get(intervals.len() / 2).copied().unwrap_or(0);
                let line = format!(
                    "{{\"agent\":{i},\"polls\":{},\"median_round_trip_us\":{median}}}\n",
                    intervals.len()
                );
                let _ = out.lock().unwrap().write_all(line.as_bytes());
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}
