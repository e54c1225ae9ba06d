//! After the upgrade: message relay, close pass-through, fragmentation, pings, limits, idle.

mod common;
use async_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use async_tungstenite::tungstenite::protocol::frame::Frame;
use common::*;
use futures::StreamExt;
use std::time::{Duration, Instant};

async fn gateway_with(b: &Backend, extra: Value) -> Gateway {
    let mut cfg = one_pool_config(&[b]);
    if let Value::Object(m) = extra {
        for (k, v) in m {
            cfg[k] = v;
        }
    }
    Gateway::start(cfg).await
}

/// A raw client session: upgraded through the gateway, frames read and written by hand.
async fn raw_session(gw: &Gateway) -> RawConn {
    let mut c = RawConn::open(gw.addr()).await;
    c.write(upgrade_head("/", "localhost", &[]).as_bytes())
        .await;
    assert_eq!(c.read_head().await.status, 101);
    c
}

/// The next frame from the gateway that `want` accepts (others are skipped), bounded.
async fn next_frame(c: &mut RawConn, what: &str, want: impl Fn(&RawFrame) -> bool) -> RawFrame {
    within(what, WAIT, async {
        loop {
            let f = c.read_frame().await;
            if want(&f) {
                return f;
            }
        }
    })
    .await
}

/// Text and binary messages go through unchanged both ways, in order.
#[async_std::test]
async fn text_and_binary_relayed_both_ways() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({})).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    c.send_text("hello ✓").await;
    c.send(Message::binary(vec![0u8, 1, 2, 255])).await;
    assert_eq!(c.recv_data().await, Message::text("hello ✓"));
    assert_eq!(c.recv_data().await, Message::binary(vec![0u8, 1, 2, 255]));
    let rec = b.conn(0);
    assert_eq!(
        rec.data(),
        vec![
            &Message::text("hello ✓"),
            &Message::binary(vec![0u8, 1, 2, 255])
        ]
    );
}

/// A client's close code and reason reach the backend unchanged.
#[async_std::test]
async fn close_from_client_passes_code_and_reason() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({})).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    assert_eq!(c.whoami().await, "b1");
    c.close(4001, "bye from client").await;
    let f = b.wait_close(0).await.expect("close frame with a code");
    assert_eq!(code_of(&f), 4001);
    assert_eq!(f.reason.as_str(), "bye from client");
    // The client's close handshake completes with the echoed close.
    let (reply, _) = c.recv_close().await;
    assert_eq!(reply.map(|f| code_of(&f)), Some(4001));
}

/// RFC 6455 §7.1.1: once the gateway has answered a client's close, the server side closes
/// the TCP connection first. The gateway does so at once, with the answer, without waiting
/// for the backend to finish its own closing handshake (here it never does).
#[async_std::test]
async fn client_close_answered_then_its_connection_ended_at_once() {
    let b = Backend::start(BackendOpts::new("slow").mode(Mode::RawFramesNoCloseAnswer)).await;
    let gw = gateway_with(&b, json!({})).await;
    let mut c = raw_session(&gw).await;
    c.write_frame(true, 8, b"\x0f\xa1bye").await; // 4001 "bye"
    let f = next_frame(&mut c, "the close answer", |f| f.opcode == 8).await;
    assert_eq!(f.payload, b"\x0f\xa1bye");
    // The gateway gives the backend 2 s to answer its close; the client's end comes first.
    assert!(within("the client's EOF", ms(1500), c.at_eof()).await);
    b.wait_until("the backend got the close", |c| {
        c.first()
            .is_some_and(|r| r.raw_frames.iter().any(|f| f.opcode == 8))
    })
    .await;
}

/// §3 row "backend sent close frame → that code and reason, unchanged".
#[async_std::test]
async fn close_from_backend_passes_code_and_reason() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({})).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    c.send_text("close:4002:bye from backend").await;
    let (f, before) = c.recv_close().await;
    let f = f.expect("close frame with a code");
    assert_eq!(code_of(&f), 4002);
    assert_eq!(f.reason.as_str(), "bye from backend");
    assert!(before
        .iter()
        .all(|m| !matches!(m, Message::Text(_) | Message::Binary(_))));
    // A standard code with an empty reason too.
    let mut c2 = connect(gw.addr(), "/", &[]).await;
    c2.send_text("close:1000:").await;
    let (f, _) = c2.recv_close().await;
    let f = f.expect("close frame with a code");
    assert_eq!((code_of(&f), f.reason.as_str()), (1000, ""));
}

/// Close frames pass on byte for byte: a backend's 1014 (a code tungstenite 0.30 rewrites
/// on receipt) reaches a raw client as 1014 with its reason.
#[async_std::test]
async fn backend_close_code_1014_reaches_the_client_unchanged() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({})).await;
    let mut c = raw_session(&gw).await;
    c.write_frame(true, 1, b"close:1014:upstream gone").await;
    let f = next_frame(&mut c, "a close frame", |f| f.opcode == 8).await;
    assert_eq!(&f.payload[..2], &1014u16.to_be_bytes());
    assert_eq!(&f.payload[2..], b"upstream gone");
}

/// A client frame that breaks the protocol (here: unmasked) ends the session with 1002 to
/// the client and 1001 to the backend; nothing of it reaches the backend.
#[async_std::test]
async fn unmasked_client_frame_gets_1002() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({})).await;
    let mut c = raw_session(&gw).await;
    c.write_frame(true, 1, b"fine").await;
    c.write(&[0x81, 0x03, b'b', b'a', b'd']).await;
    let f = next_frame(&mut c, "a close frame", |f| f.opcode == 8).await;
    assert_eq!(&f.payload[..2], &1002u16.to_be_bytes());
    let closed = b.wait_close(0).await.expect("close with a code");
    assert_eq!(code_of(&closed), 1001);
    assert_eq!(b.conn(0).texts(), vec!["fine".to_string()]);
}

/// An 8 MiB binary message arrives intact both ways (default limits are 16 MiB).
#[async_std::test]
async fn eight_mib_binary_intact() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({})).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    let data: Vec<u8> = (0..8usize << 20).map(|i| (i * 31 % 251) as u8).collect();
    c.send(Message::binary(data.clone())).await;
    match c.recv_data().await {
        Message::Binary(got) => {
            assert_eq!(got.len(), data.len());
            assert!(got[..] == data[..], "8 MiB echo differs");
        }
        other => panic!("expected binary, got {other:?}"),
    }
    let rec = b.conn(0);
    assert_eq!(rec.data().len(), 1);
    match rec.data()[0] {
        Message::Binary(got) => assert!(got[..] == data[..], "backend copy differs"),
        other => panic!("backend got {other:?}"),
    }
}

/// A message the client sends in three fragments reaches the backend as one whole frame.
#[async_std::test]
async fn fragmented_client_message_forwarded_whole() {
    let raw = Backend::start(BackendOpts::new("raw").mode(Mode::RawFrames)).await;
    let gw = gateway_with(&raw, json!({})).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    c.send(Message::Frame(Frame::message(
        "hel",
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    c.send(Message::Frame(Frame::message(
        "lo ",
        OpCode::Data(Data::Continue),
        false,
    )))
    .await;
    c.send(Message::Frame(Frame::message(
        "world",
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    raw.wait_until("a data frame", |c| {
        c.first()
            .is_some_and(|c| c.raw_frames.iter().any(|f| f.opcode < 8))
    })
    .await;
    let data: Vec<RawFrame> = raw
        .conn(0)
        .raw_frames
        .into_iter()
        .filter(|f| f.opcode < 8)
        .collect();
    assert_eq!(
        data,
        vec![RawFrame {
            fin: true,
            opcode: 1,
            payload: b"hello world".to_vec()
        }],
        "the backend must see one final text frame"
    );
}

/// A message the backend sends in three fragments reaches the client as one whole frame.
#[async_std::test]
async fn fragmented_backend_message_forwarded_whole() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({})).await;
    let mut c = raw_session(&gw).await;
    c.write_frame(true, 1, b"frag").await;
    let f = next_frame(&mut c, "a data frame", |f| f.opcode < 8).await;
    assert_eq!(
        f,
        RawFrame {
            fin: true,
            opcode: 1,
            payload: b"hello world".to_vec()
        }
    );
}

/// Pings and pongs pass both ways: a client ping reaches the backend and its pong comes
/// back; a backend ping reaches the client and the client's pong reaches the backend.
#[async_std::test]
async fn ping_and_pong_relayed_both_ways() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({})).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    c.send(Message::Ping(b"c2b".to_vec().into())).await;
    b.wait_until("the client's ping", |c| {
        c[0].messages
            .contains(&Message::Ping(b"c2b".to_vec().into()))
    })
    .await;
    let got_pong = within("pong c2b", WAIT, async {
        loop {
            if let Message::Pong(p) = c.recv().await {
                return p;
            }
        }
    })
    .await;
    assert_eq!(&got_pong[..], b"c2b");

    c.send_text("ping:b2c").await;
    let got_ping = within("ping b2c", WAIT, async {
        loop {
            if let Message::Ping(p) = c.recv().await {
                return p;
            }
        }
    })
    .await;
    assert_eq!(&got_ping[..], b"b2c");
    // Reading again flushes tungstenite's automatic pong.
    assert_eq!(c.whoami().await, "b1");
    b.wait_until("the client's pong", |c| {
        c[0].messages
            .contains(&Message::Pong(b"b2c".to_vec().into()))
    })
    .await;
}

/// Gateway keepalive pings (`ping_interval_ms`) reach both peers, are answered, and the
/// answers are not forwarded: no pong arrives anywhere unasked, and the session lives on.
#[async_std::test]
async fn keepalive_pings_answered_not_forwarded() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({ "timeouts": { "ping_interval_ms": 300 } })).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    let mut got = Vec::new();
    let until = Instant::now() + ms(1400);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match async_std::future::timeout(left, c.ws.next()).await {
            Ok(Some(Ok(m))) => got.push(m),
            Ok(other) => panic!("session ended during keepalive: {other:?} after {got:?}"),
            Err(_) => break,
        }
    }
    let client_pings = got.iter().filter(|m| matches!(m, Message::Ping(_))).count();
    assert!(
        client_pings >= 2,
        "client got {client_pings} keepalive pings in 1400 ms: {got:?}"
    );
    assert!(
        !got.iter().any(|m| matches!(m, Message::Pong(_))),
        "unasked pong reached client"
    );
    assert_eq!(
        c.whoami().await,
        "b1",
        "the session must survive keepalives"
    );
    let rec = b.conn(0);
    let backend_pings = rec
        .messages
        .iter()
        .filter(|m| matches!(m, Message::Ping(_)))
        .count();
    assert!(
        backend_pings >= 2,
        "backend got {backend_pings} keepalive pings in 1400 ms"
    );
    assert!(
        !rec.messages.iter().any(|m| matches!(m, Message::Pong(_))),
        "the client's keepalive pong was forwarded to the backend: {:?}",
        rec.messages
    );
}

/// §3 rows "message over limit → 1009" and "the other side → 1001": a client message of
/// 1500 bytes in three 500-byte frames over `max_message_bytes` 1024.
#[async_std::test]
async fn client_message_over_limit_1009_backend_1001() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({ "limits": { "max_message_bytes": 1024 } })).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    c.send(Message::binary(vec![7u8; 1000])).await;
    assert_eq!(
        c.recv_data().await,
        Message::binary(vec![7u8; 1000]),
        "under the limit passes"
    );
    let part = vec![1u8; 500];
    c.send(Message::Frame(Frame::message(
        part.clone(),
        OpCode::Data(Data::Binary),
        false,
    )))
    .await;
    c.send(Message::Frame(Frame::message(
        part.clone(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await;
    c.send(Message::Frame(Frame::message(
        part,
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    assert_eq!(c.close_code().await, 1009);
    let f = b.wait_close(0).await.expect("close with a code");
    assert_eq!(code_of(&f), 1001);
    assert_eq!(
        b.conn(0).data().len(),
        1,
        "the oversized message must not be delivered"
    );
}

/// A single client frame over `max_frame_bytes` 1024 (message limit at default): 1009 to the
/// client, 1001 to the backend.
#[async_std::test]
async fn client_frame_over_limit_1009_backend_1001() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({ "limits": { "max_frame_bytes": 1024 } })).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    c.send(Message::binary(vec![7u8; 1000])).await;
    assert_eq!(
        c.recv_data().await,
        Message::binary(vec![7u8; 1000]),
        "under the limit passes"
    );
    c.send(Message::binary(vec![2u8; 2000])).await;
    assert_eq!(c.close_code().await, 1009);
    let f = b.wait_close(0).await.expect("close with a code");
    assert_eq!(code_of(&f), 1001);
    assert_eq!(b.conn(0).data().len(), 1);
}

/// The backend sends a message over the limit: the backend gets 1009, the client 1001.
#[async_std::test]
async fn backend_message_over_limit_1009_client_1001() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({ "limits": { "max_message_bytes": 1024 } })).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    c.send_text("big:1024").await;
    assert_eq!(
        c.recv_data().await,
        Message::binary(vec![b'x'; 1024]),
        "at the limit passes"
    );
    c.send_text("big:5000").await;
    let (f, before) = c.recv_close().await;
    assert!(
        before.iter().all(|m| !matches!(m, Message::Binary(_))),
        "oversized was relayed"
    );
    assert_eq!(f.map(|f| code_of(&f)), Some(1001));
    let f = b.wait_close(0).await.expect("close with a code");
    assert_eq!(code_of(&f), 1009);
}

/// §3 row "idle timeout → 1001": traffic keeps a session alive past `idle_ms`; with no
/// message either way for `idle_ms`, both sides get close 1001.
#[async_std::test]
async fn idle_timeout_closes_both_sides_1001() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({ "timeouts": { "idle_ms": 400 } })).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    for i in 0..6 {
        if i > 0 {
            async_std::task::sleep(ms(150)).await; // 5 × 150 ms > idle_ms, with traffic between
        }
        let m = format!("keep {i}");
        assert_eq!(c.ask(&m).await, m);
    }
    let last = Instant::now();
    let code = c.close_code().await;
    let idle = last.elapsed();
    assert_eq!(code, 1001);
    assert!(
        idle >= ms(300),
        "closed after only {idle:?} of idleness (idle_ms 400)"
    );
    assert!(idle < Duration::from_secs(3), "idle close took {idle:?}");
    let f = b.wait_close(0).await.expect("close with a code");
    assert_eq!(code_of(&f), 1001);
}

/// 100 concurrent connections × 100 messages each: none lost, none reordered, none crossed
/// between sessions, on both the echo path and the backend's record.
#[async_std::test]
async fn hundred_connections_hundred_messages_in_order() {
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({})).await;
    let addr = gw.addr();
    let clients = (0..100).map(|i| async move {
        let mut c = connect(addr, "/", &[]).await;
        for j in 0..100 {
            c.send_text(&format!("c{i}-m{j}")).await;
        }
        for j in 0..100 {
            assert_eq!(
                c.recv_text().await,
                format!("c{i}-m{j}"),
                "client {i} message {j}"
            );
        }
        c.close_and_wait().await;
    });
    within(
        "100 × 100 messages",
        Duration::from_secs(60),
        futures::future::join_all(clients),
    )
    .await;
    let conns = b.conns();
    assert_eq!(conns.len(), 100);
    let mut seen = std::collections::BTreeSet::new();
    for rec in conns {
        let texts = rec.texts();
        assert_eq!(
            texts.len(),
            100,
            "a backend connection got {} messages",
            texts.len()
        );
        let i: usize = texts[0][1..texts[0].find('-').unwrap()].parse().unwrap();
        let want: Vec<String> = (0..100).map(|j| format!("c{i}-m{j}")).collect();
        assert_eq!(texts, want, "backend order for client {i}");
        assert!(seen.insert(i), "client {i} seen on two backend connections");
    }
}

/// `"relay": "tunnel"` between plain TCP ends: two bulk phases of 64 KiB messages (3 MiB each
/// way each; reads that fill the copy buffer switch a direction to splice(2)) around a
/// 64 B phase (small splices switch it back to read/write), every byte verified both ways,
/// and the access line's byte counts exact.
#[async_std::test]
async fn tunnel_bulk_and_small_messages_intact_and_counted() {
    const BIG: usize = 64 * 1024;
    const SMALL: usize = 64;
    const ROUNDS: usize = 12;
    const WINDOW: usize = 4;
    let b = Backend::echo("b1").await;
    let gw = gateway_with(&b, json!({ "relay": "tunnel" })).await;
    let mut c = connect(gw.addr(), "/", &[]).await;
    let msg = |size: usize, k: usize| -> Vec<u8> {
        (0..size).map(|i| ((i * 31 + k * 7) % 251) as u8).collect()
    };
    // Frame bytes on the wire: the client's frames carry a 4-byte mask; a payload over 125
    // bytes has a 2-byte length, over 65535 an 8-byte one.
    let frame = |size: usize, masked: bool| -> u64 {
        let len = match size {
            0..=125 => 0,
            126..=65535 => 2,
            _ => 8,
        };
        (2 + len + if masked { 4 } else { 0 } + size) as u64
    };
    let (mut c2b, mut b2c) = (0u64, 0u64);
    let mut k = 0;
    for size in [BIG, SMALL, BIG] {
        within("a tunnel phase", Duration::from_secs(60), async {
            for _ in 0..ROUNDS {
                for w in 0..WINDOW {
                    c.send(Message::binary(msg(size, k + w))).await;
                }
                for w in 0..WINDOW {
                    match c.recv_data().await {
                        Message::Binary(got) => {
                            assert_eq!(got.len(), size, "message {}", k + w);
                            assert!(got[..] == msg(size, k + w)[..], "message {} differs", k + w);
                        }
                        other => panic!("expected binary, got {other:?}"),
                    }
                }
                k += WINDOW;
                c2b += WINDOW as u64 * frame(size, true);
                b2c += WINDOW as u64 * frame(size, false);
            }
        })
        .await;
    }
    c.close_and_wait().await;
    // The close handshake: the client's 1000 (masked), the backend's 1000 back.
    c2b += frame(2, true);
    b2c += frame(2, false);
    let rec = b.conn(0);
    assert_eq!(rec.data().len(), k, "messages the backend got");
    let lines = gw.wait_access_lines(1).await;
    let f = fields(&lines[0]);
    assert_eq!(f["c2b_bytes"], c2b.to_string(), "{}", lines[0]);
    assert_eq!(f["b2c_bytes"], b2c.to_string(), "{}", lines[0]);
}
