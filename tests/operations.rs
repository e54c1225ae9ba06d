//! Operations (SPEC §2, §3, §5, §6), end to end with the real binary on loopback:
//! reload under load (SIGHUP and `POST /reload`), broken reloads, SIGTERM with 50 clients,
//! exact `/metrics` and `/status`, `wss://` listeners and backends with a test CA, PROXY
//! protocol v1/v2, limits and slowloris, permessage-deflate through tunnel mode, and HTTP
//! pass-through with curl and headless Chromium.
//!
//! External tools (installed by `.ci/run`): `curl`, `python3` with `websockets`, `chromium`.

mod common;
mod ops_support;

use common::*;
use ops_support::*;
use std::net::{SocketAddr, SocketAddrV4};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tests whose assertions are about time (drain, handshake timeout) or that are heavy
/// (50 sessions, Chromium) run one at a time, so two cores measure the gateway, not the
/// other tests.
static SERIAL: async_std::sync::Mutex<()> = async_std::sync::Mutex::new(());

/// One listener on `/` (or `routes`) → pool `p`, admin on, `drain_ms` as given.
fn pool_cfg(backends: &[&Backend], drain_ms: u64) -> Value {
    json!({
        "listeners": [
            { "name": "public", "bind": "127.0.0.1:0", "routes": [ { "path": "/", "pool": "p" } ] }
        ],
        "pools": { "p": { "backends": backends_json(backends) } },
        "timeouts": { "drain_ms": drain_ms },
        "admin": { "bind": "127.0.0.1:0" }
    })
}

/// Replaces the gateway's config file (write + rename: the reader never sees half a file).
fn write_config_text(gw: &Gateway, text: &str) {
    let tmp = gw.config_path.with_extension("json.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &gw.config_path).unwrap();
}

fn write_config(gw: &Gateway, cfg: &Value) {
    write_config_text(gw, &serde_json::to_string_pretty(cfg).unwrap());
}

async fn admin(gw: &Gateway, method: &str, path: &str) -> (u16, String) {
    let (r, body) = http(gw.admin.expect("admin is on"), method, path, b"").await;
    (r.status, String::from_utf8_lossy(&body).into_owned())
}

async fn status_json(gw: &Gateway) -> Value {
    let (st, body) = admin(gw, "GET", "/status").await;
    assert_eq!(st, 200, "GET /status: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
}

/// Waits (bounded) until `pred` holds for every session record.
async fn wait_sessions(
    notify: &Notify,
    sessions: &[EchoSession],
    what: &str,
    d: Duration,
    pred: impl Fn(&EchoRecord) -> bool,
) {
    notify
        .wait_until(what, d, || {
            sessions.iter().all(|s| pred(&s.rec.lock().unwrap()))
        })
        .await
}

// ---------------------------------------------------------------------------------------------
// 1. Reload under load.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    Sighup,
    PostReload,
}

/// 50 sessions echo (one message every 25 ms each) on backends A and B; the config file is
/// changed to pool [A, C] and reloaded. Shown: every session keeps echoing through the reload
/// with no message lost; new sessions go to A and C, never B; B's 25 sessions keep echoing
/// during `drain_ms`, then get close 1014 (read off the wire) between drain_ms and
/// drain_ms + 1 s after the trigger; A's sessions are never closed.
async fn reload_under_load(how: Trigger) {
    let _serial = SERIAL.lock().await;
    const SESSIONS: usize = 50;
    const DRAIN_MS: u64 = 1500;
    let a = Backend::echo("A").await;
    let b = Backend::echo("B").await;
    let c = Backend::echo("C").await;
    let gw = Gateway::start(pool_cfg(&[&a, &b], DRAIN_MS)).await;
    let addr = gw.addr();
    let notify = Arc::new(Notify::new());
    let mut sessions = Vec::new();
    for i in 0..SESSIONS {
        let mut ws = ws_open(addr, &format!("/s{i}")).await;
        let name = ws.ask("whoami").await.unwrap();
        sessions.push(spawn_echo(ws, i, name, ms(25), notify.clone()));
    }
    let on = |n: &str| {
        sessions
            .iter()
            .filter(|s| s.rec.lock().unwrap().backend == n)
            .count()
    };
    assert_eq!((on("A"), on("B")), (25, 25), "round robin over A, B");
    wait_sessions(&notify, &sessions, "3 echoes on every session", WAIT, |r| {
        r.echoes.len() >= 3
    })
    .await;

    write_config(&gw, &pool_cfg(&[&a, &c], DRAIN_MS));
    let path = gw.config_path.display().to_string();
    let from = gw.logs.len();
    let t_trigger = Instant::now();
    match how {
        Trigger::Sighup => {
            gw.signal("HUP");
            gw.logs
                .wait_line_from("SIGHUP log line", from, WAIT, |l| {
                    l.contains(&format!("SIGHUP: reloading {path}"))
                })
                .await;
        }
        Trigger::PostReload => {
            let (st, body) = admin(&gw, "POST", "/reload").await;
            assert_eq!((st, body.trim()), (200, "reloaded"), "POST /reload");
        }
    }
    let (_, applied) = gw
        .logs
        .wait_line_from("reload applied", from, WAIT, |l| {
            l.contains("reload applied: ")
        })
        .await;
    assert!(
        applied.contains("1 backends removed (25 live sessions draining for 1500 ms)"),
        "{applied}"
    );
    gw.logs
        .wait_line_from("reload: PATH applied", from, WAIT, |l| {
            l.contains(&format!("reload: {path} applied"))
        })
        .await;
    let t_applied = Instant::now();
    assert!(
        gw.logs.count(|l| l.contains("reload failed")) == 0,
        "{}",
        gw.logs.dump()
    );

    // New sessions: A and C in turn, never the removed B.
    let b_upgrades = b.upgrades();
    let mut names = Vec::new();
    for i in 0..10 {
        let mut ws = ws_open(addr, "/new").await;
        names.push(ws.ask("whoami").await.unwrap());
        assert_eq!(
            ws.ask(&format!("new {i}")).await.unwrap(),
            format!("new {i}")
        );
        assert_eq!(ws.close_handshake(1000).await.unwrap(), Some(1000));
    }
    let count = |n: &str| names.iter().filter(|x| *x == n).count();
    assert_eq!((count("A"), count("C"), count("B")), (5, 5, 0), "{names:?}");
    assert_eq!(
        b.upgrades(),
        b_upgrades,
        "the removed backend got a new session"
    );
    assert_eq!(c.upgrades(), 5);

    // B's sessions drain: they keep echoing, then get 1014 once drain_ms has passed.
    wait_sessions(
        &notify,
        &sessions,
        "B's sessions closed after drain_ms",
        ms(DRAIN_MS + 5000),
        |r| r.backend != "B" || r.closed.is_some() || r.error.is_some(),
    )
    .await;
    let mut b_closes = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        let r = s.rec.lock().unwrap().clone();
        if r.backend != "B" {
            continue;
        }
        assert_eq!(r.error, None, "B session {i}");
        let (code, at) = r.closed.unwrap();
        assert_eq!(code, Some(1014), "B session {i} close code");
        let after = at - t_trigger;
        b_closes.push(after);
        assert!(
            after >= ms(DRAIN_MS),
            "B session {i} closed {after:?} after the reload, before drain_ms"
        );
        assert!(
            after <= (t_applied - t_trigger) + ms(DRAIN_MS + 1000),
            "B session {i} closed {after:?} after the reload"
        );
        let last = *r.echoes.last().unwrap() - t_trigger;
        assert!(
            last >= ms(DRAIN_MS - 300),
            "B session {i} stopped echoing {last:?} after the reload (drain_ms {DRAIN_MS})"
        );
        assert!(r.echoes.iter().any(|t| *t > t_applied));
        assert!(r.sent - r.echoes.len() as u64 <= 1, "B session {i}: {r:?}");
    }
    let b_done = t_trigger + *b_closes.iter().max().unwrap();

    // A's sessions never noticed anything: they echo on after B's are gone.
    wait_sessions(
        &notify,
        &sessions,
        "A sessions echo after the drain",
        WAIT,
        |r| r.backend != "A" || r.echoes.iter().filter(|t| **t > b_done).count() >= 3,
    )
    .await;
    let mut a_echoes = 0;
    for s in &sessions {
        if s.rec.lock().unwrap().backend == "A" {
            s.stop.store(true, Ordering::SeqCst);
        }
    }
    for (i, s) in sessions.into_iter().enumerate() {
        within("echo task ends", WAIT, s.task).await;
        let r = s.rec.lock().unwrap().clone();
        if r.backend == "A" {
            assert_eq!(r.error, None, "A session {i}");
            assert_eq!(r.closed, None, "A session {i} was closed by the gateway");
            assert_eq!(r.close_reply, Some(Some(1000)), "A session {i}");
            assert_eq!(
                r.sent,
                r.echoes.len() as u64,
                "A session {i} lost a message"
            );
            a_echoes += r.echoes.len();
        }
    }
    let lines = gw.wait_access_lines(SESSIONS + 10).await;
    let lost: Vec<&String> = lines
        .iter()
        .filter(|l| fields(l)["backend"] == b.addr.to_string())
        .collect();
    assert_eq!(lost.len(), 25);
    for l in lost {
        let f = fields(l);
        assert_eq!(
            (f["close"].as_str(), f["closed_by"].as_str()),
            ("1014", "gateway"),
            "{l}"
        );
    }
    b.wait_until("B's connections end", |c| c.iter().all(|c| c.ended))
        .await;
    eprintln!(
        "reload via {how:?}: applied {:?} after the trigger; B's 1014s at {:?}..{:?} \
         (drain_ms {DRAIN_MS}); {a_echoes} echoes on A's sessions, none lost",
        t_applied - t_trigger,
        b_closes.iter().min().unwrap(),
        b_closes.iter().max().unwrap()
    );
}

#[async_std::test]
async fn reload_by_sighup_adds_and_drains_backends_under_50_sessions() {
    reload_under_load(Trigger::Sighup).await;
}

#[async_std::test]
async fn reload_by_post_adds_and_drains_backends_under_50_sessions() {
    reload_under_load(Trigger::PostReload).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Broken reloads.

/// An invalid file (bad field, JSON syntax error, unknown field) is refused by `POST /reload`
/// (400 + the error line) and by SIGHUP (logged); the running config keeps serving: live
/// sessions, new sessions, routes and `config_loaded_at_unix` are unchanged. A good file
/// afterwards still applies.
#[async_std::test]
async fn broken_reload_is_refused_and_the_old_config_keeps_serving() {
    let a = Backend::echo("A").await;
    let b = Backend::echo("B").await;
    let mut cfg = pool_cfg(&[&a], 1000);
    cfg["listeners"][0]["routes"] = json!([{ "path": "/app", "pool": "p" }]);
    let gw = Gateway::start(cfg.clone()).await;
    let addr = gw.addr();
    let mut live = ws_open(addr, "/app/live").await;
    assert_eq!(live.ask("whoami").await.unwrap(), "A");
    let loaded_at = status_json(&gw).await["config_loaded_at_unix"].clone();
    assert!(loaded_at.as_u64().is_some(), "{loaded_at}");

    // A bad address, and the routes changed: nothing of it may apply.
    let mut broken = cfg.clone();
    broken["pools"]["p"]["backends"] = json!([{ "address": "127.0.0.1:80x0" }]);
    broken["listeners"][0]["routes"] = json!([{ "path": "/other", "pool": "p" }]);
    write_config(&gw, &broken);
    let from = gw.logs.len();
    let (st, body) = admin(&gw, "POST", "/reload").await;
    assert_eq!(st, 400, "POST /reload of a broken file: {body}");
    let err = body.trim_end_matches('\n');
    assert!(!err.contains('\n'), "one error line: {body:?}");
    assert!(
        err.starts_with(
            "config error: pools.p.backends[0].address: invalid socket address \"127.0.0.1:80x0\""
        ),
        "{err}"
    );
    let (_, logged) = gw
        .logs
        .wait_line_from("reload failed line", from, WAIT, |l| {
            l.contains("reload failed, the running config stays: config error: ")
        })
        .await;
    assert!(
        logged.ends_with(&format!("reload failed, the running config stays: {err}")),
        "log {logged:?} vs answer {err:?}"
    );

    // A JSON syntax error, by SIGHUP.
    write_config_text(&gw, "{ \"listeners\": [ ");
    let from = gw.logs.len();
    gw.signal("HUP");
    gw.logs
        .wait_line_from("SIGHUP line", from, WAIT, |l| {
            l.contains("SIGHUP: reloading ")
        })
        .await;
    let (_, logged) = gw
        .logs
        .wait_line_from("reload failed after SIGHUP", from, WAIT, |l| {
            l.contains("reload failed, the running config stays: config error: ")
        })
        .await;
    eprintln!("syntax error reload: {logged}");

    // An unknown field (a typo), by POST.
    let mut typo = cfg.clone();
    typo["pools"]["p"]["balanse"] = json!("least_conn");
    write_config(&gw, &typo);
    let from = gw.logs.len();
    let (st, body) = admin(&gw, "POST", "/reload").await;
    assert_eq!(st, 400, "{body}");
    assert!(
        body.starts_with("config error: pools.p.balanse: unknown field `balanse`"),
        "{body}"
    );
    // The gateway logs before it answers, but stderr reaches the test through a reader
    // thread: wait for the line rather than count what has been read so far.
    gw.logs
        .wait_line_from("reload failed after the typo", from, WAIT, |l| {
            l.contains("reload failed, the running config stays: config error: pools.p.balanse")
        })
        .await;

    assert_eq!(gw.logs.count(|l| l.contains("reload applied")), 0);
    assert_eq!(
        gw.logs
            .count(|l| l.contains("reload failed, the running config stays: config error: ")),
        3
    );
    // The old config serves on: the live session, new sessions on /app, no /other route.
    assert_eq!(live.ask("still here").await.unwrap(), "still here");
    let mut fresh = ws_open(addr, "/app/new").await;
    assert_eq!(fresh.ask("whoami").await.unwrap(), "A");
    assert_eq!(upgrade_status(addr, "/other", &[]).await, 404);
    assert_eq!(status_json(&gw).await["config_loaded_at_unix"], loaded_at);

    // A good file applies after all that.
    let mut good = cfg.clone();
    good["pools"]["q"] = json!({ "backends": backends_json(&[&b]) });
    good["listeners"][0]["routes"] = json!([
        { "path": "/app", "pool": "p" },
        { "path": "/other", "pool": "q" }
    ]);
    write_config(&gw, &good);
    let (st, body) = admin(&gw, "POST", "/reload").await;
    assert_eq!((st, body.trim()), (200, "reloaded"));
    let mut other = ws_open(addr, "/other").await;
    assert_eq!(other.ask("whoami").await.unwrap(), "B");
    assert_eq!(live.ask("and now").await.unwrap(), "and now");
}

// ---------------------------------------------------------------------------------------------
// 3. SIGTERM with 50 clients.

/// SIGTERM with 50 live clients: all 50 get close 1001; 40 answer the close, 10 never do.
/// The listener stops accepting; the process exits 0 within drain_ms + 1 s.
#[async_std::test]
async fn sigterm_with_50_clients_all_get_1001_and_exit_0_within_drain() {
    let _serial = SERIAL.lock().await;
    const DRAIN_MS: u64 = 2000;
    let b = Backend::echo("b1").await;
    let mut cfg = one_pool_config(&[&b]);
    cfg["timeouts"] = json!({ "drain_ms": DRAIN_MS });
    let mut gw = Gateway::start(cfg).await;
    let addr = gw.addr();
    let mut clients = Vec::new();
    for i in 0..50 {
        let mut ws = ws_open(addr, "/").await;
        assert_eq!(ws.ask(&format!("hi {i}")).await.unwrap(), format!("hi {i}"));
        clients.push(ws);
    }
    let t0 = Instant::now();
    gw.signal("TERM");
    let mut tasks = Vec::new();
    for (i, mut ws) in clients.into_iter().enumerate() {
        let stubborn = i % 5 == 0;
        tasks.push(async_std::task::spawn(async move {
            let ev = ws.next_event(ms(DRAIN_MS + 3000)).await;
            let got = t0.elapsed();
            if !stubborn {
                let _ = ws.send_close(1001).await;
            }
            // Either way, the gateway ends the connection.
            let end = ws
                .read_to_end(ms(DRAIN_MS + 3000))
                .await
                .map(|_| t0.elapsed());
            (i, stubborn, ev, got, end)
        }));
    }
    let mut worst_close = Duration::ZERO;
    let mut worst_end_polite = Duration::ZERO;
    let mut worst_end_stubborn = Duration::ZERO;
    for t in tasks {
        let (i, stubborn, ev, got, end) =
            within("client sees the drain", ms(DRAIN_MS + 7000), t).await;
        match ev {
            Ok(Event::Close(Some(1001), _)) => {}
            other => panic!("client {i}: expected close 1001, got {other:?}"),
        }
        worst_close = worst_close.max(got);
        let end = end.unwrap_or_else(|e| panic!("client {i}: {e}"));
        if stubborn {
            worst_end_stubborn = worst_end_stubborn.max(end);
        } else {
            worst_end_polite = worst_end_polite.max(end);
        }
    }
    assert!(
        worst_close <= ms(DRAIN_MS),
        "the last 1001 came {worst_close:?} after SIGTERM"
    );
    let code = gw.wait_exit(ms(DRAIN_MS + 3000)).await;
    let exited = t0.elapsed();
    assert_eq!(code, Some(0), "exit status");
    assert!(
        exited <= ms(DRAIN_MS + 1000),
        "exit {exited:?} after SIGTERM (drain_ms {DRAIN_MS})"
    );
    assert!(
        async_std::net::TcpStream::connect(addr).await.is_err(),
        "the listener accepts after exit"
    );
    let log = gw.logs.dump();
    assert!(log.contains("SIGTERM: draining"), "{log}");
    assert!(log.contains("shutdown complete"), "{log}");
    let access_1001 = gw
        .logs
        .count(|l| is_access_line(l) && fields(l).get("close").map(String::as_str) == Some("1001"));
    eprintln!(
        "SIGTERM, 50 clients (10 never answer the close), drain_ms {DRAIN_MS}: last 1001 at \
         {worst_close:?}; polite clients' connections ended by {worst_end_polite:?}, stubborn \
         ones by {worst_end_stubborn:?}; exit 0 at {exited:?}; {access_1001} access lines with \
         close=1001"
    );
    // Every session is logged before exit, the 10 that never answer the close included:
    // the closing handshakes are bounded inside drain_ms.
    assert_eq!(access_1001, 50, "access lines with close=1001\n{log}");
}

// ---------------------------------------------------------------------------------------------
// 4. /metrics, /status and the admin endpoint.

/// After N sessions of K messages each way with known payload sizes have ended, the counters
/// are exactly what the test did; the text parses as Prometheus format; `/status` has its
/// fields; unknown admin paths get 404.
#[async_std::test]
async fn metrics_and_status_equal_what_the_test_did() {
    const N: usize = 4;
    const K: usize = 5;
    let b = Backend::echo("b1").await;
    let mut cfg = pool_cfg(&[&b], 1000);
    cfg["listeners"][0]["routes"] = json!([{ "path": "/app", "pool": "p" }]);
    let gw = Gateway::start(cfg).await;
    let addr = gw.addr();
    assert_eq!(upgrade_status(addr, "/nowhere", &[]).await, 404);

    let mut clients = Vec::new();
    let mut bytes = 0u64;
    for i in 0..N {
        let mut c = connect(addr, &format!("/app/{i}"), &[]).await;
        for j in 0..K {
            let m = if j == K - 1 {
                Message::binary(vec![i as u8; 100 + i * 13])
            } else {
                Message::text(format!("s{i}m{j}:{}", "z".repeat(j * 7 + i)))
            };
            bytes += m.len() as u64;
            c.send(m.clone()).await;
            assert_eq!(c.recv_data().await, m);
        }
        clients.push(c);
    }

    // /status while the sessions live.
    let st = status_json(&gw).await;
    for key in [
        "pools",
        "listeners",
        "uptime_s",
        "config_file",
        "config_loaded_at_unix",
        "sessions_active",
    ] {
        assert!(st.get(key).is_some(), "/status lacks {key}: {st:#}");
    }
    assert_eq!(st["sessions_active"], N);
    assert_eq!(
        st["config_file"].as_str().unwrap(),
        gw.config_path.display().to_string()
    );
    let be = &st["pools"]["p"]["backends"][0];
    assert_eq!(be["address"], b.addr.to_string(), "{st:#}");
    assert_eq!(be["health"], "up", "{st:#}");
    assert_eq!(be["sessions"], N, "{st:#}");
    assert_eq!(st["listeners"][0]["name"], "public", "{st:#}");
    // The configured bind (today "127.0.0.1:0", not the port actually bound).
    assert!(st["listeners"][0]["bind"].is_string(), "{st:#}");

    for c in clients {
        c.close_and_wait().await;
    }
    let lines = gw.wait_access_lines(N).await;
    let mut from_lines = [0u64; 4];
    for l in &lines {
        let f = fields(l);
        assert_eq!(
            (f["c2b_msgs"].as_str(), f["b2c_msgs"].as_str()),
            ("5", "5"),
            "{l}"
        );
        for (k, name) in ["c2b_msgs", "b2c_msgs", "c2b_bytes", "b2c_bytes"]
            .iter()
            .enumerate()
        {
            from_lines[k] += f[*name].parse::<u64>().unwrap();
        }
    }
    assert_eq!(from_lines, [(N * K) as u64, (N * K) as u64, bytes, bytes]);

    let text = gw.metrics().await;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"));
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        let found: Vec<f64> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name}: unexpected value {other:?}"),
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {label:?}: {found:?}\n{text}");
        found[0]
    };
    let dir = |d| Some(("direction", d));
    assert_eq!(value("wsgate_sessions_total", None), N as f64);
    assert_eq!(value("wsgate_sessions_active", None), 0.0);
    assert_eq!(
        value("wsgate_messages_total", dir("client_to_backend")),
        (N * K) as f64
    );
    assert_eq!(
        value("wsgate_messages_total", dir("backend_to_client")),
        (N * K) as f64
    );
    assert_eq!(
        value("wsgate_bytes_total", dir("client_to_backend")),
        bytes as f64
    );
    assert_eq!(
        value("wsgate_bytes_total", dir("backend_to_client")),
        bytes as f64
    );
    assert_eq!(
        value(
            "wsgate_handshake_failures_total",
            Some(("reason", "no_route"))
        ),
        1.0
    );
    assert_eq!(value("wsgate_failovers_total", None), 0.0);
    assert_eq!(value("wsgate_actor_restarts_total", None), 0.0);
    let be_label = b.addr.to_string();
    for name in ["wsgate_backend_up", "wsgate_backend_sessions"] {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("{name} missing\n{text}"));
        assert_eq!(s.labels.get("pool"), Some("p"), "{name}");
        assert_eq!(s.labels.get("backend"), Some(be_label.as_str()), "{name}");
    }
    assert_eq!(value("wsgate_backend_up", Some(("pool", "p"))), 1.0);
    assert_eq!(value("wsgate_backend_sessions", Some(("pool", "p"))), 0.0);
    // TYPE lines agree with what the series are.
    for (name, kind) in [
        ("wsgate_sessions_active", "gauge"),
        ("wsgate_sessions_total", "counter"),
        ("wsgate_messages_total", "counter"),
        ("wsgate_bytes_total", "counter"),
        ("wsgate_backend_up", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "no `# TYPE {name} {kind}`\n{text}"
        );
    }

    assert_eq!(admin(&gw, "GET", "/nope").await.0, 404);
    assert_eq!(admin(&gw, "GET", "/metrics/x").await.0, 404);
    assert_eq!(admin(&gw, "POST", "/metrics").await.0, 405);
    assert_eq!(admin(&gw, "GET", "/reload").await.0, 405);
}

/// Without `admin` in the config there is no admin listener: no admin line in the whole
/// log, from start to exit.
#[async_std::test]
async fn admin_is_off_unless_configured() {
    let b = Backend::echo("b1").await;
    let mut gw = Gateway::start(one_pool_config(&[&b])).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    assert_eq!(c.whoami().await, "b1");
    c.close_and_wait().await;
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(WAIT).await, Some(0));
    assert_eq!(
        gw.logs.count(|l| l.to_ascii_lowercase().contains("admin")),
        0,
        "{}",
        gw.logs.dump()
    );
    assert!(gw.admin.is_none());
}

// ---------------------------------------------------------------------------------------------
// 5. wss:// listener.

struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    /// A CA, a leaf for localhost / 127.0.0.1 (`leaf.pem`, `leaf.key`), the CA's PEM
    /// (`ca.pem`), and a second CA (`other-ca.pem`) with its own leaf (`other.pem`, `other.key`).
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("wsgate test CA");
        let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"]);
        let other = Ca::new("some other CA");
        let (ocert, okey) = other.leaf(&["localhost", "127.0.0.1"]);
        for (name, text) in [
            ("ca.pem", &ca.pem),
            ("leaf.pem", &cert),
            ("leaf.key", &key),
            ("other-ca.pem", &other.pem),
            ("other.pem", &ocert),
            ("other.key", &okey),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        Pki { dir, ca }
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap()
    }

    /// `name` relative to a config file written by `Gateway::start` (a sibling temp dir).
    fn rel(&self, name: &str) -> String {
        format!(
            "../{}/{name}",
            self.dir.path().file_name().unwrap().to_str().unwrap()
        )
    }
}

/// Over `wss://NAME:PORT` (TLS verified against `ca_pem`): one echo, then the backend's view
/// of the upgrade request (`headers`).
async fn wss_headers(addr: SocketAddr, name: &str, ca_pem: String) -> Value {
    use futures::StreamExt;
    let tls = Box::pin(tls_connect(addr, name, &ca_pem))
        .await
        .unwrap_or_else(|e| panic!("TLS to the gateway as {name}: {e}"));
    let url = format!("wss://{name}:{}/secure?n=1", addr.port());
    let (mut ws, resp) = within(
        "wss handshake",
        WAIT,
        Box::pin(async_tungstenite::client_async(url, tls)),
    )
    .await
    .unwrap_or_else(|e| panic!("wss handshake: {e}"));
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("over tls")).await.unwrap();
    let echo = within("echo", WAIT, ws.next()).await.unwrap().unwrap();
    assert_eq!(echo, Message::text("over tls"));
    ws.send(Message::text("headers")).await.unwrap();
    let h = within("headers", WAIT, ws.next()).await.unwrap().unwrap();
    ws.close(None).await.unwrap();
    serde_json::from_str(h.to_text().unwrap()).unwrap()
}

/// A `wss://` listener with a leaf from the test's CA: a client trusting only that CA
/// completes TLS and the upgrade as `localhost` and as `127.0.0.1`, messages round-trip, and
/// the backend sees `X-Forwarded-Proto: https`. A plain-text upgrade on that port gets no 101.
#[async_std::test]
async fn wss_listener_round_trip_with_a_test_ca() {
    let pki = Pki::new();
    let b = Backend::echo("b1").await;
    let mut cfg = one_pool_config(&[&b]);
    cfg["listeners"][0]["tls"] = json!({ "cert": pki.rel("leaf.pem"), "key": pki.rel("leaf.key") });
    let gw = Gateway::start(cfg).await;
    let addr = gw.addr();
    for name in ["localhost", "127.0.0.1"] {
        // rustls in a debug build wants more stack than a test thread has.
        let h = on_big_stack(wss_headers(addr, name, pki.ca.pem.clone())).await;
        assert_eq!(h["headers"]["x-forwarded-proto"], json!(["https"]), "{h:#}");
        assert_eq!(h["path"], "/secure?n=1");
    }
    // The wrong CA fails the client's verification.
    let other = pki.read("other-ca.pem");
    let other_ca = other.clone();
    let err =
        on_big_stack(async move { tls_connect(addr, "localhost", &other_ca).await.err() }).await;
    assert!(err.is_some_and(|e| e.contains("UnknownIssuer") || e.contains("certificate")));
    // Plain text on the TLS port: no upgrade.
    let mut raw = RawWs::new(async_std::net::TcpStream::connect(addr).await.unwrap());
    raw.write(upgrade_head("/", &addr.to_string(), &[]).as_bytes())
        .await
        .unwrap();
    let back = raw.read_to_end(WAIT).await.unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&back).contains("101"),
        "plain upgrade on a TLS port got {:?}",
        String::from_utf8_lossy(&back)
    );
    assert_eq!(b.upgrades(), 2);
}

/// `--check` loads the TLS files, relative to the config file's folder (not the working
/// directory): a good pair is `config ok`; a missing key file, a key that does not match
/// the cert, or a missing backend CA file is exit 1 with the error naming the field.
#[test]
fn check_validates_tls_files_relative_to_the_config() {
    let pki = Pki::new();
    let elsewhere = tempfile::tempdir().unwrap();
    let cfg_path = pki.dir.path().join("config.json");
    let check = |tls: Value, backend: Value| {
        let cfg = json!({
            "listeners": [ { "bind": "127.0.0.1:0", "tls": tls, "routes": [ { "path": "/", "pool": "p" } ] } ],
            "pools": { "p": { "backends": [ backend ] } }
        });
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        run_wsgate(
            &["--check", "--config", cfg_path.to_str().unwrap()],
            elsewhere.path(),
        )
    };
    let plain = json!({ "address": "127.0.0.1:9" });
    let good = json!({ "cert": "leaf.pem", "key": "leaf.key" });
    let (code, out, err) = check(good.clone(), plain.clone());
    assert_eq!((code, out.trim()), (0, "config ok"), "{err}");

    let (code, out, err) = check(
        json!({ "cert": "leaf.pem", "key": "missing.key" }),
        plain.clone(),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("listeners[0].tls"),
        "missing key: {out:?} {err:?}"
    );
    assert!(out.contains("missing.key"), "names the file: {out:?}");

    let (code, out, err) = check(
        json!({ "cert": "leaf.pem", "key": "other.key" }),
        plain.clone(),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("listeners[0].tls"),
        "mismatched key: {out:?} {err:?}"
    );

    let (code, out, err) = check(json!({ "cert": "missing.pem", "key": "leaf.key" }), plain);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("listeners[0].tls"),
        "missing cert: {out:?} {err:?}"
    );

    let tls_backend = json!({ "address": "127.0.0.1:9", "tls": true, "ca": "nope.pem", "server_name": "localhost" });
    let (code, out, err) = check(good, tls_backend);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("pools.p.backends[0]"),
        "missing backend CA: {out:?} {err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. wss:// backend.

/// A backend that serves `wss://` with a leaf of the test CA: with `tls`, `ca` and
/// `server_name` the gateway verifies it and messages round-trip; with another CA (or a
/// server name the leaf does not carry) the backend connect fails and the client gets 502.
#[async_std::test]
async fn wss_backend_verified_by_ca_and_wrong_ca_gets_502() {
    let pki = Pki::new();
    let tb = TlsBackend::start(&pki.read("leaf.pem"), &pki.read("leaf.key")).await;
    let backend = |ca: &str, name: &str| json!({ "address": tb.addr.to_string(), "tls": true, "ca": pki.rel(ca), "server_name": name });
    let cfg = json!({
        "listeners": [ { "name": "public", "bind": "127.0.0.1:0", "routes": [
            { "path": "/good", "pool": "good" },
            { "path": "/wrongca", "pool": "wrongca" },
            { "path": "/wrongname", "pool": "wrongname" }
        ] } ],
        "pools": {
            "good": { "backends": [ backend("ca.pem", "localhost") ] },
            "wrongca": { "backends": [ backend("other-ca.pem", "localhost") ] },
            "wrongname": { "backends": [ backend("ca.pem", "elsewhere.example") ] }
        }
    });
    let gw = Gateway::start(cfg).await;
    let addr = gw.addr();
    let mut ws = ws_open(addr, "/good").await;
    assert_eq!(
        ws.ask("to a wss backend").await.unwrap(),
        "to a wss backend"
    );
    let h: Value = serde_json::from_str(&ws.ask("headers").await.unwrap()).unwrap();
    assert_eq!(h["x-forwarded-proto"], "http", "{h:#}");
    assert_eq!(ws.close_handshake(1000).await.unwrap(), Some(1000));
    assert_eq!(tb.upgrades(), 1);

    let errors_before = tb.shared.tls_errors.lock().unwrap().len();
    assert_eq!(upgrade_status(addr, "/wrongca", &[]).await, 502);
    assert_eq!(upgrade_status(addr, "/wrongname", &[]).await, 502);
    assert_eq!(tb.upgrades(), 1, "an unverified backend got an upgrade");
    tb.shared
        .notify
        .wait_until("the backend saw the failed TLS handshakes", WAIT, || {
            tb.shared.tls_errors.lock().unwrap().len() >= errors_before + 2
        })
        .await;
    eprintln!(
        "wss backend, wrong CA / name: backend saw {:?}",
        tb.shared.tls_errors.lock().unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// 7. PROXY protocol.

fn v4(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

/// A listener with `proxy_protocol`: a v1 line and a v2 binary header before the upgrade; the
/// backend sees the carried address in `X-Forwarded-For` / `X-Real-IP` and the access line
/// says `client=IP:PORT`. Without a valid header the connection is closed with no answer.
#[async_std::test]
async fn proxy_protocol_v1_and_v2_carry_the_client_address() {
    let b = Backend::echo("b1").await;
    let mut cfg = one_pool_config(&[&b]);
    cfg["listeners"][0]["proxy_protocol"] = json!(true);
    let gw = Gateway::start(cfg).await;
    let addr = gw.addr();
    let dst = v4("127.0.0.1:8020");
    let cases = [
        (
            "v1",
            proxy_v1(v4("203.0.113.7:40000"), dst),
            "203.0.113.7:40000",
        ),
        (
            "v2",
            proxy_v2(v4("198.51.100.9:40001"), dst),
            "198.51.100.9:40001",
        ),
    ];
    for (what, header, client) in &cases {
        let mut ws = ws_open_with(addr, header, &format!("/{what}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let h: Value = serde_json::from_str(&ws.ask("headers").await.unwrap()).unwrap();
        let ip = client.split(':').next().unwrap();
        assert_eq!(
            h["headers"]["x-forwarded-for"],
            json!([ip]),
            "{what}: {h:#}"
        );
        assert_eq!(h["headers"]["x-real-ip"], json!([ip]), "{what}: {h:#}");
        assert_eq!(ws.close_handshake(1000).await.unwrap(), Some(1000));
    }
    let lines = gw.wait_access_lines(2).await;
    for (what, _, client) in &cases {
        assert!(
            lines
                .iter()
                .any(|l| fields(l)["client"] == *client && fields(l)["route"] == "/"),
            "{what}: no access line with client={client}: {lines:#?}"
        );
    }
    // No header, a malformed v1 line, a truncated v2 header: closed, nothing answered.
    let head = upgrade_head("/", &addr.to_string(), &[]);
    let mut bad_v2 = proxy_v2(v4("198.51.100.9:1"), dst);
    bad_v2[12] = 0x31; // version 3
    for (what, prefix) in [
        ("no header", Vec::new()),
        ("bad v1", b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n".to_vec()),
        ("bad v2 version", bad_v2),
    ] {
        let mut raw = RawWs::new(async_std::net::TcpStream::connect(addr).await.unwrap());
        let mut bytes = prefix;
        bytes.extend_from_slice(head.as_bytes());
        let _ = raw.write(&bytes).await;
        let back = raw
            .read_to_end(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            back.is_empty(),
            "{what}: answered {:?}",
            String::from_utf8_lossy(&back)
        );
    }
    assert_eq!(b.upgrades(), 2);
}

// ---------------------------------------------------------------------------------------------
// 8. Limits.

/// `max_sessions_per_ip` 1 behind a PROXY listener counts the carried IPs: two different
/// carried IPs (one TCP peer, 127.0.0.1) both pass; a second session of one IP gets 503 and
/// passes again once the first has ended. `max_sessions` → 503, `allowed_origins` → 403,
/// each counted in `wsgate_handshake_failures_total`.
#[async_std::test]
async fn limits_per_ip_via_proxy_max_sessions_and_origins() {
    let b = Backend::echo("b1").await;
    let cfg = json!({
        "listeners": [
            { "name": "lb", "bind": "127.0.0.1:0", "proxy_protocol": true,
              "routes": [ { "path": "/", "pool": "p" } ] }
        ],
        "pools": { "p": { "backends": backends_json(&[&b]) } },
        "limits": { "max_sessions": 3, "max_sessions_per_ip": 1 },
        "allowed_origins": [ "https://app.example" ],
        "admin": { "bind": "127.0.0.1:0" }
    });
    let gw = Gateway::start(cfg).await;
    let addr = gw.addr();
    let dst = v4("127.0.0.1:443");
    let status = |prefix: Vec<u8>, extra: Vec<(&'static str, &'static str)>| async move {
        let mut raw = RawWs::new(async_std::net::TcpStream::connect(addr).await.unwrap());
        let mut bytes = prefix;
        bytes.extend_from_slice(upgrade_head("/", &addr.to_string(), &extra).as_bytes());
        raw.write(&bytes).await.unwrap();
        raw.read_head(WAIT).await.unwrap().status
    };
    let mut s1 = ws_open_with(addr, &proxy_v1(v4("203.0.113.7:40000"), dst), "/", &[])
        .await
        .unwrap();
    assert_eq!(s1.ask("one").await.unwrap(), "one");
    assert_eq!(
        status(proxy_v1(v4("203.0.113.7:40001"), dst), vec![]).await,
        503
    );
    let mut s2 = ws_open_with(addr, &proxy_v2(v4("203.0.113.8:40000"), dst), "/", &[])
        .await
        .unwrap();
    assert_eq!(s2.ask("two").await.unwrap(), "two");
    // Origins: listed (any case) passes, absent passes, another is 403.
    let mut s3 = ws_open_with(
        addr,
        &proxy_v1(v4("203.0.113.9:1"), dst),
        "/",
        &[("Origin", "HTTPS://App.Example")],
    )
    .await
    .unwrap();
    assert_eq!(s3.ask("three").await.unwrap(), "three");
    assert_eq!(
        status(
            proxy_v1(v4("203.0.113.10:1"), dst),
            vec![("Origin", "https://evil.example")]
        )
        .await,
        403
    );
    // max_sessions 3 are live now: a fourth IP gets 503.
    assert_eq!(
        status(proxy_v1(v4("203.0.113.11:1"), dst), vec![]).await,
        503
    );
    assert_eq!(b.upgrades(), 3, "refused sessions reached the backend");
    // 203.0.113.7 may come back once its session has ended.
    assert_eq!(s1.close_handshake(1000).await.unwrap(), Some(1000));
    gw.wait_access_lines(1).await;
    let mut again = None;
    for _ in 0..50 {
        match ws_open_with(addr, &proxy_v1(v4("203.0.113.7:40002"), dst), "/", &[]).await {
            Ok(ws) => {
                again = Some(ws);
                break;
            }
            Err(_) => async_std::task::sleep(ms(50)).await,
        }
    }
    let mut again = again.expect("203.0.113.7 admitted again after its session ended");
    assert_eq!(again.ask("back").await.unwrap(), "back");
    let text = gw.metrics().await;
    let fails = |r: &str| metric_sum(&text, "wsgate_handshake_failures_total", &[("reason", r)]);
    assert!(fails("limit").unwrap_or(0.0) >= 2.0, "{text}");
    assert_eq!(fails("origin"), Some(1.0), "{text}");
}

/// Slowloris: with `handshake_ms` 500, a client sending its upgrade one byte every 100 ms
/// (it would need ~15 s) and a client sending nothing are both dropped around 500 ms, with no
/// answer; a normal client is served meanwhile; both count as `reason="timeout"`.
#[async_std::test]
async fn slowloris_dropped_at_handshake_ms() {
    let _serial = SERIAL.lock().await;
    let b = Backend::echo("b1").await;
    let mut cfg = pool_cfg(&[&b], 1000);
    cfg["timeouts"]["handshake_ms"] = json!(500);
    let gw = Gateway::start(cfg).await;
    let addr = gw.addr();

    async fn dropped_after(addr: SocketAddr, trickle: bool) -> (Duration, Vec<u8>, usize) {
        let t0 = Instant::now();
        let tcp = async_std::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut writer = tcp.clone();
        let head = upgrade_head("/", &addr.to_string(), &[]).into_bytes();
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sent2 = sent.clone();
        let w = async_std::task::spawn(async move {
            use futures::AsyncWriteExt;
            if !trickle {
                return;
            }
            for byte in head {
                if writer.write_all(&[byte]).await.is_err() {
                    return;
                }
                sent2.fetch_add(1, Ordering::SeqCst);
                async_std::task::sleep(ms(100)).await;
            }
        });
        let mut raw = RawWs::new(tcp);
        let back = raw.read_to_end(ms(5000)).await.unwrap_or_else(|e| {
            panic!("slow client (trickle {trickle}) not dropped within 5 s: {e}")
        });
        let took = t0.elapsed();
        w.cancel().await;
        (took, back, sent.load(Ordering::SeqCst))
    }
    let slow = async_std::task::spawn(dropped_after(addr, true));
    let silent = async_std::task::spawn(dropped_after(addr, false));
    // Served while the two hang on.
    let mut ok = ws_open(addr, "/").await;
    assert_eq!(ok.ask("fine").await.unwrap(), "fine");
    let (slow_took, slow_back, slow_sent) = slow.await;
    let (silent_took, silent_back, _) = silent.await;
    eprintln!(
        "slowloris (handshake_ms 500): trickling client dropped after {slow_took:?} \
         ({slow_sent} bytes sent), silent client after {silent_took:?}"
    );
    for (what, took, back) in [
        ("trickle", slow_took, slow_back),
        ("silent", silent_took, silent_back),
    ] {
        assert!(
            took >= ms(450),
            "{what} dropped after {took:?}, before handshake_ms"
        );
        assert!(took <= ms(1500), "{what} dropped after {took:?}");
        assert!(
            !String::from_utf8_lossy(&back).contains(" 101 "),
            "{what}: got {:?}",
            String::from_utf8_lossy(&back)
        );
    }
    assert!(slow_sent < 20, "the trickle got {slow_sent} bytes in");
    assert_eq!(b.upgrades(), 1);
    let text = gw.metrics().await;
    assert_eq!(
        metric_sum(
            &text,
            "wsgate_handshake_failures_total",
            &[("reason", "timeout")]
        ),
        Some(2.0),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. permessage-deflate: tunnel passes it, message mode declines it.

/// A Python `websockets` client and server (both offer / accept permessage-deflate). Through
/// a `"relay": "tunnel"` pool the client negotiates permessage-deflate end to end, messages
/// round-trip, and the relayed byte counts (access line and metrics) are far smaller than the
/// payload. Through a `"relay": "message"` pool the same client gets no extension (the gateway
/// declines it and does not offer it upstream either), still round-trips, and the counts are
/// exactly the payload.
#[async_std::test]
async fn permessage_deflate_passes_through_tunnel_not_message_mode() {
    assert!(
        python_has_websockets(),
        "python3 with the `websockets` module is needed (bash .ci/run installs it)"
    );
    let mut server_cmd = Command::new("python3");
    server_cmd.arg(ws_peer_script()).arg("server");
    let server = ChildGuard::spawn(server_cmd);
    let line = server
        .logs
        .wait_line("python websockets server ready", |l| {
            l.starts_with("listening ")
        })
        .await;
    let port: u16 = line["listening ".len()..].trim().parse().unwrap();
    let py = json!([{ "address": format!("127.0.0.1:{port}") }]);
    let cfg = json!({
        "listeners": [ { "name": "public", "bind": "127.0.0.1:0", "routes": [
            { "path": "/tunnel", "pool": "t" },
            { "path": "/msg", "pool": "m" }
        ] } ],
        "pools": {
            "t": { "backends": py },
            "m": { "backends": py, "relay": "message" }
        },
        "relay": "tunnel",
        "admin": { "bind": "127.0.0.1:0" }
    });
    let gw = Gateway::start(cfg).await;
    let addr = gw.addr();
    const COUNT: usize = 5;
    const SIZE: usize = 20000;
    let payload = (COUNT * SIZE) as u64;
    let run_client = move |path: &str| {
        let mut cmd = Command::new("python3");
        cmd.arg(ws_peer_script())
            .arg("client")
            .arg(format!("ws://{addr}{path}"))
            .arg(COUNT.to_string())
            .arg(SIZE.to_string());
        let out = run_bounded(cmd, Duration::from_secs(30));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "python client on {path}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(v["echoed"], COUNT);
        assert_eq!(v["payload_bytes"], payload);
        v
    };

    // Tunnel.
    let t = async_std::task::spawn_blocking({
        let run = run_client;
        move || run("/tunnel")
    })
    .await;
    let neg = t["negotiated"].as_str().unwrap_or_default();
    assert!(neg.contains("permessage-deflate"), "tunnel: negotiated {t}");
    let lines = gw.wait_access_lines(1).await;
    let f = fields(&lines[0]);
    assert_eq!(f["route"], "/tunnel");
    let (c2b, b2c): (u64, u64) = (
        f["c2b_bytes"].parse().unwrap(),
        f["b2c_bytes"].parse().unwrap(),
    );
    assert!(
        c2b > 0 && c2b < payload / 10,
        "tunnel c2b_bytes {c2b} vs payload {payload}"
    );
    assert!(
        b2c > 0 && b2c < payload / 10,
        "tunnel b2c_bytes {b2c} vs payload {payload}"
    );
    let text = gw.metrics().await;
    let metric =
        |d: &str| metric_sum(&text, "wsgate_bytes_total", &[("direction", d)]).unwrap() as u64;
    assert_eq!(
        (metric("client_to_backend"), metric("backend_to_client")),
        (c2b, b2c)
    );
    let s1: Value = serde_json::from_str(
        &server
            .logs
            .wait_line("python server's first session", |l| {
                l.contains("\"session\"")
            })
            .await,
    )
    .unwrap();
    assert!(
        s1["negotiated"]
            .as_str()
            .unwrap_or_default()
            .contains("permessage-deflate"),
        "backend side of the tunnel: {s1}"
    );

    // Message mode.
    let m = async_std::task::spawn_blocking(move || run_client("/msg")).await;
    assert_eq!(m["negotiated"], Value::Null, "message mode negotiated {m}");
    let lines = gw.wait_access_lines(2).await;
    let f = fields(lines.iter().find(|l| fields(l)["route"] == "/msg").unwrap());
    assert_eq!(
        (f["c2b_msgs"].as_str(), f["b2c_msgs"].as_str()),
        ("5", "5"),
        "{f:?}"
    );
    assert_eq!(f["c2b_bytes"], payload.to_string());
    assert_eq!(f["b2c_bytes"], payload.to_string());
    server
        .logs
        .wait_count("python server's second session", 2, |l| {
            l.contains("\"session\"")
        })
        .await;
    let s2: Value = serde_json::from_str(
        server
            .logs
            .lines()
            .iter()
            .filter(|l| l.contains("\"session\""))
            .nth(1)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        s2["negotiated"],
        Value::Null,
        "message mode, backend side: {s2}"
    );
    eprintln!(
        "permessage-deflate: {payload} payload bytes each way; tunnel relayed c2b {c2b} / b2c \
         {b2c} bytes; backend offer in message mode: {}",
        s2["offered"]
    );
}

// ---------------------------------------------------------------------------------------------
// 10. HTTP pass-through: curl and headless Chromium.

async fn chat_server(name: &str) -> (ChildGuard, SocketAddr) {
    let bin = example_bin("chat_server");
    assert!(
        bin.exists(),
        "{} is missing: `cargo build --examples` (cargo test builds it)",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.args(["--port", "0", "--name", name]);
    let child = ChildGuard::spawn(cmd);
    let marker = format!("chat_server {name} listening on ");
    let line = child
        .logs
        .wait_line("chat_server ready", |l| l.contains(&marker))
        .await;
    let addr = word_after(&line, &marker).unwrap().parse().unwrap();
    (child, addr)
}

/// (status, headers, body) of a `curl -i` output.
fn parse_curl(out: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(out)));
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, out[end + 4..].to_vec())
}

fn curl(args: &[&str]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let bin = which("curl").expect("curl is not installed (bash .ci/run installs it)");
    let mut cmd = Command::new(bin);
    cmd.args(["-sS", "-i", "--max-time", "10"]).args(args);
    let out = run_bounded(cmd, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_curl(&out.stdout)
}

fn hdr<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// With `"http": true`: curl gets the chat page (200, HTML, `X-Backend`), a Content-Length
/// POST reaches the chat backend's `/echo`, and a 300 kB chunked POST (with bytes that look
/// like chunk framing inside) arrives intact at a backend that decodes chunked bodies and is
/// echoed back. Without `"http": true`: 426 with `Upgrade: websocket`.
#[async_std::test]
async fn http_pass_through_with_curl() {
    let (_chat, chat_addr) = chat_server("chat-1").await;
    let up = HttpEcho::start("chunky").await;
    let cfg = json!({
        "listeners": [ { "name": "public", "bind": "127.0.0.1:0", "routes": [
            { "path": "/chat", "pool": "chat" },
            { "path": "/echo", "pool": "chat" },
            { "path": "/upload", "pool": "up" },
            { "path": "/plain", "pool": "plain" }
        ] } ],
        "pools": {
            "chat": { "backends": [ { "address": chat_addr.to_string() } ], "http": true },
            "up": { "backends": [ { "address": up.addr.to_string() } ], "http": true },
            "plain": { "backends": [ { "address": chat_addr.to_string() } ] }
        }
    });
    let gw = Gateway::start(cfg).await;
    let base = format!("http://{}", gw.addr());
    let (st, h, body) = async_std::task::spawn_blocking({
        let u = format!("{base}/chat");
        move || curl(&[u.as_str()])
    })
    .await;
    assert_eq!(st, 200);
    assert_eq!(hdr(&h, "x-backend"), Some("chat-1"), "{h:?}");
    assert!(
        hdr(&h, "content-type").is_some_and(|c| c.starts_with("text/html")),
        "{h:?}"
    );
    let page = String::from_utf8_lossy(&body);
    assert!(page.contains("<title>wsgate chat</title>"), "{page}");
    assert_eq!(body, include_bytes!("../examples/chat.html"));

    let (st, h, body) = async_std::task::spawn_blocking({
        let u = format!("{base}/echo?x=1");
        move || curl(&["--data-binary", "hello=world", u.as_str()])
    })
    .await;
    assert_eq!((st, hdr(&h, "x-backend")), (200, Some("chat-1")));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["method"].as_str(), v["body"].as_str()),
        (Some("POST"), Some("hello=world")),
        "{v}"
    );

    // 300 kB of pseudo-random bytes, with CRLFs and a fake last-chunk inside.
    let mut payload = Vec::with_capacity(300_000);
    let mut x: u32 = 0x2545_f491;
    while payload.len() < 300_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        payload.push((x >> 24) as u8);
        if payload.len() % 10_007 == 0 {
            payload.extend_from_slice(b"\r\n0\r\n\r\n");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.bin");
    std::fs::write(&file, &payload).unwrap();
    let (st, h, body) = async_std::task::spawn_blocking({
        let u = format!("{base}/upload/x?y=1");
        let data = format!("@{}", file.display());
        move || {
            curl(&[
                "-H",
                "Transfer-Encoding: chunked",
                "-H",
                "Expect:",
                "--data-binary",
                data.as_str(),
                u.as_str(),
            ])
        }
    })
    .await;
    assert_eq!((st, hdr(&h, "x-backend")), (200, Some("chunky")), "{h:?}");
    assert!(
        body == payload,
        "echoed body differs ({} bytes back)",
        body.len()
    );
    let reqs = up.reqs.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(
        (r.method.as_str(), r.target.as_str()),
        ("POST", "/upload/x?y=1")
    );
    assert!(
        r.chunked,
        "the body reached the backend chunked: {:?}",
        r.headers
    );
    assert!(r.body == payload, "the backend got {} bytes", r.body.len());
    assert_eq!(r.header("x-forwarded-for"), Some("127.0.0.1"));

    let (st, h, _) = async_std::task::spawn_blocking({
        let u = format!("{base}/plain");
        move || curl(&[u.as_str()])
    })
    .await;
    assert_eq!(st, 426);
    assert!(
        hdr(&h, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")),
        "{h:?}"
    );

    let http_lines: Vec<String> = gw
        .logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("http session="))
        .collect();
    for want in [" GET /chat status=200", " POST /upload/x?y=1 status=200"] {
        assert!(
            http_lines.iter().any(|l| l.contains(want)),
            "no http line with {want:?}: {http_lines:#?}"
        );
    }
    let l = http_lines.iter().find(|l| l.contains("GET /chat")).unwrap();
    let f = fields(l);
    assert_eq!(
        (
            f["route"].as_str(),
            f["pool"].as_str(),
            f["backend"].clone()
        ),
        ("/chat", "chat", chat_addr.to_string()),
        "{l}"
    );
}

/// Headless Chromium loads the chat page through the gateway (HTTP pass-through), the page's
/// own JavaScript opens its WebSocket through the gateway and joins `lobby`; the page says
/// something (typed and submitted through the DevTools protocol) and a second WebSocket
/// client in the lobby receives it; that client's message appears on the page.
#[async_std::test]
async fn chromium_chats_through_the_gateway() {
    let _serial = SERIAL.lock().await;
    let (_chat, chat_addr) = chat_server("chat-b").await;
    let cfg = json!({
        "listeners": [ { "name": "public", "bind": "127.0.0.1:0", "routes": [
            { "path": "/chat", "pool": "chat" }
        ] } ],
        "pools": { "chat": { "backends": [ { "address": chat_addr.to_string() } ], "http": true } },
        "admin": { "bind": "127.0.0.1:0" }
    });
    let gw = Gateway::start(cfg).await;
    let addr = gw.addr();
    let page_url = format!("http://{addr}/chat");
    let t0 = Instant::now();
    let browser = Chromium::start(&page_url).await;
    let mut cdp = Cdp::connect(&browser.page_ws_url("/chat").await).await;
    cdp.wait_true(
        "the page joined the lobby over its WebSocket",
        "document.getElementById('status').className === 'up' && \
         document.getElementById('log').textContent.includes('joined lobby')",
        Duration::from_secs(30),
    )
    .await;
    let joined_after = t0.elapsed();
    let status = cdp
        .eval("document.getElementById('status').textContent")
        .await;
    assert!(
        status
            .as_str()
            .unwrap()
            .contains(&format!("ws://{addr}/chat")),
        "{status}"
    );

    let mut peer = connect(addr, "/chat", &[("Sec-WebSocket-Protocol", "chat")]).await;
    peer.send_text(r#"{"join":"lobby"}"#).await;
    let joined: Value = serde_json::from_str(&peer.recv_text().await).unwrap();
    assert_eq!(joined["joined"], "lobby");

    let nonce = format!(
        "{:x}",
        Instant::now().elapsed().as_nanos() ^ std::process::id() as u128
    );
    let said = format!("hello from chromium {nonce}");
    let r = cdp
        .eval(&format!(
            "document.getElementById('text').value = {said:?}; \
             document.getElementById('say-form').requestSubmit(); 'sent'"
        ))
        .await;
    assert_eq!(r, "sent");
    let heard: Value = within(
        "the page's message reaches the peer",
        Duration::from_secs(15),
        async {
            loop {
                let v: Value = serde_json::from_str(&peer.recv_text().await).unwrap();
                if v["text"].is_string() {
                    return v;
                }
            }
        },
    )
    .await;
    assert_eq!(heard["text"], said.as_str(), "{heard}");
    assert_eq!(heard["room"], "lobby");
    assert_eq!(heard["backend"], "chat-b");

    let reply = format!("hello page {nonce}");
    peer.send_text(&json!({ "say": reply }).to_string()).await;
    cdp.wait_true(
        "the peer's message shows on the page",
        &format!("document.getElementById('log').textContent.includes({reply:?})"),
        Duration::from_secs(15),
    )
    .await;
    eprintln!(
        "chromium: page loaded and joined the lobby {joined_after:?} after launch; \
         page -> peer and peer -> page messages went through the gateway ({:?} in all)",
        t0.elapsed()
    );
    // Both WebSockets are live sessions of the gateway; the page came by HTTP pass-through.
    assert_eq!(gw.metric("wsgate_sessions_active").await, Some(2.0));
    assert!(
        gw.logs
            .count(|l| l.contains("http session=") && l.contains(" GET /chat status=200"))
            >= 1,
        "{}",
        gw.logs.dump()
    );
    peer.close_and_wait().await;
    drop(cdp);
    drop(browser);
}
