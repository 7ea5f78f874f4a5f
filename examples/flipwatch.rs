//! `flipwatch`: watches several lockstep agents from outside and reports the instant each one
//! starts serving a new release — the measuring instrument of `bench/sync.sh`.
//!
//! One thread per agent sends `HEAD /` over a kept-alive connection in a tight loop and reads
//! `X-Lockstep-Release`. Every change is printed as a JSON line
//! `{"agent":I,"release":"…","t_us":T,"gap_us":G}`, where `T` is the send time of the first
//! answer carrying the new release (µs on this process's monotonic clock) and `G` the time
//! since the previous poll's send: the flip happened inside that window, so `G` is the
//! resolution of that observation. At the end (after `--seconds`), one summary line per agent
//! gives its poll count and median poll interval.
//!
//! Usage: `flipwatch --seconds 60 127.0.0.1:8101 127.0.0.1:8102 …`

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
    let mut agents: Vec<SocketAddr> = Vec::new();
    while let Some(a) = args.next() {
        if a == "--seconds" {
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
                    let sent = Instant::now();
                    match release_of(c) {
                        Ok(r) => {
                            let gap = last_send.map_or(0, |l| (sent - l).as_micros() as u64);
                            if last_send.is_some() {
                                intervals.push(gap as u32);
                            }
                            last_send = Some(sent);
                            if r != current {
                                let t = (sent - start).as_micros();
                                let line = format!(
                                    "{{\"agent\":{i},\"release\":\"{r}\",\"t_us\":{t},\"gap_us\":{gap}}}\n"
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
                    "{{\"agent\":{i},\"polls\":{},\"median_interval_us\":{median}}}\n",
                    intervals.len() + 1
                );
                let _ = out.lock().unwrap().write_all(line.as_bytes());
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}
