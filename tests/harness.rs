//! Self-checks of the test harness against the test backends directly (no gateway): the
//! raw frame views really see fragmentation, so the relay tests that expect one whole frame
//! can fail; rejection, header capture, protocol choice and close knobs work.

mod common;
use async_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use async_tungstenite::tungstenite::protocol::frame::Frame;
use common::*;

#[async_std::test]
async fn raw_backend_sees_fragments_directly() {
    let raw = Backend::start(BackendOpts::new("raw").mode(Mode::RawFrames)).await;
    let mut c = connect(raw.addr, "/", &[]).await;
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
    // The backend may record the connection after the client already has its 101: wait for
    // it rather than index it.
    raw.wait_until("3 frames", |c| {
        c.first().is_some_and(|c| c.raw_frames.len() == 3)
    })
    .await;
    let f = raw.conn(0).raw_frames;
    assert_eq!(
        f[0],
        RawFrame {
            fin: false,
            opcode: 1,
            payload: b"hel".to_vec()
        }
    );
    assert_eq!(
        f[2],
        RawFrame {
            fin: true,
            opcode: 0,
            payload: b"world".to_vec()
        }
    );
}

#[async_std::test]
async fn raw_client_sees_backend_fragments_directly() {
    let b = Backend::echo("b").await;
    let mut c = RawConn::open(b.addr).await;
    c.write(upgrade_head("/", "localhost", &[]).as_bytes())
        .await;
    assert_eq!(c.read_head().await.status, 101);
    c.write_frame(true, 1, b"frag").await;
    assert_eq!(
        c.read_frame().await,
        RawFrame {
            fin: false,
            opcode: 1,
            payload: b"hel".to_vec()
        }
    );
    c.write_frame(true, 1, b"headers").await;
    let _ = c.read_frame().await;
    let f = c.read_frame().await;
    assert_eq!(f.opcode, 0);
}

#[async_std::test]
async fn backend_rejects_with_status() {
    let r = Backend::start(BackendOpts::new("r").mode(Mode::Reject(401, "no"))).await;
    assert_eq!(upgrade_status(r.addr, "/x", &[]).await, 401);
    r.wait_until("recorded", |c| c.len() == 1).await;
    assert_eq!(r.conn(0).path, "/x");
}

#[async_std::test]
async fn direct_headers_and_protocol() {
    let b = Backend::start(BackendOpts::new("b").protocols(&["p2"])).await;
    let mut c = connect(
        b.addr,
        "/a?b=1",
        &[
            ("Sec-WebSocket-Protocol", "p1, p2"),
            ("Host", "h.example:1"),
        ],
    )
    .await;
    assert_eq!(c.protocol().as_deref(), Some("p2"));
    let v: Value = serde_json::from_str(&c.ask("headers").await).unwrap();
    assert_eq!(v["path"], "/a?b=1");
    assert_eq!(v["headers"]["host"][0], "h.example:1");
    c.send_text("close:4005:x").await;
    let (f, _) = c.recv_close().await;
    assert_eq!(code_of(&f.unwrap()), 4005);
}
