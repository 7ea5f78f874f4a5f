//! The PROXY protocol (HAProxy's, versions 1 and 2): the header an L4 balancer puts before a
//! connection's bytes to say whose connection it is, and the one lockstep sends to backends.
//!
//! Parsing is pure ([`parse`]: bytes in, a header or how many more bytes it needs out), and
//! bounded: a v1 header is at most 107 bytes, a v2 header at most [`MAX_V2`] (its TLVs are
//! skipped). Reading one off a socket ([`read_header`]) takes exactly the header's bytes, so
//! what follows (TLS, HTTP) is left to the next layer, and gives up after a deadline.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature.
const SIG_V2: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the specification's bound).
pub const MAX_V1: usize = 107;
/// Longest v2 header accepted (16 bytes, addresses and TLVs); longer ones are refused.
pub const MAX_V2: usize = 16 + 512;

pub use crate::config::ProxyVersion as Version;

/// The client's address and the address it connected to, carried in a request's extensions
/// to the upstream client, which writes them in the PROXY header of a pool with `send_proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddrs {
    /// The client.
    pub source: SocketAddr,
    /// Where it connected (this appliance's address, or the one the balancer's header gave).
    pub destination: SocketAddr,
}

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection: the client's address and the address it connected to.
    Proxied {
        /// The client.
        source: SocketAddr,
        /// Where it connected.
        destination: SocketAddr,
    },
    /// The balancer's own connection (a health check), or an address family it does not
    /// say: the connection's own addresses stand.
    Local,
}

/// The outcome of [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes.
    Done(Header, usize),
    /// At least this many bytes in all are needed to go on.
    Need(usize),
}

/// Why a header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Neither signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// A v1 line without its CRLF within 107 bytes, or malformed.
    #[error("bad PROXY v1 header: {0}")]
    V1(&'static str),
    /// A v2 header that breaks the specification.
    #[error("bad PROXY v2 header: {0}")]
    V2(&'static str),
    /// Reading it failed or took too long.
    #[error("reading the PROXY header: {0}")]
    Io(String),
}

/// Parses the header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let n = buf.len().min(SIG_V2.len());
    if buf[..n] == SIG_V2[..n] {
        return if buf.len() < 16 {
            Ok(Parsed::Need(16))
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return parse_v1(buf);
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_V1 {
            Err(ProxyError::V1("no CRLF within 107 bytes"))
        } else {
            Ok(Parsed::Need(buf.len() + 1))
        };
    };
    if end + 2 > MAX_V1 {
        return Err(ProxyError::V1("longer than 107 bytes"));
    }
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| ProxyError::V1("not ASCII"))?;
    let mut parts = line.split(' ');
    let family = parts.next().unwrap_or("");
    if family == "UNKNOWN" {
        // The receiver ignores the rest of the line.
        return Ok(Parsed::Done(Header::Local, end + 2));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyError::V1(
            "expected PROXY TCP4|TCP6 SRC DST SPORT DPORT",
        ));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        let ip: IpAddr = s.parse().map_err(|_| ProxyError::V1("bad address"))?;
        match (family, ip) {
            ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
            ("TCP4" | "TCP6", _) => Err(ProxyError::V1("address of the other family")),
            _ => Err(ProxyError::V1("family is not TCP4, TCP6 or UNKNOWN")),
        }
    };
    let port = |s: &str| -> Result<u16, ProxyError> {
        // Decimal, no sign, no leading zero (the specification's form).
        if s.is_empty() || s.len() > 5 || (s.len() > 1 && s.starts_with('0')) {
            return Err(ProxyError::V1("bad port"));
        }
        s.parse().map_err(|_| ProxyError::V1("bad port"))
    };
    Ok(Parsed::Done(
        Header::Proxied {
            source: SocketAddr::new(ip(src)?, port(sport)?),
            destination: SocketAddr::new(ip(dst)?, port(dport)?),
        },
        end + 2,
    ))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2("version is not 2"));
    }
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_V2 {
        return Err(ProxyError::V2("longer than lockstep accepts (528 bytes)"));
    }
    if buf.len() < len {
        return Ok(Parsed::Need(len));
    }
    let body = &buf[16..len];
    match ver_cmd & 0x0f {
        // LOCAL: the balancer's own connection; the addresses are to be ignored.
        0 => return Ok(Parsed::Done(Header::Local, len)),
        1 => {}
        _ => return Err(ProxyError::V2("command is neither LOCAL nor PROXY")),
    }
    let header = match buf[13] {
        // TCP over IPv4: 4 + 4 + 2 + 2.
        0x11 if body.len() >= 12 => {
            let a = |i: usize| IpAddr::from([body[i], body[i + 1], body[i + 2], body[i + 3]]);
            let p = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
            Header::Proxied {
                source: SocketAddr::new(a(0), p(8)),
                destination: SocketAddr::new(a(4), p(10)),
            }
        }
        // TCP over IPv6: 16 + 16 + 2 + 2.
        0x21 if body.len() >= 36 => {
            let a = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&body[i..i + 16]);
                IpAddr::from(o)
            };
            let p = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
            Header::Proxied {
                source: SocketAddr::new(a(0), p(32)),
                destination: SocketAddr::new(a(16), p(34)),
            }
        }
        0x11 | 0x21 => return Err(ProxyError::V2("address block shorter than its family")),
        // UNSPEC, UDP, unix sockets: the connection's own addresses stand.
        0x00 | 0x12 | 0x22 | 0x31 | 0x32 => Header::Local,
        _ => return Err(ProxyError::V2("unknown address family or protocol")),
    };
    Ok(Parsed::Done(header, len))
}

/// Reads a PROXY header off `stream`, taking exactly its bytes, within `deadline`.
pub async fn read_header(stream: &mut TcpStream, deadline: Duration) -> Result<Header, ProxyError> {
    tokio::time::timeout(deadline, read_exact_header(stream))
        .await
        .map_err(|_| ProxyError::Io(format!("no whole header within {deadline:?}")))?
}

async fn read_exact_header(stream: &mut TcpStream) -> Result<Header, ProxyError> {
    let io = |e: std::io::Error| ProxyError::Io(e.to_string());
    let mut buf = [0u8; MAX_V2];
    // The header nearly always arrives whole in the first segment: look at what is there,
    // then take exactly the header.
    let mut have = 0;
    loop {
        let seen = stream.peek(&mut buf[have..]).await.map_err(io)?;
        if seen == 0 {
            return Err(ProxyError::Io("the connection closed".into()));
        }
        match parse(&buf[..have + seen])? {
            Parsed::Done(h, len) => {
                stream.read_exact(&mut buf[have..len]).await.map_err(io)?;
                return Ok(h);
            }
            Parsed::Need(n) => {
                // Incomplete: take what is known to be header (never past it) and wait for
                // the rest; a read blocks until more arrives, where a peek would not.
                let take = (n - 1).min(have + seen) - have;
                let take = take.max(1).min(seen);
                stream
                    .read_exact(&mut buf[have..have + take])
                    .await
                    .map_err(io)?;
                have += take;
            }
        }
    }
}

/// The header lockstep sends a backend for a client at `source` that connected to
/// `destination` (v1 `PROXY TCP4|TCP6 …`, or v2 PROXY over TCP); `None`, a health check of
/// lockstep's own (v1 `PROXY UNKNOWN`, v2 LOCAL).
pub fn encode(version: Version, addrs: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    // One family on both sides: an IPv4 address mapped into IPv6 is written as IPv4.
    let addrs = addrs.map(|(s, d)| {
        let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let (s, d) = (canon(s), canon(d));
        match (s, d) {
            (SocketAddr::V4(_), SocketAddr::V6(_)) | (SocketAddr::V6(_), SocketAddr::V4(_)) => {
                let six = |a: SocketAddr| match a.ip() {
                    IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
                    IpAddr::V6(_) => a,
                };
                (six(s), six(d))
            }
            same => same,
        }
    });
    match version {
        Version::V1 => match addrs {
            None => b"PROXY UNKNOWN\r\n".to_vec(),
            Some((s, d)) => {
                let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
                format!(
                    "PROXY {family} {} {} {} {}\r\n",
                    s.ip(),
                    d.ip(),
                    s.port(),
                    d.port()
                )
                .into_bytes()
            }
        },
        Version::V2 => {
            let mut out = SIG_V2.to_vec();
            match addrs {
                None => out.extend_from_slice(&[0x20, 0x00, 0, 0]),
                Some((s, d)) => {
                    let mut body = Vec::with_capacity(36);
                    let family = match (s.ip(), d.ip()) {
                        (IpAddr::V4(a), IpAddr::V4(b)) => {
                            body.extend_from_slice(&a.octets());
                            body.extend_from_slice(&b.octets());
                            0x11
                        }
                        (a, b) => {
                            let six = |ip: IpAddr| match ip {
                                IpAddr::V6(v) => v.octets(),
                                IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
                            };
                            body.extend_from_slice(&six(a));
                            body.extend_from_slice(&six(b));
                            0x21
                        }
                    };
                    body.extend_from_slice(&s.port().to_be_bytes());
                    body.extend_from_slice(&d.port().to_be_bytes());
                    out.extend_from_slice(&[0x21, family]);
                    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
                    out.extend_from_slice(&body);
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Done(
                Header::Proxied {
                    source: sa("192.0.2.1:56324"),
                    destination: sa("198.51.100.2:443")
                },
                45
            ))
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n";
        assert!(matches!(
            parse(h),
            Ok(Parsed::Done(Header::Proxied { .. }, 44))
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"),
            Ok(Parsed::Done(Header::Local, 35))
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parsed::Done(Header::Local, 15))
        );
    }

    #[test]
    fn v1_needs_more_until_its_crlf_and_refuses_what_is_malformed() {
        assert_eq!(parse(b"PRO"), Ok(Parsed::Need(4)));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(Parsed::Need(19)));
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"[..],
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(
            parse(&long),
            Err(ProxyError::V1("no CRLF within 107 bytes"))
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::NotProxy));
    }

    #[test]
    fn v2_round_trips_what_lockstep_sends() {
        for (s, d) in [
            ("192.0.2.1:56324", "198.51.100.2:443"),
            ("[2001:db8::1]:1", "[2001:db8::2]:65535"),
        ] {
            let bytes = encode(Version::V2, Some((sa(s), sa(d))));
            assert_eq!(
                parse(&bytes),
                Ok(Parsed::Done(
                    Header::Proxied {
                        source: sa(s),
                        destination: sa(d)
                    },
                    bytes.len()
                ))
            );
            let text = encode(Version::V1, Some((sa(s), sa(d))));
            assert_eq!(
                parse(&text),
                Ok(Parsed::Done(
                    Header::Proxied {
                        source: sa(s),
                        destination: sa(d)
                    },
                    text.len()
                ))
            );
        }
        // Mixed families are written as IPv6 (v4-mapped); a mapped pair as IPv4.
        let mixed = encode(
            Version::V1,
            Some((sa("192.0.2.1:1"), sa("[2001:db8::2]:2"))),
        );
        assert_eq!(mixed, b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1 2\r\n");
        let mapped = encode(
            Version::V1,
            Some((sa("[::ffff:192.0.2.1]:1"), sa("[::ffff:192.0.2.2]:2"))),
        );
        assert_eq!(mapped, b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n");
        assert_eq!(
            parse(&encode(Version::V2, None)),
            Ok(Parsed::Done(Header::Local, 16))
        );
        assert_eq!(encode(Version::V1, None), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v2_needs_its_length_skips_tlvs_and_refuses_the_rest() {
        let mut h = encode(Version::V2, Some((sa("10.0.0.1:1000"), sa("10.0.0.2:80"))));
        // A TLV (type 0x04 NOOP, 3 bytes) after the addresses.
        h.extend_from_slice(&[0x04, 0x00, 0x03, 1, 2, 3]);
        let len = (h.len() - 16) as u16;
        h[14..16].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(parse(&h), Ok(Parsed::Done(Header::Proxied { .. }, n)) if n == h.len()));
        assert_eq!(parse(&h[..10]), Ok(Parsed::Need(16)));
        assert_eq!(parse(&h[..20]), Ok(Parsed::Need(h.len())));
        let mut v3 = h.clone();
        v3[12] = 0x31;
        assert!(parse(&v3).is_err());
        let mut cmd = h.clone();
        cmd[12] = 0x2f;
        assert!(parse(&cmd).is_err());
        let mut short = h.clone();
        short[14..16].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(
            parse(&short),
            Err(ProxyError::V2("address block shorter than its family"))
        );
        let mut huge = h.clone();
        huge[14..16].copy_from_slice(&60000u16.to_be_bytes());
        assert!(parse(&huge).is_err(), "bounded");
        let mut unix = h;
        unix[13] = 0x31;
        assert!(matches!(parse(&unix), Ok(Parsed::Done(Header::Local, _))));
    }
}
