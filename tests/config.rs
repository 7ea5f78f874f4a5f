//! Config checking as an operator meets it: each mistake is reported at the exact line and
//! column where it was written, with a message that names the problem and the fix; every
//! semantic problem of a file is reported at once, sorted by line; and
//! `deploy/examples/lockstep.yaml` holds every key the config accepts and loads cleanly.
//!
//! Positions are 1-based. Most tests locate the expected position with [`pos_of`], which finds
//! a unique needle in the YAML text, so that the YAML stays readable and the assertion exact.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lockstep::config::{self, AccessLog, ConfigError, ConfigErrors, Pos, Target};
use lockstep::router::balance::Policy;
use lockstep::router::route::HostMatch;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Every error reported for `text` (read as `t.yaml`); panics if the config is accepted.
fn errors(text: &str) -> Vec<ConfigError> {
    match config::parse(Path::new("t.yaml"), text) {
        Ok(_) => panic!("config was accepted, expected errors:\n{text}"),
        Err(ConfigErrors(errors)) => {
            assert!(!errors.is_empty(), "ConfigErrors must never be empty");
            errors
        }
    }
}

/// The single error reported for `text`.
fn one_error(text: &str) -> ConfigError {
    let mut all = errors(text);
    assert_eq!(
        all.len(),
        1,
        "expected exactly one error, got:\n{}",
        ConfigErrors(all.clone())
    );
    all.remove(0)
}

/// 1-based line and column of `needle` in `text`; the needle must occur exactly once.
fn pos_of(text: &str, needle: &str) -> Pos {
    let mut hits = text.match_indices(needle);
    let (at, _) = hits
        .next()
        .unwrap_or_else(|| panic!("`{needle}` not in the YAML"));
    assert!(
        hits.next().is_none(),
        "`{needle}` occurs more than once in the YAML"
    );
    let before = &text[..at];
    let line = before.matches('\n').count() as u64 + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..at].chars().count() as u64 + 1;
    Pos { line, column }
}

/// Asserts that `e` is reported where `needle` is written and that its message contains each
/// of `words`.
#[track_caller]
fn assert_error(e: &ConfigError, text: &str, needle: &str, words: &[&str]) {
    let want = pos_of(text, needle);
    assert_eq!(
        e.pos, want,
        "error reported at {}:{}, expected at `{needle}` ({}:{}): {e}",
        e.pos.line, e.pos.column, want.line, want.column
    );
    for w in words {
        assert!(e.message.contains(w), "message lacks `{w}`: {}", e.message);
    }
}

/// One valid pool, appended to configs whose subject is elsewhere.
const POOL_WWW: &str = r#"
pools:
  - name: www
    backends:
      - { name: web-1, address: "127.0.0.1:8081" }
"#;

/// A self-signed certificate and its key, PEM.
fn self_signed(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

/// A config with one TLS listener using `cert` and `key` (paths written as given).
fn tls_config(cert: &Path, key: &Path) -> String {
    format!(
        r#"
listeners:
  - name: https
    bind: "127.0.0.1:8443"
    tls:
      certificates:
        - cert: "{}"
          key: "{}"
routes:
  - pool: www
{POOL_WWW}"#,
        cert.display(),
        key.display()
    )
}

// ---------------------------------------------------------------------------------------------
// Errors the YAML parser reports (the parse stops at the first)

#[test]
fn unknown_key_is_reported_at_the_key_with_the_nearest_valid_key() {
    let yaml = r#"
listeners:
  - name: http
    bnd: "127.0.0.1:8080"
"#;
    let e = one_error(yaml);
    // Line 1 is the empty line the raw string starts with.
    assert_eq!(e.pos, Pos { line: 4, column: 5 });
    assert_error(
        &e,
        yaml,
        "bnd",
        &["unknown key `bnd`", "did you mean `bind`?"],
    );
}

#[test]
fn unknown_key_far_from_any_valid_key_lists_the_valid_keys() {
    let yaml = "listeners: []\nfrobnicate: 1\n";
    let e = one_error(yaml);
    assert_error(
        &e,
        yaml,
        "frobnicate",
        &[
            "unknown key `frobnicate`",
            "listeners, routes, pools, dns, sync, admin",
        ],
    );
}

#[test]
fn unknown_key_in_a_flow_mapping_is_reported_at_the_key() {
    let yaml = r#"
pools:
  - name: www
    backends:
      - { name: web-1, adress: "127.0.0.1:8081" }
"#;
    let e = one_error(yaml);
    assert_error(
        &e,
        yaml,
        "adress",
        &["unknown key `adress`", "did you mean `address`?"],
    );
}

#[test]
fn duplicate_key_is_reported_at_the_second_occurrence() {
    let yaml = r#"
listeners:
  - name: http
    bind: "127.0.0.1:8080"
    bind: "127.0.0.1:8081"
"#;
    let e = one_error(yaml);
    assert_eq!(e.pos, Pos { line: 5, column: 5 });
    assert_error(
        &e,
        yaml,
        "bind: \"127.0.0.1:8081\"",
        &["duplicate key `bind`", "remove or merge"],
    );
}

#[test]
fn wrong_type_is_reported_at_the_value() {
    let yaml = r#"
pools:
  - name: www
    retries: many
    backends:
      - { name: web-1, address: "127.0.0.1:8081" }
"#;
    let e = one_error(yaml);
    assert_eq!(
        e.pos,
        Pos {
            line: 4,
            column: 14
        }
    );
    assert_error(&e, yaml, "many", &[]);
}

#[test]

fn wrong_type_message_names_the_value_and_what_to_write() {
    let yaml = r#"
pools:
  - name: www
    retries: many
    backends:
      - { name: web-1, address: "127.0.0.1:8081", weight: heavy }
"#;
    let e = one_error(yaml);
    assert_error(&e, yaml, "many", &["`many`", "number"]);
    assert!(
        !e.message.contains("line"),
        "position repeated in the message: {e}"
    );
    assert!(
        !e.message.contains("u32"),
        "Rust type leaked into the message: {e}"
    );
}

#[test]

fn parser_messages_do_not_repeat_the_position() {
    let yaml = r#"
pools:
  - name: www
    balance: random
    backends:
      - { name: web-1, address: "127.0.0.1:8081" }
"#;
    let e = one_error(yaml);
    assert_error(
        &e,
        yaml,
        "random",
        &[
            "`random`",
            "round_robin, weighted, least_conn, p2c_ewma, hash",
        ],
    );
    assert!(
        !e.message.contains("line"),
        "position repeated in the message: {e}"
    );

    let yaml = "listeners: 5\n";
    let e = one_error(yaml);
    assert_error(&e, yaml, "5", &[]);
    assert!(
        !e.message.contains("line"),
        "position repeated in the message: {e}"
    );
}

#[test]
fn unknown_balance_policy_lists_the_policies() {
    let yaml = r#"
pools:
  - name: www
    balance: random
    backends:
      - { name: web-1, address: "127.0.0.1:8081" }
"#;
    let e = one_error(yaml);
    assert_error(
        &e,
        yaml,
        "random",
        &[
            "`random`",
            "round_robin, weighted, least_conn, p2c_ewma, hash",
        ],
    );
}

#[test]
fn empty_file_is_a_whole_file_error_pointing_at_the_example() {
    let e = one_error("  \n\n");
    assert_eq!(e.pos, Pos::default());
    assert!(e.message.contains("empty"), "{e}");
    assert!(e.message.contains("deploy/examples/lockstep.yaml"), "{e}");
    assert_eq!(e.to_string(), format!("t.yaml: {}", e.message));
}

#[test]

fn file_of_only_comments_is_refused_like_an_empty_file() {
    let e = one_error("# listeners:\n#   - { name: http, bind: \"0.0.0.0:80\" }\n");
    assert!(e.message.contains("empty"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Durations and addresses

#[test]
fn duration_with_an_unknown_unit_is_refused_with_examples() {
    let yaml = format!(
        r#"{POOL_WWW}    health:
      interval: 2 parsecs
"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "2 parsecs",
        &[
            "health.interval",
            "`2 parsecs`",
            "write a number with a unit, like 500ms, 2s or 1m",
        ],
    );
}

#[test]
fn duration_without_a_unit_is_refused_with_the_fix() {
    let yaml = format!(
        r#"{POOL_WWW}    health:
      interval: 30
"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "30",
        &["health.interval", "`30` has no unit", "write 30s or 30ms"],
    );
}

#[test]
fn zero_duration_is_refused() {
    let yaml = format!("{POOL_WWW}    timeouts: {{ connect: 0s }}\n");
    let e = one_error(&yaml);
    assert_error(&e, &yaml, "0s", &["timeouts.connect", "longer than 0"]);
}

#[test]
fn bind_that_is_not_ip_port_is_refused_with_an_example() {
    let yaml = format!(
        r#"
listeners:
  - name: http
    bind: "localhost"
routes:
  - pool: www
{POOL_WWW}"#
    );
    let e = one_error(&yaml);
    assert_eq!(
        e.pos,
        Pos {
            line: 4,
            column: 11
        }
    );
    assert_error(
        &e,
        &yaml,
        "\"localhost\"",
        &[
            "listener bind `localhost`",
            "not an ip:port address",
            "\"0.0.0.0:80\"",
        ],
    );
}

#[test]
fn backend_address_without_port_is_refused() {
    let yaml = r#"
pools:
  - name: www
    backends:
      - name: web-1
        address: "10.0.0.1"
"#;
    let e = one_error(yaml);
    assert_error(
        &e,
        yaml,
        "\"10.0.0.1\"",
        &["backend address `10.0.0.1`", "not an ip:port address"],
    );
}

#[test]
fn admin_bind_that_is_not_ip_port_is_refused() {
    let yaml = "admin:\n  bind: \":9900\"\n";
    let e = one_error(yaml);
    assert_error(&e, yaml, "\":9900\"", &["admin bind `:9900`", "ip:port"]);
}

// ---------------------------------------------------------------------------------------------
// Names and references

#[test]
fn route_to_a_missing_pool_suggests_the_nearest_pool() {
    let yaml = format!(
        r#"
listeners:
  - {{ name: http, bind: "127.0.0.1:8080" }}
routes:
  - pool: wwww
{POOL_WWW}"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "wwww",
        &["pool `wwww`", "does not exist", "did you mean `www`?"],
    );
}

#[test]
fn route_to_a_missing_pool_lists_the_pools_when_none_is_near() {
    let yaml = format!(
        r#"
routes:
  - pool: checkout
{POOL_WWW}  - name: api
    backends:
      - {{ name: api-1, address: "127.0.0.1:8082" }}
"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "checkout",
        &["pool `checkout`", "does not exist", "pools are: api, www"],
    );
}

#[test]
fn duplicate_pool_name_is_reported_at_the_second_pool() {
    let yaml = format!(
        r#"{POOL_WWW}  - name: www
    backends:
      - {{ name: web-2, address: "127.0.0.1:8082" }}
"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "www\n    backends:\n      - { name: web-2",
        &["duplicate pool name `www`", "unique"],
    );
}

#[test]
fn duplicate_backend_name_is_reported_at_the_second_backend() {
    let yaml = r#"
pools:
  - name: www
    backends:
      - { name: web-1, address: "127.0.0.1:8081" }
      - { name: web-1, address: "127.0.0.1:8082" }
"#;
    let e = one_error(yaml);
    assert_error(
        &e,
        yaml,
        "web-1, address: \"127.0.0.1:8082\"",
        &[
            "duplicate backend name `web-1` in pool `www`",
            "unique within a pool",
        ],
    );
}

#[test]
fn duplicate_listener_name_is_reported_at_the_second_listener() {
    let yaml = format!(
        r#"
listeners:
  - {{ name: http, bind: "127.0.0.1:8080" }}
  - {{ name: http, bind: "127.0.0.1:8081" }}
routes:
  - pool: www
{POOL_WWW}"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "http, bind: \"127.0.0.1:8081\"",
        &["duplicate listener name `http`", "unique"],
    );
}

#[test]
fn two_listeners_on_one_address_are_refused_naming_both() {
    let yaml = format!(
        r#"
listeners:
  - {{ name: http, bind: "127.0.0.1:8080" }}
  - {{ name: alt, bind: "127.0.0.1:8080" }}
routes:
  - pool: www
{POOL_WWW}"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "\"127.0.0.1:8080\" }\nroutes",
        &[
            "listener `alt` binds 127.0.0.1:8080",
            "overlaps listener `http` on 127.0.0.1:8080",
            "its own port",
        ],
    );
}

#[test]

fn wildcard_and_specific_listener_on_one_port_are_refused() {
    let yaml = format!(
        r#"
listeners:
  - {{ name: all, bind: "0.0.0.0:8080" }}
  - {{ name: local, bind: "127.0.0.1:8080" }}
routes:
  - pool: www
{POOL_WWW}"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "\"127.0.0.1:8080\"",
        &["`local`", "`all`", "8080"],
    );
}

#[test]

fn admin_bind_on_a_listener_address_is_refused() {
    let yaml = format!(
        r#"
listeners:
  - {{ name: http, bind: "127.0.0.1:8080" }}
routes:
  - pool: www
{POOL_WWW}admin:
  bind: "127.0.0.1:8080"
"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "\"127.0.0.1:8080\"\n",
        &["admin", "listener `http`", "127.0.0.1:8080"],
    );
}

// ---------------------------------------------------------------------------------------------
// Pools: weights, health, hashing

#[test]
fn zero_total_weight_is_refused_at_the_pool() {
    let yaml = r#"
pools:
  - name: www
    backends:
      - { name: web-1, address: "127.0.0.1:8081", weight: 0 }
      - { name: web-2, address: "127.0.0.1:8082", weight: 0 }
"#;
    let e = one_error(yaml);
    assert_error(
        &e,
        yaml,
        "www",
        &["pool `www` has a total weight of 0", "weight ≥ 1"],
    );
}

#[test]
fn rise_zero_is_refused() {
    let yaml = format!("{POOL_WWW}    health: {{ rise: 0 }}\n");
    let e = one_error(&yaml);
    assert_error(&e, &yaml, "0 }", &["health.rise is 0", "at least 1"]);
}

#[test]
fn fall_zero_is_refused() {
    let yaml = format!("{POOL_WWW}    health:\n      fall: 0\n");
    let e = one_error(&yaml);
    assert_error(&e, &yaml, "0\n", &["health.fall is 0", "at least 1"]);
}

#[test]
fn health_path_must_be_absolute() {
    let yaml = format!("{POOL_WWW}    health: {{ path: healthz }}\n");
    let e = one_error(&yaml);
    assert_error(&e, &yaml, "healthz", &["health.path `healthz`", "/healthz"]);
}

#[test]
fn hash_balance_without_hash_key_is_refused_at_balance() {
    let yaml = r#"
pools:
  - name: www
    balance: hash
    backends:
      - { name: web-1, address: "127.0.0.1:8081" }
"#;
    let e = one_error(yaml);
    assert_error(
        &e,
        yaml,
        "hash",
        &[
            "`balance: hash` needs `hash_key:`",
            "header:NAME, cookie:NAME or client_ip",
        ],
    );
}

#[test]
fn hash_key_without_hash_balance_is_refused_at_hash_key() {
    let yaml = r#"
pools:
  - name: www
    balance: least_conn
    hash_key: "cookie:session"
    backends:
      - { name: web-1, address: "127.0.0.1:8081" }
"#;
    let e = one_error(yaml);
    assert_error(
        &e,
        yaml,
        "\"cookie:session\"",
        &["hash_key is only used with `balance: hash`", "remove it"],
    );
}

#[test]
fn unknown_hash_key_form_is_refused_with_the_forms() {
    let yaml = r#"
pools:
  - name: www
    balance: hash
    hash_key: session
    backends:
      - { name: web-1, address: "127.0.0.1:8081" }
"#;
    let e = one_error(yaml);
    assert_error(
        &e,
        yaml,
        "session",
        &[
            "hash_key `session`",
            "header:NAME, cookie:NAME or client_ip",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Listener settings and routes

#[test]
fn unknown_access_log_format_is_refused_with_the_formats() {
    let yaml = format!(
        r#"
listeners:
  - name: http
    bind: "127.0.0.1:8080"
    access_log: verbose
routes:
  - pool: www
{POOL_WWW}"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "verbose",
        &["access_log `verbose`", "off, combined or json"],
    );
}

#[test]
fn bad_trusted_proxy_entry_is_reported_at_the_entry() {
    let yaml = format!(
        r#"
listeners:
  - name: http
    bind: "127.0.0.1:8080"
    trusted_proxies: ["10.0.0.0/8", "10.0.0.0/33", "192.0.2.7"]
routes:
  - pool: www
{POOL_WWW}"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "\"10.0.0.0/33\"",
        &["trusted proxy `10.0.0.0/33`", "\"10.0.0.0/8\""],
    );
}

#[test]
fn bad_admin_allow_changes_from_entry_is_reported_at_the_entry() {
    let yaml = format!(
        r#"
listeners:
  - {{ name: http, bind: "127.0.0.1:8080" }}
routes:
  - pool: www
{POOL_WWW}
admin:
  bind: "127.0.0.1:9900"
  allow_changes_from: ["10.0.0.0/8", "ops-laptop"]
"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "\"ops-laptop\"",
        &["admin client `ops-laptop`", "not an address or CIDR"],
    );
}

#[test]
fn path_prefix_without_leading_slash_is_refused() {
    let yaml = format!("\nroutes:\n  - {{ path_prefix: \"api/\", pool: www }}\n{POOL_WWW}");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "\"api/\"",
        &["path_prefix `api/`", "must start with /"],
    );
}

#[test]
fn bad_host_wildcard_is_refused_with_the_allowed_form() {
    let yaml = format!("\nroutes:\n  - {{ host: \"*foo.test\", pool: www }}\n{POOL_WWW}");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "\"*foo.test\"",
        &["route host `*foo.test`", "leading \"*.\""],
    );
}

#[test]
fn listeners_without_routes_are_refused() {
    let yaml = format!("\nlisteners:\n  - {{ name: http, bind: \"127.0.0.1:8080\" }}\n{POOL_WWW}");
    let e = one_error(&yaml);
    assert!(e.message.contains("no routes"), "{e}");
    assert!(e.message.contains("add `routes:`"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// TLS files

#[test]
fn missing_certificate_file_is_reported_at_cert() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("missing.crt");
    let key = dir.path().join("missing.key");
    let yaml = tls_config(&cert, &key);
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        &format!("\"{}\"", cert.display()),
        &[
            "cannot read certificate",
            &cert.display().to_string(),
            "No such file",
        ],
    );
}

#[test]
fn certificate_file_without_pem_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key_pem) = self_signed(&["farm.test"]);
    let cert = dir.path().join("farm.crt");
    let key = dir.path().join("farm.key");
    std::fs::write(&cert, "this is not a certificate\n").unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let yaml = tls_config(&cert, &key);
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        &format!("\"{}\"", cert.display()),
        &[
            &cert.display().to_string(),
            "no PEM CERTIFICATE block",
            "leaf first",
        ],
    );
}

#[test]
fn certificate_with_broken_pem_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key_pem) = self_signed(&["farm.test"]);
    let cert = dir.path().join("farm.crt");
    let key = dir.path().join("farm.key");
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let yaml = tls_config(&cert, &key);
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        &format!("\"{}\"", cert.display()),
        &[&cert.display().to_string(), "not valid PEM"],
    );
}

#[test]
fn certificate_that_is_pem_but_not_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key_pem) = self_signed(&["farm.test"]);
    let cert = dir.path().join("farm.crt");
    let key = dir.path().join("farm.key");
    // Valid base64, but the DER inside is "hello world".
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let yaml = tls_config(&cert, &key);
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        &format!("\"{}\"", cert.display()),
        &[&cert.display().to_string(), "cannot be parsed"],
    );
}

#[test]
fn key_that_does_not_match_the_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, _) = self_signed(&["farm.test"]);
    let (_, other_key) = self_signed(&["other.test"]);
    let cert = dir.path().join("farm.crt");
    let key = dir.path().join("other.key");
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, other_key).unwrap();
    let yaml = tls_config(&cert, &key);
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        &format!("\"{}\"", key.display()),
        &[&format!(
            "private key {} does not belong to certificate {}",
            key.display(),
            cert.display()
        )],
    );
}

#[test]

fn key_file_problems_are_reported_at_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, _) = self_signed(&["farm.test"]);
    let cert = dir.path().join("farm.crt");
    std::fs::write(&cert, cert_pem).unwrap();

    let missing = dir.path().join("missing.key");
    let yaml = tls_config(&cert, &missing);
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        &format!("\"{}\"", missing.display()),
        &["cannot read private key", &missing.display().to_string()],
    );

    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, "not a key\n").unwrap();
    let yaml = tls_config(&cert, &garbage);
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        &format!("\"{}\"", garbage.display()),
        &["is not a PEM private key", &garbage.display().to_string()],
    );
}

#[test]
fn tls_without_certificates_is_refused() {
    let yaml = format!(
        r#"
listeners:
  - name: https
    bind: "127.0.0.1:8443"
    tls: {{ certificates: [] }}
routes:
  - pool: www
{POOL_WWW}"#
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "https",
        &[
            "listener `https` has `tls:` with no certificates",
            "certificates: [",
        ],
    );
}

#[test]
fn valid_tls_listener_loads_its_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem) = self_signed(&["farm.test", "*.farm.test"]);
    let cert = dir.path().join("farm.crt");
    let key = dir.path().join("farm.key");
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let cfg = config::parse(Path::new("t.yaml"), &tls_config(&cert, &key))
        .unwrap_or_else(|e| panic!("{e}"));
    let certs = cfg.listeners[0].tls.as_ref().expect("tls listener");
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].names, ["farm.test", "*.farm.test"]);
}

// ---------------------------------------------------------------------------------------------
// All problems at once; display

#[test]
fn every_semantic_problem_is_reported_sorted_by_line_and_column() {
    // Written so that the file order differs from the order the checks run in (listeners,
    // pools, routes, admin), and two problems share a line.
    let yaml = r#"
routes:
  - { path_prefix: "api", pool: ww }
listeners:
  - name: http
    bind: "localhost:80"
    access_log: loud
pools:
  - name: www
    backends:
      - { name: web-1, address: "10.0.0.1" }
    health: { rise: 0, fall: 0, interval: 30 }
admin:
  bind: "nowhere"
"#;
    let all = errors(yaml);
    let want: &[(&str, &str)] = &[
        ("\"api\"", "path_prefix `api` must start with /"),
        (
            "ww }",
            "pool `ww`, which does not exist: did you mean `www`?",
        ),
        ("\"localhost:80\"", "listener bind `localhost:80`"),
        ("loud", "access_log `loud`"),
        ("\"10.0.0.1\"", "backend address `10.0.0.1`"),
        ("0, fall", "health.rise is 0"),
        ("0, interval", "health.fall is 0"),
        ("30 }", "health.interval: duration `30` has no unit"),
        ("\"nowhere\"", "admin bind `nowhere`"),
    ];
    assert_eq!(
        all.len(),
        want.len(),
        "expected {} problems, got:\n{}",
        want.len(),
        ConfigErrors(all.clone())
    );
    for (e, (needle, words)) in all.iter().zip(want) {
        assert_error(e, yaml, needle, &[words]);
    }
    let positions: Vec<(u64, u64)> = all.iter().map(|e| (e.pos.line, e.pos.column)).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(
        positions, sorted,
        "errors are not sorted by line and column"
    );
}

#[test]
fn display_is_file_line_column_message_one_per_line() {
    let yaml = r#"
listeners:
  - { name: http, bind: "localhost" }
  - { name: alt, bind: "127.0.0.1:99999" }
routes:
  - pool: www
"#;
    let errs = match config::parse(Path::new("conf/lockstep.yaml"), yaml) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    assert_eq!(errs.0.len(), 3, "{errs}");
    let first = &errs.0[0];
    assert_eq!(first.file, PathBuf::from("conf/lockstep.yaml"));
    assert_eq!(
        first.to_string(),
        format!("conf/lockstep.yaml:3:25: {}", first.message),
        "display of {first:?}"
    );
    assert!(first
        .to_string()
        .starts_with("conf/lockstep.yaml:3:25: listener bind `localhost`"));
    let text = errs.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (line, e) in lines.iter().zip(&errs.0) {
        assert_eq!(
            *line,
            format!(
                "conf/lockstep.yaml:{}:{}: {}",
                e.pos.line, e.pos.column, e.message
            )
        );
    }
    assert!(
        lines[1].starts_with("conf/lockstep.yaml:4:24: listener bind `127.0.0.1:99999`"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("conf/lockstep.yaml:6:11: route to pool `www`, which does not exist"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// dns: and sync: sections

const DNS_AND_SYNC: &str = r#"
dns:
  bind: "0.0.0.0:53"
  max_answers: 4
  zones:
    - name: farm.test
      ttl: 30
      nameservers: [ns1.farm.test]
      records:
        - { name: www, pool: www }
        - { name: lb,  addresses: ["192.0.2.10", "192.0.2.11"] }
        - { name: ns1, addresses: ["192.0.2.10"] }
sync:
  bind: "127.0.0.1:7700"
  store: /var/lib/lockstep/hub
  cadence: 60s
  lead: 10s
"#;

#[test]
fn dns_and_sync_sections_of_the_design_are_accepted() {
    let yaml = format!("{POOL_WWW}{DNS_AND_SYNC}");
    let cfg = config::parse(Path::new("t.yaml"), &yaml).unwrap_or_else(|e| panic!("{e}"));
    let dns = cfg.dns.as_ref().expect("dns section kept");
    assert_eq!(dns.bind, "0.0.0.0:53".parse::<SocketAddr>().unwrap());
    assert_eq!(dns.max_answers, 4);
    assert_eq!(dns.zones.len(), 1);
    let z = &dns.zones[0];
    assert_eq!((z.name.as_str(), z.ttl), ("farm.test", 30));
    assert_eq!(z.nameservers, ["ns1.farm.test"]);
    let records: Vec<(&str, &Target)> = z
        .records
        .iter()
        .map(|r| (r.name.as_str(), &r.target))
        .collect();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        records,
        [
            ("www.farm.test", &Target::Pool("www".into())),
            (
                "lb.farm.test",
                &Target::Addresses(vec![ip("192.0.2.10"), ip("192.0.2.11")])
            ),
            ("ns1.farm.test", &Target::Addresses(vec![ip("192.0.2.10")])),
        ]
    );
    let sync = cfg.sync.as_ref().expect("sync section kept");
    assert_eq!(sync.store, Path::new("/var/lib/lockstep/hub"));
    assert_eq!(sync.cadence, std::time::Duration::from_secs(60));
    assert_eq!(sync.lead, std::time::Duration::from_secs(10));
    assert!(sync.tokens.agent.is_none() && sync.tls.is_none());
    assert_eq!(
        sync.report_expiry,
        lockstep::sync::protocol::DEFAULT_REPORT_EXPIRY
    );
}

/// Fail closed: a sync API other hosts can reach needs mutual TLS (`sync.tls.client_ca`, the
/// farm CA whose certificates name every caller); tokens are not enough, they cross the network
/// and name nobody. `check` says so at `sync.bind`'s line and column. Loopback may go without
/// (a farm of one).
#[test]
fn a_sync_api_off_loopback_without_client_certificates_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token = |name: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, "0123456789abcdef").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.display().to_string()
    };
    let (agent, publish) = (token("agent.token"), token("publish.token"));
    let ca_dir = dir.path().join("ca");
    let mut ca = lockstep::ca::Ca::init(&ca_dir, "t").unwrap();
    let hub = lockstep::sync::identity::Identity::new(lockstep::sync::identity::Kind::Hub, "lb-1")
        .unwrap();
    let x = ca
        .issue(&hub, &[], &["192.0.2.7".parse().unwrap()], 1)
        .unwrap();
    std::fs::write(dir.path().join("hub.crt"), x.cert).unwrap();
    std::fs::write(dir.path().join("hub.key"), x.key).unwrap();
    let d = dir.path().display();
    let sync = |bind: &str, extra: &str| {
        format!("{POOL_WWW}sync:\n  bind: \"{bind}\"\n  store: /var/lib/lockstep/hub\n{extra}")
    };
    let refused = |yaml: String| match config::parse(Path::new("t.yaml"), &yaml) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => e.to_string(),
    };
    let tokens = format!("  agent_token_file: {agent}\n  publish_token_file: {publish}\n");
    let server_only =
        format!("  tls:\n    certificates:\n      - {{ cert: {d}/hub.crt, key: {d}/hub.key }}\n");
    for bind in ["0.0.0.0:7700", "[::]:7700", "192.0.2.7:7700"] {
        // Nothing, both tokens, TLS without client certificates: all refused.
        for extra in ["", tokens.as_str(), server_only.as_str()] {
            let e = refused(sync(bind, extra));
            assert!(e.contains("sync.tls.client_ca is not set"), "{e}");
            assert!(e.contains("reachable from other hosts"), "{e}");
            let line = POOL_WWW.lines().count() + 2;
            assert!(
                e.starts_with(&format!("t.yaml:{line}:9:")),
                "at sync.bind: {e}"
            );
        }
    }
    let mutual = format!("{server_only}    client_ca: {d}/ca/ca.crt\n    crl: {d}/ca/crl.pem\n");
    let cfg = config::parse(Path::new("t.yaml"), &sync("0.0.0.0:7700", &mutual))
        .unwrap_or_else(|e| panic!("{e}"));
    let tls = cfg.sync.unwrap().tls.unwrap();
    assert_eq!(tls.clients.unwrap().crls.len(), 1);
    // A CRL without the CA it belongs to, or a CA file that holds no certificate: refused there.
    let e = refused(sync(
        "0.0.0.0:7700",
        &format!("{server_only}    crl: {d}/ca/crl.pem\n"),
    ));
    assert!(e.contains("sync.tls.crl needs sync.tls.client_ca"), "{e}");
    let e = refused(sync(
        "0.0.0.0:7700",
        &format!("{server_only}    client_ca: {d}/ca/crl.pem\n"),
    ));
    assert!(e.contains("holds no PEM CERTIFICATE"), "{e}");
    config::parse(Path::new("t.yaml"), &sync("127.0.0.1:7700", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    config::parse(Path::new("t.yaml"), &sync("[::1]:7700", "")).unwrap_or_else(|e| panic!("{e}"));
}

/// A `dns:` section over pool `www`, with `zone_extra` (records, indented as list items of
/// `records:`) appended to zone `farm.test`.
fn dns_yaml(zone_extra: &str) -> String {
    format!(
        r#"{POOL_WWW}
dns:
  bind: "127.0.0.1:5300"
  zones:
    - name: farm.test
      records:
        - {{ name: www, pool: www }}
{zone_extra}"#
    )
}

#[test]
fn dns_defaults_and_apex_and_full_names() {
    let yaml = dns_yaml(
        "        - { name: \"@\", addresses: [\"2001:db8::1\"] }\n        - { name: Api.Farm.Test., pool: www }\n",
    );
    let cfg = config::parse(Path::new("t.yaml"), &yaml).unwrap_or_else(|e| panic!("{e}"));
    let dns = cfg.dns.expect("dns");
    assert_eq!(dns.max_answers, config::DEFAULT_MAX_ANSWERS);
    assert_eq!(dns.zones[0].ttl, config::DEFAULT_DNS_TTL);
    assert!(dns.zones[0].nameservers.is_empty());
    let names: Vec<&str> = dns.zones[0]
        .records
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["www.farm.test", "farm.test", "api.farm.test"]);
}

#[test]
fn dns_bind_that_is_not_ip_port_is_refused() {
    let yaml = dns_yaml("").replace("\"127.0.0.1:5300\"", "\"localhost:53\"");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "\"localhost:53\"",
        &["dns bind `localhost:53`", "ip:port"],
    );
}

#[test]
fn dns_bind_on_a_listener_port_is_refused() {
    let yaml = format!(
        "listeners:\n  - {{ name: http, bind: \"127.0.0.1:5300\" }}\nroutes:\n  - pool: www\n{}",
        dns_yaml("")
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "\"127.0.0.1:5300\"\n  zones",
        &["overlaps listener `http`", "own port"],
    );
}

#[test]
fn max_answers_zero_is_refused() {
    let yaml = dns_yaml("").replace("  zones:", "  max_answers: 0\n  zones:");
    let e = one_error(&yaml);
    assert_error(&e, &yaml, "0\n", &["max_answers is 0", "at least 1"]);
}

#[test]
fn max_answers_over_what_fits_512_bytes_is_refused() {
    assert_eq!(config::MAX_ANSWERS_LIMIT, 8, "(512 - 12 - 259) / 28");
    let yaml = dns_yaml("").replace("  zones:", "  max_answers: 9\n  zones:");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "9\n",
        &[
            "dns.max_answers is 9",
            "at most 8",
            "512-byte",
            "use 8 or fewer",
        ],
    );
    let yaml = dns_yaml("").replace("  zones:", "  max_answers: 8\n  zones:");
    let cfg = config::parse(Path::new("t.yaml"), &yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.dns.unwrap().max_answers, 8);
}

#[test]
fn rrl_and_tcp_cap_defaults_and_values() {
    let cfg = config::parse(Path::new("t.yaml"), &dns_yaml("")).unwrap_or_else(|e| panic!("{e}"));
    let dns = cfg.dns.unwrap();
    assert_eq!(dns.max_tcp_connections, config::DEFAULT_MAX_TCP_CONNECTIONS);
    assert_eq!(
        dns.rrl,
        config::Rrl {
            rate_limit: config::DEFAULT_RRL_RATE,
            slip: config::DEFAULT_RRL_SLIP,
            ipv4_prefix: config::DEFAULT_RRL_IPV4_PREFIX,
            ipv6_prefix: config::DEFAULT_RRL_IPV6_PREFIX,
        }
    );
    assert!(dns.rrl.rate_limit > 0, "on by default");
    let yaml = dns_yaml("").replace(
        "  zones:",
        "  max_tcp_connections: 10\n  rrl: { rate_limit: 0, slip: 1, ipv4_prefix: 32, ipv6_prefix: 64 }\n  zones:",
    );
    let dns = config::parse(Path::new("t.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{e}"))
        .dns
        .unwrap();
    assert_eq!(dns.max_tcp_connections, 10);
    assert_eq!(
        dns.rrl,
        config::Rrl {
            rate_limit: 0,
            slip: 1,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }
    );
    // Keys left out keep their defaults.
    let yaml = dns_yaml("").replace("  zones:", "  rrl: { slip: 0 }\n  zones:");
    let rrl = config::parse(Path::new("t.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{e}"))
        .dns
        .unwrap()
        .rrl;
    assert_eq!((rrl.rate_limit, rrl.slip), (config::DEFAULT_RRL_RATE, 0));
}

#[test]
fn rrl_and_tcp_cap_values_out_of_range_are_refused_where_written() {
    let cases: [(&str, &str, &[&str]); 6] = [
        (
            "  max_tcp_connections: 0\n",
            "0\n",
            &["max_tcp_connections is 0", "at least 1"],
        ),
        (
            "  rrl: { slip: 101 }\n",
            "101",
            &["dns.rrl.slip is 101", "at most 100"],
        ),
        (
            "  rrl: { ipv4_prefix: 0 }\n",
            "0 }",
            &["dns.rrl.ipv4_prefix is 0", "1 to 32"],
        ),
        (
            "  rrl: { ipv4_prefix: 33 }\n",
            "33",
            &["dns.rrl.ipv4_prefix is 33", "1 to 32"],
        ),
        (
            "  rrl: { ipv6_prefix: 129 }\n",
            "129",
            &["dns.rrl.ipv6_prefix is 129", "1 to 128"],
        ),
        (
            "  rrl: { ipv6_prefix: 255 }\n",
            "255",
            &["dns.rrl.ipv6_prefix is 255", "1 to 128"],
        ),
    ];
    for (keys, needle, words) in cases {
        let yaml = dns_yaml("").replace("  zones:", &format!("{keys}  zones:"));
        let e = one_error(&yaml);
        assert_error(&e, &yaml, needle, words);
    }
    // A misspelt key gets the nearest one.
    let yaml = dns_yaml("").replace("  zones:", "  rrl: { rate_limt: 5 }\n  zones:");
    let e = config::parse(Path::new("t.yaml"), &yaml)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rate_limit"), "{e}");
}

#[test]
fn ttl_zero_is_refused() {
    let yaml = dns_yaml("").replace("      records:", "      ttl: 0\n      records:");
    let e = one_error(&yaml);
    assert_error(&e, &yaml, "0\n      records", &["ttl is 0", "at least 1"]);
}

#[test]
fn bad_zone_name_is_refused_with_an_example() {
    let yaml = dns_yaml("").replace("name: farm.test", "name: farm..test");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "farm..test",
        &["zone name `farm..test`", "empty label", "farm.test"],
    );

    let long = "a".repeat(64);
    let yaml = dns_yaml("").replace("name: farm.test", &format!("name: {long}.test"));
    let e = one_error(&yaml);
    assert_error(&e, &yaml, &long, &["at most 63"]);
}

#[test]
fn duplicate_zone_is_reported_at_the_second() {
    let yaml = format!("{}    - name: Farm.Test.\n", dns_yaml(""));
    let e = one_error(&yaml);
    assert_error(&e, &yaml, "Farm.Test.", &["duplicate zone `farm.test`"]);
}

#[test]
fn record_with_both_pool_and_addresses_is_refused() {
    let yaml = dns_yaml("        - { name: lb, pool: www, addresses: [\"192.0.2.1\"] }\n");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "lb,",
        &["record `lb`", "both `pool:` and `addresses:`"],
    );
}

#[test]
fn record_with_neither_pool_nor_addresses_is_refused() {
    let yaml = dns_yaml("        - { name: lb }\n");
    let e = one_error(&yaml);
    assert_error(&e, &yaml, "lb }", &["record `lb`", "neither"]);
}

#[test]
fn record_to_a_missing_pool_suggests_the_nearest() {
    let yaml = dns_yaml("        - { name: lb, pool: wwww }\n");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "wwww",
        &[
            "record to pool `wwww`, which does not exist",
            "did you mean `www`?",
        ],
    );
}

#[test]
fn bad_record_address_is_reported_at_the_address() {
    let yaml = dns_yaml("        - { name: lb, addresses: [\"192.0.2.1\", \"192.0.2.300\"] }\n");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "\"192.0.2.300\"",
        &["address `192.0.2.300` is not an IP address"],
    );
}

#[test]
fn empty_address_list_is_refused() {
    let yaml = dns_yaml("        - { name: lb, addresses: [] }\n");
    let e = one_error(&yaml);
    assert_error(&e, &yaml, "lb,", &["empty `addresses:`"]);
}

#[test]
fn duplicate_record_name_is_reported_at_the_second() {
    let yaml = dns_yaml("        - { name: WWW, addresses: [\"192.0.2.1\"] }\n");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "WWW",
        &["duplicate record `WWW` in zone `farm.test`"],
    );
}

#[test]
fn bad_record_name_and_full_name_outside_the_zone_are_refused() {
    let yaml = dns_yaml("        - { name: \"we b\", addresses: [\"192.0.2.1\"] }\n");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "\"we b\"",
        &["record name `we b`", "letters, digits"],
    );

    let yaml = dns_yaml("        - { name: www.example.com., addresses: [\"192.0.2.1\"] }\n");
    let e = one_error(&yaml);
    assert_error(&e, &yaml, "www.example.com.", &["outside zone `farm.test`"]);
}

#[test]
fn nameserver_names_are_checked() {
    let with_ns = |ns: &str| {
        dns_yaml("").replace(
            "      records:",
            &format!("      nameservers: [{ns}]\n      records:"),
        )
    };
    let yaml = with_ns("ns1");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "ns1]",
        &["not a full host name", "ns1.farm.test"],
    );

    let yaml = with_ns("\"ns_1..farm.test\"");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "\"ns_1..farm.test\"",
        &["nameserver `ns_1..farm.test`"],
    );

    // Inside the zone, the nameserver needs a record (its glue).
    let yaml = with_ns("ns2.farm.test");
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "ns2.farm.test",
        &[
            "inside zone `farm.test` but has no record",
            "{ name: ns2, addresses",
        ],
    );

    // Outside the zone it needs none.
    let yaml = with_ns("ns.provider.example");
    config::parse(Path::new("t.yaml"), &yaml).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn unknown_key_in_dns_is_refused() {
    let yaml = format!(
        "{POOL_WWW}{}",
        DNS_AND_SYNC.replace("      ttl: 30", "      tll: 30")
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "tll",
        &["unknown key `tll`", "did you mean `ttl`?"],
    );

    let yaml = format!(
        "{POOL_WWW}{}",
        DNS_AND_SYNC.replace("{ name: ns1, addresses", "{ name: ns1, adresses")
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "adresses",
        &["unknown key `adresses`", "did you mean `addresses`?"],
    );
}

#[test]
fn unknown_key_in_sync_is_refused() {
    let yaml = format!(
        "{POOL_WWW}{}",
        DNS_AND_SYNC.replace("  cadence: 60s", "  cadense: 60s")
    );
    let e = one_error(&yaml);
    assert_error(
        &e,
        &yaml,
        "cadense",
        &["unknown key `cadense`", "did you mean `cadence`?"],
    );
}

// ---------------------------------------------------------------------------------------------
// Defaults (the example's comments are checked against the same constants below)

#[test]
fn omitted_keys_take_the_documented_defaults() {
    let yaml = format!(
        r#"
listeners:
  - {{ name: http, bind: "127.0.0.1:8080" }}
routes:
  - pool: www
{POOL_WWW}    health: {{}}
"#
    );
    let cfg = config::parse(Path::new("t.yaml"), &yaml).unwrap_or_else(|e| panic!("{e}"));
    let l = &cfg.listeners[0];
    assert!(l.tls.is_none());
    assert!(l.trusted_proxies.is_empty());
    assert_eq!(l.access_log, AccessLog::Off);
    assert_eq!(l.header_read_timeout, config::DEFAULT_HEADER_READ);
    assert_eq!(l.idle_timeout, config::DEFAULT_IDLE);
    let r = &cfg.routes[0];
    assert!(r.host.is_none());
    assert_eq!(r.path_prefix, "/");
    let p = &cfg.pools[0];
    assert_eq!(p.policy, Policy::RoundRobin);
    assert!(p.hash_key.is_none());
    assert_eq!(p.backends[0].weight, 1);
    assert_eq!(
        p.backends[0].dns_address,
        "127.0.0.1".parse::<std::net::IpAddr>().unwrap()
    );
    let h = p.health.as_ref().expect("health: {} enables checks");
    assert_eq!(h.path, config::DEFAULT_HEALTH_PATH);
    assert_eq!(h.interval, config::DEFAULT_HEALTH_INTERVAL);
    assert_eq!(h.timeout, config::DEFAULT_HEALTH_TIMEOUT);
    assert_eq!(
        (h.rise, h.fall),
        (config::DEFAULT_RISE, config::DEFAULT_FALL)
    );
    assert_eq!(p.connect_timeout, config::DEFAULT_CONNECT);
    assert_eq!(p.response_timeout, config::DEFAULT_RESPONSE);
    assert_eq!(p.retries, config::DEFAULT_RETRIES);
    assert_eq!(p.passive.failures, config::DEFAULT_PASSIVE_FAILURES);
    assert_eq!(p.passive.base, config::DEFAULT_EJECTION);
    assert_eq!(p.passive.max, config::DEFAULT_MAX_EJECTION);
    assert!(cfg.admin.bind.is_none() && cfg.admin.socket.is_none());
    assert!(cfg.dns.is_none() && cfg.sync.is_none());
}

// ---------------------------------------------------------------------------------------------
// deploy/examples/lockstep.yaml

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/lockstep.yaml")
}

/// Copies the example into a temporary directory with a generated `tls/farm.crt` and
/// `tls/farm.key` beside it, as the example expects.
fn example_in_tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lockstep.yaml");
    std::fs::copy(example_path(), &cfg).unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    let (cert, key) = self_signed(&["farm.test", "*.farm.test"]);
    std::fs::write(dir.path().join("tls/farm.crt"), cert).unwrap();
    std::fs::write(dir.path().join("tls/farm.key"), key).unwrap();
    let (cert, key) = self_signed(&["hub.farm.test"]);
    std::fs::write(dir.path().join("tls/sync.crt"), cert).unwrap();
    std::fs::write(dir.path().join("tls/sync.key"), key).unwrap();
    std::fs::create_dir(dir.path().join("etcd")).unwrap();
    let (cert, key) = self_signed(&["etcd.farm.test"]);
    // Self-signed: the hub's client certificate is its own CA here (only parsed, never used).
    std::fs::write(dir.path().join("etcd/ca.crt"), &cert).unwrap();
    std::fs::write(dir.path().join("etcd/lb-1.crt"), cert).unwrap();
    std::fs::write(dir.path().join("etcd/lb-1.key"), key).unwrap();
    lockstep::ca::Ca::init(&dir.path().join("ca"), "example").unwrap();
    std::fs::write(dir.path().join("maintenance.html"), "<h1>back soon</h1>\n").unwrap();
    write_private(&dir.path().join("agent.token"), "agent-secret");
    write_private(&dir.path().join("publish.token"), "publish-secret");
    write_private(&dir.path().join("admin.token"), "admin-secret");
    lockstep::sync::sign::write_key_pair(
        &dir.path().join("publisher.key"),
        None,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    (dir, cfg)
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn sync_section_problems_are_reported_where_they_are_written() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open.token");
    std::fs::write(&open, "t").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let yaml = format!(
        "listeners:\n  - {{ name: http, bind: \"127.0.0.1:7700\" }}\nroutes:\n  - {{ pool: www }}\n\
         pools:\n  - name: www\n    backends:\n      - {{ name: a, address: \"127.0.0.1:9\" }}\n\
         sync:\n  bind: \"0.0.0.0:7700\"\n  store: /tmp/x\n  cadence: 10ms\n  lead: soon\n  \
         agent_token_file: {}\n  publish_token_file: {}\n  gc_interval: often\n  gc_grace: 10ms\n  \
         report_expiry: 0s\n  trusted_keys: [{}]\n",
        open.display(),
        dir.path().join("missing.token").display(),
        dir.path().join("missing.pub").display()
    );
    let e = config::parse(Path::new("hub.yaml"), &yaml)
        .unwrap_err()
        .to_string();
    for want in [
        "hub.yaml:10:9: sync.bind 0.0.0.0:7700 overlaps listener `http`",
        "hub.yaml:12:12: sync.cadence must be at least 100ms",
        "hub.yaml:13:9: sync.lead:",
        "hub.yaml:14:21: token file",
        "is readable by every user: `chmod 600",
        "hub.yaml:15:23: cannot read token file",
        "hub.yaml:16:16: sync.gc_interval:",
        "(0s turns collection off)",
        "hub.yaml:17:13: sync.gc_grace must be at least 1s",
        "hub.yaml:18:18: sync.report_expiry must be longer than 0",
        "hub.yaml:19:18: sync.trusted_keys: cannot read key file",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
}

#[test]
fn example_config_loads_with_its_tls_files() {
    let (_dir, path) = example_in_tempdir();
    let cfg = config::load(&path).unwrap_or_else(|e| panic!("the example is refused:\n{e}"));

    let https = cfg
        .listeners
        .iter()
        .find(|l| l.tls.is_some())
        .expect("an https listener");
    assert_eq!(https.bind, "0.0.0.0:443".parse::<SocketAddr>().unwrap());
    assert_eq!(
        https.tls.as_ref().unwrap()[0].names,
        ["farm.test", "*.farm.test"]
    );
    assert!(cfg.listeners.iter().any(|l| !l.trusted_proxies.is_empty()));
    assert!(cfg.listeners.iter().any(|l| l.access_log != AccessLog::Off));

    for want in [
        Policy::RoundRobin,
        Policy::Weighted,
        Policy::LeastConn,
        Policy::P2cEwma,
        Policy::Hash,
    ] {
        assert!(
            cfg.pools.iter().any(|p| p.policy == want),
            "no pool uses {want:?}"
        );
    }
    assert!(cfg.pools.iter().any(|p| p.hash_key.is_some()));
    assert!(cfg
        .pools
        .iter()
        .flat_map(|p| &p.backends)
        .any(|b| b.weight > 1));
    assert!(cfg
        .pools
        .iter()
        .flat_map(|p| &p.backends)
        .any(|b| b.dns_address != b.address.ip()));

    let hosts: Vec<&HostMatch> = cfg.routes.iter().filter_map(|r| r.host.as_ref()).collect();
    assert!(
        hosts.iter().any(|h| matches!(h, HostMatch::Exact(_))),
        "no exact host route: {hosts:?}"
    );
    assert!(
        hosts.iter().any(|h| matches!(h, HostMatch::Suffix(_))),
        "no wildcard host route: {hosts:?}"
    );
    assert!(
        cfg.routes.iter().any(|r| r.path_prefix != "/"),
        "no path_prefix route"
    );

    assert!(cfg.dns.is_some() && cfg.sync.is_some());
    assert_eq!(
        cfg.sync
            .as_ref()
            .and_then(|s| s.trusted_keys.as_ref())
            .map(|k| k.len()),
        Some(1)
    );
    assert!(cfg.admin.bind.is_some());
    assert_eq!(
        cfg.admin.socket.as_deref(),
        Some(Path::new("/run/lockstep/admin.sock"))
    );
}

#[test]
fn example_config_without_its_files_says_which_files_are_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lockstep.yaml");
    std::fs::copy(example_path(), &path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let errs = config::load(&path).expect_err("the TLS, token and key files are missing");
    // The listener's certificate, the maintenance page, the two token files, the trusted
    // key, the sync API's certificate, the farm CA's certificate and its directory, etcd's
    // CA, the admin token.
    assert_eq!(errs.0.len(), 10, "{errs}");
    for (e, file) in errs.0.iter().zip([
        "tls/farm.crt",
        "maintenance.html",
        "agent.token",
        "publish.token",
        "publisher.key.pub",
        "tls/sync.crt",
        "ca/ca.crt",
        "ca",
        "etcd/ca.crt",
        "admin.token",
    ]) {
        assert!(
            e.message
                .contains(&dir.path().join(file).display().to_string()),
            "{e}"
        );
    }
    let e = &errs.0[0];
    let cert_key = pos_of(&text, "cert: tls/farm.crt");
    let want = Pos {
        line: cert_key.line,
        column: cert_key.column + "cert: ".len() as u64,
    };
    assert_eq!(e.pos, want, "{e}");
    assert!(
        e.message
            .contains(&dir.path().join("tls/farm.crt").display().to_string()),
        "{e}"
    );
}

/// The `Raw*` structs of `src/config/raw.rs`: struct name → (field, type) in order.
fn raw_structs() -> BTreeMap<String, Vec<(String, String)>> {
    let src =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config/raw.rs"))
            .unwrap();
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("pub struct ") {
            let name = rest
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .next()
                .unwrap();
            if name.starts_with("Raw") {
                current = Some(name.to_string());
                out.insert(name.to_string(), Vec::new());
            }
        } else if t == "}" {
            current = None;
        } else if let (Some(s), Some(rest)) = (&current, t.strip_prefix("pub ")) {
            if let Some((field, ty)) = rest.split_once(':') {
                let ty = ty.trim().trim_end_matches(',').to_string();
                out.get_mut(s).unwrap().push((field.trim().to_string(), ty));
            }
        }
    }
    out
}

/// Names `Raw*` structs in `ty` (e.g. `Option<Vec<RawRecord>>` → `RawRecord`).
fn nested_struct<'a>(
    ty: &str,
    structs: &'a BTreeMap<String, Vec<(String, String)>>,
) -> Option<&'a str> {
    ty.split(|c: char| !c.is_alphanumeric() && c != '_')
        .find_map(|w| structs.get_key_value(w).map(|(k, _)| k.as_str()))
}

/// Records `path.field` for every field of `name` that none of `nodes` has, recursing into
/// nested structs (through sequences).
fn missing_keys(
    structs: &BTreeMap<String, Vec<(String, String)>>,
    name: &str,
    nodes: &[&serde_json::Value],
    path: &str,
    out: &mut Vec<String>,
) {
    for (field, ty) in &structs[name] {
        let here = format!("{path}{field}");
        let children: Vec<&serde_json::Value> = nodes.iter().filter_map(|n| n.get(field)).collect();
        if children.is_empty() {
            out.push(here);
            continue;
        }
        if let Some(inner) = nested_struct(ty, structs) {
            let mut items = Vec::new();
            for c in children {
                match c {
                    serde_json::Value::Array(a) => items.extend(a.iter()),
                    other => items.push(other),
                }
            }
            missing_keys(structs, inner, &items, &format!("{here}."), out);
        }
    }
}

#[test]
fn example_config_has_every_key_of_raw_rs_in_its_place() {
    let structs = raw_structs();
    assert!(
        structs.len() >= 10 && structs.contains_key("RawConfig") && structs.contains_key("RawSync"),
        "could not read the Raw* structs of src/config/raw.rs: {structs:?}"
    );
    let text = std::fs::read_to_string(example_path()).unwrap();
    let tree: serde_json::Value = serde_saphyr::from_str(&text).expect("the example is valid YAML");
    let mut missing = Vec::new();
    missing_keys(&structs, "RawConfig", &[&tree], "", &mut missing);
    assert!(
        missing.is_empty(),
        "deploy/examples/lockstep.yaml lacks: {}",
        missing.join(", ")
    );
}

/// Index of the first line of the example where `field:` is written as a key (not in a comment).
fn first_key_line(lines: &[&str], field: &str) -> Option<usize> {
    let pattern = format!("{field}:");
    lines.iter().position(|line| {
        let code = line.split(" #").next().unwrap_or("");
        !code.trim_start().starts_with('#')
            && code.match_indices(&pattern).any(|(i, _)| {
                code[..i]
                    .chars()
                    .last()
                    .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
            })
    })
}

#[test]
fn example_config_comments_every_key_where_it_first_appears() {
    let structs = raw_structs();
    let fields: BTreeSet<&str> = structs
        .values()
        .flatten()
        .map(|(f, _)| f.as_str())
        .collect();
    let text = std::fs::read_to_string(example_path()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut problems = Vec::new();
    for field in fields {
        match first_key_line(&lines, field) {
            None => problems.push(format!("`{field}:` never appears as a key")),
            Some(i) => {
                let commented = lines[i].contains(" #")
                    || (i > 0 && lines[i - 1].trim_start().starts_with('#'));
                if !commented {
                    problems.push(format!(
                        "`{field}:` first appears without a comment, line {}",
                        i + 1
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "deploy/examples/lockstep.yaml: {}",
        problems.join("; ")
    );
}

#[test]
fn example_config_documents_the_real_defaults() {
    enum Want {
        Dur(Duration),
        Num(u32),
        Text(&'static str),
    }
    let wants = [
        ("header_read", Want::Dur(config::DEFAULT_HEADER_READ)),
        ("idle", Want::Dur(config::DEFAULT_IDLE)),
        ("access_log", Want::Text("off")),
        ("path_prefix", Want::Text("\"/\"")),
        ("balance", Want::Text("round_robin")),
        ("weight", Want::Num(1)),
        ("path", Want::Text(config::DEFAULT_HEALTH_PATH)),
        ("interval", Want::Dur(config::DEFAULT_HEALTH_INTERVAL)),
        ("timeout", Want::Dur(config::DEFAULT_HEALTH_TIMEOUT)),
        ("rise", Want::Num(config::DEFAULT_RISE)),
        ("fall", Want::Num(config::DEFAULT_FALL)),
        ("connect", Want::Dur(config::DEFAULT_CONNECT)),
        ("response", Want::Dur(config::DEFAULT_RESPONSE)),
        ("retries", Want::Num(config::DEFAULT_RETRIES)),
        ("failures", Want::Num(config::DEFAULT_PASSIVE_FAILURES)),
        ("ejection", Want::Dur(config::DEFAULT_EJECTION)),
        ("max_ejection", Want::Dur(config::DEFAULT_MAX_EJECTION)),
        ("max_answers", Want::Num(config::DEFAULT_MAX_ANSWERS)),
        (
            "max_tcp_connections",
            Want::Num(config::DEFAULT_MAX_TCP_CONNECTIONS),
        ),
        ("rate_limit", Want::Num(config::DEFAULT_RRL_RATE)),
        ("slip", Want::Num(config::DEFAULT_RRL_SLIP)),
        (
            "ipv4_prefix",
            Want::Num(config::DEFAULT_RRL_IPV4_PREFIX.into()),
        ),
        (
            "ipv6_prefix",
            Want::Num(config::DEFAULT_RRL_IPV6_PREFIX.into()),
        ),
        ("ttl", Want::Num(config::DEFAULT_DNS_TTL)),
        ("max", Want::Num(config::DEFAULT_QUEUE_MAX as u32)),
        (
            "gc_interval",
            Want::Dur(lockstep::sync::gc::DEFAULT_INTERVAL),
        ),
        ("gc_grace", Want::Dur(lockstep::sync::gc::DEFAULT_GRACE)),
        (
            "report_expiry",
            Want::Dur(lockstep::sync::protocol::DEFAULT_REPORT_EXPIRY),
        ),
    ];
    let text = std::fs::read_to_string(example_path()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut problems = Vec::new();
    for (key, want) in wants {
        // `rate_limit:` of a route comes first; the one with a default is DNS's (rrl:).
        let from = match key {
            "rate_limit" => lines
                .iter()
                .position(|l| l.starts_with("dns:"))
                .unwrap_or(0),
            _ => 0,
        };
        let Some(i) = first_key_line(&lines[from..], key).map(|i| i + from) else {
            problems.push(format!("`{key}:` missing"));
            continue;
        };
        let Some(doc) = lines[i]
            .split("(default: ")
            .nth(1)
            .and_then(|r| r.split(')').next())
        else {
            problems.push(format!("line {}: `{key}:` has no `(default: ...)`", i + 1));
            continue;
        };
        let ok = match want {
            Want::Dur(d) => config::duration::parse(doc) == Ok(d),
            Want::Num(n) => doc.parse::<u32>() == Ok(n),
            Want::Text(t) => doc == t,
        };
        if !ok {
            problems.push(format!(
                "line {}: `{key}:` documents default `{doc}`, the code's differs",
                i + 1
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "deploy/examples/lockstep.yaml: {}",
        problems.join("; ")
    );
}

#[test]
fn connection_caps_are_checked_where_written() {
    let text = format!(
        "listeners:\n  - {{ name: http, bind: \"127.0.0.1:8080\", max_connections: 0 }}\n\
         routes:\n  - {{ path_prefix: \"/\", pool: www }}\n{POOL_WWW}\
         admin:\n  bind: \"127.0.0.1:9900\"\n  max_connections: 2000000\n"
    );
    let all = errors(&text);
    assert_eq!(all.len(), 2, "{}", ConfigErrors(all.clone()));
    assert_error(
        &all[0],
        &text,
        "0 }",
        &["max_connections is 0", "between 1 and", "LimitNOFILE"],
    );
    assert_error(
        &all[1],
        &text,
        "2000000",
        &["admin.max_connections", "between 1 and 1000000"],
    );

    let ok = format!(
        "listeners:\n  - {{ name: http, bind: \"127.0.0.1:8080\", max_connections: 50000 }}\n\
         routes:\n  - {{ path_prefix: \"/\", pool: www }}\n{POOL_WWW}"
    );
    let c = config::parse(Path::new("t.yaml"), &ok).expect("valid");
    assert_eq!(c.listeners[0].max_connections, 50_000);
    assert_eq!(
        c.admin.max_connections,
        lockstep::config::DEFAULT_ADMIN_MAX_CONNECTIONS
    );
}

#[test]
fn upload_quota_is_a_size_of_at_least_one_blob() {
    let text = format!(
        "sync:\n  bind: \"127.0.0.1:7700\"\n  store: /tmp/hub\n  upload_quota: 1MiB\n{POOL_WWW}"
    );
    let e = one_error(&text);
    assert_error(
        &e,
        &text,
        "1MiB",
        &["sync.upload_quota must be at least", "16GiB"],
    );
    let text = text.replace("1MiB", "20 furlongs");
    assert_error(
        &one_error(&text),
        &text,
        "20 furlongs",
        &["unknown size unit"],
    );
    let ok = text.replace("20 furlongs", "100GiB");
    let c = config::parse(Path::new("t.yaml"), &ok).expect("valid");
    assert_eq!(c.sync.expect("sync").upload_quota, 100 << 30);
}

#[test]
fn sync_cluster_names_its_etcd_and_speaks_tls_to_it_off_loopback() {
    let base = |cluster: &str| {
        format!(
            "sync:\n  bind: \"127.0.0.1:7700\"\n  store: /tmp/hub\n  cluster:\n{cluster}{POOL_WWW}"
        )
    };
    let ok = base("    etcd: [http://127.0.0.1:2379, \"http://[::1]:2379\"]\n    name: hub-a\n");
    let c = config::parse(Path::new("t.yaml"), &ok).expect("valid");
    let cluster = c.sync.expect("sync").cluster.expect("cluster");
    assert_eq!(
        cluster.endpoints,
        ["http://127.0.0.1:2379", "http://[::1]:2379"]
    );
    assert_eq!(
        (
            cluster.prefix.as_str(),
            cluster.name.as_str(),
            cluster.lease
        ),
        ("/lockstep/", "hub-a", Duration::from_secs(5))
    );

    for (cluster, needle, words) in [
        (
            "    etcd: [http://10.0.0.1:2379]\n",
            "http://10.0.0.1:2379",
            &["in clear", "sync.cluster.tls"][..],
        ),
        (
            "    etcd: [https://10.0.0.1:2379]\n",
            "https://10.0.0.1:2379",
            &["sync.cluster.tls is not set"][..],
        ),
        (
            "    etcd: [10.0.0.1:2379]\n",
            "10.0.0.1:2379",
            &["scheme"][..],
        ),
        ("    etcd: []\n", "[]", &["sync.cluster.etcd is empty"][..]),
        (
            "    etcd: [http://127.0.0.1:2379]\n    lease: 500ms\n",
            "500ms",
            &["whole seconds from 2s to 60s"][..],
        ),
        (
            "    etcd: [http://127.0.0.1:2379]\n    name: \"hub a\"\n",
            "\"hub a\"",
            &["not a hub name"][..],
        ),
        (
            "    etcd: [https://10.0.0.1:2379]\n    tls: { ca: /nonexistent/etcd-ca.crt }\n",
            "/nonexistent/etcd-ca.crt",
            &["cannot read"][..],
        ),
    ] {
        let text = base(cluster);
        assert_error(&one_error(&text), &text, needle, words);
    }
    let text = base("    etcd: [http://127.0.0.1:2379]\n    endpoints: [x]\n");
    assert!(
        errors(&text)[0].message.contains("endpoints"),
        "{:?}",
        errors(&text)
    );
}
