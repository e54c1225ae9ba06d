//! `wsgate --check`: "config ok" / exit 0, or one line naming the field path / exit 1.

mod common;
use common::*;

const LISTENERS: &str = r#""listeners": [ { "name": "public", "bind": "127.0.0.1:0", "routes": [ { "path": "/chat", "pool": "chat" } ] } ]"#;

/// Runs `wsgate ARGS --config <tmp file with TEXT>`; returns (exit code, all output lines).
fn run_with_config(args: &[&str], text: &str) -> (i32, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, text).unwrap();
    let p = path.to_str().unwrap();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", p]);
    let (code, out, err) = run_wsgate(&all, dir.path());
    let lines = out
        .lines()
        .chain(err.lines())
        .map(|l| l.trim().to_string())
        .collect();
    (code, lines)
}

/// The one `config error:` line of a failed check (exit 1 asserted).
fn check_error(text: &str) -> String {
    let (code, lines) = run_with_config(&["--check"], text);
    let errors: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("config error: "))
        .collect();
    assert_eq!(
        code, 1,
        "exit code of --check on a broken config; output {lines:?}"
    );
    assert_eq!(
        errors.len(),
        1,
        "exactly one config error line; output {lines:?}"
    );
    let l = errors[0];
    l[l.find("config error: ").unwrap()..].to_string()
}

fn with_pool(pool: &str, rest: &str) -> String {
    format!(r#"{{ {LISTENERS}, "pools": {{ "chat": {pool} }} {rest} }}"#)
}

const OK_POOL: &str = r#"{ "backends": [ { "address": "127.0.0.1:8010" } ] }"#;

#[test]
fn check_valid_config_prints_config_ok() {
    let (code, lines) = run_with_config(&["--check"], &with_pool(OK_POOL, ""));
    assert_eq!(code, 0, "output {lines:?}");
    assert!(lines.iter().any(|l| l == "config ok"), "output {lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains("config error")),
        "output {lines:?}"
    );
}

#[test]
fn check_bad_backend_address_names_field() {
    let text = format!(
        "{{ {LISTENERS},\n \"pools\": {{ \"chat\": {{ \"backends\": [\n {{ \"address\": \"127.0.0.1:8010\" }},\n {{ \"address\": \"127.0.0.1:80x0\" }} ] }} }} }}"
    );
    let e = check_error(&text);
    assert!(
        e.starts_with(
            r#"config error: pools.chat.backends[1].address: invalid socket address "127.0.0.1:80x0""#
        ),
        "{e}"
    );
}

#[test]
fn check_unknown_field_names_field() {
    let e = check_error(&with_pool(
        r#"{ "balanse": "round_robin", "backends": [ { "address": "127.0.0.1:8010" } ] }"#,
        "",
    ));
    assert!(
        e.starts_with("config error: pools.chat.balanse: unknown field `balanse`"),
        "{e}"
    );
}

#[test]
fn check_bad_enum_value_names_field() {
    let e = check_error(&with_pool(
        r#"{ "balance": "fastest", "backends": [ { "address": "127.0.0.1:8010" } ] }"#,
        "",
    ));
    assert!(
        e.starts_with("config error: pools.chat.balance: unknown variant `fastest`"),
        "{e}"
    );
}

#[test]
fn check_route_to_missing_pool_names_field() {
    let text = r#"{ "listeners": [ { "bind": "127.0.0.1:0", "routes": [ { "path": "/chat", "pool": "nope" } ] } ],
                   "pools": { "chat": { "backends": [ { "address": "127.0.0.1:8010" } ] } } }"#;
    assert_eq!(
        check_error(text),
        r#"config error: listeners[0].routes[0].pool: no pool named "nope""#
    );
}

#[test]
fn check_zero_weight_names_field() {
    let e = check_error(&with_pool(
        r#"{ "backends": [ { "address": "127.0.0.1:8010", "weight": 0 } ] }"#,
        "",
    ));
    assert_eq!(
        e,
        "config error: pools.chat.backends[0].weight: weight must be at least 1"
    );
}

#[test]
fn check_zero_idle_timeout_names_field() {
    let e = check_error(&with_pool(OK_POOL, r#", "timeouts": { "idle_ms": 0 }"#));
    assert_eq!(e, "config error: timeouts.idle_ms: must be at least 1");
}

#[test]
fn check_bad_origin_names_field() {
    let e = check_error(&with_pool(
        OK_POOL,
        r#", "allowed_origins": ["localhost:8020"]"#,
    ));
    assert_eq!(
        e,
        r#"config error: allowed_origins[0]: "localhost:8020" is not an origin (scheme://host[:port])"#
    );
}

#[test]
fn check_reserved_set_header_names_field() {
    let e = check_error(&with_pool(
        OK_POOL,
        r#", "headers": { "set": { "Upgrade": "h2c" } }"#,
    ));
    assert!(e.starts_with("config error: headers.set.Upgrade: "), "{e}");
}

/// Starting (not `--check`) with a broken config prints the same one line and exits 1.
#[test]
fn start_with_broken_config_exits_1() {
    let text = with_pool(OK_POOL, r#", "timeouts": { "idle_ms": 0 }"#);
    let (code, lines) = run_with_config(&[], &text);
    assert_eq!(code, 1, "output {lines:?}");
    let errors: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("config error: "))
        .collect();
    assert_eq!(errors.len(), 1, "output {lines:?}");
    assert!(
        errors[0].ends_with("config error: timeouts.idle_ms: must be at least 1"),
        "{lines:?}"
    );
}

#[test]
fn version_prints_package_version() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run_wsgate(&["--version"], dir.path());
    assert_eq!(code, 0, "stdout {out:?} stderr {err:?}");
    assert!(
        out.contains(env!("CARGO_PKG_VERSION")),
        "stdout {out:?} stderr {err:?}"
    );
}
