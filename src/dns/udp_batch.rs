//! Batched UDP I/O for the DNS receive loop ([`super::server`]): the datagrams queued on a
//! socket read with one `recvmmsg` into per-slot buffers ([`Inbox`], up to [`SLOTS`]), and the
//! answers written into per-slot buffers ([`Outbox`]) sent with one `sendmmsg`. That is Linux;
//! elsewhere the same two types read and send one datagram per call.
//!
//! It owns the syscalls and the socket's readiness, nothing else: what is answered, and in what
//! order, is the loop's. Every call is non-blocking and goes through tokio's `try_io` (elsewhere
//! than Linux, `try_recv_from` / `try_send_to`), so a `WouldBlock` clears the socket's readiness
//! and the next `readable()` / `writable()` really waits. An answer is never dropped for a full socket buffer: the rest waits for writability.
//! The crate forbids `unsafe`: `recvmmsg` is nix's safe wrapper and `sendmmsg` rustix's
//! (ARCHITECTURE.md, "Dependencies", says why two crates).

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::net::UdpSocket;
use tracing::debug;

use super::answer::MAX_UDP_PAYLOAD;

/// Datagrams read per call, and answers sent per call.
pub const SLOTS: usize = 64;

/// Largest UDP query read (a query is a question and an OPT; anything longer is cut here and
/// then fails to parse): the size of one receive slot.
pub const UDP_RECV: usize = 4096;

/// Size of one answer slot: the largest UDP answer lockstep sends.
const OUT_SLOT: usize = MAX_UDP_PAYLOAD as usize;

/// Slot `i` of `size`-byte slots laid back to back in `bufs` (empty when out of range).
fn slot(bufs: &[u8], i: usize, size: usize) -> &[u8] {
    bufs.get(i * size..(i + 1) * size).unwrap_or_default()
}

/// The datagrams of one read, each in its own slot.
pub struct Inbox {
    /// [`SLOTS`] buffers of [`UDP_RECV`] bytes, back to back.
    bufs: Vec<u8>,
    /// Length and source of the datagram in each slot, in order of arrival (`None`: the kernel
    /// gave no source address lockstep can answer).
    got: Vec<(usize, Option<SocketAddr>)>,
    /// Whether the socket is IPv6 (then every source address is, v4-mapped ones included).
    v6: bool,
}

impl Inbox {
    /// Buffers for reading a socket bound to an address of `local`'s family.
    pub fn new(local: SocketAddr) -> Inbox {
        Inbox {
            bufs: vec![0; SLOTS * UDP_RECV],
            got: Vec::with_capacity(SLOTS),
            v6: local.is_ipv6(),
        }
    }

    /// Reads the datagrams queued on `socket`, up to [`SLOTS`], without waiting; how many
    /// (at least one). `WouldBlock` when none is queued, and the socket's read readiness is
    /// cleared then.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.got.clear();
        sys::recv(socket, self.v6, &mut self.bufs, &mut self.got)
    }

    /// The datagrams of the last read, in order of arrival, with their source.
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.got.iter().enumerate().filter_map(|(i, (len, src))| {
            let packet = slot(&self.bufs, i, UDP_RECV).get(..*len)?;
            Some((packet, (*src)?))
        })
    }
}

/// Where an answer goes, in the form the send call takes.
#[cfg(target_os = "linux")]
type Dst = rustix::net::SocketAddrAny;
#[cfg(not(target_os = "linux"))]
type Dst = SocketAddr;

/// An answer waiting in its slot.
struct Queued<T> {
    /// Its length.
    len: usize,
    /// Its destination (for the logs).
    to: SocketAddr,
    /// The same, for the send call.
    dst: Dst,
    /// What the loop wants back once it was sent.
    tag: T,
}

/// Answers waiting to be sent, each in its own slot, with a tag (the loop's metrics) given back
/// once it was sent.
pub struct Outbox<T> {
    /// [`SLOTS`] buffers of [`MAX_UDP_PAYLOAD`] bytes, back to back; answer `i` is in slot `i`.
    bufs: Vec<u8>,
    queued: Vec<Queued<T>>,
}

impl<T> Default for Outbox<T> {
    fn default() -> Self {
        Outbox {
            bufs: vec![0; SLOTS * OUT_SLOT],
            queued: Vec::with_capacity(SLOTS),
        }
    }
}

impl<T> Outbox<T> {
    /// Whether every slot holds an answer ([`Outbox::flush`] before queueing another).
    pub fn is_full(&self) -> bool {
        self.queued.len() >= SLOTS
    }

    /// Lets `write` put an answer to `to` into the next free slot: it returns the answer's
    /// length and its tag, or `None` to decline. Whether an answer was queued (not when the
    /// outbox is full).
    pub fn queue(
        &mut self,
        to: SocketAddr,
        write: impl FnOnce(&mut [u8]) -> Option<(usize, T)>,
    ) -> bool {
        let at = self.queued.len();
        let Some(buf) = self.bufs.get_mut(at * OUT_SLOT..(at + 1) * OUT_SLOT) else {
            return false;
        };
        match write(buf) {
            Some((len, tag)) if len <= OUT_SLOT => {
                self.queued.push(Queued {
                    len,
                    to,
                    dst: Dst::from(to),
                    tag,
                });
                true
            }
            _ => false,
        }
    }

    /// Sends the queued answers in order (one `sendmmsg` while the socket takes them all),
    /// then hands each tag to `sent`. When the socket's buffer is full it waits for
    /// writability and sends the rest; an answer the kernel refuses otherwise is logged and
    /// skipped (its tag is handed over all the same, as for a single failed send).
    pub async fn flush(&mut self, socket: &UdpSocket, mut sent: impl FnMut(T)) {
        let (bufs, queued) = (&self.bufs, &self.queued);
        send_all(
            queued.len(),
            |from| sys::send(socket, bufs, from, queued.get(from..).unwrap_or_default()),
            || socket.writable(),
            |i, error| {
                let dst = queued.get(i).map(|q| q.to);
                debug!(%error, ?dst, "cannot send a DNS answer");
            },
        )
        .await;
        for q in self.queued.drain(..) {
            sent(q.tag);
        }
    }
}

/// Sends items `0..count` in order. `send(from)` sends some of `from..count` at once and says
/// how many; on `WouldBlock` the rest waits for `writable()`. Another error skips the item it
/// is about (the first one not sent: a batch send reports an error only when it sent nothing)
/// and reports it to `failed`; if waiting for writability fails, every item left is reported.
async fn send_all<W>(
    count: usize,
    mut send: impl FnMut(usize) -> io::Result<usize>,
    mut writable: impl FnMut() -> W,
    mut failed: impl FnMut(usize, io::Error),
) where
    W: Future<Output = io::Result<()>>,
{
    let mut at = 0;
    while at < count {
        match send(at) {
            Ok(0) => {
                failed(at, io::Error::other("the socket took none of the answers"));
                at += 1;
            }
            Ok(n) => at += n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if let Err(error) = writable().await {
                    for i in at..count {
                        failed(i, io::Error::new(error.kind(), error.to_string()));
                    }
                    return;
                }
            }
            Err(error) => {
                failed(at, error);
                at += 1;
            }
        }
    }
}

/// `recvmmsg` (nix) and `sendmmsg` (rustix).
#[cfg(target_os = "linux")]
mod sys {
    use std::cell::RefCell;
    use std::io::{self, IoSlice, IoSliceMut};
    use std::net::SocketAddr;
    use std::os::fd::{AsFd, AsRawFd, RawFd};
    use std::thread::LocalKey;

    use nix::sys::socket::{
        recvmmsg, MsgFlags, MultiHeaders, SockaddrIn, SockaddrIn6, SockaddrLike,
    };
    use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags};
    use tokio::io::Interest;
    use tokio::net::UdpSocket;

    use super::{slot, Queued, OUT_SLOT, SLOTS, UDP_RECV};

    thread_local! {
        // nix's message headers hold raw pointers, so they are not `Send` and cannot live in
        // the receive task across its awaits; one set per thread, borrowed only inside the
        // synchronous receive call. The address type is the socket's family, which the kernel
        // writes whole for every datagram (so nix never reads an address it did not write).
        static V4: RefCell<Option<MultiHeaders<SockaddrIn>>> = const { RefCell::new(None) };
        static V6: RefCell<Option<MultiHeaders<SockaddrIn6>>> = const { RefCell::new(None) };
    }

    pub(super) fn recv(
        socket: &UdpSocket,
        v6: bool,
        bufs: &mut [u8],
        got: &mut Vec<(usize, Option<SocketAddr>)>,
    ) -> io::Result<usize> {
        let fd = socket.as_fd().as_raw_fd();
        socket.try_io(Interest::READABLE, || {
            if v6 {
                recv_with(&V6, fd, bufs, got, |a| SocketAddr::V6(a.into()))
            } else {
                recv_with(&V4, fd, bufs, got, |a| SocketAddr::V4(a.into()))
            }
        })
    }

    fn recv_with<S: SockaddrLike + Copy>(
        headers: &'static LocalKey<RefCell<Option<MultiHeaders<S>>>>,
        fd: RawFd,
        bufs: &mut [u8],
        got: &mut Vec<(usize, Option<SocketAddr>)>,
        to_std: fn(S) -> SocketAddr,
    ) -> io::Result<usize> {
        headers.with_borrow_mut(|headers| {
            let headers = headers.get_or_insert_with(|| MultiHeaders::preallocate(SLOTS, None));
            let mut slots = bufs.chunks_mut(UDP_RECV);
            let mut iovs: [[IoSliceMut<'_>; 1]; SLOTS] =
                std::array::from_fn(|_| [IoSliceMut::new(slots.next().unwrap_or_default())]);
            let read = recvmmsg(fd, headers, iovs.iter_mut(), MsgFlags::MSG_DONTWAIT, None)?;
            got.extend(read.map(|m| (m.bytes, m.address.map(to_std))));
            Ok(got.len())
        })
    }

    pub(super) fn send<T>(
        socket: &UdpSocket,
        bufs: &[u8],
        first: usize,
        queued: &[Queued<T>],
    ) -> io::Result<usize> {
        socket.try_io(Interest::WRITABLE, || {
            let iovs: [[IoSlice<'_>; 1]; SLOTS] = std::array::from_fn(|i| {
                let bytes = queued
                    .get(i)
                    .and_then(|q| slot(bufs, first + i, OUT_SLOT).get(..q.len));
                [IoSlice::new(bytes.unwrap_or_default())]
            });
            // No ancillary data, but each message takes its own (empty) buffer.
            let mut control: [SendAncillaryBuffer<'_, '_, '_>; SLOTS] =
                std::array::from_fn(|_| SendAncillaryBuffer::default());
            let mut i = 0;
            let mut msgs = control.each_mut().map(|control| {
                let iov = iovs.get(i).map_or(&[][..], |v| &v[..]);
                let msg = match queued.get(i) {
                    Some(q) => MMsgHdr::new_with_addr(&q.dst, iov, control),
                    None => MMsgHdr::new(iov, control),
                };
                i += 1;
                msg
            });
            let n = queued.len().min(SLOTS);
            let msgs = msgs.get_mut(..n).unwrap_or_default();
            Ok(sendmmsg(socket, msgs, SendFlags::DONTWAIT)?)
        })
    }
}

/// One datagram per call, through tokio (which keeps the readiness itself).
#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;
    use std::net::SocketAddr;

    use tokio::net::UdpSocket;

    use super::{slot, Queued, OUT_SLOT, UDP_RECV};

    pub(super) fn recv(
        socket: &UdpSocket,
        _v6: bool,
        bufs: &mut [u8],
        got: &mut Vec<(usize, Option<SocketAddr>)>,
    ) -> io::Result<usize> {
        for buf in bufs.chunks_mut(UDP_RECV) {
            match socket.try_recv_from(buf) {
                Ok((len, src)) => got.push((len, Some(src))),
                Err(error) if got.is_empty() => return Err(error),
                Err(_) => break,
            }
        }
        Ok(got.len())
    }

    pub(super) fn send<T>(
        socket: &UdpSocket,
        bufs: &[u8],
        first: usize,
        queued: &[Queued<T>],
    ) -> io::Result<usize> {
        let mut sent = 0;
        for (i, q) in queued.iter().enumerate() {
            let bytes = slot(bufs, first + i, OUT_SLOT)
                .get(..q.len)
                .unwrap_or_default();
            match socket.try_send_to(bytes, q.dst) {
                Ok(_) => sent += 1,
                Err(error) if sent == 0 => return Err(error),
                Err(_) => break,
            }
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::future::ready;
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_secs(3);

    #[tokio::test]
    async fn partial_sends_and_a_full_buffer_still_send_everything_once_in_order() {
        let out = RefCell::new(Vec::new());
        let calls = Cell::new(0);
        let waits = Cell::new(0);
        let failed = RefCell::new(Vec::new());
        // Takes at most 3 per call, and every other call finds the buffer full.
        send_all(
            10,
            |from| {
                calls.set(calls.get() + 1);
                if calls.get() % 2 == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let n = 3.min(10 - from);
                out.borrow_mut().extend(from..from + n);
                Ok(n)
            },
            || {
                waits.set(waits.get() + 1);
                ready(Ok(()))
            },
            |i, _| failed.borrow_mut().push(i),
        )
        .await;
        assert_eq!(*out.borrow(), (0..10).collect::<Vec<_>>());
        assert_eq!(waits.get(), 3, "waited once per full buffer");
        assert!(failed.borrow().is_empty());
    }

    #[tokio::test]
    async fn a_refused_answer_is_skipped_alone_and_a_broken_socket_reports_the_rest() {
        // Item 4 is refused: a batch send stops before it, then fails on it alone.
        let out = RefCell::new(Vec::new());
        let failed = RefCell::new(Vec::new());
        send_all(
            8,
            |from| {
                if from == 4 {
                    return Err(io::ErrorKind::PermissionDenied.into());
                }
                let end = if from < 4 { 4 } else { 8 };
                out.borrow_mut().extend(from..end);
                Ok(end - from)
            },
            || ready(Ok(())),
            |i, e| failed.borrow_mut().push((i, e.kind())),
        )
        .await;
        assert_eq!(*out.borrow(), [0, 1, 2, 3, 5, 6, 7]);
        assert_eq!(*failed.borrow(), [(4, io::ErrorKind::PermissionDenied)]);

        // A send that takes nothing skips one item rather than spinning.
        let failed = RefCell::new(Vec::new());
        send_all(
            2,
            |_| Ok(0),
            || ready(Ok(())),
            |i, _| failed.borrow_mut().push(i),
        )
        .await;
        assert_eq!(*failed.borrow(), [0, 1]);

        // Full, then waiting fails: everything not sent is reported, nothing is lost quietly.
        let failed = RefCell::new(Vec::new());
        send_all(
            5,
            |from| {
                if from == 0 {
                    Ok(2)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                }
            },
            || ready(Err(io::Error::other("gone"))),
            |i, _| failed.borrow_mut().push(i),
        )
        .await;
        assert_eq!(*failed.borrow(), [2, 3, 4]);
    }

    async fn bound() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.expect("bind")
    }

    #[tokio::test]
    async fn a_read_takes_up_to_a_batch_of_queued_datagrams_in_order_with_their_sources() {
        let server = bound().await;
        let addr = server.local_addr().unwrap();
        let clients = [bound().await, bound().await, bound().await];
        // 100 datagrams queued before the first read (well within the socket's buffer).
        for i in 0..100u16 {
            let c = &clients[usize::from(i) % 3];
            c.send_to(&i.to_be_bytes(), addr).await.unwrap();
        }
        let mut inbox = Inbox::new(addr);
        let mut seen = Vec::new();
        let mut reads = Vec::new();
        while seen.len() < 100 {
            tokio::time::timeout(WAIT, server.readable())
                .await
                .expect("readable in time")
                .unwrap();
            match inbox.recv(&server) {
                Ok(n) => {
                    reads.push(n);
                    seen.extend(inbox.datagrams().map(|(p, src)| (p.to_vec(), src)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read failed: {e}"),
            }
        }
        // Loopback delivers within the send call, so the first read finds them all queued.
        assert_eq!(
            reads.iter().max(),
            Some(&SLOTS),
            "a full batch in one read: {reads:?}"
        );
        assert!(reads.iter().all(|&n| (1..=SLOTS).contains(&n)), "{reads:?}");
        assert_eq!(reads.iter().sum::<usize>(), 100);
        assert_eq!(seen.len(), 100);
        for (c, client) in clients.iter().enumerate() {
            let from = client.local_addr().unwrap();
            let got: Vec<Vec<u8>> = seen
                .iter()
                .filter(|(_, src)| *src == from)
                .map(|(p, _)| p.clone())
                .collect();
            let want: Vec<Vec<u8>> = (0..100u16)
                .filter(|i| usize::from(*i) % 3 == c)
                .map(|i| i.to_be_bytes().to_vec())
                .collect();
            assert_eq!(
                got, want,
                "client {c}: its datagrams, in order, from its address"
            );
        }
        // Drained: the next read says so (and clears the readiness).
        let e = inbox.recv(&server).expect_err("nothing left");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(inbox.datagrams().count(), 0);
    }

    #[tokio::test]
    async fn a_flush_sends_each_answer_to_its_client_in_order_and_hands_back_the_tags() {
        let server = bound().await;
        let clients = [bound().await, bound().await, bound().await];
        let to = |i: usize| clients[i % 3].local_addr().unwrap();
        let mut outbox = Outbox::default();
        // Declined or oversized answers take no slot.
        assert!(!outbox.queue(to(0), |_| None::<(usize, usize)>));
        assert!(!outbox.queue(to(0), |buf| Some((buf.len() + 1, 0))));
        for i in 0..SLOTS {
            let queued = outbox.queue(to(i), |buf| {
                let n = 2 + i % 7;
                buf[..n].fill(i as u8);
                Some((n, i))
            });
            assert!(queued, "slot {i}");
        }
        assert!(outbox.is_full());
        assert!(
            !outbox.queue(to(0), |_| Some((1, 999))),
            "no slot when full"
        );
        let mut tags = Vec::new();
        outbox.flush(&server, |t| tags.push(t)).await;
        assert_eq!(tags, (0..SLOTS).collect::<Vec<_>>());
        assert!(!outbox.is_full(), "emptied by the flush");
        let mut buf = [0u8; 64];
        for (c, client) in clients.iter().enumerate() {
            for i in (0..SLOTS).filter(|i| i % 3 == c) {
                let (n, src) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
                    .await
                    .expect("answer in time")
                    .unwrap();
                assert_eq!(src, server.local_addr().unwrap());
                assert_eq!(&buf[..n], &vec![i as u8; 2 + i % 7][..], "client {c}");
            }
            assert!(client.try_recv_from(&mut buf).is_err(), "nothing more");
        }
    }
}
