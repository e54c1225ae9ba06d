//! Supervision, with the binary built with `fault-injection` (request header X-Wsgate-Fault).

mod common;
use common::*;

fn config(b: &Backend) -> Value {
    json!({
        "listeners": [ { "name": "public", "bind": "127.0.0.1:0",
                         "routes": [ { "path": "/", "pool": "chat" } ] } ],
        "pools": { "chat": { "backends": backends_json(&[b]) } },
        "admin": { "bind": "127.0.0.1:0" }
    })
}

/// A pool actor that panics is restarted by the supervisor (warn `pool:chat` … `failed`,
/// then info `pool:chat restarted`); live sessions — the crashing one and another — relay
/// on throughout; new sessions work after the restart; `wsgate_actor_restarts_total` goes
/// from 0 to 1.
#[async_std::test]
async fn crashed_pool_restarted_live_sessions_continue() {
    let b = Backend::echo("b1").await;
    let gw = Gateway::start(config(&b)).await;
    assert_eq!(gw.metric("wsgate_actor_restarts_total").await, Some(0.0));
    let mut live = connect(gw.addr(), "/", &[]).await;
    assert_eq!(live.ask("before").await, "before");
    let mut crasher = connect(gw.addr(), "/", &[("X-Wsgate-Fault", "crash-pool")]).await;
    let (failed_at, _) = gw
        .logs
        .wait_line_from("pool:chat failed", 0, WAIT, |l| {
            l.contains("pool:chat") && l.contains("failed")
        })
        .await;
    gw.logs
        .wait_line_from("pool:chat restarted", failed_at, WAIT, |l| {
            l.contains("pool:chat restarted")
        })
        .await;
    assert_eq!(live.ask("after crash").await, "after crash");
    assert_eq!(crasher.ask("crasher lives").await, "crasher lives");
    let mut fresh = connect(gw.addr(), "/", &[]).await;
    assert_eq!(fresh.whoami().await, "b1");
    assert_eq!(gw.metric("wsgate_actor_restarts_total").await, Some(1.0));
    // The restarted pool still tracks sessions: ending them all is clean.
    live.close_and_wait().await;
    crasher.close_and_wait().await;
    fresh.close_and_wait().await;
    gw.wait_access_lines(3).await;
}

/// A listener actor that panics is restarted; its socket is kept, so a connect made
/// between `failed` and `restarted` is queued and served; live sessions go on.
#[async_std::test]
async fn crashed_listener_restarted_connects_queued() {
    let b = Backend::echo("b1").await;
    let gw = Gateway::start(config(&b)).await;
    let addr = gw.addr();
    let mut live = connect(addr, "/", &[]).await;
    assert_eq!(live.ask("before").await, "before");
    let mut crasher = connect(addr, "/", &[("X-Wsgate-Fault", "crash-listener")]).await;
    let (failed_at, _) = gw
        .logs
        .wait_line_from("listener:public failed", 0, WAIT, |l| {
            l.contains("listener:public") && l.contains("failed")
        })
        .await;
    // Connect at once (the restart backoff is 100 ms): it must be queued, not refused.
    let during = async {
        let mut c = connect(addr, "/", &[]).await;
        c.whoami().await
    };
    let restarted = gw
        .logs
        .wait_line_from("listener:public restarted", failed_at, WAIT, |l| {
            l.contains("listener:public restarted")
        });
    let (who, _) = futures::join!(during, restarted);
    assert_eq!(who, "b1");
    assert_eq!(live.ask("after crash").await, "after crash");
    assert_eq!(crasher.ask("crasher lives").await, "crasher lives");
    let mut fresh = connect(addr, "/", &[]).await;
    assert_eq!(fresh.whoami().await, "b1");
    assert_eq!(gw.metric("wsgate_actor_restarts_total").await, Some(1.0));
}

/// §3 row "internal failure of the session → 1011": a session that panics right after
/// relaying its first client message closes with 1011; another live session is untouched;
/// the panic is logged and counted (`wsgate_session_panics_total 1`); the process lives on;
/// every session actor stops with its session (`wsgate_session_actors` back to 0).
#[async_std::test]
async fn session_panic_closes_1011_alone() {
    let b = Backend::echo("b1").await;
    let mut gw = Gateway::start(config(&b)).await;
    let mut other = connect(gw.addr(), "/", &[]).await;
    assert_eq!(other.ask("before").await, "before");
    let mut bad = connect(gw.addr(), "/", &[("X-Wsgate-Fault", "panic")]).await;
    bad.send_text("first").await;
    let (f, _) = bad.recv_close().await;
    assert_eq!(f.map(|f| code_of(&f)), Some(1011));
    b.wait_until("the panicking session's message relayed", |c| {
        c.len() == 2 && c[1].texts().first().map(String::as_str) == Some("first")
    })
    .await;
    gw.wait_log("a warn line about the panicked session", |l| {
        l.to_ascii_lowercase().contains("warn") && l.contains("session") && l.contains("panicked")
    })
    .await;
    assert_eq!(other.ask("after panic").await, "after panic");
    let mut fresh = connect(gw.addr(), "/", &[]).await;
    assert_eq!(fresh.whoami().await, "b1");
    assert_eq!(gw.metric("wsgate_session_panics_total").await, Some(1.0));
    // The panicked session's actor stopped too; the two live sessions keep theirs.
    gw.wait_metric("wsgate_session_actors", 2.0).await;
    other.close_and_wait().await;
    fresh.close_and_wait().await;
    gw.wait_metric("wsgate_session_actors", 0.0).await;
    assert!(gw.is_running());
}
