//! `GET /status`: one self-contained HTML page for people — pools and backends with their
//! health, the sync agents with their releases, the next activation with a live countdown,
//! the last flip's skew, recent conflicts and DNS answer counts. Its script reads the JSON
//! [`super::api`] (`/api/pools`, `/api/agents`, `/api/dns`) every second and says "stale since
//! …" when the appliance stops answering.
//!
//! The page is `status.html`, embedded as is: no build step, no external resources (the
//! Content-Security-Policy lets it reach nothing but this listener), and no state here — the
//! handler only hands out the bytes.

use crate::net::respond;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// The page.
pub const PAGE: &str = include_str!("status.html");

/// What the page may load: its own inline script and style, and JSON from this listener.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// The `/status` response: the page, never cached (a reload after an upgrade gets the new one).
pub fn page() -> Response<Full<Bytes>> {
    let mut r = respond::bytes(StatusCode::OK, "text/html; charset=utf-8", PAGE);
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_html_never_cached_and_reaches_only_this_listener() {
        let r = page();
        let h = r.headers();
        assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
        assert!(h[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'"));
        assert!(PAGE.starts_with("<!doctype html>"));
        // No CDN, no fonts, no remote anything: every URL the page names is a path here.
        for external in [
            "http:", "https:", "src=\"//", "href=", "@import", "url(", "<link",
        ] {
            assert!(!PAGE.contains(external), "status.html names {external:?}");
        }
        for api in ["\"/api/pools\"", "\"/api/agents\"", "\"/api/dns\""] {
            assert!(PAGE.contains(api), "status.html does not read {api}");
        }
    }
}
