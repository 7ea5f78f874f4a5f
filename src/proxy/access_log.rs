//! Access log lines (`combined` as nginx writes it, or one JSON object per line), written to
//! stdout by a dedicated thread so that a slow terminal or journal never blocks a request.
//! When the writer falls behind, lines are dropped and counted rather than queued forever.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::AccessLog;

/// What one access log line says.
pub struct Entry<'a> {
    /// Client address.
    pub client: IpAddr,
    /// When the request arrived.
    pub time: SystemTime,
    /// Method.
    pub method: &'a str,
    /// Path and query.
    pub target: &'a str,
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub version: &'a str,
    /// Status sent.
    pub status: u16,
    /// Response body size when known.
    pub bytes: Option<u64>,
    /// `Referer`.
    pub referer: Option<&'a str>,
    /// `User-Agent`.
    pub user_agent: Option<&'a str>,
    /// Host asked for.
    pub host: Option<&'a str>,
    /// Pool and backend that served it.
    pub pool: Option<&'a str>,
    /// Backend that served it.
    pub backend: Option<&'a str>,
    /// Time to the response head.
    pub duration: Duration,
    /// Listener name.
    pub listener: &'a str,
}

/// A field of a combined-format line as nginx writes it: `"`, `\` and bytes outside printable
/// ASCII as `\xHH`, so a client cannot close a quoted field or start a new line.
fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Formats one line (without the newline).
pub fn format(fmt: AccessLog, e: &Entry<'_>) -> Option<String> {
    match fmt {
        AccessLog::Off => None,
        AccessLog::Combined => Some(format!(
            "{} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\"",
            e.client,
            clf_time(e.time),
            escape(e.method),
            escape(e.target),
            e.version,
            e.status,
            e.bytes.map_or("-".to_string(), |b| b.to_string()),
            escape(e.referer.unwrap_or("-")),
            escape(e.user_agent.unwrap_or("-")),
        )),
        AccessLog::Json => Some(
            serde_json::json!({
                "time": humantime::format_rfc3339_millis(e.time).to_string(),
                "listener": e.listener,
                "client": e.client.to_string(),
                "method": e.method,
                "target": e.target,
                "version": e.version,
                "host": e.host,
                "status": e.status,
                "bytes": e.bytes,
                "referer": e.referer,
                "user_agent": e.user_agent,
                "pool": e.pool,
                "backend": e.backend,
                "duration_ms": e.duration.as_secs_f64() * 1000.0,
            })
            .to_string(),
        ),
    }
}

/// `21/Nov/2026:22:13:58 +0000` (UTC).
fn clf_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000",
        MONTHS[(m - 1) as usize % 12],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month 1..=12, day) — Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Lines queued for stdout, at most.
const QUEUE_LINES: usize = 16 * 1024;
/// Bytes queued for stdout, at most: a line can be ~128 KiB (a 64 KiB request head, escaped),
/// so the line count alone would allow 2 GiB.
const QUEUE_BYTES: usize = 8 << 20;

/// Whether `len` more bytes fit beside `queued` (pure).
fn fits(queued: usize, len: usize) -> bool {
    queued.saturating_add(len) <= QUEUE_BYTES
}

/// Queues a line for stdout; when the writer is behind (past [`QUEUE_LINES`] or
/// [`QUEUE_BYTES`]) the line is dropped and counted.
pub fn write(line: String) {
    static QUEUED: AtomicUsize = AtomicUsize::new(0);
    static TX: OnceLock<SyncSender<String>> = OnceLock::new();
    let tx = TX.get_or_init(|| {
        let (tx, rx) = sync_channel::<String>(QUEUE_LINES);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                while let Ok(first) = rx.recv() {
                    // Lock stdout per batch, never while waiting: anything else printing to
                    // stdout (the demo's instructions, a test harness) must not block forever.
                    let mut out = std::io::BufWriter::new(stdout.lock());
                    let _ = writeln!(out, "{first}");
                    QUEUED.fetch_sub(first.len(), Ordering::Relaxed);
                    while let Ok(more) = rx.try_recv() {
                        let _ = writeln!(out, "{more}");
                        QUEUED.fetch_sub(more.len(), Ordering::Relaxed);
                    }
                    let _ = out.flush();
                }
            })
            .ok();
        tx
    });
    let len = line.len();
    let admitted = QUEUED
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
            fits(q, len).then_some(q + len)
        })
        .is_ok();
    if !admitted {
        crate::metrics::access_log_dropped().inc();
        return;
    }
    if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(line) {
        QUEUED.fetch_sub(len, Ordering::Relaxed);
        crate::metrics::access_log_dropped().inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            client: "192.0.2.1".parse().unwrap(),
            time: UNIX_EPOCH + Duration::from_secs(1_795_299_238),
            method: "GET",
            target: "/a?b=1",
            version: "HTTP/1.1",
            status: 200,
            bytes: Some(12),
            referer: None,
            user_agent: Some("curl/8"),
            host: Some("www.farm.test"),
            pool: Some("www"),
            backend: Some("web-1"),
            duration: Duration::from_millis(3),
            listener: "http",
        }
    }

    #[test]
    fn the_queue_is_bounded_in_bytes() {
        assert!(fits(0, 128 * 1024));
        assert!(fits(QUEUE_BYTES - 10, 10));
        assert!(!fits(QUEUE_BYTES - 10, 11));
        assert!(!fits(usize::MAX, 1));
    }

    #[test]
    fn combined_escapes_quotes_backslashes_and_control_bytes() {
        assert_eq!(escape("curl/8"), "curl/8");
        assert_eq!(escape("a\"b\\c\nd"), "a\\x22b\\x5Cc\\x0Ad");
        assert_eq!(escape("é"), "\\xC3\\xA9");
    }

    #[test]
    fn combined_matches_nginx_shape() {
        let line = format(AccessLog::Combined, &entry()).unwrap();
        assert_eq!(line, "192.0.2.1 - - [21/Nov/2026:22:13:58 +0000] \"GET /a?b=1 HTTP/1.1\" 200 12 \"-\" \"curl/8\"");
    }

    #[test]
    fn json_is_one_parsable_object() {
        let line = format(AccessLog::Json, &entry()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["backend"], "web-1");
        assert!(format(AccessLog::Off, &entry()).is_none());
    }
}
