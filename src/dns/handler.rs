//! The hickory [`RequestHandler`]: checks the message (opcode, EDNS, one question), reads the
//! live state once, asks [`answer`](super::answer::answer) and sends the result. Over UDP the
//! [`fast`](super::fast) path is tried first ([`DnsHandler::answer_fast`]); what it does not
//! take comes here through [`DnsHandler::handle_udp`], and every query over TCP through
//! [`DnsHandler::answer_tcp`], both decoding the message the way hickory's server does.
//! It also hands the transports the limits of the live generation (rate limits, TCP
//! connections) and counts what they held back.
//!
//! It reads zones and health through the live pointer at every query (`live.load()` → the
//! zones of that generation and `table.pool(name)` → `health.load()`), so answers follow the
//! health checks and reloads with no plumbing of their own. Malformed messages whose header
//! parses are answered FORMERR by hickory's server before they get here; shorter junk gets
//! silence.
#![allow(clippy::disallowed_methods)] // I/O shell: answer latency for the metrics

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::Record;
use hickory_server::proto::serialize::binary::{
    BinDecodable, BinDecoder, BinEncodable, BinEncoder,
};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use prometheus_client::metrics::counter::Counter;
use tokio::net::UdpSocket;
use tracing::debug;

use super::answer::{answer, Answer, Health, Question, MAX_UDP_PAYLOAD};
use super::fast;
use super::metrics::{DnsMetrics, NameLabels, QueryLabels, RrlLabels};
use super::rrl::{Limits, Verdict};
use super::view::SharedView;
use super::zone::{NameEntry, Zones};
use crate::pools::table::Table;

/// The EDNS version lockstep speaks.
const EDNS_VERSION: u8 = 0;

/// Answers queries from the live state.
#[derive(Clone)]
pub struct DnsHandler {
    live: SharedView,
    metrics: DnsMetrics,
    /// `dns_queries{qtype="A",rcode="NOERROR"}` and the AAAA one, looked up once for the
    /// fast path.
    noerror_a: Counter,
    noerror_aaaa: Counter,
    /// `dns_rrl{action="dropped"}` and `{action="slipped"}`, looked up once for the UDP loop.
    rrl_dropped: Counter,
    rrl_slipped: Counter,
}

impl DnsHandler {
    /// A handler over `live`.
    pub fn new(live: SharedView, metrics: DnsMetrics) -> DnsHandler {
        let counter = |qtype| {
            metrics
                .queries
                .get_or_create(&QueryLabels {
                    qtype,
                    rcode: "NOERROR",
                })
                .clone()
        };
        let rrl = |action| metrics.rrl.get_or_create(&RrlLabels { action }).clone();
        DnsHandler {
            noerror_a: counter("A"),
            noerror_aaaa: counter("AAAA"),
            rrl_dropped: rrl("dropped"),
            rrl_slipped: rrl("slipped"),
            live,
            metrics,
        }
    }
}

/// What the fast path sent, for the metrics.
#[derive(Debug)]
pub struct FastDone {
    /// Length of the answer in the buffer.
    pub len: usize,
    qtype: &'static str,
    fail_open: Option<String>,
}

/// Pool health read from one routing table at one instant.
pub(crate) struct LiveHealth<'a> {
    table: &'a Table,
    now: Instant,
}

impl Health for LiveHealth<'_> {
    fn backends(&self, pool: &str, out: &mut Vec<(IpAddr, bool)>) {
        let Some(p) = self.table.pool(pool) else {
            return;
        };
        let health = p.health.load();
        out.extend(
            p.backends
                .iter()
                .enumerate()
                .map(|(i, b)| (b.config.dns_address, health.available(i, self.now))),
        );
    }
}

/// The OPT record of the response to a query that had `req`: our version, the payload
/// clamped to 512..=1232, the DO bit copied; unknown flags and options are not echoed
/// (RFC 6891 §6.1.4, §6.1.2).
fn response_edns(req: &Edns) -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(req.max_payload().clamp(512, MAX_UDP_PAYLOAD));
    e.set_dnssec_ok(req.flags().dnssec_ok);
    e.set_version(EDNS_VERSION);
    e
}

/// The slow path's decision for `request`: the response header, its OPT, and the answer or
/// error code. `zones` is `None` when DNS was removed by a reload.
pub(crate) fn respond(
    request: &Request,
    zones: Option<&Zones>,
    health: &impl Health,
    turn: impl FnOnce(&NameEntry) -> usize,
) -> (Metadata, Option<Edns>, Result<Answer, ResponseCode>) {
    let edns = request.edns.as_ref().map(response_edns);
    let mut metadata = Metadata::response_from_request(&request.metadata);
    let outcome = if request
        .edns
        .as_ref()
        .is_some_and(|e| e.version() > EDNS_VERSION)
    {
        // RFC 6891 §6.1.3: BADVERS, with an OPT of the version we do speak.
        Err(ResponseCode::BADVERS)
    } else if request.metadata.op_code != OpCode::Query {
        Err(ResponseCode::NotImp)
    } else {
        match request.request_info() {
            // Zero or several questions: RFC 9619 allows exactly one.
            Err(_) => Err(ResponseCode::FormErr),
            Ok(info) => {
                let q = info.query;
                match zones {
                    // DNS was removed by a reload while a query was in flight.
                    None => Err(ResponseCode::Refused),
                    Some(zones) => {
                        let question = Question {
                            name: q.original().name(),
                            lower: q.name(),
                            qtype: q.query_type(),
                            qclass: q.query_class(),
                        };
                        Ok(answer(zones, &question, health, turn))
                    }
                }
            }
        }
    };
    match &outcome {
        Ok(a) => {
            metadata.authoritative = a.authoritative;
            metadata.response_code = a.rcode;
        }
        Err(code) => metadata.response_code = *code,
    }
    metadata.recursion_available = false;
    (metadata, edns, outcome)
}

/// The response message of a [`respond`] decision.
pub(crate) fn build<'q, 'a>(
    request: &'q Request,
    edns: Option<&'q Edns>,
    metadata: Metadata,
    outcome: &'a Result<Answer, ResponseCode>,
) -> MessageResponse<
    'q,
    'a,
    impl Iterator<Item = &'a Record> + Send + 'a,
    impl Iterator<Item = &'a Record> + Send + 'a,
    impl Iterator<Item = &'a Record> + Send + 'a,
    impl Iterator<Item = &'a Record> + Send + 'a,
> {
    let (answers, authorities, additionals): (&[Record], &[Record], &[Record]) = match outcome {
        Ok(a) => (&a.answers, &a.authorities, &a.additionals),
        Err(_) => (&[], &[], &[]),
    };
    let mut builder = MessageResponseBuilder::new(&request.queries, None);
    if let Some(e) = edns {
        builder.edns(e);
    }
    builder.build(
        metadata,
        answers.iter(),
        authorities.iter(),
        std::iter::empty(),
        additionals.iter(),
    )
}

/// Encodes `response` for UDP as hickory's server does: at most the advertised payload (512
/// without EDNS), TC set when records had to be left out; SERVFAIL if it cannot be encoded.
pub(crate) fn encode_udp<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> (ResponseInfo, Vec<u8>) {
    let max = response.edns().map_or(512, |e| e.max_payload());
    encode(response, max)
}

/// Encodes `response` in at most `max` bytes (TC set when records had to be left out);
/// SERVFAIL if it cannot be encoded.
fn encode<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    max: u16,
) -> (ResponseInfo, Vec<u8>) {
    let id = response.metadata().id;
    let mut bytes = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(max);
    let error = match response.destructive_emit(&mut encoder) {
        Ok(info) => return (info, bytes),
        Err(error) => error,
    };
    debug!(%error, "cannot encode a DNS answer; SERVFAIL");
    bytes.clear();
    let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
    metadata.response_code = ResponseCode::ServFail;
    let header = Header {
        metadata,
        counts: HeaderCounts::default(),
    };
    let mut encoder = BinEncoder::new(&mut bytes);
    if let Err(error) = header.emit(&mut encoder) {
        debug!(%error, "cannot encode a SERVFAIL header");
        bytes.clear();
    }
    (ResponseInfo::from(header), bytes)
}

/// Keeps a hickory response encoded for TCP, for the connection to write (as one message: at
/// most 65535 bytes, RFC 1035 §4.2.2).
#[derive(Clone, Default)]
struct TcpReply {
    // Uncontended: one query at a time per connection; a clone is only hickory's contract.
    bytes: Arc<Mutex<Vec<u8>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for TcpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode(response, u16::MAX);
        *self.bytes.lock().unwrap_or_else(PoisonError::into_inner) = bytes;
        Ok(info)
    }
}

/// Sends a hickory response over a lockstep-owned UDP socket.
#[derive(Clone)]
struct UdpReply {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode_udp(response);
        if !bytes.is_empty() {
            self.socket.send_to(&bytes, self.dst).await?;
        }
        Ok(info)
    }
}

impl DnsHandler {
    /// The fast path: answers `query` into `out` when it is the common case (see
    /// [`fast`]), taking the name's rotation turn. `None`: give it to [`DnsHandler::handle_udp`].
    pub fn answer_fast(
        &self,
        query: &[u8],
        scratch: &mut Vec<(IpAddr, bool)>,
        out: &mut [u8],
        now: Instant,
    ) -> Option<FastDone> {
        let live = self.live.load();
        let zones = live.zones.as_deref()?;
        let health = LiveHealth {
            table: &live.table,
            now,
        };
        let f = fast::answer(query, zones, &health, NameEntry::next_turn, scratch, out)?;
        Some(FastDone {
            len: f.len,
            qtype: f.qtype,
            fail_open: f.fail_open.map(str::to_owned),
        })
    }

    /// Counts a fast-path answer sent (type and NOERROR, latency from `started`, fail open).
    pub fn record_fast(&self, done: &FastDone, started: Instant) {
        match done.qtype {
            "A" => self.noerror_a.inc(),
            _ => self.noerror_aaaa.inc(),
        };
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        if let Some(pool) = &done.fail_open {
            self.metrics
                .fail_open
                .get_or_create(&NameLabels { pool: pool.clone() })
                .inc();
        }
    }

    /// The limits of the live generation for the UDP loop (off without a `dns:` section).
    pub fn udp_limits(&self) -> Limits {
        self.live
            .load()
            .zones
            .as_ref()
            .map_or_else(Limits::off, |z| z.rrl)
    }

    /// How many TCP connections may be open now (none without a `dns:` section).
    pub fn max_tcp_connections(&self) -> usize {
        self.live
            .load()
            .zones
            .as_ref()
            .map_or(0, |z| z.max_tcp_connections)
    }

    /// Counts an answer response-rate limiting held back.
    pub fn record_rrl(&self, verdict: Verdict) {
        match verdict {
            Verdict::Answer => {}
            Verdict::Drop => {
                self.rrl_dropped.inc();
            }
            Verdict::Slip => {
                self.rrl_slipped.inc();
            }
        }
    }

    /// The metrics (for the TCP listener's connection counts).
    pub fn metrics(&self) -> &DnsMetrics {
        &self.metrics
    }

    /// The slow path for a UDP datagram, as hickory's server handles one: silence for fewer
    /// than 12 bytes or a response, FORMERR when the header parses but the rest does not,
    /// otherwise [`RequestHandler::handle_request`], the answer sent from `socket` to `src`.
    pub async fn handle_udp(&self, packet: &[u8], src: SocketAddr, socket: &Arc<UdpSocket>) {
        let reply = UdpReply {
            socket: socket.clone(),
            dst: src,
        };
        self.handle_raw(packet, src, Protocol::Udp, reply).await;
    }

    /// A query that came over TCP from `src` (one message, without its length prefix): the
    /// answer to write back, or `None` for silence (as for UDP).
    pub async fn answer_tcp(&self, packet: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
        let reply = TcpReply::default();
        self.handle_raw(packet, src, Protocol::Tcp, reply.clone())
            .await;
        let bytes =
            std::mem::take(&mut *reply.bytes.lock().unwrap_or_else(PoisonError::into_inner));
        (!bytes.is_empty()).then_some(bytes)
    }

    /// Decodes `packet` as hickory's server does and answers through `reply`.
    async fn handle_raw(
        &self,
        packet: &[u8],
        src: SocketAddr,
        protocol: Protocol,
        reply: impl ResponseHandler,
    ) {
        let mut decoder = BinDecoder::new(packet);
        let Ok(header) = Header::read(&mut decoder) else {
            return;
        };
        match Request::from_bytes(packet.to_vec(), src, protocol) {
            Ok(request) => {
                if request.metadata.message_type == MessageType::Response {
                    return;
                }
                self.handle_request::<_, TokioTime>(&request, reply).await;
            }
            Err(error) => {
                debug!(%error, %src, "malformed DNS query; FORMERR");
                let Ok(queries) = Queries::read(&mut BinDecoder::new(&[]), 0) else {
                    return;
                };
                let response = MessageResponseBuilder::new(&queries, None)
                    .error_msg(&header.metadata, ResponseCode::FormErr);
                let mut reply = reply;
                if let Err(error) = reply.send_response(response).await {
                    debug!(%error, %src, "cannot send a DNS FORMERR");
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let query = request.queries.queries().first();
        let qtype: &'static str = query.map_or("none", |q| q.query_type().into());
        let (mut metadata, edns, outcome) = {
            // Read once, and let go of before the send.
            let live = self.live.load();
            let health = LiveHealth {
                table: &live.table,
                now: started,
            };
            respond(
                request,
                live.zones.as_deref(),
                &health,
                NameEntry::next_turn,
            )
        };
        let response = build(request, edns.as_ref(), metadata, &outcome);
        let info = match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                debug!(%error, src = %request.src(), "cannot send a DNS answer");
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        };
        self.record(qtype, metadata.response_code, &outcome, started);
        info
    }
}

impl DnsHandler {
    fn record(
        &self,
        qtype: &'static str,
        rcode: ResponseCode,
        outcome: &Result<Answer, ResponseCode>,
        started: Instant,
    ) {
        self.metrics
            .queries
            .get_or_create(&QueryLabels {
                qtype,
                rcode: mnemonic(rcode),
            })
            .inc();
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        if let Ok(Answer {
            fail_open: Some(pool),
            ..
        }) = outcome
        {
            self.metrics
                .fail_open
                .get_or_create(&NameLabels { pool: pool.clone() })
                .inc();
        }
    }
}

/// The rcode as dig prints it (`NOERROR`, `NXDOMAIN`, ...), for metric labels.
fn mnemonic(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "OTHER",
    }
}
