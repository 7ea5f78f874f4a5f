//! The one set of response helpers: plain text, JSON, the `{"error": …}` body every lockstep
//! API answers failures with, and an empty answer. Generic over the body type (anything made
//! from `Bytes`), so the admin API, the sync hub and the agent build answers alike.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};

/// `{"error": "…"}`: what every lockstep API answers a failure with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// What went wrong, worded for an operator.
    pub error: String,
}

/// An answer of `status` with `body` as `ctype`.
pub fn bytes<B: From<Bytes>>(
    status: StatusCode,
    ctype: &'static str,
    body: impl Into<Bytes>,
) -> Response<B> {
    let mut r = Response::new(B::from(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// A `text/plain` answer.
pub fn text<B: From<Bytes>>(status: StatusCode, body: impl Into<Bytes>) -> Response<B> {
    bytes(status, "text/plain; charset=utf-8", body)
}

/// A JSON answer of `value`.
pub fn json<B: From<Bytes>, T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<B> {
    match serde_json::to_vec(value) {
        Ok(body) => bytes(status, "application/json", body),
        // Only a map with non-string keys fails to serialise; lockstep's messages have none.
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer: {e}"),
        ),
    }
}

/// A JSON [`ErrorBody`] answer.
pub fn error<B: From<Bytes>>(status: StatusCode, message: impl Into<String>) -> Response<B> {
    let body = ErrorBody {
        error: message.into(),
    };
    // A struct of one string always serialises.
    let text = serde_json::to_vec(&body).unwrap_or_default();
    bytes(status, "application/json", text)
}

/// A bearer-token refusal: 401 with `WWW-Authenticate: Bearer realm="<realm>"`.
pub fn unauthorized<B: From<Bytes>>(
    realm: &'static str,
    message: impl Into<String>,
) -> Response<B> {
    let mut r = error(StatusCode::UNAUTHORIZED, message);
    let v = format!("Bearer realm=\"{realm}\"");
    if let Ok(v) = HeaderValue::from_str(&v) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// An answer without a body.
pub fn empty<B: From<Bytes>>(status: StatusCode) -> Response<B> {
    let mut r = Response::new(B::from(Bytes::new()));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[test]
    fn error_bodies_are_json_and_401_names_the_realm() {
        let r: Response<Full<Bytes>> = unauthorized("lockstep-sync", "no token");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"lockstep-sync\""
        );
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r: Response<Full<Bytes>> = json(StatusCode::OK, &ErrorBody { error: "x".into() });
        assert_eq!(r.status(), StatusCode::OK);
    }
}
