//! Observability: the access line per session and actor message tracing.

mod common;
use common::*;

/// One access line per finished session with exact counts: 2 messages / 9 payload bytes
/// client→backend, 2 messages / 5 bytes back, close 4000 by the client, no failover.
#[async_std::test]
async fn access_line_per_session_with_exact_counts() {
    let b = Backend::echo("b1").await;
    let cfg = json!({
        "listeners": [ { "name": "edge", "bind": "127.0.0.1:0",
                         "routes": [ { "path": "/chat", "pool": "chat" } ] } ],
        "pools": { "chat": { "backends": backends_json(&[&b]) } }
    });
    let gw = Gateway::start(cfg).await;
    let mut c = connect(gw.addr(), "/chat/x?y=1", &[]).await;
    assert_eq!(c.ask("abc").await, "abc");
    assert_eq!(c.whoami().await, "b1");
    let client_port = c.ws.get_ref().local_addr().unwrap().port();
    c.close(4000, "done").await;
    let _ = c.recv_close().await;
    let lines = gw.wait_access_lines(1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let f = fields(&lines[0]);
    let get = |k: &str| {
        f.get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {k}= in {lines:?}"))
    };
    assert!(get("session").parse::<u64>().is_ok(), "{lines:?}");
    assert_eq!(get("client"), format!("127.0.0.1:{client_port}"));
    assert_eq!(get("listener"), "edge");
    assert_eq!(get("route"), "/chat");
    assert_eq!(get("pool"), "chat");
    assert_eq!(get("backend"), b.addr.to_string());
    assert!(get("duration_ms").parse::<u64>().is_ok(), "{lines:?}");
    assert_eq!(get("c2b_msgs"), "2");
    assert_eq!(get("b2c_msgs"), "2");
    assert_eq!(get("c2b_bytes"), "9");
    assert_eq!(get("b2c_bytes"), "5");
    assert_eq!(get("close"), "4000");
    assert_eq!(get("closed_by"), "client");
    assert_eq!(get("failovers"), "0");
}

/// A backend-initiated close is logged as `closed_by=backend` with its code.
#[async_std::test]
async fn access_line_backend_close() {
    let b = Backend::echo("b1").await;
    let gw = Gateway::start(one_pool_config(&[&b])).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    c.send_text("close:4003:bye").await;
    assert_eq!(c.close_code().await, 4003);
    let lines = gw.wait_access_lines(1).await;
    let f = fields(&lines[0]);
    assert_eq!(
        f.get("close").map(String::as_str),
        Some("4003"),
        "{lines:?}"
    );
    assert_eq!(
        f.get("closed_by").map(String::as_str),
        Some("backend"),
        "{lines:?}"
    );
    assert_eq!(
        f.get("c2b_msgs").map(String::as_str),
        Some("1"),
        "{lines:?}"
    );
    assert_eq!(
        f.get("b2c_msgs").map(String::as_str),
        Some("0"),
        "{lines:?}"
    );
}

/// With `RUST_LOG=info,wsgate::trace=trace`, a session's request to its pool is traced as
/// `session#ID -> pool:NAME: Message`, with the same ID as the session's access line.
#[async_std::test]
async fn trace_shows_session_to_pool_message() {
    let b = Backend::echo("b1").await;
    let cfg = json!({
        "listeners": [ { "name": "public", "bind": "127.0.0.1:0",
                         "routes": [ { "path": "/", "pool": "chat" } ] } ],
        "pools": { "chat": { "backends": backends_json(&[&b]) } }
    });
    let gw = Gateway::start_with_env(cfg, &[("RUST_LOG", "info,wsgate::trace=trace")]).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    assert_eq!(c.whoami().await, "b1");
    c.close_and_wait().await;
    let access = gw.wait_access_lines(1).await;
    let id = fields(&access[0])
        .get("session")
        .cloned()
        .expect("session= in access line");
    let want = format!("session#{id} -> pool:chat: ");
    let line = gw
        .wait_log(&format!("a trace line containing {want:?}"), |l| {
            l.contains(&want)
        })
        .await;
    assert!(
        line.contains("wsgate::trace"),
        "trace target missing: {line}"
    );
    let name = word_after(&line, &want).unwrap();
    assert!(
        name.chars().next().is_some_and(|c| c.is_ascii_uppercase()),
        "message name after the receiver: {line}"
    );
}
