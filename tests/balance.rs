//! Balance policies and failover of new sessions, observed by which backend answers `whoami`.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

fn pool_config(pool: Value) -> Value {
    json!({
        "listeners": [ { "name": "public", "bind": "127.0.0.1:0",
                         "routes": [ { "path": "/", "pool": "p" } ] } ],
        "pools": { "p": pool }
    })
}

fn tally(names: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_insert(0) += 1;
    }
    m
}

/// One short session: connect, `whoami`, close.
async fn who(addr: std::net::SocketAddr) -> String {
    let mut c = connect(addr, "/", &[]).await;
    let n = c.whoami().await;
    c.close_and_wait().await;
    n
}

/// round_robin over 3 equal backends: 60 sequential sessions → exactly 20 each, in a
/// repeating cycle of the three.
#[async_std::test]
async fn round_robin_three_backends_sixty_sessions() {
    let (a, b, c) = (
        Backend::echo("A").await,
        Backend::echo("B").await,
        Backend::echo("C").await,
    );
    let gw = Gateway::start(pool_config(json!({
        "balance": "round_robin", "backends": backends_json(&[&a, &b, &c])
    })))
    .await;
    let mut names = Vec::new();
    for _ in 0..60 {
        names.push(who(gw.addr()).await);
    }
    let t = tally(&names);
    assert_eq!(
        t,
        BTreeMap::from([("A".into(), 20), ("B".into(), 20), ("C".into(), 20)])
    );
    for i in 3..60 {
        assert_eq!(names[i], names[i - 3], "round robin is a cycle: {names:?}");
    }
}

/// Weighted round_robin 2:1 over 60 sessions → 40 and 20, and every window of 3
/// consecutive sessions has exactly two of the heavy backend (smooth weighting).
#[async_std::test]
async fn weighted_round_robin_two_to_one() {
    let (h, l) = (Backend::echo("heavy").await, Backend::echo("light").await);
    let gw = Gateway::start(pool_config(json!({
        "balance": "round_robin",
        "backends": [ { "address": h.addr.to_string(), "weight": 2 },
                      { "address": l.addr.to_string(), "weight": 1 } ]
    })))
    .await;
    let mut names = Vec::new();
    for _ in 0..60 {
        names.push(who(gw.addr()).await);
    }
    let t = tally(&names);
    assert_eq!(
        t,
        BTreeMap::from([("heavy".into(), 40), ("light".into(), 20)])
    );
    for w in names.chunks(3) {
        assert_eq!(
            w.iter().filter(|n| *n == "heavy").count(),
            2,
            "cycle of 3: {names:?}"
        );
    }
}

/// ip_hash: each client IP (40 source addresses 127.0.0.2..41) sticks to one backend;
/// when one backend dies exactly its clients move (and only to live backends); when it
/// comes back, the original mapping is restored.
#[async_std::test]
async fn ip_hash_sticky_and_bounded_movement() {
    let opts = |n: &str| BackendOpts::new(n);
    let mut backends = vec![
        Backend::start(opts("A")).await,
        Backend::start(opts("B")).await,
        Backend::start(opts("C")).await,
    ];
    let refs: Vec<&Backend> = backends.iter().collect();
    let gw = Gateway::start(pool_config(json!({
        "balance": "ip_hash",
        "backends": backends_json(&refs),
        "passive": { "max_fails": 1, "fail_timeout_ms": 500 }
    })))
    .await;
    let ips: Vec<IpAddr> = (2..42)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    let who_from = |ip: IpAddr| {
        let addr = gw.addr();
        async move {
            let mut c = connect_from(ip, addr, "/").await;
            let n = c.whoami().await;
            c.close_and_wait().await;
            n
        }
    };
    let mut first = BTreeMap::new();
    for ip in &ips {
        first.insert(*ip, who_from(*ip).await);
    }
    // Sticky: the same IP reaches the same backend again.
    for ip in &ips {
        assert_eq!(
            who_from(*ip).await,
            first[ip],
            "client {ip} moved without a reason"
        );
    }
    let t = tally(&first.values().cloned().collect::<Vec<_>>());
    assert!(
        t.len() >= 2,
        "40 client IPs all hashed to one backend: {t:?}"
    );
    // Kill the backend with the most clients.
    let (victim, _) = t.iter().max_by_key(|(_, n)| **n).unwrap();
    let victim = victim.clone();
    let vi = backends.iter().position(|b| b.name == victim).unwrap();
    let dead = backends.remove(vi);
    let dead_addr = dead.addr;
    dead.stop().await;
    let mut after = BTreeMap::new();
    for ip in &ips {
        after.insert(*ip, who_from(*ip).await);
    }
    for ip in &ips {
        if first[ip] == victim {
            assert_ne!(after[ip], victim, "client {ip} still on the dead backend");
        } else {
            assert_eq!(
                after[ip], first[ip],
                "client {ip} moved though its backend lives"
            );
        }
    }
    // Bring it back on the same port; after fail_timeout_ms the original mapping returns.
    let back = Backend::start_on(dead_addr, opts(&victim)).await;
    let mut restored = false;
    for _ in 0..40 {
        async_std::task::sleep(ms(150)).await;
        let ip = ips.iter().find(|ip| first[*ip] == victim).unwrap();
        if who_from(*ip).await == victim {
            restored = true;
            break;
        }
    }
    assert!(restored, "backend {victim} never got its clients back");
    for ip in &ips {
        assert_eq!(
            who_from(*ip).await,
            first[ip],
            "client {ip} after {victim} came back"
        );
    }
    drop(back);
}

/// least_conn follows live session counts: 6 held sessions spread 2/2/2; closing both
/// sessions on one backend sends the next two sessions there; closing one on another
/// sends the next one there.
#[async_std::test]
async fn least_conn_follows_live_counts() {
    let (a, b, c) = (
        Backend::echo("A").await,
        Backend::echo("B").await,
        Backend::echo("C").await,
    );
    let mut cfg = pool_config(json!({
        "balance": "least_conn", "backends": backends_json(&[&a, &b, &c])
    }));
    cfg["admin"] = json!({ "bind": "127.0.0.1:0" });
    let gw = Gateway::start(cfg).await;
    let mut held: Vec<(String, Client)> = Vec::new();
    for _ in 0..6 {
        let mut cl = connect(gw.addr(), "/", &[]).await;
        let n = cl.whoami().await;
        held.push((n, cl));
    }
    let names: Vec<String> = held.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        tally(&names),
        BTreeMap::from([("A".into(), 2), ("B".into(), 2), ("C".into(), 2)])
    );
    let backend_of = |name: &str| match name {
        "A" => &a,
        "B" => &b,
        _ => &c,
    };
    // Close both sessions on the backend of the first session.
    let target = names[0].clone();
    let mut keep = Vec::new();
    for (n, cl) in held {
        if n == target {
            cl.close_and_wait().await;
        } else {
            keep.push((n, cl));
        }
    }
    wait_backend_sessions(&gw, backend_of(&target), 0).await;
    for k in 0..2 {
        let mut cl = connect(gw.addr(), "/", &[]).await;
        assert_eq!(
            cl.whoami().await,
            target,
            "new session {k} must go to the emptied backend"
        );
        keep.push((target.clone(), cl));
    }
    // Now 2/2/2 again; close one session on another backend.
    let other = keep
        .iter()
        .map(|(n, _)| n.clone())
        .find(|n| *n != target)
        .unwrap();
    let i = keep.iter().position(|(n, _)| *n == other).unwrap();
    let (_, cl) = keep.remove(i);
    cl.close_and_wait().await;
    wait_backend_sessions(&gw, backend_of(&other), 1).await;
    let mut cl = connect(gw.addr(), "/", &[]).await;
    assert_eq!(cl.whoami().await, other);
}

/// Waits until the gateway counts `n` live sessions on backend `b` (admin metrics: the
/// only signal of the gateway's own count; polled, bounded).
async fn wait_backend_sessions(gw: &Gateway, b: &Backend, n: u64) {
    let addr = b.addr.to_string();
    let mut last = None;
    for _ in 0..100 {
        let text = gw.metrics().await;
        last = metric_sum(
            &text,
            "wsgate_backend_sessions",
            &[("pool", "p"), ("backend", &addr)],
        );
        if last == Some(n as f64) {
            return;
        }
        async_std::task::sleep(ms(50)).await;
    }
    panic!("wsgate_backend_sessions{{pool=p,backend={addr}}} stayed {last:?}, want {n}");
}

/// A pool with one dead backend: 50 new sessions all succeed, all on the live ones.
#[async_std::test]
async fn dead_backend_in_pool_fifty_sessions_succeed() {
    let (a, b) = (Backend::echo("A").await, Backend::echo("B").await);
    let dead = dead_addr();
    let gw = Gateway::start(pool_config(json!({
        "backends": [ { "address": a.addr.to_string() },
                      { "address": dead.to_string() },
                      { "address": b.addr.to_string() } ]
    })))
    .await;
    let mut names = Vec::new();
    for _ in 0..50 {
        names.push(who(gw.addr()).await);
    }
    let t = tally(&names);
    assert_eq!(t.values().sum::<usize>(), 50);
    assert_eq!(
        t.keys().cloned().collect::<Vec<_>>(),
        vec!["A", "B"],
        "{t:?}"
    );
    assert!(
        t["A"] >= 10 && t["B"] >= 10,
        "live backends share the load: {t:?}"
    );
}
