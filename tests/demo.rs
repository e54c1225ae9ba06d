//! The demo backends (examples chat_server and ticker_server, built by `cargo test`) behind
//! the real gateway with a config shaped like config.json, on ports the OS picks.

mod common;
use common::*;
use std::net::SocketAddr;
use std::process::Command;

/// Starts an example server with `--port 0` and returns it with the address it printed.
async fn start_example(bin: &str, name: &str, extra: &[&str]) -> (ChildGuard, SocketAddr) {
    let path = example_bin(bin);
    assert!(
        path.exists(),
        "{} is missing: cargo test builds examples",
        path.display()
    );
    let mut cmd = Command::new(path);
    cmd.args(["--port", "0", "--name", name])
        .args(extra)
        .env("RUST_LOG", "info");
    let child = ChildGuard::spawn(cmd);
    let marker = format!("{bin} {name} listening on ");
    let line = child
        .logs
        .wait_line(&format!("{bin} readiness"), |l| l.contains(&marker))
        .await;
    let addr = word_after(&line, &marker).unwrap().parse().unwrap();
    (child, addr)
}

/// Reads text messages as JSON until one satisfies `pred` (bounded).
async fn recv_json_until(c: &mut Client, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    within(what, WAIT, async {
        loop {
            let t = c.recv_text().await;
            let v: Value =
                serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON {t:?}: {e}"));
            if pred(&v) {
                return v;
            }
        }
    })
    .await
}

/// A chat message said by one client reaches another client in the same room, tagged with
/// the chat backend's name; ticks for a subscribed symbol stream through the gateway with
/// consecutive sequence numbers.
#[async_std::test]
async fn demo_chat_and_ticks_through_gateway() {
    let (_chat, chat_addr) = start_example("chat_server", "chat-t1", &[]).await;
    let (_ticker, ticker_addr) =
        start_example("ticker_server", "ticker-t1", &["--interval-ms", "50"]).await;
    let cfg = json!({
        "listeners": [ { "name": "public", "bind": "127.0.0.1:0", "routes": [
            { "path": "/chat", "pool": "chat" }, { "path": "/ticker", "pool": "ticker" } ] } ],
        "pools": {
            "chat": { "balance": "least_conn", "backends": [ { "address": chat_addr.to_string() } ] },
            "ticker": { "balance": "ip_hash", "backends": [ { "address": ticker_addr.to_string() } ] }
        },
        "headers": { "forwarded": true, "set": { "X-Gateway": "wsgate" } }
    });
    let gw = Gateway::start(cfg).await;

    let mut alice = connect(gw.addr(), "/chat", &[]).await;
    let mut bob = connect(gw.addr(), "/chat", &[]).await;
    for c in [&mut alice, &mut bob] {
        c.send_text(r#"{"join":"lobby"}"#).await;
        recv_json_until(c, "join acknowledged", |v| v["joined"] == "lobby").await;
    }
    alice.send_text(r#"{"say":"hello through wsgate"}"#).await;
    let got = recv_json_until(&mut bob, "bob hears alice", |v| {
        v["text"] == "hello through wsgate"
    })
    .await;
    assert_eq!(got["backend"], "chat-t1");
    assert_eq!(got["room"], "lobby");

    let mut t = connect(gw.addr(), "/ticker", &[]).await;
    t.send_text(r#"{"subscribe":["AAPL"]}"#).await;
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        let v = recv_json_until(&mut t, "an AAPL tick", |v| v["symbol"] == "AAPL").await;
        assert_eq!(v["backend"], "ticker-t1");
        seqs.push(v["seq"].as_u64().expect("numeric seq"));
    }
    assert_eq!(seqs[1], seqs[0] + 1, "{seqs:?}");
    assert_eq!(seqs[2], seqs[1] + 1, "{seqs:?}");
}
