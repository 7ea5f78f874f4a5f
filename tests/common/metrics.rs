//! Prometheus text as the admin listener and the agents serve it: a strict parser
//! ([`parse_metrics`]: every line must be well formed) and [`scrape`].

use std::collections::BTreeMap;
use std::net::SocketAddr;

use http::StatusCode;

use super::client::{get, HttpClient};

/// Parses the Prometheus text format: every non-comment, non-empty line must be
/// `name{labels} value` (or `name value`) with a float value. Returns series → value, the
/// series written exactly as in the text (`name{a="1",b="2"}`).
pub fn parse_metrics(text: &str) -> Result<BTreeMap<String, f64>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("line {}: no value: {line:?}", n + 1))?;
        let value: f64 = value
            .parse()
            .map_err(|_| format!("line {}: value is not a float: {line:?}", n + 1))?;
        let (name, labels) = match series.split_once('{') {
            None => (series, None),
            Some((name, rest)) => {
                let labels = rest
                    .strip_suffix('}')
                    .ok_or_else(|| format!("line {}: unclosed labels: {line:?}", n + 1))?;
                (name, Some(labels))
            }
        };
        let name_ok = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if !name_ok {
            return Err(format!("line {}: bad metric name {name:?}", n + 1));
        }
        if let Some(labels) = labels {
            for pair in split_labels(labels) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("line {}: label without `=`: {line:?}", n + 1))?;
                let k_ok =
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                let v_ok = v.len() >= 2 && v.starts_with('"') && v.ends_with('"');
                if !k_ok || !v_ok {
                    return Err(format!("line {}: bad label {pair:?}: {line:?}", n + 1));
                }
            }
        }
        out.insert(series.to_string(), value);
    }
    Ok(out)
}

/// Splits `a="1",b="x,y"` at the commas outside quotes.
fn split_labels(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

/// GETs the admin listener's `/metrics` and parses it.
pub async fn scrape(client: &HttpClient, admin: SocketAddr) -> BTreeMap<String, f64> {
    let r = get(client, admin, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK, "/metrics: {r:?}");
    match parse_metrics(&r.body) {
        Ok(m) => m,
        Err(e) => panic!("/metrics does not parse: {e}\n{}", r.body),
    }
}
