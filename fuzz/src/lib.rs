//! The harnesses of lockstep's fuzz targets (`fuzz_targets/*.rs` call one each), kept in a
//! library so that the seed corpus also runs as a plain test on stable Rust
//! (`cargo test --lib` here: every file of `corpus/<target>/` through its harness).
//!
//! Each harness feeds bytes as they arrive from outside — a DNS datagram, a manifest or a
//! changeset from the hub or a peer, a peer frame, a request path — to the parser that takes
//! them, and checks what must hold for any input: no panic, and where the parser accepts,
//! the invariants its callers rely on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;

use lockstep::dns::answer::Health;
use lockstep::dns::zone::Zones;

/// A farm's zone as the DNS responder holds it: pool-backed names, fixed addresses, a name
/// with more addresses than `max_answers`, a delegation-free sub-zone.
const DNS_YAML: &str = r#"
listeners: []
pools:
  - name: www
    backends:
      - { name: a, address: "192.0.2.1:80" }
      - { name: b, address: "192.0.2.2:80" }
      - { name: c, address: "[2001:db8::1]:80" }
dns:
  bind: "127.0.0.1:5300"
  zones:
    - name: farm.test
      ttl: 30
      nameservers: [ns1.farm.test]
      records:
        - { name: www, pool: www }
        - { name: lb, addresses: ["192.0.2.10", "192.0.2.11", "2001:db8::10"] }
        - { name: ns1, addresses: ["192.0.2.53"] }
        - { name: many, addresses: ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.0.8", "10.0.0.9", "10.0.0.10"] }
        - { name: "@", pool: www }
    - name: sub.farm.test
      records:
        - { name: x, addresses: ["192.0.2.99"] }
"#;

/// Every backend up but one.
struct Up;

impl Health for Up {
    fn backends(&self, pool: &str, out: &mut Vec<(IpAddr, bool)>) {
        if pool == "www" {
            out.extend([
                ("192.0.2.1".parse().unwrap(), true),
                ("192.0.2.2".parse().unwrap(), false),
                ("2001:db8::1".parse().unwrap(), true),
            ]);
        }
    }
}

fn zones() -> &'static Zones {
    static Z: OnceLock<Zones> = OnceLock::new();
    Z.get_or_init(|| {
        let config = lockstep::config::parse(Path::new("fuzz.yaml"), DNS_YAML)
            .expect("the fuzz zone parses");
        Zones::build(config.dns.as_ref().expect("a dns section"), 1)
    })
}

/// A UDP datagram through the DNS fast path: an answer, when given, is a well-formed reply to
/// it that fits the buffer and is no longer than what a UDP answer may be.
pub fn dns_fast(data: &[u8]) {
    let mut scratch = Vec::new();
    let mut out = [0u8; 4096];
    if let Some(fast) =
        lockstep::dns::fast::answer(data, zones(), &Up, |_| 0, &mut scratch, &mut out)
    {
        let len = fast.len;
        assert!(len >= 12 && len <= out.len(), "answer length {len}");
        assert_eq!(out[..2], data[..2], "the reply carries the query's id");
        assert!(out[2] & 0x80 != 0, "QR set in a reply");
    }
}

/// A datagram over the rate limit: the slipped reply (TC, the question) is never bigger than
/// the query, so a spoofed flood gains no amplification.
pub fn dns_slip(data: &[u8]) {
    let mut out = [0u8; 4096];
    if let Some(n) = lockstep::dns::rrl::slip_reply(data, &mut out) {
        assert!(n <= data.len(), "slip reply {n} bytes for a {}-byte query", data.len());
        assert!(n >= 12);
        assert!(out[2] & 0x02 != 0, "TC set");
    }
}

/// A manifest from the hub: accepted ones re-encode canonically to the same release id.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = lockstep::sync::manifest::Manifest::from_json(data) {
        let again = lockstep::sync::manifest::Manifest::from_json(&m.to_json())
            .expect("a canonical encoding parses");
        assert_eq!(m.id(), again.id());
    }
}

/// A changeset from an agent or a peer: parsing never panics, nor does checking what parsed.
pub fn changeset(data: &[u8]) {
    if let Ok(signed) = lockstep::sync::provenance::SignedChangeset::from_json(data) {
        let _ = signed.changeset.check();
        let _ = signed.changeset.check_time(u64::MAX / 2);
        let _ = signed.changeset.blobs();
    }
}

/// A peer frame (a changeset with its blobs inline): every blob it accepts hashes to its name.
pub fn peer_frame(data: &[u8]) {
    if let Ok((_, blobs)) = lockstep::agent::frame::decode(data) {
        let mut seen = HashMap::new();
        for (hash, bytes) in blobs {
            assert_eq!(lockstep::sync::manifest::Hash::of(&bytes), hash);
            seen.insert(hash, bytes.len());
        }
    }
}

/// A request path as the router sees it: normalising is idempotent and never leaves a `..`
/// segment that could climb above a route's prefix.
pub fn request_path(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let once = lockstep::router::route::normalize_path(path);
    let twice = lockstep::router::route::normalize_path(&once);
    assert_eq!(once, twice, "normalising {path:?} twice changed it");
    assert!(
        !once.split('/').any(|s| s == ".." || s == "."),
        "{path:?} normalised to {once:?}"
    );
    let _ = lockstep::router::route::HostMatch::parse(path);
}

/// A request head as the HTTP/1.1 connection parses it: no panic, an accepted head took no
/// more than it was given and parses the same from exactly those bytes, and its framing is
/// never ambiguous (chunked only without `Content-Length`, a length only when every copy of
/// `Content-Length` agrees).
pub fn h1_head(data: &[u8]) {
    use lockstep::net::h1::head::{parse_request, Framing};
    let Ok(Some((head, used))) = parse_request(data, 64 * 1024) else {
        return;
    };
    assert!(used <= data.len());
    let again = parse_request(&data[..used], 64 * 1024)
        .expect("the same head parses again")
        .expect("and is complete");
    assert_eq!(again.1, used);
    assert_eq!(again.0.framing, head.framing);
    let lengths = head.parts.headers.get_all(http::header::CONTENT_LENGTH).iter().count();
    match head.framing {
        Framing::Chunked => assert_eq!(lengths, 0, "chunked with a Content-Length"),
        Framing::Length(n) => {
            for v in head.parts.headers.get_all(http::header::CONTENT_LENGTH) {
                for part in v.to_str().expect("digits").split(',') {
                    assert_eq!(part.trim().parse::<u64>().ok(), Some(n));
                }
            }
        }
        Framing::None => {}
    }
}

/// A client's bytes after the HTTP/2 preface: frames parsed one after another as the server
/// connection reads them (a length past 16 KiB ends the input, as it ends a connection), and
/// every header block (HEADERS, then its CONTINUATIONs) decoded by one HPACK decoder whose
/// table carries over, as a connection's does. No panic; a value is never longer than a
/// Huffman expansion of its block allows; a field that decodes re-encodes to the same field.
pub fn h2_frames(data: &[u8]) {
    use bytes::Bytes;
    use lockstep::net::h2::frame::{self, Frame, Head, HEAD_LEN};
    use lockstep::net::h2::hpack::{self, Decoder, Name};
    let mut decoder = Decoder::default();
    let mut block: Option<Vec<u8>> = None;
    let mut at = 0;
    while data.len() - at >= HEAD_LEN {
        let head = Head::parse(&data[at..]);
        if head.len > 16 * 1024 || data.len() - at - HEAD_LEN < head.len {
            return;
        }
        let payload = Bytes::copy_from_slice(&data[at + HEAD_LEN..at + HEAD_LEN + head.len]);
        at += HEAD_LEN + head.len;
        let (fragment, end) = match frame::parse(head, payload) {
            Ok(Frame::Headers { fragment, end_headers, .. }) => {
                block = Some(Vec::new());
                (fragment, end_headers)
            }
            Ok(Frame::Continuation { fragment, end_headers, .. }) if block.is_some() => {
                (fragment, end_headers)
            }
            Ok(Frame::Data { data, flow_len, .. }) => {
                assert!(data.len() <= flow_len);
                continue;
            }
            Ok(_) => continue,
            Err(_) => return,
        };
        let Some(b) = &mut block else { continue };
        b.extend_from_slice(&fragment);
        if !end {
            continue;
        }
        let whole = Bytes::from(block.take().unwrap_or_default());
        let mut fields = Vec::new();
        let decoded = decoder.decode(&whole, |name, value| fields.push((name.clone(), value.clone())));
        if decoded.is_err() {
            return; // COMPRESSION_ERROR: the connection ends here
        }
        for (name, value) in fields {
            // Indexed fields may come from the table (any earlier block): bound by the input.
            assert!(value.len() <= data.len() * 8 / 5 + 64, "value of {} bytes", value.len());
            let Name::Field(name) = name else { continue };
            let Ok(v) = http::HeaderValue::from_maybe_shared(value.clone()) else { continue };
            let mut out = Vec::new();
            hpack::encode_field(&name, &v, &mut out);
            let mut again = Vec::new();
            Decoder::default()
                .decode(&Bytes::from(out), |n, v| again.push((n.clone(), v.clone())))
                .expect("an encoded field decodes");
            assert_eq!(again, vec![(Name::Field(name), value)]);
        }
    }
}

/// A chunked body decoded whole and decoded in pieces (the first byte picks the piece
/// size) give the same data and the same verdict; a decoder never takes more than it has.
pub fn h1_chunked(data: &[u8]) {
    use lockstep::net::h1::chunked::Decoder;
    let Some((&step, body)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let run = |pieces: usize| -> Result<(Vec<u8>, bool), ()> {
        let mut d = Decoder::default();
        let mut pending: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        for piece in body.chunks(pieces) {
            pending.extend_from_slice(piece);
            loop {
                let r = d.decode(&pending).map_err(|_| ())?;
                assert!(r.consumed <= pending.len());
                if let Some(range) = r.data.clone() {
                    assert!(range.end <= r.consumed);
                    out.extend_from_slice(&pending[range]);
                }
                pending.drain(..r.consumed);
                if d.is_done() || r.consumed == 0 {
                    break;
                }
            }
            if d.is_done() {
                break;
            }
        }
        Ok((out, d.is_done()))
    };
    let whole = run(body.len().max(1));
    let split = run(step);
    match (&whole, &split) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "split decoding differs"),
        (Err(()), Err(())) => {}
        // An error past the point where the split run stopped early is not a disagreement.
        _ => assert!(
            whole.as_ref().is_ok_and(|w| w.1) || split.as_ref().is_ok_and(|s| s.1)
                || whole.is_err() || split.is_err()
        ),
    }
}

/// A PROXY protocol header as a balancer (or anyone who can reach the listener from a
/// listed address) sends it: parsing never panics, never claims more bytes than it was given
/// or more than the bound, and asks for more only when it means it: the header, cut short,
/// asks for more; given whole, parses the same; and what lockstep writes for the addresses
/// it parsed parses back to them.
pub fn proxy_header(data: &[u8]) {
    use lockstep::net::proxy_protocol::{encode, parse, Header, Parsed, Version, MAX_V2};
    match parse(data) {
        Ok(Parsed::Done(h, len)) => {
            assert!(len <= data.len() && len <= MAX_V2);
            for cut in 0..len {
                match parse(&data[..cut]) {
                    Ok(Parsed::Need(n)) => assert!(n > cut && n <= len.max(16)),
                    other => panic!("a header cut at {cut} of {len}: {other:?}"),
                }
            }
            if let Header::Proxied {
                source,
                destination,
            } = h
            {
                for v in [Version::V1, Version::V2] {
                    let again = encode(v, Some((source, destination)));
                    match parse(&again) {
                        Ok(Parsed::Done(Header::Proxied { source: s, destination: d }, n)) => {
                            assert_eq!(n, again.len());
                            let canon = |a: std::net::SocketAddr| (a.ip().to_canonical(), a.port());
                            assert_eq!((canon(s), canon(d)), (canon(source), canon(destination)));
                        }
                        other => panic!("lockstep's own header does not parse back: {other:?}"),
                    }
                }
            }
        }
        Ok(Parsed::Need(n)) => assert!(n > data.len() && n <= MAX_V2),
        Err(_) => {}
    }
}

/// A certificate's DER as a config file gives it (the operator's, or one an ACME server
/// issued): reading its notAfter never panics, and a time it reads is a real calendar time
/// (between 1950 and 9999).
pub fn cert_not_after(data: &[u8]) {
    if let Some(t) = lockstep::config::tls::not_after(data) {
        assert!(t <= 253_402_300_800, "{t} is past 9999-12-31T23:59:60");
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Runs `harness` over every file of `corpus/<target>/`; there must be some.
    fn corpus(target: &str, harness: fn(&[u8])) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("entry").path();
            harness(&std::fs::read(&path).expect("read seed"));
            n += 1;
        }
        assert!(n > 0, "no seeds in {}", dir.display());
    }

    #[test]
    fn seeds_pass_every_harness() {
        corpus("dns_fast", super::dns_fast);
        corpus("dns_slip", super::dns_slip);
        corpus("manifest", super::manifest);
        corpus("changeset", super::changeset);
        corpus("peer_frame", super::peer_frame);
        corpus("request_path", super::request_path);
        corpus("h1_head", super::h1_head);
        corpus("h2_frames", super::h2_frames);
        corpus("h1_chunked", super::h1_chunked);
        corpus("proxy_header", super::proxy_header);
        corpus("cert_not_after", super::cert_not_after);
    }
}
