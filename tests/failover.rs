//! Failover, health checks and backend loss (SPEC §2 `health_check`, `passive`,
//! `connect_attempts`, `on_backend_loss`, `replay_first_messages`; §3 close 1014; §6 logs,
//! `/metrics`, `/status`), black-box: the real `wsgate` binary, the real example backends as
//! processes killed with SIGKILL (or frozen with SIGSTOP) and restarted on their port, clients
//! on loopback sockets.
//!
//! Times are measured on the test's clock: from the instant the signal is sent to the
//! instant the test reads the gateway's log line (or the client's frame). The tests of this
//! file run one at a time (`SERIAL`) so the bounds measure the gateway, not the neighbours.
//! Run with `--nocapture` to see the measured figures.

mod failover_support;

use failover_support::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_std::task;
use futures::{SinkExt, StreamExt};

/// What the bounds below allow on top of the figure the config implies: one scheduling
/// round of a gateway, a backend and the test on two cores, and reading the log pipe.
const MARGIN: Duration = Duration::from_millis(300);

/// Health checks every 200 ms, the settings.
fn ws_check(interval_ms: u64) -> Value {
    json!({ "kind": "websocket", "interval_ms": interval_ms, "timeout_ms": interval_ms,
            "healthy_after": 2, "unhealthy_after": 2 })
}

/// One listener `public` on 127.0.0.1:0, route `/` → pool `p`, admin on 127.0.0.1:0.
fn config(pool: Value, timeouts: Value) -> Value {
    json!({
        "listeners": [ { "name": "public", "bind": "127.0.0.1:0",
                         "routes": [ { "path": "/", "pool": "p" } ] } ],
        "pools": { "p": pool },
        "timeouts": timeouts,
        "admin": { "bind": "127.0.0.1:0" }
    })
}

fn backends_json(addrs: &[SocketAddr]) -> Value {
    Value::Array(
        addrs
            .iter()
            .map(|a| json!({ "address": a.to_string() }))
            .collect(),
    )
}

/// `client ip:port` → session id, from the access lines.
fn sessions_by_client(gw: &Gateway) -> HashMap<SocketAddr, u64> {
    gw.logs()
        .matching(0, is_access)
        .into_iter()
        .map(|(_, l)| {
            let f = fields(&l.text);
            (f["client"].parse().unwrap(), f["session"].parse().unwrap())
        })
        .collect()
}

/// Session ids that tried `backend` and failed (`session#ID backend ADDR in pool p failed`).
fn failed_attempts(gw: &Gateway, backend: SocketAddr) -> BTreeMap<u64, String> {
    let marker = format!(" backend {backend} in pool p failed: ");
    gw.logs()
        .matching(0, |l| l.contains(&marker))
        .into_iter()
        .map(|(_, l)| {
            let id = word_after(&l.text, "session#").unwrap().parse().unwrap();
            let why = l.text.split_once(&marker).unwrap().1.to_string();
            (id, why)
        })
        .collect()
}

/// One short session: handshake (timed), one echo, close.
#[derive(Debug)]
struct Visit {
    started: Instant,
    local: SocketAddr,
    handshake: Duration,
    backend: String,
}

async fn visit(addr: SocketAddr, tag: String) -> Result<Visit, String> {
    let started = Instant::now();
    let mut c = try_connect(addr, "/", &[], WAIT).await?;
    let backend = c.echo(&tag).await;
    let v = Visit {
        started,
        local: c.local,
        handshake: c.handshake,
        backend,
    };
    c.close().await;
    Ok(v)
}

/// Starts `n` visits, the i-th at `t0 + i × every`.
fn visits_from(
    addr: SocketAddr,
    t0: Instant,
    n: usize,
    every: Duration,
) -> Vec<task::JoinHandle<Result<Visit, String>>> {
    (0..n)
        .map(|i| {
            let at = t0 + every * i as u32;
            task::spawn(async move {
                task::sleep(at.saturating_duration_since(Instant::now())).await;
                visit(addr, format!("visit-{i}")).await
            })
        })
        .collect()
}

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

/// Bullet 1. Three chat backends with `websocket` checks every 200 ms; passive ejection is
/// off (`max_fails: 0`) so the only detector is the active check. SIGKILL one backend:
/// * the gateway logs it DOWN within `unhealthy_after × interval + timeout` = 600 ms
///   (+ `MARGIN`);
/// * 100 sessions opened from the kill on, one every 10 ms (so they span the detection
///   window and 600 ms past it), ALL succeed; some of the early ones did try the dead
///   backend (logged as a failed attempt) and were moved on by `connect_attempts`; no
///   session that began after the DOWN line was read tried it;
/// * restarted on the same port, it is UP within `healthy_after × interval` = 400 ms
///   (+ 10 % check jitter + `MARGIN`) and takes new sessions again.
#[async_std::test]
async fn killed_backend_detected_sessions_survive_and_readmitted() {
    let _serial = SERIAL.lock().await;
    let mut bs = vec![
        ExampleBackend::chat("c1").await,
        ExampleBackend::chat("c2").await,
        ExampleBackend::chat("c3").await,
    ];
    let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr).collect();
    let gw = Gateway::start(config(
        json!({ "balance": "round_robin", "backends": backends_json(&addrs),
                "health_check": ws_check(200), "passive": { "max_fails": 0 },
                "connect_attempts": 3 }),
        json!({}),
    ))
    .await;
    // All three serve before the kill.
    let mut before = BTreeSet::new();
    for i in 0..3 {
        before.insert(visit(gw.addr, format!("warm-{i}")).await.unwrap().backend);
    }
    assert_eq!(before, BTreeSet::from(["c1".into(), "c2".into(), "c3".into()]));

    let victim = addrs[1];
    let from = gw.logs().len();
    let killed = bs[1].kill();
    let handles = visits_from(gw.addr, killed, 100, ms(10));
    let (_, down) = gw
        .logs()
        .wait_line("the killed backend DOWN", from, WAIT, |l| is_down(l, victim))
        .await;
    let detection = down.at - killed;
    let mut visits = Vec::new();
    for h in handles {
        visits.push(h.await);
    }
    let failed: Vec<&String> = visits.iter().filter_map(|v| v.as_ref().err()).collect();
    assert!(failed.is_empty(), "sessions failed: {failed:?}");
    let visits: Vec<Visit> = visits.into_iter().map(Result::unwrap).collect();

    // The access lines name each client's session: map them to the failed attempts.
    gw.logs()
        .wait_count("103 access lines", 0, 103, WAIT, is_access)
        .await;
    let ids = sessions_by_client(&gw);
    let tried_dead = failed_attempts(&gw, victim);
    let mut tried_before_down = 0;
    for v in &visits {
        assert_ne!(v.backend, "c2", "a session was served by the killed backend");
        let id = ids[&v.local];
        if let Some(why) = tried_dead.get(&id) {
            assert!(
                v.started < down.at,
                "session#{id} began {} ms after the DOWN line was read and still tried the \
                 dead backend ({why})",
                millis(v.started - down.at)
            );
            tried_before_down += 1;
        }
    }
    let after_down = visits.iter().filter(|v| v.started >= down.at).count();
    let slowest = visits.iter().map(|v| v.handshake).max().unwrap();
    eprintln!(
        "bullet 1: DOWN {} ms after SIGKILL ({}); 100/100 sessions ok, {tried_before_down} \
         tried the dead backend first and were retried, {after_down} began after DOWN; \
         slowest handshake {} ms",
        millis(detection),
        down.text.split_once(" is DOWN: ").unwrap().1,
        millis(slowest)
    );
    let bound = ms(2 * 200 + 200) + MARGIN;
    assert!(
        detection <= bound,
        "DOWN {detection:?} after the kill; bound {bound:?}"
    );
    assert!(
        !down.text.contains("failed connects"),
        "passive ejection is off: the DOWN must come from the websocket check: {}",
        down.text
    );
    // The window was really exercised: sessions hit the dead backend and were retried, and
    // sessions began after the DOWN (the schedule spans 1 s, detection takes under 1 s).
    assert!(tried_before_down > 0, "no session tried the dead backend");
    assert!(after_down > 0, "no session began after the DOWN line");
    for id in tried_dead.keys() {
        let f = fields(
            &gw.logs()
                .matching(0, |l| is_access(l) && l.contains(&format!("session={id} ")))[0]
                .1
                .text,
        );
        assert_ne!(f["backend"], victim.to_string());
        assert_eq!(f["close"], "1000");
    }
    let m = gw.metrics().await;
    let up = |a: SocketAddr| metric(&m, "wsgate_backend_up", &[("backend", &a.to_string())]);
    assert_eq!(up(victim), Some(0.0));
    assert_eq!(up(addrs[0]), Some(1.0));
    assert_eq!(up(addrs[2]), Some(1.0));

    // Restart on the same port: UP after two passing checks.
    let from = gw.logs().len();
    let ready = bs[1].restart().await;
    let (_, upline) = gw
        .logs()
        .wait_line("the restarted backend UP", from, WAIT, |l| is_up(l, victim))
        .await;
    let readmit = upline.at.saturating_duration_since(ready);
    eprintln!(
        "bullet 1: UP {} ms after the restarted backend was ready ({})",
        millis(readmit),
        upline.text.split_once(" is UP: ").unwrap().1
    );
    let bound = ms(2 * 220) + MARGIN;
    assert!(
        readmit <= bound,
        "UP {readmit:?} after restart; bound {bound:?}"
    );
    // It takes new sessions again: 6 sequential sessions over 3 up backends.
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..6 {
        *served
            .entry(visit(gw.addr, format!("again-{i}")).await.unwrap().backend)
            .or_default() += 1;
    }
    eprintln!("bullet 1: after the restart 6 sessions went {served:?}");
    assert!(served.get("c2").copied().unwrap_or(0) >= 1, "{served:?}");
    assert_eq!(served.values().sum::<usize>(), 6);
    let status = gw.status().await;
    let health: Vec<&str> = status["pools"]["p"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["health"].as_str().unwrap())
        .collect();
    assert_eq!(health, ["up", "up", "up"]);
}

/// A backend that accepts TCP and never answers: sockets are accepted and held, unread.
struct Tarpit {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: Option<task::JoinHandle<()>>,
}

impl Tarpit {
    async fn start() -> Tarpit {
        let l = async_std::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = Arc::clone(&accepted);
        let task = task::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        Tarpit {
            addr,
            accepted,
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(t) = self.task.take() {
            t.cancel().await;
        }
    }
}

/// Bullet 2. A tarpit backend (accepts TCP, never answers the upgrade) next to a chat
/// backend; `timeouts.connect_ms` 300, websocket checks every 200 ms (timeout 200 ms),
/// passive ejection off. Sessions start every 25 ms from the gateway's start:
/// * the checks mark the tarpit DOWN (cause: no answer within timeout_ms);
/// * every session succeeds on the chat backend; a session whose first attempt was the
///   tarpit waited ≥ 300 ms and < 300 ms + `MARGIN` (one `connect_ms`, then the other
///   backend), every other one < `MARGIN`; the number of slow sessions equals the number of
///   `upgrade timed out (connect_ms)` attempts logged; none began after the DOWN line.
#[async_std::test]
async fn tarpit_backend_marked_down_and_connect_ms_bounds_attempts() {
    let _serial = SERIAL.lock().await;
    let tarpit = Tarpit::start().await;
    let chat = ExampleBackend::chat("c1").await;
    let gw = Gateway::start(config(
        json!({ "balance": "round_robin", "backends": backends_json(&[tarpit.addr, chat.addr]),
                "health_check": ws_check(200), "passive": { "max_fails": 0 } }),
        json!({ "connect_ms": 300 }),
    ))
    .await;
    let t0 = Instant::now();
    let handles = visits_from(gw.addr, t0, 48, ms(25));
    let (_, down) = gw
        .logs()
        .wait_line("the tarpit DOWN", 0, WAIT, |l| is_down(l, tarpit.addr))
        .await;
    let mut visits = Vec::new();
    for h in handles {
        visits.push(h.await.unwrap_or_else(|e| panic!("session failed: {e}")));
    }
    gw.logs()
        .wait_count("48 access lines", 0, 48, WAIT, is_access)
        .await;
    let ids = sessions_by_client(&gw);
    let timed_out = failed_attempts(&gw, tarpit.addr);
    let connect_ms = ms(300);
    let (mut slow, mut fast_max, mut slow_max) = (0, Duration::ZERO, Duration::ZERO);
    for v in &visits {
        assert_eq!(v.backend, "c1");
        let id = ids[&v.local];
        match timed_out.get(&id) {
            Some(why) => {
                assert_eq!(why, "upgrade timed out (connect_ms)", "session#{id}");
                assert!(
                    v.handshake >= connect_ms && v.handshake < connect_ms + MARGIN,
                    "session#{id}: handshake {:?} after one timed-out attempt",
                    v.handshake
                );
                assert!(v.started < down.at, "session#{id} tried the tarpit after DOWN");
                slow += 1;
                slow_max = slow_max.max(v.handshake);
            }
            None => {
                assert!(
                    v.handshake < MARGIN,
                    "session#{id}: handshake {:?} without a tarpit attempt",
                    v.handshake
                );
                fast_max = fast_max.max(v.handshake);
            }
        }
    }
    let after_down = visits.iter().filter(|v| v.started >= down.at).count();
    eprintln!(
        "bullet 2: tarpit DOWN {} ms after the gateway started ({}); {slow}/48 sessions \
         tried it first (handshake ≤ {} ms), the others ≤ {} ms; {after_down} began after \
         DOWN; the tarpit accepted {} connections",
        millis(down.at - t0),
        down.text.split_once(" is DOWN: ").unwrap().1,
        millis(slow_max),
        millis(fast_max),
        tarpit.accepted.load(Ordering::SeqCst)
    );
    assert!(
        down.text.contains("no answer within timeout_ms"),
        "{}",
        down.text
    );
    assert_eq!(slow, timed_out.len(), "timed-out attempts are the slow sessions");
    assert!(slow > 0, "no session tried the tarpit before DOWN");
    assert!(after_down > 0, "no session began after DOWN");
    assert_eq!(
        metric(
            &gw.metrics().await,
            "wsgate_backend_up",
            &[("backend", &tarpit.addr.to_string())]
        ),
        Some(0.0)
    );
    tarpit.stop().await;
}

/// Bullet 3. `on_backend_loss: close`, three chat backends, checks every 200 ms,
/// `ping_interval_ms` 500, three live sessions on each backend:
/// * SIGKILL backend A: its three sessions get close 1014 within one check interval +
///   `ping_interval_ms` = 700 ms (+ `MARGIN`);
/// * SIGSTOP backend B (its sockets hang, no FIN): its three sessions get 1014 once the
///   checks mark it DOWN, within `unhealthy_after × interval` (+10 % jitter) + `timeout` =
///   640 ms (+ `MARGIN`), and not before the DOWN line;
/// * the three sessions on C still echo afterwards, from C; the access lines of the six
///   lost sessions say `close=1014 closed_by=gateway`.
#[async_std::test]
async fn backend_loss_close_sends_1014_and_spares_others() {
    let _serial = SERIAL.lock().await;
    let mut a = ExampleBackend::chat("a").await;
    let b = ExampleBackend::chat("b").await;
    let c = ExampleBackend::chat("c").await;
    let gw = Gateway::start(config(
        json!({ "balance": "round_robin", "backends": backends_json(&[a.addr, b.addr, c.addr]),
                "health_check": ws_check(200), "on_backend_loss": "close" }),
        json!({ "ping_interval_ms": 500 }),
    ))
    .await;
    let mut on: BTreeMap<String, Vec<Client>> = BTreeMap::new();
    for i in 0..9 {
        let mut cl = connect(gw.addr, "/").await;
        let who = cl.echo(&format!("hello-{i}")).await;
        on.entry(who).or_default().push(cl);
    }
    assert_eq!(
        on.iter().map(|(k, v)| (k.as_str(), v.len())).collect::<Vec<_>>(),
        [("a", 3), ("b", 3), ("c", 3)]
    );
    let on_a = on.remove("a").unwrap();
    let on_b = on.remove("b").unwrap();
    let mut on_c = on.remove("c").unwrap();

    async fn close_codes(clients: Vec<Client>, t0: Instant) -> Vec<(Option<u16>, Duration)> {
        let all = clients.into_iter().map(|mut cl| async move {
            let r = cl.recv_for(WAIT).await;
            let at = t0.elapsed();
            match r {
                Some(Recv::Close(code)) => (code, at),
                other => panic!("expected a close frame, got {other:?}"),
            }
        });
        futures::future::join_all(all).await
    }

    // A: SIGKILL.
    let killed = a.kill();
    let got = close_codes(on_a, killed).await;
    let worst_a = got.iter().map(|g| g.1).max().unwrap();
    eprintln!(
        "bullet 3: SIGKILL → close {:?} on the 3 sessions, the last after {} ms",
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        millis(worst_a)
    );
    assert!(got.iter().all(|g| g.0 == Some(1014)), "{got:?}");
    let bound = ms(200 + 500) + MARGIN;
    assert!(worst_a <= bound, "1014 after {worst_a:?}; bound {bound:?}");

    // B: SIGSTOP: the process is frozen, its sockets stay open and silent.
    let from = gw.logs().len();
    let stopped = Instant::now();
    b.proc.signal("STOP");
    let got = close_codes(on_b, stopped).await;
    let worst_b = got.iter().map(|g| g.1).max().unwrap();
    let first_b = got.iter().map(|g| g.1).min().unwrap();
    let (_, down) = gw
        .logs()
        .wait_line("B DOWN", from, WAIT, |l| is_down(l, b.addr))
        .await;
    let down_after = down.at - stopped;
    eprintln!(
        "bullet 3: SIGSTOP → DOWN after {} ms ({}), close {:?} on the 3 sessions between {} \
         and {} ms",
        millis(down_after),
        down.text.split_once(" is DOWN: ").unwrap().1,
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        millis(first_b),
        millis(worst_b)
    );
    assert!(got.iter().all(|g| g.0 == Some(1014)), "{got:?}");
    let bound = ms(2 * 220 + 200) + MARGIN;
    assert!(worst_b <= bound, "1014 after {worst_b:?}; bound {bound:?}");
    assert!(
        down.text.contains("no answer within timeout_ms"),
        "{}",
        down.text
    );
    // The closes follow the health verdict (the log line is read a little after it is
    // written, so allow the pipe's latency the other way).
    assert!(
        first_b + ms(50) >= down_after,
        "1014 at {first_b:?}, before the DOWN verdict at {down_after:?}"
    );

    // C: untouched.
    for (i, cl) in on_c.iter_mut().enumerate() {
        assert_eq!(cl.echo(&format!("still-{i}")).await, "c");
    }
    let mut fresh = connect(gw.addr, "/").await;
    assert_eq!(fresh.echo("fresh").await, "c");
    fresh.close().await;
    for cl in on_c {
        cl.close().await;
    }
    let access = gw
        .logs()
        .wait_count("10 access lines", 0, 10, WAIT, is_access)
        .await;
    let mut by_backend: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for l in &access {
        let f = fields(&l.text);
        by_backend
            .entry(f["backend"].clone())
            .or_default()
            .push((f["close"].clone(), f["closed_by"].clone()));
    }
    let lost = vec![("1014".to_string(), "gateway".to_string()); 3];
    assert_eq!(by_backend[&a.addr.to_string()], lost);
    assert_eq!(by_backend[&b.addr.to_string()], lost);
    assert_eq!(
        by_backend[&c.addr.to_string()],
        vec![("1000".to_string(), "client".to_string()); 4]
    );
    b.proc.signal("CONT");
}
