//! Scale-out (issue 6, docs/scale-out.md), black-box and end to end: a real Redis, two
//! `chat_server --redis` backends, two `wsgate` instances with `proxy_protocol: true`, and a
//! real HAProxy in TCP mode with `send-proxy-v2` and health checks in front (its config is
//! `deploy/haproxy.cfg.in`), all on loopback. Clients connect through HAProxy from chosen
//! 127.0.0.N source addresses.
//!
//! Needs `redis-server` and `haproxy` on PATH (`.ci/run` installs them). The tests run one at
//! a time (`SERIAL`); run with `--nocapture` to see the measured figures.

mod cluster_support;
mod common;

use cluster_support::*;
use common::{is_access_line, within, WAIT};
use futures::future::join_all;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_std::task;

/// Gaps and repeats in the ids a client received, against the full run `first..=last`:
/// (lost = ids of the run never received, doubled = receipts beyond the first of an id,
/// out of order = receipts of an id not above the previous one).
fn tally(ids: &[u64], first: u64, last: u64) -> (usize, usize, usize) {
    let got: BTreeSet<u64> = ids.iter().copied().collect();
    let lost = (first..=last).filter(|i| !got.contains(i)).count();
    let doubled = ids.len() - got.len();
    let disorder = ids.windows(2).filter(|w| w[1] <= w[0]).count();
    (lost, doubled, disorder)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Participants by (gateway, backend), for the figures.
fn spread(ps: &[Participant]) -> BTreeMap<(String, String), usize> {
    let mut m = BTreeMap::new();
    for p in ps {
        *m.entry((p.gateway.clone(), p.backend.clone())).or_insert(0) += 1;
    }
    m
}

/// A speaker: says `prefix-0`, `prefix-1`, ... in its room every `every` until `stop`, then
/// returns the id Redis gave its last message (the room's last id: it is the room's only
/// speaker).
async fn speak(
    mut sp: Participant,
    prefix: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> (u64, usize) {
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let c = sp.client.as_mut().unwrap();
        c.send(json!({ "say": format!("{prefix}-{n}") })).await;
        n += 1;
        task::sleep(every).await;
    }
    let last = format!("{prefix}-{}", n - 1);
    let id = sp
        .inbox
        .wait(
            &format!("speaker hears its last message {last}"),
            WAIT,
            |s| {
                s.room_msgs()
                    .find(|(_, _, v)| v["text"] == last.as_str())
                    .map(|(_, _, v)| v["id"].as_u64().unwrap())
            },
        )
        .await;
    (id, n)
}

/// 40 clients through HAProxy, spread over both gateways and both chat backends, in two rooms:
/// every client receives every message said in its room exactly once, in the order of the ids
/// Redis gave them (1, 2, 3, ... with no hole), and the id → message mapping is the same for
/// every member and in Redis's history.
#[async_std::test]
async fn rooms_span_gateways_and_backends_exactly_once_in_redis_order() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(false).await;
    const CLIENTS: u8 = 40;
    const SAYS: usize = 5;
    let rooms = ["red", "blue"];
    let mut ps = join_all(
        (0..CLIENTS).map(|i| Participant::join(lo(2 + i), c.haproxy.all, rooms[i as usize % 2])),
    )
    .await;
    let spread = spread(&ps);
    eprintln!("40 clients by (gateway, backend): {spread:?}");
    let gateways: BTreeSet<&str> = spread.keys().map(|k| k.0.as_str()).collect();
    let backends: BTreeSet<&str> = spread.keys().map(|k| k.1.as_str()).collect();
    assert_eq!(gateways, BTreeSet::from(["gw1", "gw2"]), "{spread:?}");
    assert_eq!(backends, BTreeSet::from(["chat1", "chat2"]), "{spread:?}");

    // Everyone talks at once.
    join_all(ps.iter_mut().map(|p| async move {
        let src = p.src;
        let c = p.client.as_mut().unwrap();
        for k in 0..SAYS {
            c.send(json!({ "say": format!("{src}#{k}") })).await;
        }
    }))
    .await;
    let per_room = (CLIENTS as usize / 2) * SAYS;
    let t0 = Instant::now();
    join_all(ps.iter().map(|p| async move {
        let what = format!("{} receives {per_room} room messages", p.src);
        p.inbox
            .wait(&what, WAIT, |s| {
                (s.room_msgs().count() >= per_room).then_some(())
            })
            .await
    }))
    .await;
    eprintln!(
        "all 40 clients had their {per_room} messages {} ms after the last say",
        t0.elapsed().as_millis()
    );

    let mut total = (0, 0, 0);
    for room in rooms {
        let kept: BTreeMap<u64, Value> = c.redis.history(room).into_iter().collect();
        assert_eq!(
            kept.keys().copied().collect::<Vec<_>>(),
            (1..=per_room as u64).collect::<Vec<_>>()
        );
        let said: BTreeSet<String> = ps
            .iter()
            .filter(|p| p.room == room)
            .flat_map(|p| (0..SAYS).map(move |k| format!("{}#{k}", p.src)))
            .collect();
        let stored: BTreeSet<String> = kept
            .values()
            .map(|v| v["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            stored, said,
            "room {room}: Redis kept exactly what was said"
        );
        let origins: BTreeSet<&str> = kept
            .values()
            .map(|v| v["origin"].as_str().unwrap())
            .collect();
        assert_eq!(
            origins,
            BTreeSet::from(["chat1", "chat2"]),
            "said on both backends"
        );
        for p in ps.iter().filter(|p| p.room == room) {
            let s = p.inbox.snapshot();
            let got: Vec<&Value> = s.room_msgs().map(|(_, _, v)| v).collect();
            let ids: Vec<u64> = got.iter().map(|v| v["id"].as_u64().unwrap()).collect();
            let t = tally(&ids, 1, per_room as u64);
            total = (total.0 + t.0, total.1 + t.1, total.2 + t.2);
            assert_eq!(
                ids,
                (1..=per_room as u64).collect::<Vec<_>>(),
                "{} in {room}: ids as received",
                p.src
            );
            for v in &got {
                let id = v["id"].as_u64().unwrap();
                assert_eq!(v["room"], room);
                assert_eq!(
                    v["text"], kept[&id]["text"],
                    "{}: message {id} differs from Redis's",
                    p.src
                );
                assert_eq!(v["origin"], kept[&id]["origin"]);
                assert_eq!(
                    v["backend"],
                    p.backend.as_str(),
                    "delivered by the client's own backend"
                );
            }
        }
    }
    eprintln!(
        "figures: 40 clients, {} messages in 2 rooms, each client got {per_room}/{per_room}: lost {}, doubled {}, out of order {}",
        2 * per_room,
        total.0,
        total.1,
        total.2
    );
}

/// Through HAProxy (TCP mode, PROXY v2) and either gateway, the backend sees the real
/// client's IP in X-Forwarded-For and X-Real-IP (appended to an X-Forwarded-For the client
/// sent), and the gateway's access line names the client's own ip:port.
#[async_std::test]
async fn backends_see_the_real_client_ip_through_haproxy_and_proxy_v2() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(false).await;
    let mut seen_gateways = BTreeSet::new();
    let mut clients = Vec::new();
    for n in 30..=37u8 {
        let src = lo(n);
        let own_xff = n == 37;
        let headers: &[(&str, &str)] = if own_xff {
            &[("X-Forwarded-For", "203.0.113.9")]
        } else {
            &[]
        };
        let inbox = Arc::new(Inbox::default());
        let mut cl = ChatClient::connect(src, c.haproxy.all, inbox, 0, headers)
            .await
            .unwrap();
        let (backend, h) = cl.whoami().await;
        let want_xff = if own_xff {
            format!("203.0.113.9, {src}")
        } else {
            src.to_string()
        };
        assert_eq!(
            h["x-forwarded-for"],
            want_xff.as_str(),
            "{src} via {backend}: {h}"
        );
        assert_eq!(h["x-real-ip"], src.to_string().as_str(), "{src}: {h}");
        let gw = h["x-gateway"].as_str().unwrap().to_string();
        eprintln!(
            "{src} (socket {}) → {gw} → {backend}: X-Forwarded-For {}",
            cl.local, h["x-forwarded-for"]
        );
        seen_gateways.insert(gw.clone());
        clients.push((cl, gw));
    }
    assert_eq!(
        seen_gateways,
        BTreeSet::from(["gw1".to_string(), "gw2".to_string()])
    );
    let locals: Vec<(SocketAddr, String)> = clients
        .iter()
        .map(|(cl, gw)| (cl.local, gw.clone()))
        .collect();
    for (cl, _) in clients {
        cl.close().await;
    }
    for (local, gw) in locals {
        let inst = c.gws.iter().find(|i| i.name == gw).unwrap();
        let marker = format!("client={local} ");
        inst.gw()
            .wait_log(&format!("{gw} access line for {local}"), |l| {
                is_access_line(l) && l.contains(&marker)
            })
            .await;
    }
}

/// ip_hash through either instance: each of 20 client IPs (127.0.0.2–21) reaches the same
/// chat backend through gw1 alone, gw2 alone (which lists the backends in the other order)
/// and the shared frontend, and it is the backend the engine's ring computes from the
/// backend list alone.
#[async_std::test]
async fn same_client_ip_same_backend_through_either_instance() {
    use wsgate_actors::balance::ip_hash::IpHash;
    use wsgate_actors::balance::BackendView;
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(true).await;
    let list: Vec<(SocketAddr, u32)> = c.chats.iter().map(|ch| (ch.addr, 1)).collect();
    let views: Vec<BackendView> = list
        .iter()
        .map(|&(addr, weight)| BackendView {
            addr,
            weight,
            active: 0,
            up: true,
        })
        .collect();
    let ring = IpHash::new(&list);
    let via = [c.haproxy.only[0], c.haproxy.only[1], c.haproxy.all];
    let results = join_all((2..=21u8).map(|n| async move {
        let src = lo(n);
        let mut out = Vec::new();
        for addr in via {
            let mut cl = ChatClient::connect(src, addr, Arc::new(Inbox::default()), 0, &[])
                .await
                .unwrap_or_else(|e| panic!("{src} → {addr}: {e}"));
            let (backend, h) = cl.whoami().await;
            assert_eq!(h["x-forwarded-for"], src.to_string().as_str());
            out.push((h["x-gateway"].as_str().unwrap().to_string(), backend));
            cl.close().await;
        }
        (src, out)
    }))
    .await;
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for (src, out) in &results {
        assert_eq!(out[0].0, "gw1");
        assert_eq!(out[1].0, "gw2");
        let expected = c.chat_name(list[ring.order(&views, *src, 1)[0]].0);
        for (gw, backend) in out {
            assert_eq!(backend, expected, "{src} through {gw}: {out:?}");
        }
        *per_backend.entry(expected.to_string()).or_default() += 1;
    }
    eprintln!("figures: 20 client IPs × (gw1, gw2, shared frontend): same backend every time; per backend {per_backend:?}");
    assert_eq!(
        per_backend.len(),
        2,
        "the 20 IPs spread over both backends: {per_backend:?}"
    );
}

/// Rolling restart: SIGTERM gw1 while two speakers (on gw2) keep talking. gw1's clients get
/// 1001, reconnect through HAProxy (to gw2), rejoin with `since` = the last id they had, and
/// the replay from Redis closes the gap: within 3 s every client is back, and over the whole
/// run every client has every id exactly once. gw1 exits 0, comes back, and HAProxy gives it
/// the new sessions.
#[async_std::test]
async fn rolling_restart_of_one_instance_loses_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(false).await;
    let rooms = ["red", "blue"];
    let mut ps = join_all(
        (0..40u8).map(|i| Participant::join(lo(2 + i), c.haproxy.all, rooms[i as usize % 2])),
    )
    .await;
    eprintln!("40 clients by (gateway, backend): {:?}", spread(&ps));
    let on_gw1 = ps.iter().filter(|p| p.gateway == "gw1").count();
    assert!(
        on_gw1 >= 10,
        "leastconn spreads the clients: {:?}",
        spread(&ps)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut speakers = Vec::new();
    for (k, room) in rooms.iter().enumerate() {
        let sp = Participant::join(lo(100 + k as u8), c.haproxy.only[1], room).await;
        speakers.push(task::spawn(speak(
            sp,
            format!("s-{room}"),
            ms(25),
            stop.clone(),
        )));
    }
    // Traffic flows: every client has a few messages.
    join_all(ps.iter().map(|p| {
        p.inbox.wait("first messages", WAIT, |s| {
            (s.room_msgs().count() >= 5).then_some(())
        })
    }))
    .await;

    let gw1 = c.gws.iter_mut().find(|i| i.name == "gw1").unwrap();
    let t0 = Instant::now();
    gw1.gw().signal("TERM");
    let all = c.haproxy.all;
    let back = join_all(
        ps.iter_mut()
            .filter(|p| p.gateway == "gw1")
            .map(|p| async move {
                let conn = p.client.as_ref().unwrap().conn;
                let (closed_at, code) = p
                    .inbox
                    .wait(&format!("{} is closed", p.src), WAIT, |s| {
                        s.closes.iter().find(|c| c.0 == conn).map(|c| (c.1, c.2))
                    })
                    .await;
                p.client.take();
                let since = p.inbox.state().last_id();
                let mut tries = 0;
                let mut cl = loop {
                    tries += 1;
                    match ChatClient::connect(p.src, all, p.inbox.clone(), conn + 1, &[]).await {
                        Ok(cl) => break cl,
                        Err(e) if tries < 50 => {
                            eprintln!("{}: reconnect try {tries}: {e}", p.src);
                            task::sleep(ms(20)).await;
                        }
                        Err(e) => panic!("{}: reconnect failed {tries} times: {e}", p.src),
                    }
                };
                let joined = cl
                    .request(json!({ "join": p.room, "since": since }), "joined")
                    .await;
                let back_at = p
                    .inbox
                    .state()
                    .msgs
                    .iter()
                    .rev()
                    .find(|m| m.2 == joined)
                    .unwrap()
                    .1;
                let (backend, h) = cl.whoami().await;
                p.gateway = h["x-gateway"].as_str().unwrap().to_string();
                p.backend = backend;
                p.client = Some(cl);
                (p.src, code, closed_at - t0, back_at - t0, tries)
            }),
    )
    .await;
    let gw1 = c.gws.iter_mut().find(|i| i.name == "gw1").unwrap();
    let code = gw1.gw.as_mut().unwrap().wait_exit(ms(6000)).await;
    assert_eq!(code, Some(0), "gw1 exits 0 after draining");
    gw1.gw = None;

    for (src, code, closed, back, tries) in &back {
        assert_eq!(*code, Some(1001), "{src}: close code");
        assert!(
            *back < ms(3000),
            "{src}: back after {back:?} (closed after {closed:?}, {tries} tries)"
        );
    }
    let backs: Vec<Duration> = back.iter().map(|b| b.3).collect();
    let worst = *backs.iter().max().unwrap();
    let med = median(backs.clone());
    let closes: Vec<Duration> = back.iter().map(|b| b.2).collect();
    let retries: usize = back.iter().map(|b| b.4 - 1).sum();
    // HAProxy retries a connect refused by the stopping gw1 on gw2 after its turn-around
    // timer, min(timeout connect, 1 s): the few clients it had already sent to gw1 pay that.
    let slow = backs.iter().filter(|b| **b > ms(500)).count();
    assert!(
        ps.iter().all(|p| p.gateway == "gw2"),
        "everyone is on gw2 now"
    );

    // gw1 comes back and takes the new sessions (leastconn: it has none, gw2 has them all).
    let gw1 = c.gws.iter_mut().find(|i| i.name == "gw1").unwrap();
    gw1.restart().await;
    c.haproxy.wait_server("gw1", "UP").await;
    let newcomers =
        join_all((50..54u8).map(|n| Participant::join(lo(n), c.haproxy.all, "red"))).await;
    for p in &newcomers {
        assert_eq!(p.gateway, "gw1", "{} after gw1 came back", p.src);
    }

    stop.store(true, Ordering::SeqCst);
    let mut last = BTreeMap::new();
    for (room, sp) in rooms.iter().zip(speakers) {
        let (id, n) = sp.await;
        eprintln!("room {room}: {n} messages said, last id {id}");
        last.insert(*room, id);
    }
    let (mut lost, mut doubled, mut disorder, mut replayed) = (0, 0, 0, 0);
    for p in &ps {
        let final_id = last[p.room.as_str()];
        p.inbox
            .wait(&format!("{} reaches id {final_id}", p.src), WAIT, |s| {
                (s.last_id() >= final_id).then_some(())
            })
            .await;
        let s = p.inbox.snapshot();
        let ids = s.ids();
        assert_eq!(ids[0], 1, "{}: first id", p.src);
        let t = tally(&ids, 1, final_id);
        if t != (0, 0, 0) {
            eprintln!(
                "{}: lost {} doubled {} out of order {}: {ids:?}",
                p.src, t.0, t.1, t.2
            );
        }
        lost += t.0;
        doubled += t.1;
        disorder += t.2;
        replayed += s.room_msgs().filter(|m| m.2["replay"] == true).count();
    }
    eprintln!(
        "figures: SIGTERM gw1 with {} of 40 clients: closed (1001) after max {} ms; back in their room after median {} ms, max {} ms ({slow} over 500 ms; {} reconnect retries); \
         {replayed} missed messages replayed from Redis; over {} + {} messages: lost {lost}, doubled {doubled}, out of order {disorder}; \
         gw1 back: 4/4 new sessions on gw1",
        back.len(),
        closes.iter().max().unwrap().as_millis(),
        med.as_millis(),
        worst.as_millis(),
        retries,
        last["red"],
        last["blue"],
    );
    assert_eq!((lost, doubled, disorder), (0, 0, 0));
    assert!(
        replayed > 0,
        "the restart made clients miss messages that the replay brought back"
    );
}

/// Killing one chat backend (SIGKILL) with `on_backend_loss: reconnect` and
/// `replay_first_messages: 1`: its clients keep their WebSocket, the gateways replay their
/// join to the other backend, they keep receiving the room's messages from it, and the one
/// hole (messages published while they moved) is filled from Redis's history.
#[async_std::test]
async fn killed_backend_clients_keep_their_socket_and_room() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(false).await;
    let speaker = Participant::join(lo(100), c.haproxy.only[1], "lobby").await;
    let survivor = speaker.backend.clone();
    let victim = if survivor == "chat1" {
        "chat2"
    } else {
        "chat1"
    }
    .to_string();
    let mut ps =
        join_all((2..=21u8).map(|n| Participant::join(lo(n), c.haproxy.all, "lobby"))).await;
    let moved: Vec<IpAddr> = ps
        .iter()
        .filter(|p| p.backend == victim)
        .map(|p| p.src)
        .collect();
    eprintln!(
        "20 clients by (gateway, backend): {:?}; killing {victim}",
        spread(&ps)
    );
    assert!(!moved.is_empty(), "some clients are on {victim}");

    let stop = Arc::new(AtomicBool::new(false));
    let speaking = task::spawn(speak(speaker, "s".into(), ms(5), stop.clone()));
    join_all(ps.iter().map(|p| {
        p.inbox.wait("first messages", WAIT, |s| {
            (s.room_msgs().count() >= 5).then_some(())
        })
    }))
    .await;

    let t0 = Instant::now();
    c.chats
        .iter_mut()
        .find(|ch| ch.name == victim)
        .unwrap()
        .kill();
    let rejoined = join_all(ps.iter_mut().filter(|p| p.backend == victim).map(|p| {
        let survivor = survivor.clone();
        async move {
            // The gateway replays the join: a second "joined", from the other backend.
            let (at, idx) = p
                .inbox
                .wait(&format!("{} rejoined", p.src), WAIT, |s| {
                    s.msgs
                        .iter()
                        .enumerate()
                        .filter(|(_, m)| m.2.get("joined").is_some())
                        .nth(1)
                        .map(|(i, m)| (m.1, i))
                })
                .await;
            let s = p.inbox.snapshot();
            assert_eq!(s.msgs[idx].2["backend"], survivor.as_str());
            assert_eq!(s.msgs[idx].0, 0, "same connection");
            let before = s.msgs[..idx]
                .iter()
                .filter_map(|m| m.2["id"].as_u64())
                .max()
                .unwrap();
            let cl = p.client.as_mut().unwrap();
            let h = cl
                .request(
                    json!({ "history": { "room": "lobby", "since": before } }),
                    "history",
                )
                .await;
            let filled: Vec<u64> = h["history"]["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_u64().unwrap())
                .collect();
            let (backend, _) = cl.whoami().await;
            assert_eq!(backend, survivor, "{}: whoami on the same socket", p.src);
            p.backend = backend;
            (p.src, at - t0, before, filled)
        }
    }))
    .await;
    // More traffic after the move, then the end.
    join_all(ps.iter().map(|p| {
        let after = p.inbox.snapshot().last_id() + 5;
        p.inbox.wait("messages after the move", WAIT, move |s| {
            (s.last_id() >= after).then_some(())
        })
    }))
    .await;
    stop.store(true, Ordering::SeqCst);
    let (final_id, said) = speaking.await;

    let (mut lost, mut doubled, mut disorder, mut missed_live) = (0, 0, 0, 0);
    for p in &ps {
        p.inbox
            .wait(&format!("{} reaches id {final_id}", p.src), WAIT, |s| {
                (s.last_id() >= final_id).then_some(())
            })
            .await;
        let s = p.inbox.snapshot();
        assert!(
            s.closes.is_empty(),
            "{}: the socket stayed open: {:?}",
            p.src,
            s.closes
        );
        let live = s.ids();
        let t = tally(&live, 1, final_id);
        doubled += t.1;
        disorder += t.2;
        let mut all: BTreeSet<u64> = live.iter().copied().collect();
        if let Some(r) = rejoined.iter().find(|r| r.0 == p.src) {
            missed_live += t.0;
            all.extend(r.3.iter().copied());
        } else {
            assert_eq!(
                t.0, 0,
                "{}: a client of the surviving backend misses nothing",
                p.src
            );
        }
        lost += (1..=final_id).filter(|i| !all.contains(i)).count();
    }
    let times: Vec<Duration> = rejoined.iter().map(|r| r.1).collect();
    let failovers: f64 = {
        let mut n = 0.0;
        for i in &c.gws {
            n += i.gw().metric("wsgate_failovers_total").await.unwrap_or(0.0);
        }
        n
    };
    eprintln!(
        "figures: SIGKILL {victim} with {} of 20 clients on it: same socket, rejoined via {survivor} after median {} ms, max {} ms; \
         {missed_live} messages published during the move fetched from Redis history; over {final_id} messages ({said} said): \
         lost {lost}, doubled {doubled}, out of order {disorder}; wsgate_failovers_total {failovers}",
        moved.len(),
        median(times.clone()).as_millis(),
        times.iter().max().unwrap().as_millis(),
    );
    assert_eq!((lost, doubled, disorder), (0, 0, 0));
    assert_eq!(
        failovers as usize,
        moved.len(),
        "one failover per moved session"
    );
}

// ---------------------------------------------------------------------------------------------
// deploy/cluster.sh

/// Runs `deploy/cluster.sh ARGS` with `env` (bounded); (exit code, stdout + stderr).
fn script(args: &[&str], env: &[(&str, String)], limit: Duration) -> (i32, String) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/cluster.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => {
            let out = out.unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.code().unwrap_or(-1), text)
        }
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("deploy/cluster.sh {args:?} did not finish within {limit:?}");
        }
    }
}

/// What the script started: name → PID, from its pid files.
fn script_pids(state: &std::path::Path) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(state.join("pids")) {
        for e in rd.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
                out.insert(e.file_name().to_string_lossy().into_owned(), pid);
            }
        }
    }
    out
}

fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Stops what the script started if the test fails half-way: the script's own `stop`, then
/// SIGKILL to any recorded PID still running (those processes are this test's).
struct ScriptCluster {
    env: Vec<(&'static str, String)>,
    state: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for ScriptCluster {
    fn drop(&mut self) {
        let pids = script_pids(&self.state);
        if pids.is_empty() {
            return;
        }
        let _ = std::panic::catch_unwind(|| script(&["stop"], &self.env, Duration::from_secs(30)));
        for pid in script_pids(&self.state).values().filter(|p| running(**p)) {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

/// The recipe: `deploy/cluster.sh start` brings up Redis, two chat backends, two gateways and
/// HAProxy; clients on it share a room and the backends see their IP; `status` reports every
/// part running; `restart gw1` is a rolling restart (gw1's client gets 1001); `stop` ends every
/// process it started and removes its folder.
#[async_std::test]
async fn deploy_cluster_script_starts_serves_restarts_and_stops() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let env = vec![
        ("WSGATE_CLUSTER_DIR", state.to_string_lossy().into_owned()),
        ("WSGATE_BIN", env!("CARGO_BIN_EXE_wsgate").to_string()),
        (
            "CHAT_SERVER_BIN",
            common::example_bin("chat_server")
                .to_string_lossy()
                .into_owned(),
        ),
        ("RUST_LOG", "info".to_string()),
    ];
    let cluster = ScriptCluster {
        env: env.clone(),
        state: state.clone(),
        _dir: dir,
    };
    let t = Instant::now();
    let (code, out) = script(&["start"], &env, Duration::from_secs(60));
    assert_eq!(code, 0, "start:\n{out}");
    eprintln!("cluster.sh start took {} ms", t.elapsed().as_millis());
    let started = script_pids(&state);
    assert_eq!(
        started.keys().map(String::as_str).collect::<Vec<_>>(),
        ["chat1", "chat2", "gw1", "gw2", "haproxy", "redis"]
    );
    let vars = std::fs::read_to_string(state.join("env")).unwrap();
    let port = vars
        .lines()
        .find_map(|l| l.strip_prefix("HAPROXY_PORT="))
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let front: SocketAddr = ([127, 0, 0, 1], port).into();

    // Two clients from different addresses (so, likely, different gateways and backends).
    let mut a = Participant::join(lo(60), front, "lobby").await;
    let b = Participant::join(lo(61), front, "lobby").await;
    eprintln!(
        "a: {} {}, b: {} {}",
        a.gateway, a.backend, b.gateway, b.backend
    );
    let (_, h) = a.client.as_mut().unwrap().whoami().await;
    assert_eq!(h["x-forwarded-for"], "127.0.0.60");
    a.client
        .as_mut()
        .unwrap()
        .send(json!({ "say": "hello through the recipe" }))
        .await;
    let got = b
        .inbox
        .wait("b hears a", WAIT, |s| {
            s.room_msgs()
                .find(|m| m.2["text"] == "hello through the recipe")
                .map(|m| m.2.clone())
        })
        .await;
    assert_eq!(got["id"], 1);
    assert_eq!(got["backend"], b.backend.as_str());

    let (code, out) = script(&["status"], &env, Duration::from_secs(20));
    assert_eq!(code, 0, "status:\n{out}");
    for name in ["redis", "chat1", "chat2", "gw1", "gw2", "haproxy"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(name) && l.contains("running")),
            "status shows {name} running:\n{out}"
        );
    }

    let on_gw1: Vec<&Participant> = [&a, &b]
        .into_iter()
        .filter(|p| p.gateway == "gw1")
        .collect();
    let (code, out) = script(&["restart", "gw1"], &env, Duration::from_secs(30));
    assert_eq!(code, 0, "restart gw1:\n{out}");
    for p in on_gw1 {
        let code = p
            .inbox
            .wait("gw1's client is closed", WAIT, |s| {
                s.closes.first().map(|c| c.2)
            })
            .await;
        assert_eq!(code, Some(1001), "{}", p.src);
    }
    let restarted = script_pids(&state);
    assert_ne!(
        restarted["gw1"], started["gw1"],
        "gw1 runs again, as a new process"
    );
    assert!(running(restarted["gw1"]));

    let (code, out) = script(&["stop"], &env, Duration::from_secs(40));
    assert_eq!(code, 0, "stop:\n{out}");
    within("every process the script started has exited", WAIT, async {
        while restarted.values().any(|p| running(*p)) {
            task::sleep(ms(20)).await;
        }
    })
    .await;
    assert!(!state.exists(), "stop removed {}", state.display());
    drop(cluster);
}
