//! The hickory [`RequestHandler`]: checks the message (opcode, EDNS, one question), reads the
//! live state once, asks [`answer`](super::answer::answer) and sends the result.
//!
//! It reads zones and health through the live pointer at every query (`live.load()` → the
//! zones of that generation and `table.pool(name)` → `health.load()`), so answers follow the
//! health checks and reloads with no plumbing of their own. Malformed messages whose header
//! parses are answered FORMERR by hickory's server before they get here; shorter junk gets
//! silence.

use std::net::IpAddr;
use std::time::Instant;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::Record;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tracing::debug;

use super::answer::{answer, Answer, Health, Question};
use super::metrics::{DnsMetrics, NameLabels, QueryLabels};
use super::zone::NameEntry;
use crate::live::Shared;
use crate::router::table::Table;

/// Largest UDP payload lockstep advertises and sends: the DNS flag day 2020 value, which
/// avoids IP fragmentation on common paths.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// The EDNS version lockstep speaks.
const EDNS_VERSION: u8 = 0;

/// Answers queries from the live state.
pub struct DnsHandler {
    live: Shared,
    metrics: DnsMetrics,
}

impl DnsHandler {
    /// A handler over `live`.
    pub fn new(live: Shared, metrics: DnsMetrics) -> DnsHandler {
        DnsHandler { live, metrics }
    }
}

/// Pool health read from one routing table at one instant.
struct LiveHealth<'a> {
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

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let edns = request.edns.as_ref().map(response_edns);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let query = request.queries.queries().first();
        let qtype: &'static str = query.map_or("none", |q| q.query_type().into());

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
                    let live = self.live.load();
                    match &live.dns {
                        // DNS was removed by a reload while a query was in flight.
                        None => Err(ResponseCode::Refused),
                        Some(zones) => {
                            let health = LiveHealth {
                                table: &live.table,
                                now: started,
                            };
                            let question = Question {
                                name: q.original().name(),
                                lower: q.name(),
                                qtype: q.query_type(),
                                qclass: q.query_class(),
                            };
                            Ok(answer(zones, &question, &health, NameEntry::next_turn))
                        }
                    }
                }
            }
        };

        let empty: Vec<Record> = Vec::new();
        let (answers, authorities, additionals) = match &outcome {
            Ok(a) => {
                metadata.authoritative = a.authoritative;
                metadata.response_code = a.rcode;
                (&a.answers, &a.authorities, &a.additionals)
            }
            Err(code) => {
                metadata.response_code = *code;
                (&empty, &empty, &empty)
            }
        };
        metadata.recursion_available = false;
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let response = builder.build(
            metadata,
            answers.iter(),
            authorities.iter(),
            std::iter::empty(),
            additionals.iter(),
        );
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
