//! HTTP/1.1 message heads (RFC 9112), pure: a request head parsed from bytes into
//! `http::request::Parts` with its body's framing decided, and a response head written out.
//!
//! The framing rules are where request smuggling lives, so they are strict (RFC 9112 §6):
//! `Transfer-Encoding` must be exactly `chunked` (another coding is a 501, `chunked` not last
//! or in an HTTP/1.0 request a 400), `Content-Length` must be digits and every copy must agree,
//! and a request carrying both is refused: a proxy that picked one reading while the backend
//! picked the other would let a second request ride inside the first. Every refusal closes
//! the connection.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

/// Most header fields in a request head (as hyper's default); more is a 431.
pub const MAX_HEADERS: usize = 100;

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// The chunked transfer coding.
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    /// Method, target, version and header fields.
    pub parts: http::request::Parts,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the client lets the connection stay open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for an interim answer before its body.
    pub expect_continue: bool,
}

/// Why a request head is refused; the connection closes after the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Larger than the head limit or with too many fields: 431.
    TooLarge,
    /// Malformed, or its framing is ambiguous: 400.
    Bad(&'static str),
    /// A transfer coding other than chunked: 501.
    NotImplemented(&'static str),
    /// Not HTTP/1.0 or HTTP/1.1: 505.
    Version,
}

impl HeadError {
    /// The status answering it.
    pub fn status(&self) -> StatusCode {
        match self {
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::Bad(_) => StatusCode::BAD_REQUEST,
            HeadError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            HeadError::Version => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        }
    }

    /// A short reason for the body of the answer.
    pub fn reason(&self) -> &'static str {
        match self {
            HeadError::TooLarge => "request head too large\n",
            HeadError::Bad(why) | HeadError::NotImplemented(why) => why,
            HeadError::Version => "HTTP version not supported\n",
        }
    }
}

/// Header slots reserved in a parsed request beyond its own, for the headers a proxy adds.
const ADDED_HEADROOM: usize = 6;

/// Parses the request head at the start of `buf` (at most `max_head` bytes): `Ok(None)` while
/// it is incomplete, else the head and how many bytes of `buf` it took. Empty lines before the
/// request line are skipped (RFC 9112 §2.2).
pub fn parse_request(buf: &[u8], max_head: usize) -> Result<Option<(Head, usize)>, HeadError> {
    let skip = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let buf_all = buf;
    let buf = &buf[skip..];
    // Left uninitialised: zeroing 100 fields per request cost more than parsing them.
    let mut fields =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf_all.len() >= max_head {
                Err(HeadError::TooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::Version),
        Err(_) => return Err(HeadError::Bad("malformed request head\n")),
    };
    if skip + len > max_head {
        return Err(HeadError::TooLarge);
    }
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        _ => return Err(HeadError::Version),
    };
    // One copy of the head; the target and every value are slices of it.
    let shared = Bytes::copy_from_slice(&buf[..len]);
    let offset = |s: &[u8]| s.as_ptr() as usize - buf.as_ptr() as usize;
    let slice = |s: &[u8]| {
        let at = offset(s);
        shared.slice(at..at + s.len())
    };
    let method = req.method.ok_or(HeadError::Bad("no method\n"))?;
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| HeadError::Bad("bad method\n"))?;
    let target = req.path.ok_or(HeadError::Bad("no request target\n"))?;
    let uri = Uri::from_maybe_shared(slice(target.as_bytes()))
        .map_err(|_| HeadError::Bad("bad request target\n"))?;

    // Room for the headers a proxy adds (Host, X-Forwarded-*, Via, Forwarded) without the
    // map growing: each growth is two allocations.
    let mut headers = HeaderMap::with_capacity(req.headers.len() + ADDED_HEADROOM);
    let mut scan = Scan::default();
    for f in req.headers.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| HeadError::Bad("bad header name\n"))?;
        let value = HeaderValue::from_maybe_shared(slice(f.value))
            .map_err(|_| HeadError::Bad("bad header value\n"))?;
        scan.field(&name, f.value)?;
        headers.append(name, value);
    }
    let framing = scan.framing(version)?;
    let keep_alive = match version {
        Version::HTTP_11 => !scan.close,
        _ => scan.keep_alive && !scan.close,
    };
    let mut parts = http::Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some((
        Head {
            parts,
            framing,
            keep_alive,
            expect_continue: scan.expect_continue && version == Version::HTTP_11,
        },
        skip + len,
    )))
}

/// What the header fields of a request or a response say about framing and the connection,
/// gathered in one pass over them.
#[derive(Default)]
pub struct Scan {
    /// `Content-Length`, the same in every field and list element.
    pub length: Option<u64>,
    /// Transfer codings, over every `Transfer-Encoding` field.
    pub codings: u8,
    /// Whether the last transfer coding is chunked.
    pub chunked_last: bool,
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (requests).
    pub expect_continue: bool,
}

impl Scan {
    /// Takes one header field into account: `Err` for a bad or conflicting `Content-Length`.
    pub fn field(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), HeadError> {
        if name == header::CONTENT_LENGTH {
            for v in value.split(|&b| b == b',') {
                let n = content_length(trim(v))?;
                if self.length.is_some_and(|l| l != n) {
                    return Err(HeadError::Bad("conflicting Content-Length\n"));
                }
                self.length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            for c in value.split(|&b| b == b',').map(trim) {
                if c.is_empty() {
                    continue;
                }
                self.codings = self.codings.saturating_add(1);
                self.chunked_last = c.eq_ignore_ascii_case(b"chunked");
            }
        } else if name == header::CONNECTION {
            for t in value.split(|&b| b == b',').map(trim) {
                if t.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                }
            }
        } else if name == header::EXPECT && trim(value).eq_ignore_ascii_case(b"100-continue") {
            self.expect_continue = true;
        }
        Ok(())
    }

    fn framing(&self, version: Version) -> Result<Framing, HeadError> {
        if self.codings > 0 {
            if version == Version::HTTP_10 {
                return Err(HeadError::Bad("Transfer-Encoding in an HTTP/1.0 request\n"));
            }
            if self.length.is_some() {
                return Err(HeadError::Bad(
                    "both Content-Length and Transfer-Encoding\n",
                ));
            }
            if !self.chunked_last {
                return Err(HeadError::Bad("chunked is not the final transfer coding\n"));
            }
            if self.codings > 1 {
                return Err(HeadError::NotImplemented(
                    "only the chunked transfer coding is understood\n",
                ));
            }
            return Ok(Framing::Chunked);
        }
        Ok(match self.length {
            None | Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
        })
    }
}

/// Header names a [`NameCache`] keeps, by position in the head.
pub const NAME_SLOTS: usize = 16;

/// Longest raw name a [`NameCache`] keeps (longer ones are parsed every time).
const NAME_LEN: usize = 32;

/// The header names of the last heads parsed, by their position in the head (pure).
///
/// A backend writes the same names in the same order in every response, and parsing a name
/// (`HeaderName::from_bytes`: lowercased into a scratch buffer, matched against the standard
/// names) cost ~150 instructions a field, ~3 % of a proxied request's. So the name at position
/// i is kept with the raw bytes it came from, and the next head whose i-th name has the same
/// bytes gets a copy of it (the same bytes always make the same name). A name at another
/// position, or longer than 32 bytes, is parsed as before and replaces the slot's.
#[derive(Debug)]
pub struct NameCache {
    slots: [Option<NameSlot>; NAME_SLOTS],
}

impl Default for NameCache {
    fn default() -> NameCache {
        NameCache::new()
    }
}

#[derive(Debug)]
struct NameSlot {
    raw: [u8; NAME_LEN],
    len: u8,
    name: HeaderName,
}

impl NameCache {
    /// An empty cache (`const`: a thread-local needs no lazy start).
    pub const fn new() -> NameCache {
        NameCache {
            slots: [const { None }; NAME_SLOTS],
        }
    }

    /// The name of the field at `index` of a head, whose raw bytes are `raw`.
    pub fn name(
        &mut self,
        index: usize,
        raw: &[u8],
    ) -> Result<HeaderName, http::header::InvalidHeaderName> {
        let slot = self.slots.get_mut(index);
        if let Some(Some(kept)) = &slot {
            if kept.raw.get(..usize::from(kept.len)) == Some(raw) {
                return Ok(kept.name.clone());
            }
        }
        let name = HeaderName::from_bytes(raw)?;
        if let Some(slot) = slot.filter(|_| raw.len() <= NAME_LEN) {
            let mut kept = [0; NAME_LEN];
            kept[..raw.len()].copy_from_slice(raw);
            *slot = Some(NameSlot {
                raw: kept,
                len: raw.len() as u8, // at most NAME_LEN
                name: name.clone(),
            });
        }
        Ok(name)
    }
}

/// Whether a `Connection` field's value names only the options of the connection itself
/// (`close`, `keep-alive`) and no other field: such a field is used up by whoever manages the
/// connection.
pub fn connection_options_only(value: &[u8]) -> bool {
    // What nearly every backend sends, without the split.
    if value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close") {
        return true;
    }
    value.split(|&b| b == b',').map(trim).all(|t| {
        t.is_empty() || t.eq_ignore_ascii_case(b"close") || t.eq_ignore_ascii_case(b"keep-alive")
    })
}

/// `1*DIGIT`, no sign, no spaces inside, at most 19 digits (fits in a u64): a
/// `Content-Length`'s value, by HTTP/1.1's rule and by HTTP/2's (`net::h2`).
pub fn content_length(v: &[u8]) -> Result<u64, HeadError> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::Bad("bad Content-Length\n"));
    }
    Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// `v` without the optional whitespace (spaces, tabs) around it.
fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// How a response's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body may follow (HEAD, 1xx, 204, 304): the head's own fields are kept as they are.
    NoBody,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked (an HTTP/1.1 client, length unknown).
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// The framing of a response with `status` and a body of `exact` length (when known), to a
/// request with `method` of `version`.
pub fn response_framing(
    status: StatusCode,
    method: &Method,
    version: Version,
    exact: Option<u64>,
) -> BodyFraming {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return BodyFraming::NoBody;
    }
    match (exact, version) {
        (Some(n), _) => BodyFraming::Length(n),
        (None, Version::HTTP_11) => BodyFraming::Chunked,
        (None, _) => BodyFraming::Close,
    }
}

/// Writes a response head: status line, the fields (without the framing and connection
/// fields, which this writes itself from `framing` and `close`), `date` unless present.
pub fn write_response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: BodyFraming,
    close: bool,
    keep_alive_10: bool,
    date: &[u8],
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let upgrading = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut has_date = false;
    for (name, value) in headers {
        if *name == header::TRANSFER_ENCODING || (*name == header::CONNECTION && !upgrading) {
            continue;
        }
        if *name == header::CONTENT_LENGTH && framing != BodyFraming::NoBody {
            continue;
        }
        has_date |= *name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyFraming::NoBody | BodyFraming::Close => {}
    }
    if !upgrading {
        if close || framing == BodyFraming::Close {
            out.extend_from_slice(b"connection: close\r\n");
        } else if keep_alive_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// A short local answer written whole (the refusals of a head that never reached a handler).
pub fn write_refusal(out: &mut Vec<u8>, e: HeadError, date: &[u8]) {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let body = e.reason().as_bytes();
    write_response_head(
        out,
        e.status(),
        &headers,
        BodyFraming::Length(body.len() as u64),
        true,
        false,
        date,
    );
    out.extend_from_slice(body);
}

/// Appends the decimal digits of `n`.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut d = [0u8; 20];
    let mut i = d.len();
    loop {
        i -= 1;
        d[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&d[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_name_is_the_one_its_bytes_make() {
        let mut names = NameCache::default();
        let heads: [&[&str]; 4] = [
            &["Server", "Content-Type", "X-Backend", "Connection"],
            &["Server", "Content-Type", "X-Backend", "Connection"],
            // Another backend: another case, another name of the same length, a prefix of a
            // kept one, one longer than a slot holds.
            &[
                "server",
                "X-Custom-Key",
                "X-Backen",
                "X-A-Rather-Long-Header-Name-Over-32-Bytes",
            ],
            &[
                "Server",
                "Content-Type",
                "X-Backend-Id",
                "X-A-Rather-Long-Header-Name-Over-32-Bytes",
            ],
        ];
        for head in heads {
            for (i, raw) in head.iter().enumerate() {
                let name = names.name(i, raw.as_bytes()).unwrap();
                assert_eq!(
                    name,
                    HeaderName::from_bytes(raw.as_bytes()).unwrap(),
                    "{raw} at {i}"
                );
            }
        }
        // Past the slots, names are still right.
        for i in NAME_SLOTS - 1..NAME_SLOTS + 3 {
            assert_eq!(names.name(i, b"ETag").unwrap(), header::ETAG);
            assert_eq!(names.name(i, b"Vary").unwrap(), header::VARY);
        }
    }

    #[test]
    fn a_bad_name_is_refused_and_leaves_the_slot_as_it_was() {
        let mut names = NameCache::default();
        assert_eq!(names.name(0, b"Date").unwrap(), header::DATE);
        assert!(names.name(0, b"Bad Name").is_err());
        assert!(names.name(0, b"").is_err());
        assert!(names.name(1, b"x\x00y").is_err());
        assert_eq!(names.name(0, b"Date").unwrap(), header::DATE);
        assert!(
            names.name(0, b"Bad Name").is_err(),
            "a refusal is never kept"
        );
    }

    #[test]
    fn connection_options_are_close_and_keep_alive_alone() {
        for v in [
            "keep-alive",
            "Keep-Alive",
            "close",
            "CLOSE",
            " keep-alive ",
            "close, keep-alive",
            "",
        ] {
            assert!(connection_options_only(v.as_bytes()), "{v:?}");
        }
        for v in ["upgrade", "keep-alive, x-foo", "close-ish", "keep-alive2"] {
            assert!(!connection_options_only(v.as_bytes()), "{v:?}");
        }
    }

    fn parse(s: &str) -> Result<Option<(Head, usize)>, HeadError> {
        parse_request(s.as_bytes(), 64 * 1024)
    }

    fn framing(s: &str) -> Result<Framing, HeadError> {
        parse(s).map(|h| h.expect("complete").0.framing)
    }

    #[test]
    fn connection_options_only_names_no_other_field() {
        for v in [
            "keep-alive",
            "close",
            " Keep-Alive , close ",
            "",
            "keep-alive,,",
        ] {
            assert!(connection_options_only(v.as_bytes()), "{v:?}");
        }
        for v in ["upgrade", "keep-alive, x-hop", "te", "keep-alive-ish"] {
            assert!(!connection_options_only(v.as_bytes()), "{v:?}");
        }
    }

    #[test]
    fn a_simple_get_parses_whole() {
        let (h, n) = parse("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(
            n,
            "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\n".len()
        );
        assert_eq!(h.parts.method, Method::GET);
        assert_eq!(h.parts.uri, "/a?b=1");
        assert_eq!(h.parts.version, Version::HTTP_11);
        assert_eq!(h.parts.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(h.framing, Framing::None);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
    }

    #[test]
    fn an_incomplete_head_waits_and_leading_empty_lines_are_skipped() {
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let (h, n) = parse("\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(n, 4 + "GET / HTTP/1.1\r\nHost: x\r\n\r\n".len());
        assert_eq!(h.parts.uri, "/");
    }

    #[test]
    fn absolute_form_keeps_its_authority() {
        let (h, _) = parse("GET http://www.farm.test/x HTTP/1.1\r\nHost: other\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.parts.uri.authority().unwrap().as_str(), "www.farm.test");
        assert_eq!(h.parts.uri.path(), "/x");
    }

    #[test]
    fn content_length_rules() {
        assert_eq!(
            framing("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Ok(Framing::None)
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            Ok(Framing::Length(5)),
            "identical copies are one length"
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        for bad in [
            "Content-Length: 4\r\nContent-Length: 5",
            "Content-Length: 4, 5",
            "Content-Length: +5",
            "Content-Length: -1",
            "Content-Length: 0x5",
            "Content-Length: 5 5",
            "Content-Length: ",
            "Content-Length: 99999999999999999999",
        ] {
            let s = format!("POST / HTTP/1.1\r\n{bad}\r\n\r\n");
            assert!(
                matches!(framing(&s), Err(HeadError::Bad(_))),
                "{bad:?} gave {:?}",
                framing(&s)
            );
        }
    }

    #[test]
    fn transfer_encoding_rules() {
        assert_eq!(
            framing("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked \r\n\r\n"),
            Ok(Framing::Chunked)
        );
        for (te, want) in [
            ("Content-Length: 4\r\nTransfer-Encoding: chunked", 400),
            ("Transfer-Encoding: chunked\r\nContent-Length: 4", 400),
            ("Transfer-Encoding: chunked, gzip", 400),
            ("Transfer-Encoding: identity", 400),
            ("Transfer-Encoding: gzip, chunked", 501),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
                501,
            ),
            ("Transfer-Encoding: xchunked", 400),
        ] {
            let s = format!("POST / HTTP/1.1\r\n{te}\r\n\r\n");
            let got = framing(&s).map_err(|e| e.status().as_u16());
            assert_eq!(got, Err(want), "{te:?}");
        }
        assert_eq!(
            framing("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n")
                .map_err(|e| e.status().as_u16()),
            Err(400),
            "HTTP/1.0 has no chunked coding"
        );
    }

    #[test]
    fn malformed_heads_are_refused() {
        for bad in [
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nBad\0Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\0b\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HeadError::Bad(_))),
                "{bad:?} gave {:?}",
                parse(bad).map(|h| h.map(|(h, _)| h.parts))
            );
        }
        assert_eq!(
            parse("GET / HTTP/2.0\r\n\r\n").unwrap_err(),
            HeadError::Version
        );
    }

    #[test]
    fn size_and_field_count_limits_are_431() {
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(parse(&many).unwrap_err(), HeadError::TooLarge);
        let partial = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(100));
        assert_eq!(
            parse_request(partial.as_bytes(), 64).unwrap_err(),
            HeadError::TooLarge
        );
    }

    #[test]
    fn connection_and_expect() {
        let h = |s: &str| parse(s).unwrap().unwrap().0;
        assert!(!h("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!h("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(h("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(
            h("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
                .expect_continue
        );
        assert!(
            !h("POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
                .expect_continue
        );
    }

    #[test]
    fn response_heads() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        let mut out = Vec::new();
        write_response_head(
            &mut out,
            StatusCode::OK,
            &headers,
            BodyFraming::Length(12),
            false,
            false,
            b"Thu, 03 Dec 2026 00:00:00 GMT",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: Thu, 03 Dec 2026 00:00:00 GMT\r\ncontent-length: 12\r\n\r\n"
        );
        let mut out = Vec::new();
        write_response_head(
            &mut out,
            StatusCode::OK,
            &HeaderMap::new(),
            BodyFraming::Close,
            false,
            false,
            b"D",
        );
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("date: D\r\nconnection: close\r\n\r\n"));
        // HEAD keeps the backend's Content-Length, which describes the GET's body.
        let mut out = Vec::new();
        write_response_head(
            &mut out,
            StatusCode::OK,
            &headers,
            BodyFraming::NoBody,
            false,
            true,
            b"D",
        );
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("content-length: 999\r\n"), "{s}");
        assert!(s.ends_with("connection: keep-alive\r\n\r\n"), "{s}");
    }

    #[test]
    fn response_framing_by_status_method_and_version() {
        use BodyFraming::*;
        let f = response_framing;
        assert_eq!(
            f(StatusCode::OK, &Method::GET, Version::HTTP_11, Some(3)),
            Length(3)
        );
        assert_eq!(
            f(StatusCode::OK, &Method::GET, Version::HTTP_11, None),
            Chunked
        );
        assert_eq!(
            f(StatusCode::OK, &Method::GET, Version::HTTP_10, None),
            Close
        );
        assert_eq!(
            f(StatusCode::OK, &Method::HEAD, Version::HTTP_11, Some(3)),
            NoBody
        );
        assert_eq!(
            f(StatusCode::NO_CONTENT, &Method::GET, Version::HTTP_11, None),
            NoBody
        );
        assert_eq!(
            f(
                StatusCode::NOT_MODIFIED,
                &Method::GET,
                Version::HTTP_11,
                None
            ),
            NoBody
        );
    }
}
