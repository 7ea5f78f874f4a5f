//! lockstep's own HTTP/2 server connection (RFC 9113) on the `h2` crate: frames, HPACK, flow
//! control and the stream states are `h2`'s; what a connection does with its streams is here.
//!
//! Why not hyper's server: it spawns a task per stream (the handler's future and the response
//! body's pipe), so every request pays a spawn, a schedule, a wake-up of the stream's task when
//! its backend answers and another of the connection's task when the stream has queued its
//! frames, and tokio moves each stream's future into its task cell. Here a connection is one
//! task: it accepts streams from the `h2` connection and polls every stream's future (the
//! handler's, then the response body piped into the stream as flow control allows) in a
//! [`FuturesUnordered`] of that task, and then lets the connection write what the streams
//! queued, in one write for all the streams that answered in this turn. Measured against
//! hyper's server, two builds at once on one core (`bench/ab.sh`): 3.5 % less CPU per h2c
//! request, ~1 % less over TLS (BENCHMARKS.md).
//!
//! What hyper's server did and this keeps: the same `h2` settings (1 MiB windows, 16 KiB
//! frames, 400 KiB send buffer per stream, at most 1 024 streams reset for errors of ours),
//! the caller's stream and header-list limits; connection-specific headers dropped from
//! responses (RFC 9113 §8.2.2: `h2` refuses to send them), a `Date` added when the handler set
//! none, `Content-Length` from an exact body size; a request whose stream the client resets
//! is dropped (so is its backend request); a request body's flow-control window given back as
//! the handler reads it; at shutdown a GOAWAY, the streams in flight finish and the connection
//! closes. Extended CONNECT is not offered (no handler here tunnels over HTTP/2).

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use ::h2::server::SendResponse;
use ::h2::{Reason, SendStream};
use bytes::Buf;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{header, HeaderMap, Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::body::{ClientBody, ConnError, H2Body};
use super::tls::PeerCertificate;

/// Initial flow-control window of a stream and of the connection (hyper's default).
const WINDOW: u32 = 1024 * 1024;
/// Largest frame payload this side accepts (the protocol's default).
const MAX_FRAME: u32 = 16 * 1024;
/// Most bytes a stream queues beyond the peer's window before its body waits (hyper's).
const MAX_SEND_BUFFER: usize = 400 * 1024;
/// Most streams this side resets for the peer's errors before it closes the connection
/// (hyper's default: a peer provoking resets without end is shut out).
const MAX_ERROR_RESETS: usize = 1024;
/// A connection whose preface had not arrived when the shutdown came gets this long for it
/// (its request was likely on its way), as HTTP/1.1's first head does.
const PREFACE_GRACE: Duration = Duration::from_millis(250);

/// Limits of one HTTP/2 connection.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Most concurrent streams the client may open.
    pub max_concurrent_streams: u32,
    /// Largest header list (`SETTINGS_MAX_HEADER_LIST_SIZE`).
    pub max_header_list_size: u32,
}

/// A response's body as `h2` sends it: the body's chunks, or the empty end of the stream.
enum Chunk<D> {
    Data(D),
    End,
}

impl<D: Buf> Buf for Chunk<D> {
    fn remaining(&self) -> usize {
        match self {
            Chunk::Data(d) => d.remaining(),
            Chunk::End => 0,
        }
    }

    fn chunk(&self) -> &[u8] {
        match self {
            Chunk::Data(d) => d.chunk(),
            Chunk::End => &[],
        }
    }

    fn advance(&mut self, n: usize) {
        if let Chunk::Data(d) = self {
            d.advance(n)
        }
    }
}

/// Serves HTTP/2 on `io` (whose client preface is still to be read) with `svc` until the
/// connection ends; at `shutdown`, GOAWAY, the streams in flight finish, and it closes.
/// `cert`, the client's TLS certificate, goes with every request.
pub async fn serve<I, S, B>(
    io: I,
    opts: Options,
    svc: &S,
    shutdown: &CancellationToken,
    cert: Option<&PeerCertificate>,
) -> Result<(), ConnError>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: hyper::service::Service<Request<ClientBody>, Response = Response<B>, Error = Infallible>,
    B: Body,
    B::Error: Into<ConnError>,
{
    let mut builder = ::h2::server::Builder::new();
    builder
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(opts.max_header_list_size)
        .max_concurrent_streams(opts.max_concurrent_streams)
        .max_local_error_reset_streams(Some(MAX_ERROR_RESETS))
        .max_send_buffer_size(MAX_SEND_BUFFER);
    let mut handshake = pin!(builder.handshake::<_, Chunk<B::Data>>(io));
    let mut conn = tokio::select! {
        r = handshake.as_mut() => r?,
        _ = shutdown.cancelled() => match tokio::time::timeout(PREFACE_GRACE, handshake).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        },
    };
    let mut streams = FuturesUnordered::new();
    let mut stopping = pin!(shutdown.cancelled());
    let mut closing = false;
    poll_fn(|cx| {
        if !closing && stopping.as_mut().poll(cx).is_ready() {
            conn.graceful_shutdown();
            closing = true;
        }
        loop {
            // The streams first: their answers are queued (the connection writes them below,
            // in one write), and the streams accepted last time send their backend requests
            // back to back.
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            // Then every stream the client has opened by now, none started yet: a backend
            // woken for the first request of a batch finds the others waiting, rather than
            // being woken again for each one.
            let mut accepted = false;
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        let (mut parts, recv) = req.into_parts();
                        if let Some(cert) = cert {
                            parts.extensions.insert(cert.clone());
                        }
                        let body = H2Body::new(recv, content_length(&parts.headers));
                        let req = Request::from_parts(parts, ClientBody::H2(body));
                        // The handler's future boxed: `stream`'s own future then holds a
                        // pointer, not a second copy of it, and is moved cheaply into the set
                        // (callgrind: pushing a 6.5 KB stream copied it three times).
                        streams.push(stream(Box::pin(svc.call(req)), respond));
                        accepted = true;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            if !accepted {
                return Poll::Pending;
            }
        }
    })
    .await
}

/// The request's `Content-Length` when every value it gives is the same number (`h2` checks
/// the body against it and refuses a malformed one).
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let parse = |v: &http::HeaderValue| v.to_str().ok()?.trim().parse::<u64>().ok();
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let first = parse(values.next()?)?;
    values.all(|v| parse(v) == Some(first)).then_some(first)
}

/// One stream: the handler's answer (dropped if the client resets the stream first), then
/// its body into the stream.
async fn stream<F, B>(mut handling: Pin<Box<F>>, mut respond: SendResponse<Chunk<B::Data>>)
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Body,
    B::Error: Into<ConnError>,
{
    let answered = poll_fn(|cx| {
        if let Poll::Ready(Ok(res)) = handling.as_mut().poll(cx) {
            return Poll::Ready(Some(res));
        }
        respond.poll_reset(cx).map(|_| None)
    })
    .await;
    drop(handling); // done: its memory goes while the body streams
    let Some(res) = answered else {
        debug!("h2 stream reset by the client before its answer");
        return;
    };
    let (mut head, body) = res.into_parts();
    strip_connection_headers(&mut head.headers);
    head.headers
        .entry(header::DATE)
        .or_insert_with(super::date::date_value);
    let end = body.is_end_stream();
    if !end {
        if let Some(n) = body.size_hint().exact() {
            head.headers
                .entry(header::CONTENT_LENGTH)
                .or_insert_with(|| n.into());
        }
    }
    let tx = match respond.send_response(Response::from_parts(head, ()), end) {
        Ok(tx) => tx,
        Err(e) => {
            debug!(error = %e, "h2 response not sent");
            respond.send_reset(Reason::INTERNAL_ERROR);
            return;
        }
    };
    if !end {
        if let Err(e) = pipe(body, tx).await {
            debug!(error = %e, "h2 response body ended early");
        }
    }
}

/// `body` into the stream, a chunk at a time as the peer's flow-control window allows; an
/// error of the body resets the stream.
async fn pipe<B>(body: B, mut tx: SendStream<Chunk<B::Data>>) -> Result<(), ConnError>
where
    B: Body,
    B::Error: Into<ConnError>,
{
    let mut body = pin!(body);
    loop {
        let frame = poll_fn(|cx| {
            if let Poll::Ready(reset) = tx.poll_reset(cx) {
                let reason = reset.map_or_else(|e| e.to_string(), |r| r.to_string());
                return Poll::Ready(Err(ConnError::from(format!("stream reset: {reason}"))));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await?;
        let frame = match frame {
            None => return Ok(tx.send_data(Chunk::End, true)?),
            Some(Err(e)) => {
                tx.send_reset(Reason::INTERNAL_ERROR);
                return Err(e.into());
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                if data.has_remaining() {
                    // A claim of one byte, not the chunk's length: a claim on the connection's
                    // window held while waiting could starve another stream; `h2` raises it to
                    // what is queued once the chunk is sent (hyper's reasoning, #4003).
                    tx.reserve_capacity(1);
                    while tx.capacity() == 0 {
                        match poll_fn(|cx| tx.poll_capacity(cx)).await {
                            Some(Ok(0)) => {}
                            Some(Ok(_)) => break,
                            Some(Err(e)) => return Err(e.into()),
                            None => {
                                return Err("the stream closed while waiting for its window".into())
                            }
                        }
                    }
                }
                tx.send_data(Chunk::Data(data), end)?;
                if end {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    tx.reserve_capacity(0);
                    return Ok(tx.send_trailers(trailers)?);
                }
            }
        }
    }
}

/// Headers HTTP/2 forbids in a response (RFC 9113 §8.2.2), and those `Connection` names.
/// Usually there are none (the proxy has removed them already): one pass over the names finds
/// that, where a removal per name would hash each of them for every response.
fn strip_connection_headers(headers: &mut HeaderMap) {
    let specific = |n: &header::HeaderName| {
        n == header::CONNECTION
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
            || n == header::TE
            || n.as_str() == "keep-alive"
            || n.as_str() == "proxy-connection"
    };
    if !headers.keys().any(specific) {
        return;
    }
    if let Some(connection) = headers.remove(header::CONNECTION) {
        if let Ok(names) = connection.to_str() {
            for name in names.split(',') {
                headers.remove(name.trim());
            }
        }
    }
    for name in [
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_specific_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        strip_connection_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::CONTENT_TYPE));
        // Each alone is found too (the pass over the names that skips the removals).
        for name in [
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
            "transfer-encoding",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::SERVER, "x".parse().unwrap());
            h.insert(header::HeaderName::from_static(name), "1".parse().unwrap());
            strip_connection_headers(&mut h);
            assert_eq!(h.len(), 1, "{name}: {h:?}");
        }
    }

    #[test]
    fn content_length_only_when_every_value_agrees() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), None);
        h.append(header::CONTENT_LENGTH, "12".parse().unwrap());
        assert_eq!(content_length(&h), Some(12));
        h.append(header::CONTENT_LENGTH, "12".parse().unwrap());
        assert_eq!(content_length(&h), Some(12));
        h.append(header::CONTENT_LENGTH, "13".parse().unwrap());
        assert_eq!(content_length(&h), None);
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, "-1".parse().unwrap());
        assert_eq!(content_length(&h), None);
    }
}
