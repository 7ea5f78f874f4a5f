//! `deploy/grafana/lockstep.json`, the Grafana dashboard shipped for lockstep's Prometheus
//! metrics, checked against a running appliance: every metric a panel queries is one
//! `/metrics` serves (with the suffix its type gives it), and every label a query groups,
//! filters or names its series by is a label of that metric.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;

/// `/metrics` as metric name → (type, the label names of its series).
fn exported(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                out.entry(name.to_string()).or_default().0 = kind.to_string();
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let series = line.split_whitespace().next().unwrap_or("");
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let labels: BTreeSet<String> = labels
            .trim_end_matches('}')
            .split(',')
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_string()))
            .collect();
        // A series belongs to the metric its name extends (`_total`, `_bucket`, …).
        let base = out
            .keys()
            .filter(|m| name.starts_with(m.as_str()))
            .max_by_key(|m| m.len())
            .cloned();
        if let Some(base) = base {
            out.get_mut(&base).unwrap().1.extend(labels);
        }
    }
    out
}

/// The metric a query names (`lockstep_x_total`) → the exported metric (`lockstep_x`).
fn metric_of<'a>(
    queried: &str,
    exported: &'a BTreeMap<String, (String, BTreeSet<String>)>,
) -> Option<&'a str> {
    exported.iter().find_map(|(name, (kind, _))| {
        let ok = match kind.as_str() {
            "counter" => queried == format!("{name}_total"),
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| queried == format!("{name}{s}")),
            _ => queried == name,
        };
        ok.then_some(name.as_str())
    })
}

/// The label names an expression or legend uses: `by (a, b)`, `{a="x"}`, `{{a}}`.
fn labels_used(expr: &str, legend: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("by (") {
        let tail = &rest[i + 4..];
        let end = tail.find(')').unwrap_or(tail.len());
        out.extend(tail[..end].split(',').map(|s| s.trim().to_string()));
        rest = &tail[end..];
    }
    let mut rest = expr;
    while let Some(i) = rest.find('{') {
        let tail = &rest[i + 1..];
        let end = tail.find('}').unwrap_or(tail.len());
        for m in tail[..end].split(',') {
            if let Some((k, _)) = m.split_once('=') {
                out.insert(
                    k.trim()
                        .trim_end_matches('!')
                        .trim_end_matches('=')
                        .to_string(),
                );
            }
        }
        rest = &tail[end..];
    }
    let mut rest = legend;
    while let Some(i) = rest.find("{{") {
        let tail = &rest[i + 2..];
        let end = tail.find("}}").unwrap_or(tail.len());
        out.insert(tail[..end].trim().to_string());
        rest = &tail[end..];
    }
    // Added by Prometheus at scrape time, or by histogram_quantile.
    out.remove("instance");
    out.remove("job");
    out.remove("le");
    out.retain(|l| !l.is_empty());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_and_label_the_dashboard_queries_exists() {
    let web = DemoBackend::start("web-1").await;
    let store = tempfile::tempdir().unwrap();
    let cert = common::tls::TestCert::new(store.path(), "www.farm.test");
    // Every part on: a TLS listener, a rate-limited route, a queue, DNS, the sync hub.
    let yaml = format!(
        "listeners:\n  - {{ name: http, bind: \"127.0.0.1:0\" }}\n  - name: https\n    bind: \"127.0.0.1:0\"\n    tls:\n      certificates:\n{}\
         routes:\n  - {{ name: site, pool: www, rate_limit: {{ requests: 100 }} }}\n\
         pools:\n  - name: www\n    queue: {{ max: 10 }}\n    backends:\n{}\
         dns:\n  bind: \"127.0.0.1:0\"\n  zones:\n    - name: farm.test\n      records:\n        - {{ name: www, pool: www }}\n\
         sync:\n  bind: \"127.0.0.1:0\"\n  store: \"{}\"\n\
         admin:\n  bind: \"127.0.0.1:0\"\n",
        cert.yaml(),
        web.yaml(),
        store.path().join("hub").display()
    );
    let mut app = start(&yaml).await;
    // Traffic, a reload, an agent's report: every family gets its series.
    assert_eq!(get(&h1_client(), proxy_addr(&app), "/").await.status, 200);
    app.reload(config(&yaml)).expect("reload");
    let report = lockstep::sync::protocol::Report {
        offset_us: Some(120),
        error_us: Some(40),
        last_flip_lateness_us: Some(300),
        serve: Some("127.0.0.1:1".into()),
        ..Default::default()
    };
    app.hub()
        .expect("hub")
        .report("web-1", report)
        .expect("report");
    let dns = app.dns_addr().expect("dns");
    require_tool("dig", "bind9-dnsutils");
    let out = std::process::Command::new("dig")
        .args([
            "+short",
            "+tries=1",
            "+time=2",
            "-p",
            &dns.port().to_string(),
            "@127.0.0.1",
            "www.farm.test",
        ])
        .output();
    assert!(out.expect("dig runs").status.success());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = get(&h1_client(), app.admin_addr().unwrap(), "/metrics")
        .await
        .body;
    let exported = exported(&text);

    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/lockstep.json"),
        )
        .unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut problems = Vec::new();
    let mut queried = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or("");
            let legend = target["legendFormat"].as_str().unwrap_or("");
            let names: BTreeSet<&str> = expr
                .match_indices("lockstep_")
                .map(|(i, _)| {
                    let tail = &expr[i..];
                    let end = tail
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(tail.len());
                    &tail[..end]
                })
                .collect();
            if names.is_empty() {
                problems.push(format!(
                    "{:?}: no lockstep metric in {expr}",
                    panel["title"]
                ));
            }
            let mut labels = BTreeSet::new();
            for n in names {
                queried += 1;
                match metric_of(n, &exported) {
                    Some(m) => labels.extend(exported[m].1.iter().cloned()),
                    None => problems.push(format!("{:?}: `{n}` is not exported", panel["title"])),
                }
            }
            for l in labels_used(expr, legend) {
                if !labels.contains(&l) {
                    problems.push(format!(
                        "{:?}: label `{l}` is on none of {expr}",
                        panel["title"]
                    ));
                }
            }
        }
    }
    assert!(queried > 25, "the dashboard queries {queried} metrics");
    assert!(
        problems.is_empty(),
        "{}\n--- /metrics ---\n{text}",
        problems.join("\n")
    );
    app.shutdown(Duration::from_millis(200)).await;
}

/// The checker itself finds what is wrong: a misspelt metric, a counter without `_total`, a
/// label the metric does not have.
#[test]
fn the_checker_catches_a_wrong_name_suffix_and_label() {
    let text = "# TYPE lockstep_http_requests counter\nlockstep_http_requests_total{pool=\"www\",class=\"2xx\"} 1\n";
    let e = exported(text);
    assert_eq!(
        metric_of("lockstep_http_requests_total", &e),
        Some("lockstep_http_requests")
    );
    assert_eq!(metric_of("lockstep_http_requests", &e), None);
    assert_eq!(metric_of("lockstep_http_request_total", &e), None);
    let used = labels_used(
        "sum by (pool, backend) (rate(lockstep_http_requests_total{class=\"5xx\"}[1m]))",
        "{{pool}}",
    );
    assert_eq!(
        used,
        ["backend", "class", "pool"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    assert!(!e["lockstep_http_requests"].1.contains("backend"));
}
