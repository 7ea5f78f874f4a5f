//! The chunked transfer coding of a request body (RFC 9112 §7.1), decoded incrementally and
//! strictly: hex sizes of at most 16 digits, every line ended by CRLF (a bare LF is an error:
//! two parsers that disagree on line ends are how smuggling works), chunk extensions and
//! trailer fields skipped within fixed bounds. Trailer fields are not forwarded. Pure.

use std::ops::Range;

/// Most bytes of chunk extensions over one body.
const MAX_EXTENSIONS: usize = 16 * 1024;
/// Most bytes of trailer section.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a chunked body is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub struct ChunkError(pub &'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size (`digits` so far).
    Size { size: u64, digits: u8 },
    /// After the size: optional whitespace, then `;` or CR.
    AfterSize,
    /// Inside chunk extensions, until CR.
    Extension,
    /// Expecting the LF of the size line.
    SizeLf,
    /// Inside chunk data.
    Data(u64),
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line, until CR.
    Trailer,
    /// Expecting the LF of a trailer line.
    TrailerLf,
    /// Expecting the final LF.
    EndLf,
    /// The body is complete.
    Done,
}

/// The decoder's state between reads.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    /// The size read, until its line ends.
    pending: u64,
    extensions: usize,
    trailers: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            state: State::Size { size: 0, digits: 0 },
            pending: 0,
            extensions: 0,
            trailers: 0,
        }
    }
}

/// What a byte of framing did to the decoder.
enum Step {
    /// Taken: on to the next byte.
    Next,
    /// It ended the chunk size: the next state looks at it again.
    Again,
    /// It ended the body.
    End,
}

/// What one call to [`Decoder::decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of the input used (framing and data).
    pub consumed: usize,
    /// Chunk data within the input, when the call reached some.
    pub data: Option<Range<usize>>,
}

impl Decoder {
    /// Whether the whole body (last chunk and trailers) has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads framing from `input` until chunk data (returned as a range of `input`, at most
    /// what is available), the end of the body, or the end of the input.
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Data(left) => {
                    let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    return Ok(Decoded {
                        consumed: i + take,
                        data: Some(i..i + take),
                    });
                }
                State::Done => {
                    return Ok(Decoded {
                        consumed: i,
                        data: None,
                    })
                }
                _ => {}
            }
            match self.step(input[i])? {
                Step::Next => i += 1,
                Step::Again => {}
                Step::End => {
                    return Ok(Decoded {
                        consumed: i + 1,
                        data: None,
                    })
                }
            }
        }
        Ok(Decoded {
            consumed: i,
            data: None,
        })
    }

    /// Takes one byte of framing (any state but `Data` and `Done`).
    // Long on purpose: one arm per state of the framing state machine (RFC 9112 §7.1), each a
    // few lines; split, the transitions would be scattered over as many functions.
    fn step(&mut self, b: u8) -> Result<Step, ChunkError> {
        match self.state {
            State::Size { size, digits } => match hex(b) {
                Some(d) => {
                    if digits >= 16 {
                        return Err(ChunkError("chunk size too large"));
                    }
                    self.state = State::Size {
                        size: size << 4 | u64::from(d),
                        digits: digits + 1,
                    };
                }
                None if digits == 0 => return Err(ChunkError("bad chunk size")),
                None => {
                    self.pending = size;
                    self.state = State::AfterSize;
                    return Ok(Step::Again);
                }
            },
            State::AfterSize => match b {
                b' ' | b'\t' => {}
                b';' => self.state = State::Extension,
                b'\r' => self.state = State::SizeLf,
                _ => return Err(ChunkError("bad chunk size line")),
            },
            State::Extension => match b {
                b'\r' => self.state = State::SizeLf,
                b'\n' | 0 => return Err(ChunkError("bad chunk extension")),
                _ => {
                    self.extensions += 1;
                    if self.extensions > MAX_EXTENSIONS {
                        return Err(ChunkError("chunk extensions too long"));
                    }
                }
            },
            State::SizeLf => {
                if b != b'\n' {
                    return Err(ChunkError("chunk size line not ended by CRLF"));
                }
                self.state = match self.size_read() {
                    0 => State::TrailerStart,
                    n => State::Data(n),
                };
            }
            State::DataCr => {
                if b != b'\r' {
                    return Err(ChunkError("chunk data not followed by CRLF"));
                }
                self.state = State::DataLf;
            }
            State::DataLf => {
                if b != b'\n' {
                    return Err(ChunkError("chunk data not followed by CRLF"));
                }
                self.state = State::Size { size: 0, digits: 0 };
            }
            State::TrailerStart => {
                self.state = if b == b'\r' {
                    State::EndLf
                } else {
                    State::Trailer
                };
                continue_trailer(&mut self.trailers, b)?;
            }
            State::Trailer => {
                continue_trailer(&mut self.trailers, b)?;
                if b == b'\r' {
                    self.state = State::TrailerLf;
                }
            }
            State::TrailerLf => {
                if b != b'\n' {
                    return Err(ChunkError("trailer line not ended by CRLF"));
                }
                self.state = State::TrailerStart;
            }
            State::EndLf => {
                if b != b'\n' {
                    return Err(ChunkError("chunked body not ended by CRLF"));
                }
                self.state = State::Done;
                return Ok(Step::End);
            }
            // Not framing: `decode` handles them.
            State::Data(_) | State::Done => return Ok(Step::Again),
        }
        Ok(Step::Next)
    }

    /// The size just read (the state machine only asks in `SizeLf`, after `Size`).
    fn size_read(&mut self) -> u64 {
        std::mem::replace(&mut self.pending, 0)
    }
}

fn continue_trailer(total: &mut usize, b: u8) -> Result<(), ChunkError> {
    if b == b'\n' || b == 0 {
        return Err(ChunkError("bad trailer line"));
    }
    *total += 1;
    if *total > MAX_TRAILERS {
        return Err(ChunkError("trailers too long"));
    }
    Ok(())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes: the data and whether it ended.
    fn run(input: &[u8], step: usize) -> Result<(Vec<u8>, bool), ChunkError> {
        let mut d = Decoder::default();
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                let r = d.decode(&buf)?;
                if let Some(range) = r.data.clone() {
                    out.extend_from_slice(&buf[range]);
                }
                buf.drain(..r.consumed);
                if d.is_done() || (r.data.is_none() && buf.is_empty()) || r.consumed == 0 {
                    break;
                }
            }
            if d.is_done() {
                break;
            }
        }
        Ok((out, d.is_done()))
    }

    #[test]
    fn decodes_in_any_split() {
        let body = b"5\r\nhello\r\n7;name=value\r\n, world\r\n0\r\nX-T: 1\r\n\r\n";
        for step in [1, 2, 3, 7, body.len()] {
            let (data, done) = run(body, step).unwrap();
            assert_eq!(data, b"hello, world", "step {step}");
            assert!(done, "step {step}");
        }
    }

    #[test]
    fn stops_at_the_end_of_the_body() {
        let mut d = Decoder::default();
        let input = b"0\r\n\r\nGET / HTTP/1.1\r\n";
        let r = d.decode(input).unwrap();
        assert!(d.is_done());
        assert_eq!(r.consumed, 5, "the next request is left in the buffer");
    }

    #[test]
    fn incomplete_bodies_are_not_done() {
        assert!(!run(b"5\r\nhel", 100).unwrap().1);
        assert!(!run(b"0\r\n", 100).unwrap().1);
        assert_eq!(
            run(b"A\r\n0123456789\r\n", 100).unwrap(),
            (b"0123456789".to_vec(), false)
        );
    }

    #[test]
    fn malformed_framing_is_refused() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"0\r\n\n",
            b"-5\r\nhello\r\n",
            b"5 x\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
            b"11111111111111111\r\n",
            b"\r\n",
        ] {
            assert!(run(bad, 100).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn extensions_and_trailers_are_bounded() {
        let mut long = b"1;".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_EXTENSIONS + 1));
        assert!(run(&long, 4096).is_err());
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"X-Trailer: 0123456789\r\n");
        }
        assert!(run(&trailers, 4096).is_err());
    }

    #[test]
    fn a_size_of_sixteen_hex_digits_is_the_most() {
        let mut d = Decoder::default();
        let r = d.decode(b"000000000000000F\r\nabc").unwrap();
        assert_eq!(r.data, Some(18..21));
    }
}
