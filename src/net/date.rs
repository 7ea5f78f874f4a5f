//! The `Date` header (RFC 9110 §6.6.1) of every response lockstep writes, formatted once per
//! second per thread: as bytes for the HTTP/1.1 writer, as a shared header value for HTTP/2.
#![allow(clippy::disallowed_methods)] // I/O shell: the Date header is the wall clock by definition

use std::cell::RefCell;
use std::time::SystemTime;

use http::HeaderValue;

thread_local! {
    /// The `Date` value of the current second on this thread.
    static DATE: RefCell<(u64, [u8; 29], HeaderValue)> =
        const { RefCell::new((u64::MAX, [0; 29], HeaderValue::from_static(""))) };
}

/// Now as an IMF-fixdate (RFC 9110 §5.6.7), formatted once per second per thread.
pub fn date() -> [u8; 29] {
    current(|d| d.1)
}

/// Now as a `Date` header value (a shared buffer: cloning it does not copy).
pub fn date_value() -> HeaderValue {
    current(|d| d.2.clone())
}

/// `f` of this second's formatted date.
fn current<T>(f: impl FnOnce(&(u64, [u8; 29], HeaderValue)) -> T) -> T {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let text = imf_fixdate(secs);
            let value = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(&text))
                .expect("an IMF-fixdate is a valid header value");
            *d = (secs, text, value);
        }
        f(&d)
    })
}

/// `Thu, 03 Dec 2026 23:41:53 GMT` from the seconds since the epoch.
fn imf_fixdate(secs: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86400;
    let rem = secs % 86400;
    let (y, m, d) = civil_from_days(days as i64);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    let put = |out: &mut [u8; 29], at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    put(&mut out, 5, 2, d);
    out[8..11].copy_from_slice(MONTHS[(m - 1) as usize]);
    put(&mut out, 12, 4, y.max(0) as u64);
    put(&mut out, 17, 2, rem / 3600);
    put(&mut out, 20, 2, rem % 3600 / 60);
    put(&mut out, 23, 2, rem % 60);
    out
}

/// Year, month (1–12), day from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u64, u64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_imf_fixdates() {
        assert_eq!(&imf_fixdate(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            &imf_fixdate(1_796_341_313),
            b"Thu, 03 Dec 2026 23:41:53 GMT"
        );
        assert_eq!(&imf_fixdate(951_782_400), b"Tue, 29 Feb 2000 00:00:00 GMT");
    }

    #[test]
    fn the_value_is_the_bytes() {
        assert_eq!(date_value().as_bytes(), &date()[..]);
    }
}
