//! HPACK's Huffman code (RFC 7541 §5.2, the code of Appendix B): strings decoded from it and
//! encoded into it. Decoding walks the code bit by bit against the canonical code's first code
//! and count per length (the table is canonical: a unit test checks it), so no state table of
//! thousands of entries is needed; a string longer than the peer's limits never gets here.

use std::sync::OnceLock;

/// The code of each octet, right-aligned (RFC 7541 Appendix B).
const CODES: [u32; 256] = [
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7, 0xfffffe8,
    0xffffea, 0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec, 0xfffffed,
    0xfffffee, 0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3, 0xffffff4,
    0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb, 0x14, 0x3f8,
    0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa, 0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18,
    0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb,
    0x3fc, 0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0,
    0x1ffc, 0x3ffc, 0x22, 0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26, 0x27, 0x6, 0x74, 0x75,
    0x28, 0x29, 0x2a, 0x7, 0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78, 0x79, 0x7a, 0x7b, 0x7ffe,
    0x7fc, 0x3ffd, 0x1ffd, 0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4,
    0x3fffd5, 0x7fffd9, 0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb,
    0x7fffdf, 0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3,
    0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef, 0x3fffda,
    0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde, 0x7fffea, 0x3fffdd,
    0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec, 0x1fffe0, 0x1fffe1, 0x3fffe0,
    0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4,
    0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1, 0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7,
    0x7ffff2, 0x3fffe8, 0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf,
    0x3ffffe5, 0xfffff1, 0x1ffffed, 0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7,
    0x7ffffe2, 0xfffff2, 0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4,
    0x7ffffe5, 0xfffec, 0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3,
    0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4, 0x3ffffeb,
    0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea, 0x7ffffeb,
    0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee,
];

/// The length in bits of each octet's code (RFC 7541 Appendix B).
const LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
];

/// End of string: 30 ones. Never valid inside a string (§5.2).
const EOS_LEN: u8 = 30;

/// A string that is not valid Huffman code: 30 bits that are no octet's code (EOS), or
/// padding longer than 7 bits or not all ones (§5.2).
#[derive(Debug, PartialEq, Eq)]
pub struct BadHuffman;

/// The canonical code by length: for each length, its first code, how many octets have it and
/// where they start in `octets` (sorted by length, then code).
struct Canonical {
    first: [u32; 31],
    count: [u16; 31],
    start: [u16; 31],
    octets: [u8; 256],
}

fn canonical() -> &'static Canonical {
    static TABLE: OnceLock<Canonical> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut order: Vec<u8> = (0..=255).collect();
        order.sort_by_key(|&b| (LENGTHS[b as usize], CODES[b as usize]));
        let mut t = Canonical {
            first: [0; 31],
            count: [0; 31],
            start: [0; 31],
            octets: [0; 256],
        };
        for (i, &b) in order.iter().enumerate() {
            let len = LENGTHS[b as usize] as usize;
            if t.count[len] == 0 {
                t.first[len] = CODES[b as usize];
                t.start[len] = i as u16;
            }
            t.count[len] += 1;
            t.octets[i] = b;
        }
        t
    })
}

/// Appends the octets `src` encodes to `dst`.
pub fn decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), BadHuffman> {
    let t = canonical();
    dst.reserve(src.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0usize);
    for &byte in src {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            // A prefix of a longer code is past the last code of its length (canonical).
            let k = code.wrapping_sub(t.first[len]);
            if k < u32::from(t.count[len]) {
                dst.push(t.octets[t.start[len] as usize + k as usize]);
                (code, len) = (0, 0);
            } else if len >= EOS_LEN as usize {
                return Err(BadHuffman);
            }
        }
    }
    // What is left is padding: at most 7 bits, the most significant bits of EOS (all ones).
    if len > 7 || code != (1 << len) - 1 {
        return Err(BadHuffman);
    }
    Ok(())
}

/// `src` in Huffman code (what a client sends; lockstep's answers carry plain strings).
#[cfg(test)]
pub fn encode(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut bits, mut n) = (0u64, 0u32);
    for &b in src {
        bits = (bits << LENGTHS[b as usize]) | u64::from(CODES[b as usize]);
        n += u32::from(LENGTHS[b as usize]);
        while n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    if n > 0 {
        out.push(((bits << (8 - n)) | ((1 << (8 - n)) - 1)) as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_is_canonical() {
        let t = canonical();
        for len in 1..31 {
            for k in 0..t.count[len] as usize {
                let b = t.octets[t.start[len] as usize + k] as usize;
                assert_eq!(CODES[b], t.first[len] + k as u32, "octet {b}");
                assert_eq!(LENGTHS[b] as usize, len);
            }
        }
        // Kraft: the 256 octets and EOS fill the code space exactly.
        let sum: u64 = LENGTHS.iter().map(|&l| 1u64 << (30 - l)).sum::<u64>() + 1;
        assert_eq!(sum, 1 << 30);
    }

    #[test]
    fn rfc_7541_examples_decode() {
        // C.4.1: "www.example.com"; C.4.2: "no-cache"; C.6.1: a date.
        let cases: [(&[u8], &str); 3] = [
            (
                &[
                    0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
                ],
                "www.example.com",
            ),
            (&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf], "no-cache"),
            (
                &[
                    0xd0, 0x7a, 0xbe, 0x94, 0x10, 0x54, 0xd4, 0x44, 0xa8, 0x20, 0x05, 0x95, 0x04,
                    0x0b, 0x81, 0x66, 0xe0, 0x82, 0xa6, 0x2d, 0x1b, 0xff,
                ],
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
        ];
        for (code, text) in cases {
            let mut out = Vec::new();
            decode(code, &mut out).unwrap();
            assert_eq!(out, text.as_bytes());
            assert_eq!(encode(text.as_bytes()), code);
        }
    }

    #[test]
    fn every_octet_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        for s in [&all[..], b"", b"0", b"\xff\xff\x00", b"a\r\nb"] {
            let mut out = Vec::new();
            decode(&encode(s), &mut out).unwrap();
            assert_eq!(out, s);
        }
    }

    #[test]
    fn bad_padding_and_eos_are_refused() {
        let mut out = Vec::new();
        // A whole byte of padding (8 ones after a complete symbol).
        let mut s = encode(b"a"); // 5 bits + 3 ones
        s.push(0xff);
        assert_eq!(decode(&s, &mut out), Err(BadHuffman));
        // Padding that is not ones: '0' is 00000, then zeros.
        assert_eq!(decode(&[0x00], &mut out), Err(BadHuffman));
        // EOS itself (30 ones) inside the string.
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff], &mut out), Err(BadHuffman));
    }
}
