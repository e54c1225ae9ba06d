//! Support for tests/operations.rs: what `tests/common` lacks for the operations suite.
//!
//! * [`RawWs`]: a WebSocket client on raw bytes over any stream (TCP or TLS), returning
//!   errors instead of panicking (so 50 of them can run as tasks) and reading close codes
//!   off the wire (tungstenite 0.30 turns a received 1014 into a protocol error,
//!   snapview/tungstenite-rs#502).
//! * [`Ca`]: a throw-away certificate authority (rcgen) and leaves signed by it; rustls client
//!   and server configs trusting / presenting them.
//! * [`TlsBackend`]: a `wss://` echo backend; [`HttpEcho`]: a plain HTTP backend that decodes
//!   chunked request bodies and echoes them.
//! * PROXY protocol v1 / v2 headers; `admin` HTTP requests; bounded external commands;
//!   headless Chromium driven over the DevTools protocol ([`Chromium`], [`Cdp`]).

use crate::common::{ms, within, Notify, RawConn, RawFrame, RawResponse, WAIT};
use async_std::net::{TcpListener, TcpStream};
use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::Message;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use futures_rustls::rustls;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// A raw WebSocket client.

/// What a [`RawWs`] read produced (pings are answered and skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Text(String),
    Binary(Vec<u8>),
    /// A close frame: its code (None = no code) and reason.
    Close(Option<u16>, String),
    Pong,
}

pub struct RawWs<S> {
    pub stream: S,
    buf: Vec<u8>,
}

pub type TcpWs = RawWs<TcpStream>;

impl<S: AsyncRead + AsyncWrite + Unpin> RawWs<S> {
    pub fn new(stream: S) -> Self {
        RawWs {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        match async_std::future::timeout(WAIT, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write: {e}")),
            Err(_) => Err("write timed out".into()),
        }
    }

    /// Reads more bytes (0 = end of stream).
    async fn fill(&mut self, d: Duration) -> Result<usize, String> {
        let mut chunk = [0u8; 16384];
        match async_std::future::timeout(d, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Ok(Err(e)) => Err(format!("read: {e}")),
            Err(_) => Err(format!("read timed out after {d:?}")),
        }
    }

    async fn take(&mut self, n: usize, d: Duration) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            if self.fill(d).await? == 0 {
                return Err("connection closed in the middle of a frame".into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads an HTTP response head.
    pub async fn read_head(&mut self, d: Duration) -> Result<RawResponse, String> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                let mut hs = [httparse::EMPTY_HEADER; 64];
                let mut r = httparse::Response::new(&mut hs);
                r.parse(&head)
                    .map_err(|e| format!("bad response head: {e}"))?;
                return Ok(RawResponse {
                    status: r.code.unwrap_or(0),
                    headers: r
                        .headers
                        .iter()
                        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into()))
                        .collect(),
                });
            }
            if self.fill(d).await? == 0 {
                return Err(format!(
                    "connection closed before a response head; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                ));
            }
        }
    }

    /// One frame off the wire (server frames are unmasked; a mask is honoured anyway).
    pub async fn read_frame(&mut self, d: Duration) -> Result<RawFrame, String> {
        let h = self.take(2, d).await?;
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            let b = self.take(2, d).await?;
            len = u64::from(u16::from_be_bytes([b[0], b[1]]));
        } else if len == 127 {
            let b = self.take(8, d).await?;
            len = u64::from_be_bytes(b.try_into().unwrap());
        }
        let mask = if h[1] & 0x80 != 0 {
            Some(self.take(4, d).await?)
        } else {
            None
        };
        let mut payload = self.take(len as usize, d).await?;
        if let Some(m) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= m[i % 4];
            }
        }
        Ok(RawFrame {
            fin: h[0] & 0x80 != 0,
            opcode: h[0] & 0x0f,
            payload,
        })
    }

    /// Writes one masked frame.
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<(), String> {
        let mut f = vec![0x80 | opcode];
        let len = payload.len();
        if len < 126 {
            f.push(0x80 | len as u8);
        } else if len <= 0xffff {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask: [u8; 4] = fastrand_mask();
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.write(&f).await
    }

    pub async fn send_text(&mut self, t: &str) -> Result<(), String> {
        self.send_frame(1, t.as_bytes()).await
    }

    pub async fn send_close(&mut self, code: u16) -> Result<(), String> {
        self.send_frame(8, &code.to_be_bytes()).await
    }

    /// The next text, binary, pong or close (pings are answered with pongs; messages are
    /// reassembled from continuation frames).
    pub async fn next_event(&mut self, d: Duration) -> Result<Event, String> {
        let mut partial: Option<(u8, Vec<u8>)> = None;
        loop {
            let f = self.read_frame(d).await?;
            match f.opcode {
                9 => self.send_frame(10, &f.payload).await?,
                10 => return Ok(Event::Pong),
                8 => {
                    let code = (f.payload.len() >= 2)
                        .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                    let reason = String::from_utf8_lossy(f.payload.get(2..).unwrap_or(&[]));
                    return Ok(Event::Close(code, reason.into_owned()));
                }
                0..=2 => {
                    let (op, mut data) = match (f.opcode, partial.take()) {
                        (0, Some(p)) => p,
                        (0, None) => return Err("continuation frame without a start".into()),
                        (op, _) => (op, Vec::new()),
                    };
                    data.extend_from_slice(&f.payload);
                    if !f.fin {
                        partial = Some((op, data));
                        continue;
                    }
                    return Ok(if op == 1 {
                        Event::Text(String::from_utf8(data).map_err(|e| e.to_string())?)
                    } else {
                        Event::Binary(data)
                    });
                }
                other => return Err(format!("unexpected opcode {other}")),
            }
        }
    }

    /// The next text message (anything else is an error).
    pub async fn recv_text(&mut self) -> Result<String, String> {
        match self.next_event(WAIT).await? {
            Event::Text(t) => Ok(t),
            other => Err(format!("expected a text message, got {other:?}")),
        }
    }

    pub async fn ask(&mut self, t: &str) -> Result<String, String> {
        self.send_text(t).await?;
        self.recv_text().await
    }

    /// Closes with `code`, expects the peer's close reply and then the end of the stream.
    /// Returns the code the peer answered with.
    pub async fn close_handshake(&mut self, code: u16) -> Result<Option<u16>, String> {
        self.send_close(code).await?;
        loop {
            match self.next_event(WAIT).await? {
                Event::Close(c, _) => {
                    self.read_to_end(WAIT).await?;
                    return Ok(c);
                }
                Event::Pong => {}
                other => return Err(format!("expected a close reply, got {other:?}")),
            }
        }
    }

    /// Reads until the peer ends the stream (a reset counts as the end); returns the bytes.
    pub async fn read_to_end(&mut self, d: Duration) -> Result<Vec<u8>, String> {
        loop {
            match self.fill(d).await {
                Ok(0) => return Ok(std::mem::take(&mut self.buf)),
                Ok(_) => {}
                Err(e) if e.contains("reset") => return Ok(std::mem::take(&mut self.buf)),
                Err(e) => return Err(e),
            }
        }
    }
}

fn fastrand_mask() -> [u8; 4] {
    // Any mask is valid; vary it so payloads are not trivially visible.
    static N: AtomicUsize = AtomicUsize::new(0x1234_5678);
    let n = N.fetch_add(0x9e37_79b9, Ordering::Relaxed) as u32;
    n.to_be_bytes()
}

/// A WebSocket upgrade on `addr` (optionally after `prefix` bytes, e.g. a PROXY header); 101
/// expected.
pub async fn ws_open_with(
    addr: SocketAddr,
    prefix: &[u8],
    path: &str,
    extra: &[(&str, &str)],
) -> Result<TcpWs, String> {
    let tcp = within("connect", WAIT, TcpStream::connect(addr))
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true).ok();
    let mut ws = RawWs::new(tcp);
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(crate::common::upgrade_head(path, &addr.to_string(), extra).as_bytes());
    ws.write(&bytes).await?;
    let r = ws.read_head(WAIT).await?;
    if r.status != 101 {
        return Err(format!("upgrade answered {}", r.status));
    }
    Ok(ws)
}

pub async fn ws_open(addr: SocketAddr, path: &str) -> TcpWs {
    ws_open_with(addr, b"", path, &[])
        .await
        .unwrap_or_else(|e| panic!("upgrade to ws://{addr}{path}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Echo sessions running as tasks.

/// What one echoing session saw.
#[derive(Debug, Default, Clone)]
pub struct EchoRecord {
    pub backend: String,
    /// Instants of the echoes received (one per message sent and answered).
    pub echoes: Vec<Instant>,
    /// A close frame received from the gateway (code, when) — not the reply to our own close.
    pub closed: Option<(Option<u16>, Instant)>,
    /// The peer's answer to our own close (the test's clean end).
    pub close_reply: Option<Option<u16>>,
    pub error: Option<String>,
    pub sent: u64,
}

pub struct EchoSession {
    pub rec: Arc<Mutex<EchoRecord>>,
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    pub task: async_std::task::JoinHandle<()>,
}

/// Runs an echo loop on `ws` (already on `backend`): one text message every `pace`, each
/// answer checked, until `stop` (then a clean close 1000) or a close from the gateway (then
/// the close is answered).
pub fn spawn_echo(
    mut ws: TcpWs,
    id: usize,
    backend: String,
    pace: Duration,
    notify: Arc<Notify>,
) -> EchoSession {
    let rec = Arc::new(Mutex::new(EchoRecord {
        backend,
        ..EchoRecord::default()
    }));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (r, s) = (rec.clone(), stop.clone());
    let task = async_std::task::spawn(async move {
        let mut n = 0u64;
        let outcome: Result<(), String> = async {
            loop {
                if s.load(Ordering::SeqCst) {
                    let c = ws.close_handshake(1000).await?;
                    r.lock().unwrap().close_reply = Some(c);
                    return Ok(());
                }
                let msg = format!("echo {id}/{n}");
                ws.send_text(&msg).await?;
                r.lock().unwrap().sent += 1;
                loop {
                    match ws.next_event(WAIT).await? {
                        Event::Text(t) if t == msg => {
                            r.lock().unwrap().echoes.push(Instant::now());
                            notify.notify();
                            break;
                        }
                        Event::Close(code, _) => {
                            r.lock().unwrap().closed = Some((code, Instant::now()));
                            notify.notify();
                            let _ = ws.send_close(code.unwrap_or(1000)).await;
                            let _ = ws.read_to_end(ms(2000)).await;
                            return Ok(());
                        }
                        Event::Pong => {}
                        other => {
                            return Err(format!("message {n}: expected {msg:?}, got {other:?}"))
                        }
                    }
                }
                n += 1;
                async_std::task::sleep(pace).await;
            }
        }
        .await;
        if let Err(e) = outcome {
            r.lock().unwrap().error = Some(e);
        }
        notify.notify();
    });
    EchoSession { rec, stop, task }
}

// ---------------------------------------------------------------------------------------------
// Certificates.

/// A test certificate authority.
pub struct Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    /// A server certificate for `names` (DNS names or IP addresses) signed by this CA:
    /// (cert PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wsgate test leaf");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn tls_connector(ca_pem: &str) -> futures_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    futures_rustls::TlsConnector::from(Arc::new(cfg))
}

pub fn tls_acceptor(cert_pem: &str, key_pem: &str) -> futures_rustls::TlsAcceptor {
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    futures_rustls::TlsAcceptor::from(Arc::new(cfg))
}

pub type TlsClientStream = futures_rustls::client::TlsStream<TcpStream>;

/// A TLS connection to `addr`, verifying the server as `name`.
pub async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    ca_pem: &str,
) -> Result<TlsClientStream, String> {
    let tcp = within("connect", WAIT, TcpStream::connect(addr))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    within(
        "TLS handshake",
        WAIT,
        Box::pin(tls_connector(ca_pem).connect(name, tcp)),
    )
    .await
    .map_err(|e| format!("TLS handshake: {e}"))
}

/// Runs `f` on its own thread with a 32 MiB stack (TLS handshakes in a debug build overflow
/// the default 2 MiB of test and executor threads). Returns when `f` is done; a panic in `f`
/// is re-raised here.
pub async fn on_big_stack<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = futures::channel::oneshot::channel();
    let h = std::thread::Builder::new()
        .stack_size(32 << 20)
        .spawn(move || {
            let _ = tx.send(async_std::task::block_on(f));
        })
        .unwrap();
    match rx.await {
        Ok(v) => v,
        Err(_) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => panic!("big-stack thread ended without a result"),
        },
    }
}

/// Like `async_std::task::spawn`, on a thread of its own with a 32 MiB stack (detached).
pub fn spawn_big_stack(f: impl std::future::Future<Output = ()> + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(32 << 20)
        .spawn(move || async_std::task::block_on(f))
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// A wss:// echo backend.

#[derive(Default)]
pub struct TlsShared {
    /// Request headers (lowercase name, value) of every accepted upgrade.
    pub upgrades: Mutex<Vec<Vec<(String, String)>>>,
    /// TLS handshakes that failed (what the server side saw).
    pub tls_errors: Mutex<Vec<String>>,
    pub accepts: AtomicUsize,
    pub notify: Notify,
}

pub struct TlsBackend {
    pub addr: SocketAddr,
    pub shared: Arc<TlsShared>,
    task: Option<async_std::task::JoinHandle<()>>,
}

impl TlsBackend {
    /// Serves `wss://` with the given leaf; echoes text and binary; `headers` answers the
    /// upgrade request's headers as JSON.
    pub async fn start(cert_pem: &str, key_pem: &str) -> TlsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tls_acceptor(cert_pem, key_pem);
        let shared = Arc::new(TlsShared::default());
        let sh = shared.clone();
        let task = async_std::task::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                sh.accepts.fetch_add(1, Ordering::SeqCst);
                let (acceptor, sh) = (acceptor.clone(), sh.clone());
                // rustls in a debug build wants more stack than an executor thread has.
                spawn_big_stack(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(t) => t,
                        Err(e) => {
                            sh.tls_errors.lock().unwrap().push(e.to_string());
                            sh.notify.notify();
                            return;
                        }
                    };
                    let seen = Arc::new(Mutex::new(Vec::new()));
                    let seen2 = seen.clone();
                    #[allow(clippy::result_large_err)]
                    let cb =
                        move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                            *seen2.lock().unwrap() = req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (
                                        k.as_str().to_string(),
                                        String::from_utf8_lossy(v.as_bytes()).into(),
                                    )
                                })
                                .collect::<Vec<(String, String)>>();
                            Ok(resp)
                        };
                    let Ok(mut ws) = async_tungstenite::accept_hdr_async(tls, cb).await else {
                        return;
                    };
                    let headers = seen.lock().unwrap().clone();
                    sh.upgrades.lock().unwrap().push(headers.clone());
                    sh.notify.notify();
                    while let Some(Ok(m)) = ws.next().await {
                        let reply = match m {
                            Message::Text(t) if t.as_str() == "headers" => {
                                let map: serde_json::Map<String, Value> = headers
                                    .iter()
                                    .map(|(k, v)| (k.clone(), Value::from(v.clone())))
                                    .collect();
                                Message::text(Value::Object(map).to_string())
                            }
                            Message::Text(_) | Message::Binary(_) => m,
                            _ => continue,
                        };
                        if ws.send(reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        TlsBackend {
            addr,
            shared,
            task: Some(task),
        }
    }

    pub fn upgrades(&self) -> usize {
        self.shared.upgrades.lock().unwrap().len()
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            drop(t.cancel());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A plain HTTP backend that decodes chunked bodies and echoes them.

#[derive(Debug, Clone)]
pub struct HttpReq {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    /// The decoded body.
    pub body: Vec<u8>,
    /// The body came chunked.
    pub chunked: bool,
}

impl HttpReq {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct HttpEcho {
    pub addr: SocketAddr,
    pub reqs: Arc<Mutex<Vec<HttpReq>>>,
    task: Option<async_std::task::JoinHandle<()>>,
}

impl HttpEcho {
    pub async fn start(name: &'static str) -> HttpEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reqs = Arc::new(Mutex::new(Vec::new()));
        let r = reqs.clone();
        let task = async_std::task::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let r = r.clone();
                async_std::task::spawn(async move {
                    let mut ws = RawWs::new(tcp);
                    if let Ok(req) = read_request(&mut ws).await {
                        let body = req.body.clone();
                        r.lock().unwrap().push(req);
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                             Content-Length: {}\r\nX-Backend: {name}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = ws.write(head.as_bytes()).await;
                        let _ = ws.write(&body).await;
                    }
                });
            }
        });
        HttpEcho {
            addr,
            reqs,
            task: Some(task),
        }
    }
}

impl Drop for HttpEcho {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            drop(t.cancel());
        }
    }
}

async fn read_line(ws: &mut TcpWs) -> Result<String, String> {
    loop {
        if let Some(i) = ws.buf.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = ws.buf.drain(..i + 2).collect();
            return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
        }
        if ws.fill(WAIT).await? == 0 {
            return Err("closed in a line".into());
        }
    }
}

async fn read_request(ws: &mut TcpWs) -> Result<HttpReq, String> {
    let end = loop {
        if let Some(e) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break e + 4;
        }
        if ws.fill(WAIT).await? == 0 {
            return Err("closed before a request head".into());
        }
    };
    let head: Vec<u8> = ws.buf.drain(..end).collect();
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut hs);
    req.parse(&head).map_err(|e| e.to_string())?;
    let mut r = HttpReq {
        method: req.method.unwrap_or("").to_string(),
        target: req.path.unwrap_or("").to_string(),
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
        body: Vec::new(),
        chunked: false,
    };
    if r.header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
    {
        r.chunked = true;
        loop {
            let line = read_line(ws).await?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size line {line:?}"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(ws).await?.is_empty() {}
                break;
            }
            let data = ws.take(size, WAIT).await?;
            r.body.extend(data);
            if !read_line(ws).await?.is_empty() {
                return Err("chunk not followed by CRLF".into());
            }
        }
    } else if let Some(n) = r.header("content-length") {
        let n: usize = n.trim().parse().map_err(|_| "bad content-length")?;
        r.body = ws.take(n, WAIT).await?;
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol headers.

pub fn proxy_v1(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

pub fn proxy_v2(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&dst.ip().octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

// ---------------------------------------------------------------------------------------------
// HTTP requests (admin endpoint).

/// `METHOD path` with an optional body; returns (status, headers, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (RawResponse, Vec<u8>) {
    let mut c = RawConn::open(addr).await;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write(head.as_bytes()).await;
    c.write(body).await;
    let r = c.read_head().await;
    let b = c.read_body(&r).await;
    (r, b)
}

// ---------------------------------------------------------------------------------------------
// External commands.

/// Runs `cmd` to completion within `d` (killed by pid past it); returns its output.
pub fn run_bounded(mut cmd: Command, d: Duration) -> std::process::Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let desc = format!("{cmd:?}");
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(d) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // Our own child, by pid.
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{desc} did not finish within {d:?}");
        }
    }
}

/// `Some(path)` of an executable on PATH.
pub fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(cmd))
            .find(|f| f.is_file())
    })
}

pub fn python_has_websockets() -> bool {
    which("python3").is_some()
        && Command::new("python3")
            .args(["-c", "import websockets"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

pub fn ws_peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ops_support/ws_peer.py")
}

// ---------------------------------------------------------------------------------------------
// Headless Chromium.

pub fn chromium_bin() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|c| which(c))
}

/// A headless Chromium in its own process group (killed as a group, by id, on drop).
pub struct Chromium {
    child: std::process::Child,
    pub logs: Arc<crate::common::Logs>,
    pub devtools: SocketAddr,
    _profile: tempfile::TempDir,
}

impl Chromium {
    pub async fn start(url: &str) -> Chromium {
        use std::os::unix::process::CommandExt;
        let bin = chromium_bin().expect("chromium is not installed (bash .ci/run installs it)");
        let profile = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn chromium");
        let logs = Arc::new(crate::common::Logs::default());
        logs.collect(child.stderr.take().unwrap());
        logs.collect(child.stdout.take().unwrap());
        let mut c = Chromium {
            child,
            logs,
            devtools: "127.0.0.1:1".parse().unwrap(),
            _profile: profile,
        };
        let marker = "DevTools listening on ws://";
        let (_, line) = c
            .logs
            .wait_line_from(
                "chromium's DevTools line",
                0,
                Duration::from_secs(30),
                |l| l.contains(marker),
            )
            .await;
        let rest = &line[line.find(marker).unwrap() + marker.len()..];
        c.devtools = rest.split('/').next().unwrap().parse().unwrap();
        c
    }

    /// The DevTools WebSocket URL of the first page whose URL contains `needle`.
    pub async fn page_ws_url(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (r, body) = http(self.devtools, "GET", "/json/list", b"").await;
            assert_eq!(r.status, 200);
            let list: Value = serde_json::from_slice(&body).unwrap();
            if let Some(p) = list.as_array().unwrap().iter().find(|t| {
                t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.contains(needle))
            }) {
                return p["webSocketDebuggerUrl"].as_str().unwrap().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no page with {needle:?} in its URL: {list}"
            );
            async_std::task::sleep(ms(100)).await;
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The browser and its helper processes share the group we gave it.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- chromium output ---\n{}", self.logs.dump());
        }
    }
}

/// A DevTools protocol connection to one page.
pub struct Cdp {
    ws: async_tungstenite::WebSocketStream<TcpStream>,
    next_id: u64,
}

impl Cdp {
    pub async fn connect(url: &str) -> Cdp {
        let hostport = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let tcp = TcpStream::connect(hostport).await.unwrap();
        let (ws, _) = within(
            "DevTools handshake",
            WAIT,
            async_tungstenite::client_async(url, tcp),
        )
        .await
        .unwrap();
        Cdp { ws, next_id: 1 }
    }

    /// Sends a command and returns its `result` (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let cmd = serde_json::json!({ "id": id, "method": method, "params": params });
        self.ws.send(Message::text(cmd.to_string())).await.unwrap();
        within(&format!("DevTools answer to {method}"), WAIT, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap();
                        if v["id"] == id {
                            if let Some(e) = v.get("error") {
                                panic!("DevTools {method}: {e}");
                            }
                            return v["result"].clone();
                        }
                    }
                    Some(Ok(_)) => {}
                    other => panic!("DevTools connection ended: {other:?}"),
                }
            }
        })
        .await
    }

    /// Evaluates a JavaScript expression in the page; returns its value.
    pub async fn eval(&mut self, expr: &str) -> Value {
        self.try_eval(expr)
            .await
            .unwrap_or_else(|e| panic!("JavaScript {expr:?} threw: {e}"))
    }

    /// Like `eval`; a JavaScript exception is an `Err` (its description).
    pub async fn try_eval(&mut self, expr: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": expr, "returnByValue": true }),
            )
            .await;
        match r.get("exceptionDetails") {
            Some(e) => Err(e["exception"]["description"]
                .as_str()
                .map_or_else(|| e.to_string(), str::to_string)),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// Evaluates `expr` every 100 ms until it is `true` (bounded by `d`).
    pub async fn wait_true(&mut self, what: &str, expr: &str, d: Duration) {
        let deadline = Instant::now() + d;
        loop {
            // An exception (the page is still loading: no such element yet) is "not yet".
            if self.try_eval(expr).await == Ok(Value::Bool(true)) {
                return;
            }
            if Instant::now() > deadline {
                let page = self
                    .try_eval("location.href + '\\n' + (document.body ? document.body.innerText : '(no body)')")
                    .await;
                panic!(
                    "timed out after {d:?} waiting for the page: {what}\n--- page ---\n{page:?}"
                );
            }
            async_std::task::sleep(ms(100)).await;
        }
    }
}
