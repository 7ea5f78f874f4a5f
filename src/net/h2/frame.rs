//! HTTP/2 frames (RFC 9113 §4, §6) as typed values: [`parse`] turns a frame's 9-byte head and
//! payload into a [`Frame`] or the error the RFC names for it, and the writers append frames
//! to a connection's output. Only the shape of each frame is checked here (lengths, stream 0
//! or not, padding, setting values); what a frame means for a stream's state is the
//! connection's.

use bytes::{Buf, Bytes};

/// Length of a frame head.
pub const HEAD_LEN: usize = 9;
/// The client's connection preface (§3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest window (§6.9.1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PRIORITY: u8 = 2;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

/// Error codes (§7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reason(pub u32);

impl Reason {
    pub const NO_ERROR: Reason = Reason(0);
    pub const PROTOCOL_ERROR: Reason = Reason(1);
    pub const INTERNAL_ERROR: Reason = Reason(2);
    pub const FLOW_CONTROL_ERROR: Reason = Reason(3);
    pub const STREAM_CLOSED: Reason = Reason(5);
    pub const FRAME_SIZE_ERROR: Reason = Reason(6);
    pub const REFUSED_STREAM: Reason = Reason(7);
    pub const CANCEL: Reason = Reason(8);
    pub const COMPRESSION_ERROR: Reason = Reason(9);
    pub const ENHANCE_YOUR_CALM: Reason = Reason(11);
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            0 => "NO_ERROR",
            1 => "PROTOCOL_ERROR",
            2 => "INTERNAL_ERROR",
            3 => "FLOW_CONTROL_ERROR",
            4 => "SETTINGS_TIMEOUT",
            5 => "STREAM_CLOSED",
            6 => "FRAME_SIZE_ERROR",
            7 => "REFUSED_STREAM",
            8 => "CANCEL",
            9 => "COMPRESSION_ERROR",
            10 => "CONNECT_ERROR",
            11 => "ENHANCE_YOUR_CALM",
            12 => "INADEQUATE_SECURITY",
            13 => "HTTP_1_1_REQUIRED",
            n => return write!(f, "error code {n:#x}"),
        };
        f.write_str(name)
    }
}

/// A frame's head (§4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Payload length.
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// The head at the start of `b` (at least [`HEAD_LEN`] bytes).
    pub fn parse(b: &[u8]) -> Head {
        Head {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// A SETTINGS frame that is not an acknowledgement (what the client's preface ends with).
    pub fn is_settings(&self) -> bool {
        self.kind == SETTINGS && self.flags & ACK == 0
    }

    /// A CONTINUATION frame (whatever its stream: the connection checks that).
    pub fn is_continuation(&self) -> bool {
        self.kind == CONTINUATION
    }
}

/// A setting (§6.5.2) the client sent, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    HeaderTableSize(u32),
    EnablePush(bool),
    MaxConcurrentStreams(u32),
    InitialWindowSize(u32),
    MaxFrameSize(u32),
    MaxHeaderListSize(u32),
    /// Unknown identifiers are ignored (§6.5.2).
    Other,
}

/// A frame from the client, its shape checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        end_stream: bool,
        /// The data, padding removed.
        data: Bytes,
        /// What counts against flow control: the whole payload, padding included (§6.9).
        flow_len: usize,
    },
    Headers {
        stream: u32,
        end_stream: bool,
        end_headers: bool,
        /// The stream this one depends on, if the frame says (checked against itself).
        depends_on: Option<u32>,
        fragment: Bytes,
    },
    Priority {
        stream: u32,
        depends_on: u32,
    },
    RstStream {
        stream: u32,
        reason: Reason,
    },
    Settings {
        ack: bool,
        settings: Vec<Setting>,
    },
    Ping {
        ack: bool,
        payload: [u8; 8],
    },
    GoAway {
        last_stream: u32,
        reason: Reason,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    Continuation {
        stream: u32,
        end_headers: bool,
        fragment: Bytes,
    },
    /// A frame of a type this side does not know: ignored (§4.1, §5.5).
    Unknown,
}

/// What a malformed frame is: an error of the connection, or of one stream (§5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    Connection(Reason),
    Stream(u32, Reason),
}

/// The frame of `head` whose payload is `payload` (`head.len` bytes).
pub fn parse(head: Head, mut payload: Bytes) -> Result<Frame, FrameError> {
    use FrameError::Connection as Conn;
    let id = head.stream;
    let on_stream = |f: Frame| {
        if id == 0 {
            Err(Conn(Reason::PROTOCOL_ERROR))
        } else {
            Ok(f)
        }
    };
    let on_connection = |f: Frame| {
        if id != 0 {
            Err(Conn(Reason::PROTOCOL_ERROR))
        } else {
            Ok(f)
        }
    };
    match head.kind {
        DATA => {
            let flow_len = payload.len();
            let data = unpad(head, payload)?;
            on_stream(Frame::Data {
                stream: id,
                end_stream: head.flags & END_STREAM != 0,
                data,
                flow_len,
            })
        }
        HEADERS => {
            if id == 0 {
                return Err(Conn(Reason::PROTOCOL_ERROR));
            }
            let mut fragment = unpad(head, payload)?;
            let depends_on = if head.flags & PRIORITY_FLAG != 0 {
                if fragment.len() < 5 {
                    return Err(Conn(Reason::FRAME_SIZE_ERROR));
                }
                let dep = fragment.get_u32() & 0x7fff_ffff;
                fragment.advance(1); // weight
                Some(dep)
            } else {
                None
            };
            Ok(Frame::Headers {
                stream: id,
                end_stream: head.flags & END_STREAM != 0,
                end_headers: head.flags & END_HEADERS != 0,
                depends_on,
                fragment,
            })
        }
        PRIORITY => {
            if id == 0 {
                return Err(Conn(Reason::PROTOCOL_ERROR));
            }
            if payload.len() != 5 {
                return Err(FrameError::Stream(id, Reason::FRAME_SIZE_ERROR));
            }
            Ok(Frame::Priority {
                stream: id,
                depends_on: payload.get_u32() & 0x7fff_ffff,
            })
        }
        RST_STREAM => {
            if payload.len() != 4 {
                return Err(Conn(Reason::FRAME_SIZE_ERROR));
            }
            on_stream(Frame::RstStream {
                stream: id,
                reason: Reason(payload.get_u32()),
            })
        }
        SETTINGS => {
            if id != 0 {
                return Err(Conn(Reason::PROTOCOL_ERROR));
            }
            let ack = head.flags & ACK != 0;
            if (ack && !payload.is_empty()) || !payload.len().is_multiple_of(6) {
                return Err(Conn(Reason::FRAME_SIZE_ERROR));
            }
            let mut settings = Vec::with_capacity(payload.len() / 6);
            while payload.has_remaining() {
                let (key, value) = (payload.get_u16(), payload.get_u32());
                settings.push(setting(key, value)?);
            }
            Ok(Frame::Settings { ack, settings })
        }
        PUSH_PROMISE => Err(Conn(Reason::PROTOCOL_ERROR)), // clients never push (§8.4)
        PING => {
            if id != 0 {
                return Err(Conn(Reason::PROTOCOL_ERROR));
            }
            let payload: [u8; 8] = payload[..]
                .try_into()
                .map_err(|_| Conn(Reason::FRAME_SIZE_ERROR))?;
            Ok(Frame::Ping {
                ack: head.flags & ACK != 0,
                payload,
            })
        }
        GOAWAY => {
            if payload.len() < 8 {
                return Err(Conn(Reason::FRAME_SIZE_ERROR));
            }
            on_connection(Frame::GoAway {
                last_stream: payload.get_u32() & 0x7fff_ffff,
                reason: Reason(payload.get_u32()),
            })
        }
        WINDOW_UPDATE => {
            if payload.len() != 4 {
                return Err(Conn(Reason::FRAME_SIZE_ERROR));
            }
            Ok(Frame::WindowUpdate {
                stream: id,
                increment: payload.get_u32() & 0x7fff_ffff,
            })
        }
        CONTINUATION => on_stream(Frame::Continuation {
            stream: id,
            end_headers: head.flags & END_HEADERS != 0,
            fragment: payload,
        }),
        _ => Ok(Frame::Unknown),
    }
}

/// The payload without its padding (§6.1, §6.2).
fn unpad(head: Head, mut payload: Bytes) -> Result<Bytes, FrameError> {
    if head.flags & PADDED == 0 {
        return Ok(payload);
    }
    let Some(&pad) = payload.first() else {
        return Err(FrameError::Connection(Reason::FRAME_SIZE_ERROR));
    };
    let pad = usize::from(pad);
    if pad >= payload.len() {
        // Padding as long as the payload or longer (§6.1).
        return Err(FrameError::Connection(Reason::PROTOCOL_ERROR));
    }
    payload.advance(1);
    payload.truncate(payload.len() - pad);
    Ok(payload)
}

fn setting(key: u16, value: u32) -> Result<Setting, FrameError> {
    use FrameError::Connection as Conn;
    Ok(match key {
        1 => Setting::HeaderTableSize(value),
        2 => match value {
            0 | 1 => Setting::EnablePush(value == 1),
            _ => return Err(Conn(Reason::PROTOCOL_ERROR)),
        },
        3 => Setting::MaxConcurrentStreams(value),
        4 if i64::from(value) > MAX_WINDOW => return Err(Conn(Reason::FLOW_CONTROL_ERROR)),
        4 => Setting::InitialWindowSize(value),
        5 if !(16_384..=16_777_215).contains(&value) => return Err(Conn(Reason::PROTOCOL_ERROR)),
        5 => Setting::MaxFrameSize(value),
        6 => Setting::MaxHeaderListSize(value),
        _ => Setting::Other,
    })
}

fn put_head(dst: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = len as u32;
    dst.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    dst.extend_from_slice(&stream.to_be_bytes());
}

/// Appends a SETTINGS frame of `(identifier, value)` pairs.
pub fn put_settings(dst: &mut Vec<u8>, settings: &[(u16, u32)]) {
    put_head(dst, settings.len() * 6, SETTINGS, 0, 0);
    for (k, v) in settings {
        dst.extend_from_slice(&k.to_be_bytes());
        dst.extend_from_slice(&v.to_be_bytes());
    }
}

/// Appends the acknowledgement of the client's SETTINGS.
pub fn put_settings_ack(dst: &mut Vec<u8>) {
    put_head(dst, 0, SETTINGS, ACK, 0);
}

/// Appends the answer to a PING.
pub fn put_ping_ack(dst: &mut Vec<u8>, payload: &[u8; 8]) {
    put_head(dst, 8, PING, ACK, 0);
    dst.extend_from_slice(payload);
}

/// Appends a GOAWAY.
pub fn put_goaway(dst: &mut Vec<u8>, last_stream: u32, reason: Reason) {
    put_head(dst, 8, GOAWAY, 0, 0);
    dst.extend_from_slice(&last_stream.to_be_bytes());
    dst.extend_from_slice(&reason.0.to_be_bytes());
}

/// Appends a RST_STREAM.
pub fn put_rst(dst: &mut Vec<u8>, stream: u32, reason: Reason) {
    put_head(dst, 4, RST_STREAM, 0, stream);
    dst.extend_from_slice(&reason.0.to_be_bytes());
}

/// Appends a WINDOW_UPDATE (`increment` at most 2^31 - 1).
pub fn put_window_update(dst: &mut Vec<u8>, stream: u32, increment: u32) {
    put_head(dst, 4, WINDOW_UPDATE, 0, stream);
    dst.extend_from_slice(&increment.to_be_bytes());
}

/// Appends a DATA frame carrying `data` (at most the peer's frame size).
pub fn put_data(dst: &mut Vec<u8>, stream: u32, data: &[u8], end_stream: bool) {
    put_head(
        dst,
        data.len(),
        DATA,
        if end_stream { END_STREAM } else { 0 },
        stream,
    );
    dst.extend_from_slice(data);
}

/// Appends a HEADERS frame for `block` (an encoded head already appended to `dst` at
/// `block_at`), split into CONTINUATION frames of at most `max_frame` bytes.
pub fn put_headers(
    dst: &mut Vec<u8>,
    block_at: usize,
    stream: u32,
    end_stream: bool,
    max_frame: usize,
) {
    let block = dst.split_off(block_at);
    let mut chunks = block.chunks(max_frame.max(1)).peekable();
    let mut kind = HEADERS;
    let mut flags = if end_stream { END_STREAM } else { 0 };
    loop {
        let chunk = chunks.next().unwrap_or(&[]);
        let last = chunks.peek().is_none();
        put_head(
            dst,
            chunk.len(),
            kind,
            flags | if last { END_HEADERS } else { 0 },
            stream,
        );
        dst.extend_from_slice(chunk);
        if last {
            return;
        }
        kind = CONTINUATION;
        flags = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Result<Frame, FrameError> {
        let mut b = Vec::new();
        put_head(&mut b, payload.len(), kind, flags, stream);
        let head = Head::parse(&b);
        assert_eq!(head.len, payload.len());
        parse(head, Bytes::copy_from_slice(payload))
    }

    #[test]
    fn heads_round_trip() {
        let mut b = Vec::new();
        put_head(&mut b, 0x12_3456, HEADERS, 0x25, 0x7fff_ffff);
        assert_eq!(
            Head::parse(&b),
            Head {
                len: 0x12_3456,
                kind: HEADERS,
                flags: 0x25,
                stream: 0x7fff_ffff
            }
        );
        // The reserved bit is ignored.
        b[5] |= 0x80;
        assert_eq!(Head::parse(&b).stream, 0x7fff_ffff);
    }

    #[test]
    fn padding_is_removed_and_counted() {
        let got = frame(DATA, PADDED | END_STREAM, 1, b"\x03abcxyz").unwrap();
        assert_eq!(
            got,
            Frame::Data {
                stream: 1,
                end_stream: true,
                data: Bytes::from("abc"),
                flow_len: 7
            }
        );
        // Padding that fills the payload, or no pad length at all.
        assert_eq!(
            frame(DATA, PADDED, 1, b"\x04abc"),
            Err(FrameError::Connection(Reason::PROTOCOL_ERROR))
        );
        assert_eq!(
            frame(DATA, PADDED, 1, b""),
            Err(FrameError::Connection(Reason::FRAME_SIZE_ERROR))
        );
        let got = frame(
            HEADERS,
            PADDED | PRIORITY_FLAG | END_HEADERS,
            3,
            b"\x01\x00\x00\x00\x05\x10\x82p",
        )
        .unwrap();
        assert_eq!(
            got,
            Frame::Headers {
                stream: 3,
                end_stream: false,
                end_headers: true,
                depends_on: Some(5),
                fragment: Bytes::from_static(b"\x82"),
            }
        );
    }

    #[test]
    fn shapes_the_rfc_forbids_are_the_errors_it_names() {
        use FrameError::{Connection as C, Stream as S};
        let cases: [(u8, u8, u32, &[u8], FrameError); 14] = [
            (DATA, 0, 0, b"x", C(Reason::PROTOCOL_ERROR)),
            (HEADERS, 0, 0, b"", C(Reason::PROTOCOL_ERROR)),
            (PRIORITY, 0, 1, b"\0\0\0\0", S(1, Reason::FRAME_SIZE_ERROR)),
            (RST_STREAM, 0, 1, b"\0\0\0", C(Reason::FRAME_SIZE_ERROR)),
            (RST_STREAM, 0, 0, b"\0\0\0\0", C(Reason::PROTOCOL_ERROR)),
            (SETTINGS, 0, 1, b"", C(Reason::PROTOCOL_ERROR)),
            (SETTINGS, 0, 0, b"\0\x01\0\0\0", C(Reason::FRAME_SIZE_ERROR)),
            (
                SETTINGS,
                ACK,
                0,
                b"\0\x01\0\0\0\0",
                C(Reason::FRAME_SIZE_ERROR),
            ),
            (
                SETTINGS,
                0,
                0,
                b"\0\x02\0\0\0\x02",
                C(Reason::PROTOCOL_ERROR),
            ),
            (
                SETTINGS,
                0,
                0,
                b"\0\x04\x80\0\0\0",
                C(Reason::FLOW_CONTROL_ERROR),
            ),
            (
                SETTINGS,
                0,
                0,
                b"\0\x05\0\0\x3f\xff",
                C(Reason::PROTOCOL_ERROR),
            ),
            (PING, 0, 0, b"1234567", C(Reason::FRAME_SIZE_ERROR)),
            (PING, 0, 1, b"12345678", C(Reason::PROTOCOL_ERROR)),
            (WINDOW_UPDATE, 0, 1, b"\0\0\0", C(Reason::FRAME_SIZE_ERROR)),
        ];
        for (kind, flags, stream, payload, want) in cases {
            assert_eq!(
                frame(kind, flags, stream, payload),
                Err(want),
                "type {kind} {payload:x?}"
            );
        }
        assert_eq!(
            frame(PUSH_PROMISE, 0, 1, b"\0\0\0\x02"),
            Err(C(Reason::PROTOCOL_ERROR))
        );
        assert_eq!(
            frame(CONTINUATION, 0, 0, b""),
            Err(C(Reason::PROTOCOL_ERROR))
        );
        assert_eq!(
            frame(GOAWAY, 0, 1, b"\0\0\0\0\0\0\0\0"),
            Err(C(Reason::PROTOCOL_ERROR))
        );
        assert_eq!(frame(0x42, 0xff, 9, b"anything"), Ok(Frame::Unknown));
    }

    #[test]
    fn settings_are_read_in_order() {
        let got = frame(
            SETTINGS,
            0,
            0,
            b"\0\x01\0\0\x10\0\0\x04\0\x01\0\0\0\x09\0\0\0\x01",
        )
        .unwrap();
        assert_eq!(
            got,
            Frame::Settings {
                ack: false,
                settings: vec![
                    Setting::HeaderTableSize(4096),
                    Setting::InitialWindowSize(65536),
                    Setting::Other
                ],
            }
        );
    }

    #[test]
    fn a_long_head_is_split_into_continuations() {
        let mut out = b"prefix".to_vec();
        out.extend(std::iter::repeat_n(7u8, 25));
        put_headers(&mut out, 6, 5, true, 10);
        let mut at = 6;
        let mut seen = Vec::new();
        while at < out.len() {
            let h = Head::parse(&out[at..]);
            seen.push((h.kind, h.flags, h.len));
            at += HEAD_LEN + h.len;
        }
        assert_eq!(
            seen,
            vec![
                (HEADERS, END_STREAM, 10),
                (CONTINUATION, 0, 10),
                (CONTINUATION, END_HEADERS, 5)
            ]
        );
        let mut empty = Vec::new();
        put_headers(&mut empty, 0, 1, false, 16_384);
        assert_eq!(
            Head::parse(&empty),
            Head {
                len: 0,
                kind: HEADERS,
                flags: END_HEADERS,
                stream: 1
            }
        );
    }
}
