//! The admin API's answers as types, shared by the server ([`super::api`]) and its clients
//! (`lockstep status --admin`, the status page reads the same JSON): what `/api/pools`,
//! `/api/agents`, `/api/dns` and a drain answer carry. Serialised field by field as the JSON
//! the API has always given.

use serde::{Deserialize, Serialize};

use crate::hub::fleet::FlipSkew;
use crate::sync::protocol::Fleet;

/// `GET /api/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolsView {
    /// The config generation serving.
    pub generation: u64,
    /// Every pool, in config order.
    pub pools: Vec<PoolView>,
}

/// One pool of `/api/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    /// Its name.
    pub name: String,
    /// Its balancing policy.
    pub policy: String,
    /// How many of its backends take traffic now.
    pub available: usize,
    /// Its backends, in config order.
    pub backends: Vec<BackendView>,
}

/// One backend of `/api/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    /// Its name.
    pub name: String,
    /// `ip:port`.
    pub address: String,
    /// Its weight.
    pub weight: u32,
    /// Passing its active checks (or not checked).
    pub up: bool,
    /// Ejected by passive health now.
    pub ejected: bool,
    /// Its agent reports a release behind the fleet's.
    pub behind: bool,
    /// Drained through the admin API.
    pub drained: bool,
    /// Takes traffic now.
    pub available: bool,
    /// Requests in flight to it.
    pub in_flight: u64,
}

impl BackendView {
    /// The one word `lockstep status` shows: the first reason it takes no traffic, else `up`.
    pub fn state(&self) -> &'static str {
        if self.drained {
            "drained"
        } else if !self.up {
            "DOWN"
        } else if self.ejected {
            "ejected"
        } else if self.behind {
            "behind"
        } else {
            "up"
        }
    }
}

/// `GET /api/agents`: the fleet as the sync API gives it, plus the last flip's skew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentsView {
    /// The fleet.
    #[serde(flatten)]
    pub fleet: Fleet,
    /// The skew of the last flip to the active release, once agents reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_flip_skew: Option<FlipSkew>,
}

/// One listener certificate of `GET /api/certificates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    /// The listener serving it.
    pub listener: String,
    /// Its name in metrics (first DNS name, or `certificate N`).
    pub certificate: String,
    /// The DNS names it serves.
    pub names: Vec<String>,
    /// Its notAfter, seconds since the epoch.
    pub not_after: Option<u64>,
    /// For a listener with `tls.acme`: how ordering goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeView>,
}

/// How ordering a listener's ACME certificate goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeView {
    /// Why the last order failed (none after one that succeeded).
    pub error: Option<String>,
    /// When the next order is due (the renewal, or the retry after a failure), seconds since
    /// the epoch; none before the ordering task has looked.
    pub next_order: Option<u64>,
}

/// `GET /api/dns`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsView {
    /// Queries answered.
    pub total: u64,
    /// Queries answered by type and response code.
    pub queries: Vec<QueryCount>,
    /// Answers that listed every backend because none was healthy, by pool.
    pub fail_open: Vec<FailOpenCount>,
}

/// One `qtype`/`rcode` count of `/api/dns`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QueryCount {
    /// `A`, `AAAA`, …
    pub qtype: String,
    /// `NOERROR`, `NXDOMAIN`, …
    pub rcode: String,
    /// How many.
    pub count: u64,
}

/// One pool's fail-open answers of `/api/dns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailOpenCount {
    /// The pool.
    pub pool: String,
    /// How many.
    pub count: u64,
}

/// The answer to `POST /api/pools/{pool}/backends/{name}/drain` (or `enable`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReply {
    /// The pool.
    pub pool: String,
    /// The backend.
    pub backend: String,
    /// Whether it is drained now.
    pub drained: bool,
}
impl DnsView {
    /// `GET /api/dns` from the metrics text: `lockstep_dns_queries_total{qtype,rcode}` and
    /// `lockstep_dns_fail_open_answers_total{pool}`. (prometheus-client's families cannot be
    /// listed, so the rendered text is the one place every label set appears.)
    pub fn from_metrics(metrics_text: &str) -> DnsView {
        let mut v = DnsView::default();
        for s in metrics_text.lines().filter_map(Series::parse) {
            match s.name {
                "lockstep_dns_queries_total" => {
                    v.total += s.value;
                    v.queries.push(QueryCount {
                        qtype: s.label("qtype").to_owned(),
                        rcode: s.label("rcode").to_owned(),
                        count: s.value,
                    });
                }
                "lockstep_dns_fail_open_answers_total" => {
                    v.fail_open.push(FailOpenCount {
                        pool: s.label("pool").to_owned(),
                        count: s.value,
                    });
                }
                _ => {}
            }
        }
        v
    }
}

/// One labelled counter line of the text format: `name{k="v",...} 12`.
struct Series<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: u64,
}

impl<'a> Series<'a> {
    /// `None` for lines without labels (comments, `# EOF`) and anything malformed.
    fn parse(line: &'a str) -> Option<Series<'a>> {
        let (name, mut rest) = line.split_once('{')?;
        let mut labels = Vec::new();
        loop {
            if let Some(tail) = rest.strip_prefix('}') {
                let value: f64 = tail.trim().split(' ').next()?.parse().ok()?;
                return Some(Series {
                    name,
                    labels,
                    value: value as u64,
                });
            }
            let (key, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => value.push(match chars.next()?.1 {
                        'n' => '\n',
                        c => c,
                    }),
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key, value));
            rest = after[end + 1..].trim_start_matches(',');
        }
    }

    fn label(&self, key: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| *k == key)
            .map_or("", |(_, v)| v.as_str())
    }
}
