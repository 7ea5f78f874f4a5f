//! instant-acme's HTTP over the one control-plane client ([`crate::net::client`]): one client
//! per origin the CA's URLs name (in practice the directory's own), trusting the CAs of
//! `acme.ca`, sending no bearer token.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use instant_acme::{BodyWrapper, BytesResponse};

use crate::net::client::{ClientTls, HttpClient, Remote};

/// Longest an exchange with the CA may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The CA's HTTP client.
pub struct AcmeHttp {
    tls: ClientTls,
    clients: Mutex<HashMap<String, HttpClient>>,
}

impl AcmeHttp {
    /// A client trusting `tls`'s CAs.
    pub fn new(tls: ClientTls) -> AcmeHttp {
        AcmeHttp {
            tls,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client of `uri`'s origin (made at first use; at most a few: the CA's own).
    fn client(&self, uri: &http::Uri) -> Result<HttpClient, instant_acme::Error> {
        let origin = match (uri.scheme_str(), uri.authority()) {
            (Some("https"), Some(a)) => format!("https://{a}"),
            _ => {
                return Err(instant_acme::Error::Str(
                    "the ACME CA named a URL that is not https://",
                ))
            }
        };
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = clients.get(&origin) {
            return Ok(c.clone());
        }
        let c = HttpClient::new(Remote::Acme, &origin, None, Some(&self.tls))
            .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
        if clients.len() < 8 {
            clients.insert(origin, c.clone());
        }
        Ok(c)
    }
}

impl instant_acme::HttpClient for AcmeHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let client = self.client(req.uri());
        Box::pin(async move {
            let client = client?;
            let (parts, body) = req.into_parts();
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            // Infallible: the body is bytes in memory.
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let body =
                (parts.method == http::Method::POST).then_some((bytes, "application/jose+json"));
            let answer = client
                .send(parts.method, &path, body, TIMEOUT)
                .await
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            let mut resp = http::Response::new(Full::new(answer.body));
            *resp.status_mut() = answer.status;
            *resp.headers_mut() = answer.headers;
            Ok(BytesResponse::from(resp))
        })
    }
}

impl std::fmt::Debug for AcmeHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AcmeHttp")
    }
}
