//! Test WebSocket backends: async-std tasks in the test process on `127.0.0.1:0`.
//!
//! Protocol of a `Mode::Normal` backend, per received message:
//! - text `whoami` → text NAME
//! - text `headers` → text JSON `{"path": PATH_AND_QUERY, "headers": {lowercase-name: [values]}}`
//! - text `close:CODE:REASON` → close handshake with that code and reason
//! - text `ping:PAYLOAD` → a ping with that payload
//! - text `big:N` → a binary message of N bytes (`b'x'`)
//! - text `frag` → the text message "hello world" in three frames
//! - any other text or binary → echoed back
//! - ping / pong / close → recorded (tungstenite answers pings and closes itself)
//!
//! Everything received is recorded per connection so tests can assert order and content.

use super::notify::Notify;
use super::{within, WAIT};
use async_std::net::{TcpListener, TcpStream};
use async_std::task::JoinHandle;
use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http;
use async_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use async_tungstenite::tungstenite::protocol::frame::Frame;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::Message;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug)]
pub enum Mode {
    /// Accept upgrades and run the protocol above.
    Normal,
    /// Answer every upgrade request with this HTTP status and body.
    Reject(u16, &'static str),
    /// Accept TCP connections and never answer anything.
    Hang,
    /// Complete the upgrade by hand and record the raw frames received (`raw_frames`);
    /// answers nothing but a close with a close. Shows how the gateway framed messages.
    RawFrames,
    /// As `RawFrames`, but a close is never answered: the connection stays open until the
    /// other side ends it (a backend slow to finish its closing handshake).
    RawFramesNoCloseAnswer,
}

#[derive(Clone, Debug)]
pub struct BackendOpts {
    pub name: String,
    /// Subprotocols this backend supports, in its order of preference.
    pub protocols: Vec<String>,
    pub mode: Mode,
}

impl BackendOpts {
    pub fn new(name: &str) -> Self {
        BackendOpts {
            name: name.to_string(),
            protocols: Vec::new(),
            mode: Mode::Normal,
        }
    }
    pub fn protocols(mut self, p: &[&str]) -> Self {
        self.protocols = p.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn mode(mut self, m: Mode) -> Self {
        self.mode = m;
        self
    }
}

/// One upgrade request the backend saw, and (when accepted) the session that followed.
#[derive(Clone, Debug, Default)]
pub struct ConnRecord {
    pub peer: Option<SocketAddr>,
    /// Path and query of the upgrade request, as received.
    pub path: String,
    /// Header (lowercase name, value) pairs in the order received.
    pub headers: Vec<(String, String)>,
    /// The subprotocol this backend chose, if any.
    pub protocol: Option<String>,
    /// 101, or the status it was rejected with.
    pub status: u16,
    /// Every message received, in order (data, ping, pong, close).
    pub messages: Vec<Message>,
    /// A read error that ended the connection, if any.
    pub error: Option<String>,
    /// The connection is over (closed or failed).
    pub ended: bool,
    /// `Mode::RawFrames` only: the frames as they came off the wire (unmasked).
    pub raw_frames: Vec<super::RawFrame>,
}

impl ConnRecord {
    /// All values of a header (name matched case-insensitively).
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    /// The close message received, if one was: `Some(None)` = a close without a code.
    pub fn close_frame(&self) -> Option<Option<CloseFrame>> {
        self.messages.iter().find_map(|m| match m {
            Message::Close(f) => Some(f.clone()),
            _ => None,
        })
    }
    /// Text and binary messages only.
    pub fn data(&self) -> Vec<&Message> {
        self.messages
            .iter()
            .filter(|m| matches!(m, Message::Text(_) | Message::Binary(_)))
            .collect()
    }
    pub fn texts(&self) -> Vec<String> {
        self.messages
            .iter()
            .filter_map(|m| match m {
                Message::Text(t) => Some(t.as_str().to_string()),
                _ => None,
            })
            .collect()
    }
}

#[derive(Default)]
pub struct Shared {
    conns: Mutex<Vec<ConnRecord>>,
    live: AtomicUsize,
    tcp_accepts: AtomicUsize,
    pub notify: Notify,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

/// A loopback address nothing listens on (bound to port 0, then released).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

impl Backend {
    /// A normal echo backend named `name`.
    pub async fn echo(name: &str) -> Backend {
        Backend::start(BackendOpts::new(name)).await
    }

    pub async fn start(opts: BackendOpts) -> Backend {
        Backend::start_on("127.0.0.1:0".parse().unwrap(), opts).await
    }

    /// Starts on a given address (to bring a stopped backend back on its port).
    pub async fn start_on(addr: SocketAddr, opts: BackendOpts) -> Backend {
        let listener = within("backend bind", WAIT, TcpListener::bind(addr))
            .await
            .unwrap_or_else(|e| panic!("backend {} cannot bind {addr}: {e}", opts.name));
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let name = opts.name.clone();
        let accept = async_std::task::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(_) => continue,
                };
                s.tcp_accepts.fetch_add(1, Ordering::SeqCst);
                s.notify.notify();
                let s2 = s.clone();
                let opts = opts.clone();
                let h = async_std::task::spawn(serve(stream, peer, opts, s2));
                s.tasks.lock().unwrap().push(h);
            }
        });
        Backend {
            addr,
            name,
            shared,
            accept: Some(accept),
        }
    }

    /// Every upgrade request seen so far (accepted or rejected), in arrival order.
    pub fn conns(&self) -> Vec<ConnRecord> {
        self.shared.conns.lock().unwrap().clone()
    }
    pub fn conn(&self, i: usize) -> ConnRecord {
        self.shared.conns.lock().unwrap()[i].clone()
    }
    /// Number of upgrade requests seen (accepted or rejected).
    pub fn upgrades(&self) -> usize {
        self.shared.conns.lock().unwrap().len()
    }
    /// Number of accepted WebSocket sessions still open.
    pub fn live(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }
    pub fn tcp_accepts(&self) -> usize {
        self.shared.tcp_accepts.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `pred` holds over the connection records.
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&[ConnRecord]) -> bool) {
        self.wait_until_for(what, WAIT, pred).await
    }

    pub async fn wait_until_for(
        &self,
        what: &str,
        d: Duration,
        pred: impl Fn(&[ConnRecord]) -> bool,
    ) {
        let what = format!("backend {}: {what}", self.name);
        let shared = self.shared.clone();
        shared
            .notify
            .wait_until(&what, d, || pred(&shared.conns.lock().unwrap()))
            .await
    }

    /// Waits until connection `i` has received a close message and returns it.
    pub async fn wait_close(&self, i: usize) -> Option<CloseFrame> {
        self.wait_until(&format!("conn {i} receives a close frame"), |c| {
            c.get(i).is_some_and(|c| c.close_frame().is_some())
        })
        .await;
        self.conn(i).close_frame().unwrap()
    }

    /// Stops listening and drops every connection (no close frames: a crash).
    pub async fn stop(mut self) {
        if let Some(a) = self.accept.take() {
            a.cancel().await;
        }
        let tasks = std::mem::take(&mut *self.shared.tasks.lock().unwrap());
        for t in tasks {
            t.cancel().await;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Detached tasks die with the test process; a stopped backend has nothing left.
    }
}

fn chosen_protocol(req: &Request, supported: &[String]) -> Option<String> {
    let offered: Vec<String> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    supported.iter().find(|p| offered.contains(p)).cloned()
}

#[allow(clippy::result_large_err)] // the callback type is tungstenite's
async fn serve(stream: TcpStream, peer: SocketAddr, opts: BackendOpts, s: Arc<Shared>) {
    if let Mode::Hang = opts.mode {
        // Hold the socket open, never answer; ends when the task is cancelled or the peer goes.
        let mut buf = [0u8; 1024];
        let mut st = stream;
        loop {
            match futures::AsyncReadExt::read(&mut st, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
    match opts.mode {
        Mode::RawFrames => return serve_raw(stream, peer, s, true).await,
        Mode::RawFramesNoCloseAnswer => return serve_raw(stream, peer, s, false).await,
        _ => {}
    }
    // The record is stored when the request arrives, before the answer is written, so
    // whoever sees the answer (the gateway, then the client) can rely on it being there.
    let slot: Arc<Mutex<Option<usize>>> = Arc::new(Mutex::new(None));
    let slot2 = slot.clone();
    let s2 = s.clone();
    let mode = opts.mode.clone();
    let protocols = opts.protocols.clone();
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let mut rec = ConnRecord {
            peer: Some(peer),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default(),
            headers: req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_ascii_lowercase(),
                        String::from_utf8_lossy(v.as_bytes()).into(),
                    )
                })
                .collect(),
            ..ConnRecord::default()
        };
        let result = match mode {
            Mode::Reject(status, body) => {
                rec.status = status;
                let mut r = ErrorResponse::new(Some(body.to_string()));
                *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                Err(r)
            }
            _ => {
                rec.status = 101;
                if let Some(p) = chosen_protocol(req, &protocols) {
                    resp.headers_mut().insert(
                        "sec-websocket-protocol",
                        http::HeaderValue::from_str(&p).unwrap(),
                    );
                    rec.protocol = Some(p);
                }
                Ok(resp)
            }
        };
        let idx = {
            let mut c = s2.conns.lock().unwrap();
            c.push(rec);
            c.len() - 1
        };
        *slot2.lock().unwrap() = Some(idx);
        s2.notify.notify();
        result
    };
    let handshake = async_tungstenite::accept_hdr_async(stream, callback).await;
    let Some(idx) = slot.lock().unwrap().take() else {
        return; // not even a valid request head (e.g. a TCP health check)
    };
    let mut ws = match handshake {
        Ok(ws) => ws,
        Err(e) => {
            let mut c = s.conns.lock().unwrap();
            c[idx].ended = true;
            if c[idx].status == 101 {
                c[idx].error = Some(format!("handshake: {e}"));
            }
            drop(c);
            s.notify.notify();
            return;
        }
    };
    s.live.fetch_add(1, Ordering::SeqCst);
    s.notify.notify();
    let record = |m: Message| {
        s.conns.lock().unwrap()[idx].messages.push(m);
        s.notify.notify();
    };
    while let Some(r) = ws.next().await {
        let m = match r {
            Ok(m) => m,
            Err(e) => {
                s.conns.lock().unwrap()[idx].error = Some(e.to_string());
                break;
            }
        };
        record(m.clone());
        let reply: Vec<Message> = match &m {
            Message::Text(t) => {
                let t = t.as_str();
                if t == "whoami" {
                    vec![Message::text(opts.name.clone())]
                } else if t == "headers" {
                    let c = s.conns.lock().unwrap()[idx].clone();
                    let mut h: BTreeMap<String, Vec<String>> = BTreeMap::new();
                    for (k, v) in &c.headers {
                        h.entry(k.clone()).or_default().push(v.clone());
                    }
                    let j = serde_json::json!({ "path": c.path, "headers": h });
                    vec![Message::text(j.to_string())]
                } else if let Some(rest) = t.strip_prefix("close:") {
                    let (code, reason) = rest.split_once(':').unwrap_or((rest, ""));
                    let code: u16 = code.parse().unwrap();
                    let frame = CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.to_string().into(),
                    };
                    let _ = ws.close(Some(frame)).await;
                    vec![]
                } else if let Some(p) = t.strip_prefix("ping:") {
                    vec![Message::Ping(p.as_bytes().to_vec().into())]
                } else if let Some(n) = t.strip_prefix("big:") {
                    vec![Message::binary(vec![b'x'; n.parse::<usize>().unwrap()])]
                } else if t == "frag" {
                    vec![
                        Message::Frame(Frame::message("hel", OpCode::Data(Data::Text), false)),
                        Message::Frame(Frame::message("lo ", OpCode::Data(Data::Continue), false)),
                        Message::Frame(Frame::message("world", OpCode::Data(Data::Continue), true)),
                    ]
                } else {
                    vec![m.clone()]
                }
            }
            Message::Binary(_) => vec![m.clone()],
            _ => vec![],
        };
        for r in reply {
            if ws.send(r).await.is_err() {
                break;
            }
        }
    }
    s.conns.lock().unwrap()[idx].ended = true;
    s.live.fetch_sub(1, Ordering::SeqCst);
    s.notify.notify();
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 8192];
    match futures::AsyncReadExt::read(stream, &mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

async fn take_exact(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Option<Vec<u8>> {
    while buf.len() < n {
        read_more(stream, buf).await?;
    }
    Some(buf.drain(..n).collect())
}

async fn read_raw_frame(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<super::RawFrame> {
    let h = take_exact(stream, buf, 2).await?;
    let mut len = (h[1] & 0x7f) as usize;
    if len == 126 {
        let b = take_exact(stream, buf, 2).await?;
        len = u16::from_be_bytes([b[0], b[1]]) as usize;
    } else if len == 127 {
        let b = take_exact(stream, buf, 8).await?;
        len = u64::from_be_bytes(b.try_into().unwrap()) as usize;
    }
    let mask = if h[1] & 0x80 != 0 {
        Some(take_exact(stream, buf, 4).await?)
    } else {
        None
    };
    let mut payload = take_exact(stream, buf, len).await?;
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Some(super::RawFrame {
        fin: h[0] & 0x80 != 0,
        opcode: h[0] & 0x0f,
        payload,
    })
}

async fn serve_raw(mut stream: TcpStream, peer: SocketAddr, s: Arc<Shared>, answer_close: bool) {
    use futures::AsyncWriteExt;
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if read_more(&mut stream, &mut buf).await.is_none() {
            return;
        }
    };
    let head: Vec<u8> = buf.drain(..end).collect();
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut hs);
    if req.parse(&head).is_err() {
        return;
    }
    let rec = ConnRecord {
        peer: Some(peer),
        path: req.path.unwrap_or("").to_string(),
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into(),
                )
            })
            .collect(),
        status: 101,
        ..ConnRecord::default()
    };
    let key = rec
        .header("sec-websocket-key")
        .first()
        .map(|k| k.to_string())
        .unwrap_or_default();
    let accept = async_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(resp.as_bytes()).await.is_err() {
        return;
    }
    let idx = {
        let mut c = s.conns.lock().unwrap();
        c.push(rec);
        c.len() - 1
    };
    s.live.fetch_add(1, Ordering::SeqCst);
    s.notify.notify();
    while let Some(f) = read_raw_frame(&mut stream, &mut buf).await {
        let close = f.opcode == 8;
        let payload = f.payload.clone();
        s.conns.lock().unwrap()[idx].raw_frames.push(f);
        s.notify.notify();
        if close && answer_close {
            let mut out = vec![0x88u8, payload.len() as u8];
            out.extend_from_slice(&payload);
            let _ = stream.write_all(&out).await;
            break;
        }
    }
    s.conns.lock().unwrap()[idx].ended = true;
    s.live.fetch_sub(1, Ordering::SeqCst);
    s.notify.notify();
}
