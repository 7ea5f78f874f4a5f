//! `editwatch`: edits one file, then measures how long until every target serves the new
//! content — the measuring instrument of `bench/forward.sh` (detect-and-forward latency).
//!
//! For each of `--count` edits: new content (a first line `edit I LABEL NONCE` that no earlier
//! edit had, padded with lines of HTML to `--size` + (I mod 16) bytes) is written to `--edit`
//! **in place** (open with truncate, one write, close; no rename, no fsync) — what most editors
//! and deploy tools do, and one `IN_CLOSE_WRITE` for an inotify watcher. `t0` is taken just
//! before the open. Then every target is polled, one thread per target, with `--poll-us`
//! between two polls, until it returns exactly the new bytes; the target's time is the instant
//! the first matching answer arrived, minus `t0`, so it includes up to one poll period of
//! observation delay. The edit's latency is the largest over the targets (the time until
//! *every* target serves it). A target still without it after `--timeout-ms` makes the edit a
//! failure; the next edit follows `--pause-ms` after the previous one is everywhere (or failed).
//!
//! Why the size changes from one edit to the next: rsync (behind lsyncd, the peer) skips a file
//! whose size and whole-second mtime match the copy's ("quick check"), so a same-size edit
//! within the second of the previous one is not copied until some later change — with
//! `--same-size` (every edit exactly `--size` bytes) and a pause under a second, about every
//! other edit then times out on lsyncd. Real edits usually change the size; `--same-size`
//! shows that blind spot.
//!
//! Targets:
//! - `http://host:port/path`: `GET` over one kept-alive HTTP/1.1 connection per target
//!   (reconnected after an error or a `Connection: close`); done when the status is 200 and
//!   the body equals the new content.
//! - anything else is a file path: read whole at every poll; done when the bytes are equal.
//!
//! Output: one line `LABEL: n=N p50=… p99=… max=… mean=… failures=F` (ms, 2 decimals).
//! Percentiles are nearest-rank over all N edits, sorted, a failure counting as +∞ (shown as
//! `timeout`): pQ is the ⌈Q·N/100⌉-th smallest, so with N = 100, p99 is the 99th value — the
//! second largest; the mean is over the edits that did not fail. `--raw FILE` also writes one
//! line per edit: `I LATENCY_MS T1_MS T2_MS …` (`timeout` for a target that never served it).
//!
//! Usage:
//! `editwatch --edit FILE --target T [--target T …] --count N --pause-ms P [--label L]
//!  [--poll-us 100] [--timeout-ms 10000] [--size 2048] [--same-size] [--raw FILE]`
//! `editwatch --summary [--label L] RAW…`: the same summary line over the edits of several
//! raw files (to combine the rounds of a benchmark).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Where an edit should show up.
enum Target {
    /// `GET http://{host}{path}`.
    Http { host: String, path: String },
    /// A file a replicator writes.
    File(PathBuf),
}

impl Target {
    fn parse(s: &str) -> Target {
        if let Some(rest) = s.strip_prefix("http://") {
            let (host, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let host = if host.contains(':') {
                host.to_string()
            } else {
                format!("{host}:80")
            };
            Target::Http {
                host,
                path: path.to_string(),
            }
        } else if s.starts_with("https://") {
            usage("https targets are not supported (plain http:// or a file path)")
        } else {
            Target::File(PathBuf::from(s))
        }
    }
}

/// One edit for a poller: the bytes to wait for, when they were written, when to give up.
struct Job {
    content: Arc<Vec<u8>>,
    t0: Instant,
    deadline: Instant,
}

/// Sends one `GET` on a kept-alive connection and reads the answer into `body`. Returns the
/// status and whether the connection may be reused.
fn get(
    conn: &mut BufReader<TcpStream>,
    request: &[u8],
    body: &mut Vec<u8>,
) -> std::io::Result<(u16, bool)> {
    conn.get_mut().write_all(request)?;
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(std::io::Error::other("closed"));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut keep = !line.starts_with("HTTP/1.0");
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("closed in the headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                keep = !v.eq_ignore_ascii_case("close");
            }
        }
    }
    body.clear();
    if chunked {
        loop {
            line.clear();
            conn.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    line.clear();
                    if conn.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            conn.read_exact(&mut body[start..])?;
            line.clear();
            conn.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        conn.read_exact(body)?;
    } else if status != 204 && status != 304 && !(100..200).contains(&status) {
        conn.read_to_end(body)?;
        keep = false;
    }
    Ok((status, keep))
}

/// Polls `target` for each job until it serves the job's content or the deadline passes;
/// answers with the time since the job's `t0`, or `None`.
fn poller(
    index: usize,
    target: Target,
    pause: Duration,
    jobs: mpsc::Receiver<Job>,
    done: mpsc::Sender<(usize, Option<Duration>)>,
) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut body = Vec::new();
    let request = match &target {
        Target::Http { host, path } => {
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: editwatch\r\n\r\n")
                .into_bytes()
        }
        Target::File(_) => Vec::new(),
    };
    for job in jobs {
        let result = loop {
            let served = match &target {
                Target::File(path) => std::fs::read(path).is_ok_and(|b| b == *job.content),
                Target::Http { host, .. } => {
                    let c = match conn.as_mut() {
                        Some(c) => Some(c),
                        None => match TcpStream::connect(host.as_str()) {
                            Ok(s) => {
                                let _ = s.set_nodelay(true);
                                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                                Some(conn.insert(BufReader::new(s)))
                            }
                            Err(_) => None,
                        },
                    };
                    match c.map(|c| get(c, &request, &mut body)) {
                        Some(Ok((status, keep))) => {
                            if !keep {
                                conn = None;
                            }
                            status == 200 && body == *job.content
                        }
                        Some(Err(_)) => {
                            conn = None;
                            false
                        }
                        None => false,
                    }
                }
            };
            let now = Instant::now();
            if served {
                break Some(now - job.t0);
            }
            if now >= job.deadline {
                break None;
            }
            std::thread::sleep(pause);
        };
        if done.send((index, result)).is_err() {
            return;
        }
    }
}

/// The `i`-th edit's content: a first line no other edit has, padded with HTML to exactly
/// `len` bytes (ending in a newline).
fn content(i: usize, label: &str, nonce: &str, len: usize) -> Vec<u8> {
    let mut s = format!("<!-- edit {i} {label} {nonce} -->\n");
    let mut k = 0;
    while s.len() < len {
        k += 1;
        s.push_str(&format!(
            "<p>Paragraph {k} of the page as of edit {i}: some ordinary text of a small page.</p>\n"
        ));
    }
    let mut b = s.into_bytes();
    if b.len() > len && len > 0 {
        b.truncate(len);
        b[len - 1] = b'\n';
    }
    b
}

fn nonce() -> String {
    let mut b = [0u8; 8];
    match File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => b.iter().map(|x| format!("{x:02x}")).collect(),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!("{:x}{:x}", t.as_nanos(), std::process::id())
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `LABEL: n=… p50=… p99=… max=… mean=… failures=…` over the edits' latencies (ms).
fn summary(label: &str, latencies: &[Option<f64>]) -> String {
    let n = latencies.len();
    let mut sorted: Vec<f64> = latencies
        .iter()
        .map(|l| l.unwrap_or(f64::INFINITY))
        .collect();
    sorted.sort_by(f64::total_cmp);
    let show = |x: f64| {
        if x.is_finite() {
            format!("{x:.2}")
        } else {
            "timeout".to_string()
        }
    };
    // Nearest rank: the ⌈q·n⌉-th smallest.
    let pick = |q: usize| match n {
        0 => "-".to_string(),
        _ => show(sorted[((q * n).div_ceil(100)).clamp(1, n) - 1]),
    };
    let ok: Vec<f64> = latencies.iter().flatten().copied().collect();
    let mean = match ok.len() {
        0 => "-".to_string(),
        k => format!("{:.2}", ok.iter().sum::<f64>() / k as f64),
    };
    format!(
        "{label}: n={n} p50={} p99={} max={} mean={mean} failures={}",
        pick(50),
        pick(99),
        sorted.last().map_or("-".to_string(), |&x| show(x)),
        n - ok.len()
    )
}

fn usage(why: &str) -> ! {
    eprintln!("editwatch: {why}");
    eprintln!(
        "usage: editwatch --edit FILE --target T [--target T …] --count N --pause-ms P [--label L] \
         [--poll-us 100] [--timeout-ms 10000] [--size 2048] [--same-size] [--raw FILE]\n       \
         editwatch --summary [--label L] RAW…"
    );
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut edit: Option<PathBuf> = None;
    let mut targets: Vec<String> = Vec::new();
    let mut count: Option<usize> = None;
    let mut pause_ms: Option<u64> = None;
    let mut label = "editwatch".to_string();
    let mut poll_us = 100u64;
    let mut timeout_ms = 10_000u64;
    let mut size = 2048usize;
    let mut raw: Option<PathBuf> = None;
    let mut same_size = false;
    let mut summarize = false;
    let mut files: Vec<PathBuf> = Vec::new();
    fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> T {
        v.and_then(|s| s.parse().ok())
            .unwrap_or_else(|| usage(&format!("{flag} needs a number")))
    }
    while let Some(a) = args.next() {
        match a.as_str() {
            "--edit" => edit = args.next().map(PathBuf::from),
            "--target" => targets.push(args.next().unwrap_or_else(|| usage("--target T"))),
            "--count" => count = Some(num(&a, args.next())),
            "--pause-ms" => pause_ms = Some(num(&a, args.next())),
            "--label" => label = args.next().unwrap_or_else(|| usage("--label L")),
            "--poll-us" => poll_us = num(&a, args.next()),
            "--timeout-ms" => timeout_ms = num(&a, args.next()),
            "--size" => size = num(&a, args.next()),
            "--raw" => raw = args.next().map(PathBuf::from),
            "--same-size" => same_size = true,
            "--summary" => summarize = true,
            s if s.starts_with("--") => usage(&format!("unknown option {s}")),
            _ if summarize => files.push(PathBuf::from(a)),
            s => usage(&format!("unexpected argument {s}")),
        }
    }

    if summarize {
        let mut latencies = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f)
                .unwrap_or_else(|e| usage(&format!("{}: {e}", f.display())));
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                match line.split_whitespace().nth(1) {
                    Some("timeout") => latencies.push(None),
                    Some(v) => latencies.push(Some(v.parse::<f64>().unwrap_or_else(|_| {
                        usage(&format!("{}: bad line {line:?}", f.display()))
                    }))),
                    None => {}
                }
            }
        }
        println!("{}", summary(&label, &latencies));
        return;
    }

    let edit = edit.unwrap_or_else(|| usage("--edit FILE is required"));
    let count = count.unwrap_or_else(|| usage("--count N is required"));
    let pause =
        Duration::from_millis(pause_ms.unwrap_or_else(|| usage("--pause-ms P is required")));
    if targets.is_empty() {
        usage("at least one --target");
    }
    let mut raw = raw.map(|p| {
        let mut f = File::create(&p).unwrap_or_else(|e| usage(&format!("{}: {e}", p.display())));
        let _ = writeln!(f, "# edit latency_ms {}", targets.join(" "));
        f
    });

    let (done_tx, done_rx) = mpsc::channel();
    let jobs: Vec<mpsc::Sender<Job>> = targets
        .iter()
        .enumerate()
        .map(|(index, t)| {
            let (tx, rx) = mpsc::channel();
            let target = Target::parse(t);
            let done = done_tx.clone();
            let poll = Duration::from_micros(poll_us);
            std::thread::spawn(move || poller(index, target, poll, rx, done));
            tx
        })
        .collect();
    drop(done_tx);

    let nonce = nonce();
    let timeout = Duration::from_millis(timeout_ms);
    let mut latencies: Vec<Option<f64>> = Vec::with_capacity(count);
    for i in 1..=count {
        let len = if same_size { size } else { size + i % 16 };
        let bytes = Arc::new(content(i, &label, &nonce, len));
        let t0 = Instant::now();
        // In place: truncate, write, close.
        if let Err(e) = File::create(&edit).and_then(|mut f| f.write_all(&bytes)) {
            eprintln!("editwatch: writing {}: {e}", edit.display());
            std::process::exit(1);
        }
        for tx in &jobs {
            let _ = tx.send(Job {
                content: bytes.clone(),
                t0,
                deadline: t0 + timeout,
            });
        }
        // Every poller answers each job once, before the next job is sent.
        let mut times: Vec<Option<Duration>> = vec![None; jobs.len()];
        for _ in 0..jobs.len() {
            let (index, t) = done_rx.recv().expect("a poller died");
            times[index] = t;
        }
        let latency = times
            .iter()
            .try_fold(Duration::ZERO, |m, t| t.map(|t| m.max(t)))
            .map(ms);
        latencies.push(latency);
        if let Some(f) = raw.as_mut() {
            let show = |t: Option<f64>| t.map_or("timeout".to_string(), |x| format!("{x:.3}"));
            let per: Vec<String> = times.iter().map(|t| show(t.map(ms))).collect();
            let _ = writeln!(f, "{i} {} {}", show(latency), per.join(" "));
        }
        if i < count {
            std::thread::sleep(pause);
        }
    }
    println!("{}", summary(&label, &latencies));
}
