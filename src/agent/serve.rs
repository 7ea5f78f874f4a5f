//! Serves the active release on the agent's `serve` address (HTTP/1.1 and h2c through
//! hyper-util's auto builder): `GET`/`HEAD` of a path → the file with `Content-Type`,
//! `Content-Length`, `ETag` (the blob hash) and `304` for a matching `If-None-Match`; `/` and
//! `…/` → `index.html`; `404` otherwise, `405` for other methods. **Every** response carries
//! `X-Lockstep-Release: <id>`; with nothing active yet the answer is `503` without it.
//!
//! A request loads the active-release pointer exactly once, so its status, headers and body
//! all come from one release, whatever flips meanwhile. `/.lockstep/healthz` and
//! `/.lockstep/metrics` are the agent's own (a release's files under `.lockstep/` are shadowed).
//! Writes (`PUT`/`DELETE /content/…`) and changesets from peers (`POST /.lockstep/changesets`)
//! go to [`super::api`]. With the agent's farm certificate (`tls:`), the same port also speaks
//! TLS, told apart from plain HTTP by the first byte: peers connect with TLS and their own
//! certificates; the local web server and the proxy keep reading in plain HTTP.

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::messages::Active;
use super::metrics::{AgentMetrics, ClassLabels};
use super::release::{not_modified, Release, Resolved};
pub use crate::net::file_body::Body;
use crate::net::limit::Cap;
use crate::net::respond;
use crate::net::server::{HttpServer, ServerTls};
use crate::sync::protocol::RELEASE_HEADER;

/// Time a client may take to send a request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The prefix of the agent's own paths.
pub const OWN_PREFIX: &str = "/.lockstep/";

/// What the handler reads.
#[derive(Clone)]
pub struct ServeState {
    /// TLS for peers (the agent's farm certificate, client certificates asked for), beside
    /// plain HTTP on the same port for the local web server and the appliance's proxy.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// The release being served.
    pub active: Active,
    /// The agent's metrics.
    pub metrics: Arc<AgentMetrics>,
    /// The write and peer API (absent in tests of serving alone).
    pub api: Option<Arc<super::api::AgentApi>>,
}

/// Accepts on `listener` until `shutdown`, at most `max_connections` at once; connections are
/// spawned on `tracker` and finish their in-flight requests when it fires.
pub async fn serve(
    listener: TcpListener,
    max_connections: usize,
    state: ServeState,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut server = HttpServer::new("agent");
    server.cap = Cap::new(max_connections, state.metrics.connections.clone());
    server.settings.header_read_timeout = HEADER_READ_TIMEOUT;
    server.tls = state.tls.clone().map(|config| ServerTls {
        plaintext_too: true,
        ..ServerTls::only(config)
    });
    server
        .serve(
            listener,
            move |peer: std::net::SocketAddr, req| {
                let state = state.clone();
                let loopback = peer.ip().to_canonical().is_loopback();
                async move {
                    if let Some(api) = state.api.as_ref() {
                        if super::api::is_api(req.method(), req.uri().path()) {
                            return super::api::handle(api, req, loopback).await;
                        }
                    }
                    handle(&state, req).await
                }
            },
            shutdown,
            tracker,
        )
        .await
}

/// Answers one request from the release active when it arrived.
pub async fn handle<B>(state: &ServeState, req: Request<B>) -> Response<Body> {
    // The one load of the pointer: everything below uses this release.
    let release = state.active.load_full();
    let resp = answer(state, release.as_deref(), &req).await;
    state
        .metrics
        .requests
        .get_or_create(&ClassLabels {
            class: crate::metrics::class(resp.status().as_u16()).into(),
        })
        .inc();
    resp
}

async fn answer<B>(
    state: &ServeState,
    release: Option<&Release>,
    req: &Request<B>,
) -> Response<Body> {
    let path = req.uri().path();
    if let Some(own) = path.strip_prefix(OWN_PREFIX) {
        return own_path(state, release, own);
    }
    let Some(release) = release else {
        return text(
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            "no release is active yet: the agent is fetching one from the hub\n",
        );
    };
    let tag = Some(release.id_header());
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(tag, StatusCode::METHOD_NOT_ALLOWED, "use GET or HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let file = match release.resolve(path) {
        Resolved::File(p) => match release.file(p) {
            Some(f) => f,
            None => return text(tag, StatusCode::NOT_FOUND, "not found\n"),
        },
        Resolved::Redirect(to) => {
            let to = match req.uri().query() {
                Some(q) => format!("{to}?{q}"),
                None => to,
            };
            let mut r = text(tag, StatusCode::MOVED_PERMANENTLY, "moved\n");
            if let Ok(v) = HeaderValue::from_str(&to) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            return r;
        }
        Resolved::NotFound => return text(tag, StatusCode::NOT_FOUND, "not found\n"),
        Resolved::BadPath => return text(tag, StatusCode::BAD_REQUEST, "malformed path\n"),
    };
    let mut builder = Response::builder()
        .header(RELEASE_HEADER, release.id_header().clone())
        .header(header::ETAG, file.etag.clone());
    if not_modified(req.headers().get(header::IF_NONE_MATCH), &file.etag) {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .expect("static headers are valid");
    }
    builder = builder
        .header(header::CONTENT_TYPE, file.content_type.clone())
        .header(header::CONTENT_LENGTH, file.size);
    let body = if req.method() == Method::HEAD {
        Body::empty()
    } else if let Some(b) = &file.body {
        Body::bytes(b.clone())
    } else {
        match tokio::fs::File::open(release.blob_path(file)).await {
            Ok(f) => Body::File {
                file: f,
                remaining: file.size,
                buf: Vec::new(),
            },
            Err(e) => {
                warn!(release = %release.id().short(), blob = %file.hash.short(), error = %e, "cannot open a blob of the active release");
                return text(
                    tag,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the file cannot be read from the agent's store\n",
                );
            }
        }
    };
    builder
        .status(StatusCode::OK)
        .body(body)
        .expect("static headers are valid")
}

fn own_path(state: &ServeState, release: Option<&Release>, path: &str) -> Response<Body> {
    let tag = release.map(|r| r.id_header());
    match path {
        "healthz" => match release {
            Some(r) => text(tag, StatusCode::OK, &format!("ok active={}\n", r.id())),
            None => text(None, StatusCode::SERVICE_UNAVAILABLE, "no active release\n"),
        },
        "metrics" => {
            let mut r = text(tag, StatusCode::OK, &state.metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => text(
            tag,
            StatusCode::NOT_FOUND,
            "not found: the agent's own paths are /.lockstep/healthz and /.lockstep/metrics\n",
        ),
    }
}

fn text(release: Option<&HeaderValue>, status: StatusCode, body: &str) -> Response<Body> {
    let mut r = respond::text(status, body.to_string());
    if let Some(id) = release {
        r.headers_mut().insert(RELEASE_HEADER, id.clone());
    }
    r
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arc_swap::ArcSwapOption;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    use super::*;
    use crate::sync::manifest::{content_type, Entry, Hash, Manifest};
    use crate::sync::store::FsStore;

    fn release(store: &Arc<FsStore>, files: &[(&str, Vec<u8>)]) -> Arc<Release> {
        let mut m = BTreeMap::new();
        for (p, data) in files {
            store.write_blob(&Hash::of(data), data).unwrap();
            m.insert(
                p.to_string(),
                Entry {
                    hash: Hash::of(data),
                    size: data.len() as u64,
                    content_type: content_type(p),
                },
            );
        }
        Arc::new(Release::build(store, Manifest::new(m).unwrap()).unwrap())
    }

    async fn get(
        state: &ServeState,
        method: Method,
        uri: &str,
        inm: Option<&str>,
    ) -> (Response<()>, Bytes) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(v) = inm {
            req = req.header(header::IF_NONE_MATCH, v);
        }
        let resp = handle(state, req.body(()).unwrap()).await;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (Response::from_parts(parts, ()), bytes)
    }

    #[tokio::test]
    async fn answers_carry_the_release_and_follow_http() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).unwrap());
        let big: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        let r = release(
            &store,
            &[
                ("index.html", b"<h1>home</h1>".to_vec()),
                ("docs/index.html", b"docs".to_vec()),
                ("big.bin", big.clone()),
            ],
        );
        let state = ServeState {
            tls: None,
            active: Arc::new(ArcSwapOption::empty()),
            metrics: Arc::new(AgentMetrics::new()),
            api: None,
        };
        let (resp, _) = get(&state, Method::GET, "/", None).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().get(RELEASE_HEADER).is_none());

        state.active.store(Some(r.clone()));
        let id = r.id().to_hex();
        let (resp, body) = get(&state, Method::GET, "/", None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body, "<h1>home</h1>");
        assert_eq!(resp.headers()[RELEASE_HEADER], id.as_str());
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "13");
        let etag = resp.headers()[header::ETAG].to_str().unwrap().to_string();
        assert_eq!(etag, format!("\"{}\"", Hash::of(b"<h1>home</h1>")));

        let (resp, body) = get(&state, Method::GET, "/index.html", Some(&etag)).await;
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
        assert_eq!(resp.headers()[RELEASE_HEADER], id.as_str());
        let (resp, _) = get(&state, Method::GET, "/index.html", Some("\"other\"")).await;
        assert_eq!(resp.status(), StatusCode::OK);

        let (resp, body) = get(&state, Method::HEAD, "/big.bin", None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_LENGTH],
            (3 << 20).to_string().as_str()
        );
        assert!(body.is_empty());
        let (_, body) = get(&state, Method::GET, "/big.bin", None).await;
        assert_eq!(body.as_ref(), &big[..], "streamed from the blob store");

        let (resp, _) = get(&state, Method::GET, "/docs?x=1", None).await;
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(resp.headers()[header::LOCATION], "/docs/?x=1");
        let (resp, body) = get(&state, Method::GET, "/docs/", None).await;
        assert_eq!((resp.status(), &body[..]), (StatusCode::OK, &b"docs"[..]));

        for (method, uri, status) in [
            (Method::GET, "/missing", StatusCode::NOT_FOUND),
            (Method::POST, "/", StatusCode::METHOD_NOT_ALLOWED),
            (Method::GET, "/%zz", StatusCode::BAD_REQUEST),
            (Method::GET, "/.lockstep/healthz", StatusCode::OK),
            (Method::GET, "/.lockstep/nope", StatusCode::NOT_FOUND),
        ] {
            let (resp, _) = get(&state, method.clone(), uri, None).await;
            assert_eq!(resp.status(), status, "{method} {uri}");
            assert_eq!(
                resp.headers()[RELEASE_HEADER],
                id.as_str(),
                "{method} {uri}"
            );
        }
        let (_, body) = get(&state, Method::GET, "/.lockstep/metrics", None).await;
        let text = std::str::from_utf8(&body).unwrap();
        assert!(
            text.contains("lockstep_agent_http_requests_total{class=\"2xx\"}"),
            "{text}"
        );
    }
}
