//! HPACK (RFC 7541): the client's header blocks decoded against the static table and the
//! connection's dynamic table, and lockstep's response heads encoded.
//!
//! Decoding keeps each table entry's name parsed once ([`Name`]: a pseudo-header, an
//! `http::HeaderName`, or one that a request may not carry), so a field the client sends by
//! index (a browser's or a load generator's second request is nearly all indexes) costs a
//! clone of the name and of the value's `Bytes`, not a parse. A literal's value is a slice of
//! the block when it is not Huffman-coded. Every length and integer is checked against what is
//! left of the block: a bad block is a [`DecodeError`] (the connection's COMPRESSION_ERROR),
//! never a panic or an allocation beyond the block's own size times 8/5.
//!
//! Encoding uses the static table for `:status` and for names, and no dynamic table: a
//! response head costs its bytes and nothing is remembered between responses (the peer's
//! `SETTINGS_HEADER_TABLE_SIZE` then never matters). Values go out as plain strings (Huffman
//! would save ~30 % of the bytes of a few hundred per response for CPU on every one).

use std::collections::VecDeque;
use std::sync::OnceLock;

use bytes::Bytes;
use http::header::HeaderName;
use http::HeaderValue;

use super::huffman;

/// A field's name as decoded: the request pseudo-headers, a regular name, or a name that
/// makes a request malformed (upper case, not a token, an unknown or response pseudo-header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Name {
    /// `:authority`
    Authority,
    /// `:method`
    Method,
    /// `:path`
    Path,
    /// `:scheme`
    Scheme,
    /// `:protocol` (extended CONNECT, not offered)
    Protocol,
    /// A regular field.
    Field(HeaderName),
    /// Any other: the request carrying it is malformed (RFC 9113 §8.2.1, §8.3).
    Invalid,
}

impl Name {
    fn parse(raw: &[u8]) -> Name {
        match raw {
            b":authority" => Name::Authority,
            b":method" => Name::Method,
            b":path" => Name::Path,
            b":scheme" => Name::Scheme,
            b":protocol" => Name::Protocol,
            _ if raw.iter().any(|b| b.is_ascii_uppercase()) => Name::Invalid,
            _ => HeaderName::from_bytes(raw).map_or(Name::Invalid, Name::Field),
        }
    }
}

/// RFC 7541 Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// A table entry: the name parsed, the value, and the entry's size (§4.1: both lengths + 32).
#[derive(Clone, Debug)]
struct Entry {
    name: Name,
    value: Bytes,
    size: usize,
}

fn static_entries() -> &'static [Entry] {
    static ENTRIES: OnceLock<Vec<Entry>> = OnceLock::new();
    ENTRIES.get_or_init(|| {
        STATIC
            .iter()
            .map(|(n, v)| Entry {
                name: Name::parse(n.as_bytes()),
                value: Bytes::from_static(v.as_bytes()),
                size: n.len() + v.len() + 32,
            })
            .collect()
    })
}

/// A header block that is not valid HPACK: the connection's COMPRESSION_ERROR (RFC 9113 §4.3).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The block ends inside a field.
    #[error("header block truncated")]
    Truncated,
    /// An integer past 2^28, or an index past the tables.
    #[error("bad index or integer in a header block")]
    BadIndex,
    /// A table size update above the limit, or after the first field.
    #[error("bad dynamic table size update")]
    BadSizeUpdate,
    /// Bad Huffman code.
    #[error("bad Huffman code in a header block")]
    BadHuffman,
}

/// The decoding side of one connection: its dynamic table.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first (index 62 is `table[0]`).
    table: VecDeque<Entry>,
    size: usize,
    /// The table's maximum size, as the peer last set it (§6.3).
    max_size: usize,
    /// What `SETTINGS_HEADER_TABLE_SIZE` allows (4 096: lockstep does not change it).
    limit: usize,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: 4096,
            limit: 4096,
        }
    }
}

impl Decoder {
    /// Decodes `block`, handing each field to `field` in order. On an error the table may be
    /// part-updated: the connection ends (COMPRESSION_ERROR), so that does not matter.
    pub fn decode(
        &mut self,
        block: &Bytes,
        mut field: impl FnMut(&Name, &Bytes),
    ) -> Result<(), DecodeError> {
        let mut at = 0;
        let mut first = true;
        while at < block.len() {
            let b = block[at];
            if b & 0x80 != 0 {
                let index = integer(block, &mut at, 7)?;
                let e = self.entry(index)?;
                field(&e.name, &e.value);
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update: only before the first field (§4.2).
                let size = integer(block, &mut at, 5)?;
                if !first || size > self.limit {
                    return Err(DecodeError::BadSizeUpdate);
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                let (prefix, index_it) = if b & 0x40 != 0 { (6, true) } else { (4, false) };
                let index = integer(block, &mut at, prefix)?;
                let (name, name_len) = if index == 0 {
                    let raw = string(block, &mut at)?;
                    (Name::parse(&raw), raw.len())
                } else {
                    let e = self.entry(index)?;
                    (e.name.clone(), e.size - e.value.len() - 32)
                };
                let value = string(block, &mut at)?;
                field(&name, &value);
                if index_it {
                    // A copy: a slice would keep the whole read buffer it points into alive
                    // for as long as the entry stays in the table (16 KiB per connection).
                    self.insert(Entry {
                        size: name_len + value.len() + 32,
                        name,
                        value: Bytes::copy_from_slice(&value),
                    });
                }
            }
            first = false;
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<&Entry, DecodeError> {
        match index {
            0 => Err(DecodeError::BadIndex),
            1..=61 => Ok(&static_entries()[index - 1]),
            _ => self.table.get(index - 62).ok_or(DecodeError::BadIndex),
        }
    }

    fn insert(&mut self, e: Entry) {
        if e.size > self.max_size {
            // Larger than the table: it empties the table and is not kept (§4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(e.size);
        self.size += e.size;
        self.table.push_front(e);
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some(e) => self.size -= e.size,
                None => break,
            }
        }
    }
}

/// An integer with an `n`-bit prefix (§5.1) at `*at`, which it moves past it. Values above
/// 2^28 are refused (no field or table is that large).
fn integer(block: &[u8], at: &mut usize, n: u32) -> Result<usize, DecodeError> {
    let max = (1usize << n) - 1;
    let first = *block.get(*at).ok_or(DecodeError::Truncated)? as usize & max;
    *at += 1;
    if first < max {
        return Ok(first);
    }
    let mut value = max;
    let mut shift = 0;
    loop {
        let b = *block.get(*at).ok_or(DecodeError::Truncated)? as usize;
        *at += 1;
        value += (b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        if shift > 21 {
            return Err(DecodeError::BadIndex);
        }
    }
}

/// A string literal (§5.2) at `*at`: a slice of the block, or its Huffman decoding.
fn string(block: &Bytes, at: &mut usize) -> Result<Bytes, DecodeError> {
    let huffman = block.get(*at).ok_or(DecodeError::Truncated)? & 0x80 != 0;
    let len = integer(block, at, 7)?;
    let end = at.checked_add(len).ok_or(DecodeError::Truncated)?;
    if end > block.len() {
        return Err(DecodeError::Truncated);
    }
    let raw = block.slice(*at..end);
    *at = end;
    if !huffman {
        return Ok(raw);
    }
    let mut out = Vec::new();
    huffman::decode(&raw, &mut out).map_err(|_| DecodeError::BadHuffman)?;
    Ok(Bytes::from(out))
}

/// Appends `:status` to a response head being encoded.
pub fn encode_status(status: u16, dst: &mut Vec<u8>) {
    let index = match status {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => {
            // Literal without indexing, name `:status` from the static table.
            dst.push(0x08);
            dst.push(3);
            dst.extend_from_slice(itoa3(status).as_slice());
            return;
        }
    };
    dst.push(0x80 | index);
}

fn itoa3(n: u16) -> [u8; 3] {
    let n = n % 1000;
    [
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

/// Appends a field to a response head being encoded: literal, not indexed (never indexed
/// when the value is marked sensitive), the name by its static index when it has one.
pub fn encode_field(name: &HeaderName, value: &HeaderValue, dst: &mut Vec<u8>) {
    let (first, prefix) = if value.is_sensitive() {
        (0x10, 4)
    } else {
        (0x00, 4)
    };
    match static_name(name.as_str()) {
        Some(index) => put_integer(dst, first, prefix, index),
        None => {
            dst.push(first);
            put_integer(dst, 0, 7, name.as_str().len());
            dst.extend_from_slice(name.as_str().as_bytes());
        }
    }
    put_integer(dst, 0, 7, value.len());
    dst.extend_from_slice(value.as_bytes());
}

/// An integer with an `n`-bit prefix after the bits `first` (§5.1).
fn put_integer(dst: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        dst.push(first | value as u8);
        return;
    }
    dst.push(first | max as u8);
    value -= max;
    while value >= 0x80 {
        dst.push(0x80 | (value & 0x7f) as u8);
        value >>= 7;
    }
    dst.push(value as u8);
}

/// The static table's index of a response field's name (a `match`: the compiler switches on
/// the length first, where a search of the table compared up to 47 strings per field).
fn static_name(name: &str) -> Option<usize> {
    Some(match name {
        "accept-charset" => 15,
        "accept-encoding" => 16,
        "accept-language" => 17,
        "accept-ranges" => 18,
        "accept" => 19,
        "access-control-allow-origin" => 20,
        "age" => 21,
        "allow" => 22,
        "authorization" => 23,
        "cache-control" => 24,
        "content-disposition" => 25,
        "content-encoding" => 26,
        "content-language" => 27,
        "content-length" => 28,
        "content-location" => 29,
        "content-range" => 30,
        "content-type" => 31,
        "cookie" => 32,
        "date" => 33,
        "etag" => 34,
        "expect" => 35,
        "expires" => 36,
        "from" => 37,
        "host" => 38,
        "if-match" => 39,
        "if-modified-since" => 40,
        "if-none-match" => 41,
        "if-range" => 42,
        "if-unmodified-since" => 43,
        "last-modified" => 44,
        "link" => 45,
        "location" => 46,
        "max-forwards" => 47,
        "proxy-authenticate" => 48,
        "proxy-authorization" => 49,
        "range" => 50,
        "referer" => 51,
        "refresh" => 52,
        "retry-after" => 53,
        "server" => 54,
        "set-cookie" => 55,
        "strict-transport-security" => 56,
        "transfer-encoding" => 57,
        "user-agent" => 58,
        "vary" => 59,
        "via" => 60,
        "www-authenticate" => 61,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Result<Vec<(Name, Bytes)>, DecodeError> {
        let mut out = Vec::new();
        d.decode(&Bytes::copy_from_slice(block), |n, v| {
            out.push((n.clone(), v.clone()))
        })?;
        Ok(out)
    }

    fn field(n: &str) -> Name {
        Name::Field(HeaderName::from_bytes(n.as_bytes()).unwrap())
    }

    #[test]
    fn the_static_table_is_rfc_7541s() {
        assert_eq!(STATIC.len(), 61);
        assert_eq!(STATIC[0], (":authority", ""));
        assert_eq!(STATIC[15], ("accept-encoding", "gzip, deflate"));
        assert_eq!(STATIC[31], ("cookie", ""));
        assert_eq!(STATIC[53], ("server", ""));
        assert_eq!(STATIC[60], ("www-authenticate", ""));
        assert_eq!(static_name("content-type"), Some(31));
        assert_eq!(static_name("www-authenticate"), Some(61));
        assert_eq!(static_name("x-custom"), None);
        for (i, (n, _)) in STATIC.iter().enumerate().skip(14) {
            assert_eq!(static_name(n), Some(i + 1), "{n}");
        }
    }

    /// RFC 7541 C.3: three requests without Huffman coding, then C.4: the same with it; the
    /// dynamic table carries over between the blocks of one connection.
    #[test]
    fn rfc_7541_request_examples() {
        for blocks in [
            [
                &b"\x82\x86\x84\x41\x0fwww.example.com"[..],
                &b"\x82\x86\x84\xbe\x58\x08no-cache"[..],
                &b"\x82\x87\x85\xbf\x40\x0acustom-key\x0ccustom-value"[..],
            ],
            [
                &b"\x82\x86\x84\x41\x8c\xf1\xe3\xc2\xe5\xf2\x3a\x6b\xa0\xab\x90\xf4\xff"[..],
                &b"\x82\x86\x84\xbe\x58\x86\xa8\xeb\x10\x64\x9c\xbf"[..],
                &b"\x82\x87\x85\xbf\x40\x88\x25\xa8\x49\xe9\x5b\xa9\x7d\x7f\x89\x25\xa8\x49\xe9\x5b\xb8\xe8\xb4\xbf"[..],
            ],
        ] {
            let mut d = Decoder::default();
            let one = decode_all(&mut d, blocks[0]).unwrap();
            assert_eq!(
                one,
                vec![
                    (Name::Method, Bytes::from("GET")),
                    (Name::Scheme, Bytes::from("http")),
                    (Name::Path, Bytes::from("/")),
                    (Name::Authority, Bytes::from("www.example.com")),
                ]
            );
            assert_eq!(d.size, 57);
            let two = decode_all(&mut d, blocks[1]).unwrap();
            assert_eq!(two[3], (Name::Authority, Bytes::from("www.example.com")));
            assert_eq!(two[4], (field("cache-control"), Bytes::from("no-cache")));
            assert_eq!(d.size, 110);
            let three = decode_all(&mut d, blocks[2]).unwrap();
            assert_eq!(three[1], (Name::Scheme, Bytes::from("https")));
            assert_eq!(three[2], (Name::Path, Bytes::from("/index.html")));
            assert_eq!(three[3], (Name::Authority, Bytes::from("www.example.com")));
            assert_eq!(three[4], (field("custom-key"), Bytes::from("custom-value")));
            assert_eq!(d.size, 164);
            assert_eq!(d.table.len(), 3);
        }
    }

    #[test]
    fn entries_are_evicted_to_fit_and_a_size_update_shrinks_the_table() {
        let mut d = Decoder::default();
        // Literal with indexing, new name: 20-byte name and value = 60 bytes an entry.
        let entry = |i: u8| {
            let mut b = vec![0x40, 10];
            b.extend_from_slice(format!("x-name-{i:03}").as_bytes());
            b.push(10);
            b.extend_from_slice(format!("value--{i:03}").as_bytes());
            b
        };
        for i in 0..100 {
            decode_all(&mut d, &entry(i)).unwrap();
            assert!(d.size <= 4096);
        }
        assert_eq!(d.table.len(), 4096 / 52);
        // The newest is 62.
        let got = decode_all(&mut d, &[0x80 | 62]).unwrap();
        assert_eq!(got[0].1, Bytes::from("value--099"));
        // A size update to 100 keeps one entry; to 0 none; past the limit is an error.
        decode_all(&mut d, &[0x3f, 0x45]).unwrap(); // 31 + 69 = 100
        assert_eq!(d.table.len(), 1);
        decode_all(&mut d, &[0x20]).unwrap();
        assert_eq!(d.table.len(), 0);
        assert_eq!(decode_all(&mut d, &[0x80 | 62]), Err(DecodeError::BadIndex));
        assert_eq!(
            decode_all(&mut d, &[0x3f, 0xe2, 0x1f]), // 4097
            Err(DecodeError::BadSizeUpdate)
        );
        // Not after a field.
        assert_eq!(
            decode_all(&mut d, &[0x82, 0x20]),
            Err(DecodeError::BadSizeUpdate)
        );
    }

    #[test]
    fn the_table_keeps_copies_not_slices_of_the_read_buffer() {
        let mut d = Decoder::default();
        let block = Bytes::from_static(b"\x40\x0acustom-key\x0ccustom-value");
        let mut seen = None;
        d.decode(&block, |_, v| seen = Some(v.clone())).unwrap();
        let inside = |p: *const u8| block.as_ptr_range().contains(&p);
        // The field handed on is a slice (no copy per request) ...
        assert!(inside(seen.unwrap().as_ptr()));
        // ... the entry kept for later requests is not (it would pin the whole buffer).
        assert_eq!(d.table[0].value, "custom-value");
        assert!(!inside(d.table[0].value.as_ptr()));
    }

    #[test]
    fn an_entry_larger_than_the_table_empties_it() {
        let mut d = Decoder::default();
        decode_all(&mut d, b"\x40\x01a\x01b").unwrap();
        let mut big = vec![0x40, 0x01, b'a'];
        put_integer(&mut big, 0, 7, 5000);
        big.extend(std::iter::repeat_n(b'v', 5000));
        let got = decode_all(&mut d, &big).unwrap();
        assert_eq!(got[0].1.len(), 5000);
        assert!(d.table.is_empty());
        assert_eq!(d.size, 0);
    }

    #[test]
    fn bad_blocks_are_errors() {
        let mut d = Decoder::default();
        for (block, err) in [
            (&[0x80][..], DecodeError::BadIndex), // index 0
            (&[0xbe][..], DecodeError::BadIndex), // 62, empty table
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0x0f][..],
                DecodeError::BadIndex,
            ), // integer too long
            (&[0xff][..], DecodeError::Truncated), // integer cut
            (&[0x40, 0x05, b'a'][..], DecodeError::Truncated), // name cut
            (&[0x04, 0x83, 0xff, 0xff, 0xff][..], DecodeError::BadHuffman),
            (&[0x04][..], DecodeError::Truncated), // value missing
        ] {
            assert_eq!(decode_all(&mut d, block), Err(err), "{block:x?}");
        }
    }

    #[test]
    fn names_a_request_may_not_carry_are_invalid() {
        assert_eq!(Name::parse(b":status"), Name::Invalid);
        assert_eq!(Name::parse(b":x"), Name::Invalid);
        assert_eq!(Name::parse(b"Content-Type"), Name::Invalid);
        assert_eq!(Name::parse(b"a b"), Name::Invalid);
        assert_eq!(Name::parse(b""), Name::Invalid);
        assert_eq!(Name::parse(b"x-ok"), field("x-ok"));
        assert_eq!(Name::parse(b":protocol"), Name::Protocol);
    }

    #[test]
    fn a_response_head_decodes_to_what_was_encoded() {
        let mut block = Vec::new();
        encode_status(200, &mut block);
        encode_status(502, &mut block);
        let long = HeaderValue::from_str(&"v".repeat(300)).unwrap();
        let mut secret = HeaderValue::from_static("s=1");
        secret.set_sensitive(true);
        let fields = [
            (
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("text/plain"),
            ),
            (HeaderName::from_static("x-a-rather-long-custom-name"), long),
            (HeaderName::from_static("set-cookie"), secret),
        ];
        for (n, v) in &fields {
            encode_field(n, v, &mut block);
        }
        // Decoded as a client would (":status" parses as invalid for a request; its value
        // is what is checked).
        let got = decode_all(&mut Decoder::default(), &block).unwrap();
        assert_eq!(got[0].1, Bytes::from("200"));
        assert_eq!(got[1].1, Bytes::from("502"));
        for (i, (n, v)) in fields.iter().enumerate() {
            assert_eq!(
                got[i + 2],
                (Name::Field(n.clone()), Bytes::copy_from_slice(v.as_bytes()))
            );
        }
        // The sensitive one is never indexed (0001xxxx), set-cookie is static 55.
        let at = block.len() - 6;
        assert_eq!(&block[at..at + 2], &[0x1f, 55 - 15]);
    }
}
