//! The appliance's live state: the routing table, the upstream clients of each pool and each
//! listener's settings, built together from one config and swapped together on reload (the
//! DNS responder's view, [`crate::dns::view`], is built from the same generation's table).
//!
//! Readers (the proxy per request, the health checkers, the admin API) `load` the pointer once
//! and use that generation to the end of what they are doing.

use std::sync::Arc;

use arc_swap::ArcSwap;

use tokio_rustls::TlsAcceptor;

use crate::config::tls::LoadedCert;
use crate::config::{Config, Listener};
use crate::metrics::Metrics;
use crate::net::acme::AcmeState;
use crate::net::upstream::Clients;
use crate::pools::table::Table;

/// One generation of live state.
pub struct Live {
    /// The config it was built from.
    pub config: Arc<Config>,
    /// Routes, pools, backends and their health (shared with the DNS view of the generation).
    pub table: Arc<Table>,
    /// Upstream clients of each pool (same index as `table.pools`).
    pub clients: Vec<Clients>,
    /// Each listener's settings and TLS acceptor, by listener name.
    pub listeners: Vec<(Arc<Listener>, Option<TlsAcceptor>)>,
    /// Whether some pool sends the PROXY protocol (then each connection keeps the address
    /// its client connected to).
    pub sends_proxy: bool,
    /// The ACME certificates and challenge answers (one for the process, kept across
    /// generations).
    pub acme: Arc<AcmeState>,
}

impl Live {
    /// Builds generation `generation` from `config`, carrying backend state, pooled
    /// connections and the ACME state over from `previous`.
    pub fn build(
        config: Arc<Config>,
        previous: Option<&Live>,
        generation: u64,
        metrics: &Metrics,
    ) -> Live {
        let acme = previous.map(|p| p.acme.clone()).unwrap_or_default();
        let table = Arc::new(Table::build(
            &config,
            previous.map(|p| &*p.table),
            generation,
            metrics,
        ));
        let clients = config
            .pools
            .iter()
            .map(|p| {
                previous
                    .and_then(|prev| {
                        prev.config
                            .pools
                            .iter()
                            .position(|o| {
                                o.name == p.name
                                    && o.connect_timeout == p.connect_timeout
                                    && o.send_proxy == p.send_proxy
                            })
                            .and_then(|i| prev.clients.get(i).cloned())
                    })
                    .unwrap_or_else(|| Clients::new(p.connect_timeout, p.send_proxy))
            })
            .collect();
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let acceptor = l.tls.as_ref().map(|certs| {
                    let ordered = l.acme.is_some().then_some((l.name.as_str(), &acme));
                    TlsAcceptor::from(crate::net::tls::server_config(certs, l.http2_only, ordered))
                });
                (Arc::new(l.clone()), acceptor)
            })
            .collect();
        let live = Live {
            sends_proxy: config.pools.iter().any(|p| p.send_proxy.is_some()),
            config,
            table,
            clients,
            listeners,
            acme,
        };
        live.export_expiry(metrics);
        live
    }

    /// Every certificate the listeners serve: (listener, the certificate's name in metrics,
    /// the certificate), a listener's ordered (ACME) certificate before its files.
    pub fn certificates(&self) -> Vec<(String, String, Arc<LoadedCert>)> {
        let ordered = self.acme.certificates();
        let mut out = Vec::new();
        for l in &self.config.listeners {
            if let Some(c) = ordered.get(&l.name).filter(|_| l.acme.is_some()) {
                out.push((l.name.clone(), certificate_name(c, 0), c.clone()));
            }
            for (i, c) in l.tls.iter().flatten().enumerate() {
                out.push((l.name.clone(), certificate_name(c, i), Arc::new(c.clone())));
            }
        }
        out
    }

    /// Sets each certificate's expiry metric, for alerts: the series of this generation and
    /// of the certificates ordered so far only.
    pub fn export_expiry(&self, metrics: &Metrics) {
        metrics.tls_expiry.clear();
        for (listener, certificate, c) in self.certificates() {
            if let Some(t) = c.not_after {
                metrics
                    .tls_expiry
                    .get_or_create(&crate::metrics::CertLabels {
                        listener,
                        certificate,
                    })
                    .set(i64::try_from(t).unwrap_or(i64::MAX));
            }
        }
    }

    /// The settings and TLS acceptor of listener `name`.
    pub fn listener(&self, name: &str) -> Option<(Arc<Listener>, Option<TlsAcceptor>)> {
        self.listeners
            .iter()
            .find(|(l, _)| l.name == name)
            .map(|(l, a)| (l.clone(), a.clone()))
    }
}

/// How a listener's certificate is named in metrics and the admin API: its first DNS name,
/// else its place in the list.
pub fn certificate_name(c: &crate::config::tls::LoadedCert, i: usize) -> String {
    c.names
        .first()
        .cloned()
        .unwrap_or_else(|| format!("certificate {}", i + 1))
}

/// The swapped pointer to the live state.
pub type Shared = Arc<ArcSwap<Live>>;
