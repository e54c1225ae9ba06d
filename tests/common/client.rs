//! Clients: WebSocket clients (optionally bound to a chosen source IP) and a raw HTTP/frame
//! connection for the non-101 answers and for looking at frames on the wire.

use super::{within, WAIT};
use async_std::net::TcpStream;
use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::handshake::client::Response;
use async_tungstenite::tungstenite::http::HeaderValue;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::WebSocketStream;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub type Ws = WebSocketStream<TcpStream>;

pub struct Client {
    pub ws: Ws,
    pub response: Response,
}

/// Opens a TCP connection from `src` (any 127.0.0.0/8 address works on Linux loopback).
pub async fn tcp_from(src: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    async_std::task::spawn_blocking(move || {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.bind(&SocketAddr::new(src, 0).into())?;
        sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
        let std: std::net::TcpStream = sock.into();
        Ok(TcpStream::from(std))
    })
    .await
}

/// A WebSocket handshake to `ws://addr{path}` with extra request headers (a `Host` given here
/// replaces the default one).
pub async fn try_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Client, async_tungstenite::tungstenite::Error> {
    try_connect_from(None, addr, path, headers).await
}

pub async fn try_connect_from(
    src: Option<IpAddr>,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Client, async_tungstenite::tungstenite::Error> {
    let url = format!("ws://{addr}{path}");
    let mut req = url.as_str().into_client_request()?;
    for (k, v) in headers {
        let name: async_tungstenite::tungstenite::http::HeaderName = k.parse().unwrap();
        req.headers_mut()
            .append(name, HeaderValue::from_str(v).unwrap());
    }
    // `append` would duplicate Host: a given Host replaces the generated one.
    if let Some((_, h)) = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.headers_mut()
            .insert("host", HeaderValue::from_str(h).unwrap());
    }
    let what = format!("WebSocket handshake with {url}");
    within(&what, WAIT, async move {
        let tcp = match src {
            Some(ip) => tcp_from(ip, addr).await?,
            None => TcpStream::connect(addr).await?,
        };
        let (ws, response) = async_tungstenite::client_async(req, tcp).await?;
        Ok(Client { ws, response })
    })
    .await
}

/// A handshake that must succeed.
pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Client {
    try_connect(addr, path, headers)
        .await
        .unwrap_or_else(|e| panic!("WebSocket handshake with ws://{addr}{path} failed: {e}"))
}

pub async fn connect_from(src: IpAddr, addr: SocketAddr, path: &str) -> Client {
    try_connect_from(Some(src), addr, path, &[])
        .await
        .unwrap_or_else(|e| panic!("handshake from {src} to ws://{addr}{path} failed: {e}"))
}

impl Client {
    /// The subprotocol the server chose.
    pub fn protocol(&self) -> Option<String> {
        self.response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_string())
    }

    pub async fn send(&mut self, m: Message) {
        within("client send", WAIT, self.ws.send(m))
            .await
            .unwrap_or_else(|e| panic!("client send failed: {e}"));
    }

    pub async fn send_text(&mut self, s: &str) {
        self.send(Message::text(s.to_string())).await
    }

    /// The next message of any kind; panics on end of stream, error or timeout.
    pub async fn recv(&mut self) -> Message {
        self.recv_for(WAIT).await
    }

    pub async fn recv_for(&mut self, d: Duration) -> Message {
        match within("client receives a message", d, self.ws.next()).await {
            Some(Ok(m)) => m,
            Some(Err(e)) => panic!("client read error: {e}"),
            None => panic!("client stream ended"),
        }
    }

    /// The next text or binary message (pings and pongs are skipped).
    pub async fn recv_data(&mut self) -> Message {
        within("client receives a data message", WAIT, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
                    Some(Ok(m)) => return m,
                    Some(Err(e)) => panic!("client read error: {e}"),
                    None => panic!("client stream ended"),
                }
            }
        })
        .await
    }

    pub async fn recv_text(&mut self) -> String {
        match self.recv_data().await {
            Message::Text(t) => t.as_str().to_string(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// Sends `text` and returns the text reply.
    pub async fn ask(&mut self, text: &str) -> String {
        self.send_text(text).await;
        self.recv_text().await
    }

    /// The backend's name (the `whoami` reply).
    pub async fn whoami(&mut self) -> String {
        self.ask("whoami").await
    }

    /// Reads until a close message and returns its frame; data messages before it are
    /// returned too. Panics if the stream ends without a close message.
    pub async fn recv_close(&mut self) -> (Option<CloseFrame>, Vec<Message>) {
        within("client receives a close frame", WAIT, async {
            let mut before = Vec::new();
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(f))) => return (f, before),
                    Some(Ok(m)) => before.push(m),
                    Some(Err(e)) => panic!("client read error before a close frame: {e}"),
                    None => panic!("client stream ended without a close frame"),
                }
            }
        })
        .await
    }

    /// The close code the client receives next (panics if there is none).
    pub async fn close_code(&mut self) -> u16 {
        let (f, _) = self.recv_close().await;
        u16::from(f.expect("close frame without a code").code)
    }

    /// Starts a close handshake with a code and reason.
    pub async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        };
        within("client close", WAIT, self.ws.close(Some(frame)))
            .await
            .unwrap_or_else(|e| panic!("client close failed: {e}"));
    }

    /// Closes with 1000 and waits for the peer's close reply and the end of the stream.
    pub async fn close_and_wait(mut self) {
        self.close(1000, "").await;
        within("client close handshake completes", WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// A plain TCP connection speaking HTTP and raw WebSocket frames by hand.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw frame as read from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawConn {
    pub async fn open(addr: SocketAddr) -> RawConn {
        let stream = within("raw connect", WAIT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        within("raw write", WAIT, self.stream.write_all(bytes))
            .await
            .unwrap_or_else(|e| panic!("raw write: {e}"));
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        let n = within("raw read", WAIT, self.stream.read(&mut chunk))
            .await
            .unwrap_or_else(|e| panic!("raw read: {e}"));
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads an HTTP response head.
    pub async fn read_head(&mut self) -> RawResponse {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                let mut hs = [httparse::EMPTY_HEADER; 64];
                let mut r = httparse::Response::new(&mut hs);
                r.parse(&head).unwrap_or_else(|e| {
                    panic!(
                        "bad response head {:?}: {e}",
                        String::from_utf8_lossy(&head)
                    )
                });
                return RawResponse {
                    status: r.code.unwrap(),
                    headers: r
                        .headers
                        .iter()
                        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into()))
                        .collect(),
                };
            }
            if self.fill().await == 0 {
                panic!(
                    "connection closed before a whole response head; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    async fn read_exact_buf(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if self.fill().await == 0 {
                panic!("connection closed in the middle of a frame");
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Reads a response body: Content-Length, chunked, or up to end of stream.
    pub async fn read_body(&mut self, head: &RawResponse) -> Vec<u8> {
        if let Some(n) = head.header("content-length") {
            let n: usize = n.trim().parse().unwrap();
            return self.read_exact_buf(n).await;
        }
        if head
            .header("transfer-encoding")
            .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
        {
            let mut body = Vec::new();
            loop {
                let line = self.read_line().await;
                let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                if size == 0 {
                    self.read_line().await;
                    return body;
                }
                body.extend(self.read_exact_buf(size).await);
                self.read_line().await;
            }
        }
        while self.fill().await > 0 {}
        std::mem::take(&mut self.buf)
    }

    async fn read_line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return String::from_utf8_lossy(&line[..i]).into_owned();
            }
            if self.fill().await == 0 {
                panic!("connection closed in the middle of a line");
            }
        }
    }

    /// Whether the peer has ended the connection: nothing is left unread and a read finds
    /// the end of the stream (bounded by `WAIT`).
    pub async fn at_eof(&mut self) -> bool {
        self.buf.is_empty() && self.fill().await == 0
    }

    /// Reads one WebSocket frame (server → client frames are unmasked).
    pub async fn read_frame(&mut self) -> RawFrame {
        let h = self.read_exact_buf(2).await;
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        let masked = h[1] & 0x80 != 0;
        let mut len = (h[1] & 0x7f) as u64;
        if len == 126 {
            let b = self.read_exact_buf(2).await;
            len = u16::from_be_bytes([b[0], b[1]]) as u64;
        } else if len == 127 {
            let b = self.read_exact_buf(8).await;
            len = u64::from_be_bytes(b.try_into().unwrap());
        }
        let mask = if masked {
            Some(self.read_exact_buf(4).await)
        } else {
            None
        };
        let mut payload = self.read_exact_buf(len as usize).await;
        if let Some(m) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= m[i % 4];
            }
        }
        RawFrame {
            fin,
            opcode,
            payload,
        }
    }

    /// Writes one masked client frame.
    pub async fn write_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
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
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.write(&f).await;
    }
}

/// A valid WebSocket upgrade request head, plus extra header lines.
pub fn upgrade_head(path: &str, host: &str, extra: &[(&str, &str)]) -> String {
    let mut s = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in extra {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    s
}

/// Sends a request head and returns the response head (status and headers).
pub async fn raw_request(addr: SocketAddr, head: &str) -> RawResponse {
    let mut c = RawConn::open(addr).await;
    c.write(head.as_bytes()).await;
    c.read_head().await
}

/// The status a well-formed upgrade request to `path` gets.
pub async fn upgrade_status(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> u16 {
    raw_request(addr, &upgrade_head(path, &addr.to_string(), extra))
        .await
        .status
}
