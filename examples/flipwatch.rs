//! `flipwatch`: watches several lockstep agents from outside and reports the instant each one
//! starts serving a new release — the measuring instrument of `bench/sync.sh`.
//!
//! One thread per agent sends `HEAD /` over a kept-alive connection in a tight loop and reads
//! `X-Lockstep-Release`. Every change is printed as a JSON line
//! `{"agent":I,"release":"…","lo_us":L,"hi_us":H}` (µs on this process's monotonic clock):
//! the agent answered the previous poll, sent at `L`, with the old release and this poll,
//! answered by `H`, with the new one, so it flipped inside `[L, H]` — the width of that window
//! is the resolution of the observation (it grows when the agent or the poller waits for a
//! core). At the end (after `--seconds`), one summary line per agent gives its poll count and
//! median poll round trip.
//!
//! Usage: `flipwatch --seconds 60 [--pause-us 200] 127.0.0.1:8101 127.0.0.1:8102 …`
//! (`--pause-us`: sleep between two polls of one agent, so that eight pollers do not take the
//! cores the agents flip on).

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

fn main() {
    let mut args = std::env::args().skip(1);
    let mut seconds = 60u64;
    let mut pause = Duration::ZERO;
    let mut agents: Vec<SocketAddr> = Vec::new();
    while let Some(a) = args.next() {
        if a == "--pause-us" {
            pause = Duration::from_micros(
                args.next()
                    .and_then(|s| s.parse().ok())
                    .expect("--pause-us N"),
            );
        } else if a == "--seconds" {
            seconds = args
                .next()
                .and_then(|s| s.parse().ok())
                .expect("--seconds N");
        } else {
            agents.push(a.parse().expect("agent address ip:port"));
        }
    }
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = agents
        .into_iter()
        .enumerate()
        .map(|(i, addr)| {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut current = String::new();
                let mut intervals: Vec<u32> = Vec::new();
                let mut last_send: Option<Instant> = None;
                let mut conn: Option<BufReader<TcpStream>> = None;
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
                    if !pause.is_zero() {
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
