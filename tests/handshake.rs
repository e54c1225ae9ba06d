//! Before-upgrade behaviour: routing, SPEC §3's HTTP statuses, subprotocols, and the
//! upstream request the gateway makes.

mod common;
use common::*;
use std::net::{IpAddr, Ipv4Addr};

fn routes_config(routes: Value, pools: Value) -> Value {
    json!({
        "listeners": [ { "name": "public", "bind": "127.0.0.1:0", "routes": routes } ],
        "pools": pools
    })
}

/// §3 row "no route → 404": an unknown path and a host-bound route with another Host get
/// 404 and never reach a backend; the matching requests (host match ignores port and case)
/// get 101.
#[async_std::test]
async fn no_route_gets_404() {
    let b = Backend::echo("b1").await;
    let cfg = routes_config(
        json!([
            { "path": "/chat", "pool": "p" },
            { "path": "/t", "pool": "p", "host": "localhost" }
        ]),
        json!({ "p": { "backends": backends_json(&[&b]) } }),
    );
    let gw = Gateway::start(cfg).await;
    let a = gw.addr();
    assert_eq!(upgrade_status(a, "/nothing", &[]).await, 404);
    assert_eq!(
        raw_request(a, &upgrade_head("/t", "elsewhere.example", &[]))
            .await
            .status,
        404
    );
    assert_eq!(b.tcp_accepts(), 0, "a 404 must not reach the backend");
    assert_eq!(
        raw_request(a, &upgrade_head("/t", "LocalHost:1234", &[]))
            .await
            .status,
        101
    );
    assert_eq!(upgrade_status(a, "/chat/room", &[]).await, 101);
    b.wait_until("two upgrades", |c| c.len() == 2).await;
    assert_eq!(b.conn(0).path, "/t");
    assert_eq!(b.conn(1).path, "/chat/room");
}

/// Route choice: the longest matching path prefix wins; at equal length a route with `host`
/// beats one without.
#[async_std::test]
async fn routing_longest_prefix_then_host() {
    let a = Backend::echo("A").await;
    let b = Backend::echo("B").await;
    let c = Backend::echo("C").await;
    let cfg = routes_config(
        json!([
            { "path": "/app", "pool": "a" },
            { "path": "/app/admin", "pool": "b" },
            { "path": "/app", "pool": "c", "host": "api.example" }
        ]),
        json!({
            "a": { "backends": backends_json(&[&a]) },
            "b": { "backends": backends_json(&[&b]) },
            "c": { "backends": backends_json(&[&c]) }
        }),
    );
    let gw = Gateway::start(cfg).await;
    let g = gw.addr();
    let cases = [
        ("/app/x", None, "A"),
        ("/app/admin/users", None, "B"),
        ("/app/x", Some("api.example:9999"), "C"),
        ("/app/admin", Some("API.example"), "B"),
    ];
    for (path, host, want) in cases {
        let headers: Vec<(&str, &str)> = host.map(|h| ("Host", h)).into_iter().collect();
        let mut cl = connect(g, path, &headers).await;
        assert_eq!(cl.whoami().await, want, "path {path} host {host:?}");
        cl.close_and_wait().await;
    }
}

/// §3 row "not an upgrade request → 426", with `Upgrade: websocket` in the answer.
#[async_std::test]
async fn plain_http_gets_426() {
    let b = Backend::echo("b1").await;
    let gw = Gateway::start(one_pool_config(&[&b])).await;
    let r = raw_request(gw.addr(), "GET /chat HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(r.status, 426);
    assert_eq!(
        r.header("upgrade")
            .map(|v| v.to_ascii_lowercase())
            .as_deref(),
        Some("websocket")
    );
    assert_eq!(b.tcp_accepts(), 0);
}

/// §3 row "malformed upgrade → 400": a missing Sec-WebSocket-Key, and version 8.
#[async_std::test]
async fn malformed_upgrade_gets_400() {
    let b = Backend::echo("b1").await;
    let gw = Gateway::start(one_pool_config(&[&b])).await;
    let no_key = "GET /chat HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
                  Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_eq!(
        raw_request(gw.addr(), no_key).await.status,
        400,
        "missing key"
    );
    let v8 = "GET /chat HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 8\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    assert_eq!(raw_request(gw.addr(), v8).await.status, 400, "version 8");
    assert_eq!(b.tcp_accepts(), 0);
}

/// §3 row "origin not allowed → 403": exact (case-insensitive) origin match; no Origin is
/// allowed (non-browser client).
#[async_std::test]
async fn disallowed_origin_gets_403() {
    let b = Backend::echo("b1").await;
    let mut cfg = one_pool_config(&[&b]);
    cfg["allowed_origins"] = json!(["http://good.example:8080"]);
    let gw = Gateway::start(cfg).await;
    let a = gw.addr();
    assert_eq!(
        upgrade_status(a, "/", &[("Origin", "http://evil.example")]).await,
        403
    );
    assert_eq!(
        upgrade_status(a, "/", &[("Origin", "http://good.example")]).await,
        403
    );
    assert_eq!(
        upgrade_status(a, "/", &[("Origin", "https://good.example:8080")]).await,
        403
    );
    assert_eq!(b.tcp_accepts(), 0);
    assert_eq!(
        upgrade_status(a, "/", &[("Origin", "HTTP://Good.Example:8080")]).await,
        101
    );
    assert_eq!(upgrade_status(a, "/", &[]).await, 101);
}

/// §3 row "over session limits → 503": `max_sessions` 2 refuses the third session while two
/// live, and admits one again after one ends.
#[async_std::test]
async fn max_sessions_gets_503() {
    let b = Backend::echo("b1").await;
    let mut cfg = one_pool_config(&[&b]);
    cfg["limits"] = json!({ "max_sessions": 2 });
    let gw = Gateway::start(cfg).await;
    let a = gw.addr();
    let mut c1 = connect(a, "/", &[]).await;
    let mut c2 = connect(a, "/", &[]).await;
    assert_eq!(c1.whoami().await, "b1");
    assert_eq!(c2.whoami().await, "b1");
    assert_eq!(upgrade_status(a, "/", &[]).await, 503);
    assert_eq!(
        b.tcp_accepts(),
        2,
        "a refused session must not reach the backend"
    );
    c1.close_and_wait().await;
    gw.wait_access_lines(1).await;
    // The slot is freed once the session has ended (bounded retry: no push signal exists).
    let mut ok = None;
    for _ in 0..50 {
        match try_connect(a, "/", &[]).await {
            Ok(c) => {
                ok = Some(c);
                break;
            }
            Err(_) => async_std::task::sleep(ms(100)).await,
        }
    }
    let mut c3 = ok.expect("a session slot must free up after a session ends");
    assert_eq!(c3.whoami().await, "b1");
}

/// `max_sessions_per_ip` 1: a second session from 127.0.0.1 gets 503, one from 127.0.0.2
/// is admitted.
#[async_std::test]
async fn max_sessions_per_ip_gets_503() {
    let b = Backend::echo("b1").await;
    let mut cfg = one_pool_config(&[&b]);
    cfg["limits"] = json!({ "max_sessions_per_ip": 1 });
    let gw = Gateway::start(cfg).await;
    let a = gw.addr();
    let mut c1 = connect(a, "/", &[]).await;
    assert_eq!(c1.whoami().await, "b1");
    assert_eq!(upgrade_status(a, "/", &[]).await, 503);
    let mut c2 = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), a, "/").await;
    assert_eq!(c2.whoami().await, "b1");
    assert_eq!(b.upgrades(), 2);
}

/// §3 row "no healthy backend / all connect attempts failed → 502": every backend refuses.
#[async_std::test]
async fn all_backends_dead_gets_502() {
    let d1 = dead_addr();
    let d2 = dead_addr();
    let cfg = json!({
        "listeners": [ { "bind": "127.0.0.1:0", "routes": [ { "path": "/", "pool": "p" } ] } ],
        "pools": { "p": { "backends": [ { "address": d1.to_string() }, { "address": d2.to_string() } ] } }
    });
    let gw = Gateway::start(cfg).await;
    assert_eq!(
        gw.listeners.keys().next().unwrap(),
        "listener-0",
        "default listener name"
    );
    assert_eq!(upgrade_status(gw.addr(), "/", &[]).await, 502);
    assert_eq!(upgrade_status(gw.addr(), "/", &[]).await, 502);
}

/// A backend that accepts TCP but never answers is a failure after `connect_ms`: 502, in
/// bounded time.
#[async_std::test]
async fn hanging_backend_gets_502_after_connect_timeout() {
    let h = Backend::start(BackendOpts::new("hang").mode(Mode::Hang)).await;
    let mut cfg = one_pool_config(&[&h]);
    cfg["timeouts"] = json!({ "connect_ms": 300 });
    let gw = Gateway::start(cfg).await;
    let t0 = std::time::Instant::now();
    assert_eq!(upgrade_status(gw.addr(), "/", &[]).await, 502);
    let took = t0.elapsed();
    assert!(
        took >= ms(250),
        "502 came before connect_ms passed: {took:?}"
    );
    assert!(took < ms(3000), "502 took {took:?} with connect_ms 300");
    assert_eq!(h.tcp_accepts(), 1);
}

/// §3 row "backend's own handshake refused → its status": a 401 is passed to the client and
/// is not retried on the other backend.
#[async_std::test]
async fn backend_401_passed_through_not_retried() {
    let r1 = Backend::start(BackendOpts::new("r1").mode(Mode::Reject(401, "no token"))).await;
    let r2 = Backend::start(BackendOpts::new("r2").mode(Mode::Reject(401, "no token"))).await;
    let gw = Gateway::start(one_pool_config(&[&r1, &r2])).await;
    let mut c = RawConn::open(gw.addr()).await;
    c.write(
        upgrade_head(
            "/secret?x=1",
            "localhost",
            &[("Authorization", "Bearer bad")],
        )
        .as_bytes(),
    )
    .await;
    let head = c.read_head().await;
    assert_eq!(head.status, 401);
    assert_eq!(
        r1.tcp_accepts() + r2.tcp_accepts(),
        1,
        "a 4xx must not be retried"
    );
    // A second request still reaches a backend: a 4xx is not a backend failure.
    assert_eq!(upgrade_status(gw.addr(), "/", &[]).await, 401);
    assert_eq!(r1.tcp_accepts() + r2.tcp_accepts(), 2);
    for r in [&r1, &r2] {
        let n = r.tcp_accepts();
        r.wait_until("every accepted request recorded", |c| c.len() == n)
            .await;
    }
    let seen: Vec<String> = r1
        .conns()
        .into_iter()
        .chain(r2.conns())
        .map(|c| c.path)
        .collect();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.contains(&"/secret?x=1".to_string()),
        "paths seen: {seen:?}"
    );
}

/// A 5xx answer to the upgrade is a backend failure: the session is retried on the other
/// backend and the client never sees it.
#[async_std::test]
async fn backend_5xx_is_retried_elsewhere() {
    let bad = Backend::start(BackendOpts::new("bad").mode(Mode::Reject(503, "busy"))).await;
    let good = Backend::echo("good").await;
    let gw = Gateway::start(one_pool_config(&[&bad, &good])).await;
    for _ in 0..2 {
        let mut c = connect(gw.addr(), "/", &[]).await;
        assert_eq!(c.whoami().await, "good");
        c.close_and_wait().await;
    }
    assert_eq!(
        bad.tcp_accepts(),
        1,
        "the 503 backend is tried once, then passively ejected"
    );
}

/// Subprotocol negotiation: the client's offer reaches the backend as sent, and the
/// backend's choice comes back to the client.
#[async_std::test]
async fn subprotocol_negotiated_by_backend() {
    let b = Backend::start(BackendOpts::new("b1").protocols(&["v2.chat", "v1.chat"])).await;
    let gw = Gateway::start(one_pool_config(&[&b])).await;
    let mut c = connect(
        gw.addr(),
        "/",
        &[("Sec-WebSocket-Protocol", "v1.chat, v2.chat")],
    )
    .await;
    assert_eq!(c.protocol().as_deref(), Some("v2.chat"));
    assert_eq!(c.whoami().await, "b1");
    let rec = b.conn(0);
    assert_eq!(rec.protocol.as_deref(), Some("v2.chat"));
    assert_eq!(
        rec.header("sec-websocket-protocol"),
        vec!["v1.chat, v2.chat"]
    );
    // Without an offer, no protocol either way.
    let c2 = connect(gw.addr(), "/", &[]).await;
    assert_eq!(c2.protocol(), None);
}

/// The upstream request: path+query unchanged; Host, Origin, Cookie, Authorization,
/// User-Agent, the protocol offer passed on; X-Forwarded-For appended to the client's value;
/// X-Forwarded-Proto/Host, X-Real-IP added; `headers.set` adds and replaces.
#[async_std::test]
async fn upstream_request_headers() {
    let b = Backend::start(BackendOpts::new("b1").protocols(&["p2"])).await;
    let mut cfg = json!({
        "listeners": [ { "name": "public", "bind": "127.0.0.1:0",
                         "routes": [ { "path": "/chat", "pool": "p" } ] } ],
        "pools": { "p": { "backends": backends_json(&[&b]) } },
        "headers": { "set": { "X-Gateway": "wsgate", "X-Team": "core" } }
    });
    cfg["allowed_origins"] = json!([]);
    let gw = Gateway::start(cfg).await;
    let mut c = connect(
        gw.addr(),
        "/chat/room%201?x=1&y=two",
        &[
            ("Host", "example.test:8080"),
            ("Origin", "http://app.example"),
            ("Cookie", "a=1; b=2"),
            ("Authorization", "Bearer tok123"),
            ("User-Agent", "wsgate-test/1.0"),
            ("Sec-WebSocket-Protocol", "p1, p2"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Team", "evil"),
        ],
    )
    .await;
    assert_eq!(c.protocol().as_deref(), Some("p2"));
    let reply: Value = serde_json::from_str(&c.ask("headers").await).unwrap();
    let h = |name: &str| -> Vec<String> {
        reply["headers"][name]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    assert_eq!(reply["path"], "/chat/room%201?x=1&y=two");
    assert_eq!(h("host"), ["example.test:8080"]);
    assert_eq!(h("origin"), ["http://app.example"]);
    assert_eq!(h("cookie"), ["a=1; b=2"]);
    assert_eq!(h("authorization"), ["Bearer tok123"]);
    assert_eq!(h("user-agent"), ["wsgate-test/1.0"]);
    assert_eq!(h("sec-websocket-protocol"), ["p1, p2"]);
    assert_eq!(h("x-forwarded-for"), ["203.0.113.9, 127.0.0.1"]);
    assert_eq!(h("x-forwarded-proto"), ["http"]);
    assert_eq!(h("x-forwarded-host"), ["example.test:8080"]);
    assert_eq!(h("x-real-ip"), ["127.0.0.1"]);
    assert_eq!(h("x-gateway"), ["wsgate"]);
    assert_eq!(
        h("x-team"),
        ["core"],
        "headers.set replaces the client's value"
    );
    assert_eq!(h("sec-websocket-version"), ["13"]);
    assert_eq!(h("upgrade").len(), 1);
}
