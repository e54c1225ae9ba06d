//! A wscat-like WebSocket client for trying and testing wsgate.
//!
//! ```text
//! cargo run --example client -- URL [--subprotocol P]... [--header "K: V"]... [--linger-ms MS]
//! ```
//!
//! Prints `connected (subprotocol: P)` (`none` when the server chose none), then sends each
//! stdin line as a text message and prints each received message on its own line: `< TEXT`,
//! or `< [binary N bytes]` for binary ones. When stdin ends it waits `--linger-ms` (default 0)
//! while still printing what arrives, then closes with 1000.
//!
//! Exit status and last line:
//! * a close frame arrived (from the server, or as the answer to ours): `closed: CODE REASON`
//!   (`closed: 1005` for a close frame without a code), exit 0;
//! * the connection broke without a close frame: `closed: 1006 connection lost: ERROR`, exit 1;
//! * connect or handshake failure: `handshake failed: HTTP STATUS REASON` (then the response
//!   body, if any, on the next line) or `connect failed: ERROR`, exit 1;
//! * bad arguments: usage on stderr, exit 2.
//!
//! The close code is read off the wire: tungstenite 0.30 rewrites codes it does not know,
//! notably 1014 (bad gateway, which wsgate sends), to 1002 before the application sees them
//! (snapview/tungstenite-rs#502), so the client taps the incoming bytes for close frames.
//!
//! Only `ws://` is supported for now; [`connect`] is the one place where `wss://` would plug in
//! (wrap the TCP stream in TLS before the handshake).

use std::io;
use std::pin::Pin;
use std::process::exit;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_std::io::BufReadExt;
use async_std::net::TcpStream;
use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::handshake::client::{Request, Response};
use async_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures::{AsyncRead, AsyncWrite, StreamExt};

const USAGE: &str =
    "usage: client URL [--subprotocol P]... [--header \"K: V\"]... [--linger-ms MS]";

struct Args {
    url: String,
    subprotocols: Vec<String>,
    headers: Vec<(String, String)>,
    linger: Duration,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut url = None;
    let mut args = Args {
        url: String::new(),
        subprotocols: Vec::new(),
        headers: Vec::new(),
        linger: Duration::ZERO,
    };
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{key} needs a value"))
        };
        match key.as_str() {
            "-h" | "--help" => return Ok(None),
            "--subprotocol" | "-s" => args.subprotocols.push(value()?),
            "--header" | "-H" => {
                let v = value()?;
                let (k, val) = v
                    .split_once(':')
                    .ok_or_else(|| format!("bad --header {v:?}: expected \"Name: value\""))?;
                args.headers
                    .push((k.trim().to_string(), val.trim().to_string()));
            }
            "--linger-ms" => {
                let v = value()?;
                let ms: u64 = v.parse().map_err(|_| format!("bad --linger-ms {v:?}"))?;
                args.linger = Duration::from_millis(ms);
            }
            k if k.starts_with('-') && k.len() > 1 => return Err(format!("unknown option {k:?}")),
            _ if url.is_none() => url = Some(key),
            _ => return Err(format!("unexpected argument {key:?}")),
        }
    }
    args.url = url.ok_or("missing URL")?;
    Ok(Some(args))
}

fn build_request(args: &Args) -> Result<Request, String> {
    let mut request = args
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad URL {:?}: {e}", args.url))?;
    let headers = request.headers_mut();
    if !args.subprotocols.is_empty() {
        let offer = args.subprotocols.join(", ");
        let value =
            HeaderValue::from_str(&offer).map_err(|_| format!("bad subprotocol {offer:?}"))?;
        headers.insert("Sec-WebSocket-Protocol", value);
    }
    for (k, v) in &args.headers {
        let name =
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("bad header name {k:?}"))?;
        let value = HeaderValue::from_str(v).map_err(|_| format!("bad value for header {k}"))?;
        // Each --header replaces a default (Host, User-Agent, ...) but repeats add up.
        if args
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(k))
            .count()
            > 1
        {
            headers.append(name, value);
        } else {
            headers.insert(name, value);
        }
    }
    Ok(request)
}

type Stream = CloseTap<TcpStream>;

/// Dials the URL's host and performs the WebSocket handshake. `wss://` belongs here: wrap the
/// `TcpStream` in TLS (e.g. an `async_tungstenite::stream::Stream` switcher) inside the tap.
async fn connect(
    request: Request,
) -> Result<(WebSocketStream<Stream>, Response, WireClose), WsError> {
    let uri = request.uri();
    let scheme = uri.scheme_str().unwrap_or("");
    if scheme != "ws" {
        let why = if scheme == "wss" {
            "wss:// is not supported by this client yet"
        } else {
            "the URL scheme must be ws://"
        };
        return Err(WsError::Io(io::Error::new(io::ErrorKind::Unsupported, why)));
    }
    let host = uri
        .host()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(WsError::Io)?;
    let _ = tcp.set_nodelay(true);
    let wire_close = WireClose::default();
    let tap = CloseTap {
        inner: tcp,
        parser: TapParser::default(),
        seen: wire_close.clone(),
    };
    let (ws, response) = async_tungstenite::client_async(request, tap).await?;
    Ok((ws, response, wire_close))
}

/// The last close frame seen on the wire: (code, reason), unaltered.
#[derive(Clone, Default)]
struct WireClose(Arc<Mutex<Option<(u16, String)>>>);

impl WireClose {
    fn get(&self) -> Option<(u16, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Passes bytes through unchanged while following the server → client frame sequence (after
/// the HTTP response head) to record close frames as sent.
struct CloseTap<S> {
    inner: S,
    parser: TapParser,
    seen: WireClose,
}

#[derive(Default)]
struct TapParser {
    /// Length of the `\r\n\r\n` suffix matched so far; 4 = head done, frames follow.
    head_match: usize,
    /// Bytes of the current frame header collected so far.
    header: Vec<u8>,
    /// Payload bytes still to skip in the current frame.
    remaining: u64,
    /// The current frame is a close frame: its payload so far.
    close: Option<Vec<u8>>,
}

impl TapParser {
    fn feed(&mut self, mut data: &[u8], seen: &WireClose) {
        while !data.is_empty() {
            if self.head_match < 4 {
                let b = data[0];
                data = &data[1..];
                let want = b"\r\n\r\n"[self.head_match];
                self.head_match = if b == want {
                    self.head_match + 1
                } else if b == b'\r' {
                    1
                } else {
                    0
                };
                continue;
            }
            if self.remaining > 0 {
                let n = data
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                if let Some(close) = &mut self.close {
                    close.extend_from_slice(&data[..n]);
                }
                self.remaining -= n as u64;
                data = &data[n..];
                if self.remaining == 0 {
                    self.end_frame(seen);
                }
                continue;
            }
            self.header.push(data[0]);
            data = &data[1..];
            let h = &self.header;
            if h.len() < 2 {
                continue;
            }
            let ext = match h[1] & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask = if h[1] & 0x80 != 0 { 4 } else { 0 };
            if h.len() < 2 + ext + mask {
                continue;
            }
            let len = match ext {
                0 => u64::from(h[1] & 0x7f),
                _ => h[2..2 + ext]
                    .iter()
                    .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
            };
            self.close = (h[0] & 0x0f == 0x8).then(Vec::new);
            self.header.clear();
            self.remaining = len;
            if len == 0 {
                self.end_frame(seen);
            }
        }
    }

    fn end_frame(&mut self, seen: &WireClose) {
        if let Some(payload) = self.close.take() {
            let close = match payload.len() {
                0 | 1 => (1005, String::new()),
                _ => (
                    u16::from_be_bytes([payload[0], payload[1]]),
                    String::from_utf8_lossy(&payload[2..]).into_owned(),
                ),
            };
            *seen.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(close);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CloseTap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            this.parser.feed(&buf[..n], &this.seen);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CloseTap<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[async_std::main]
async fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("client: {e}\n{USAGE}");
            exit(2);
        }
    };
    let request = match build_request(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("client: {e}\n{USAGE}");
            exit(2);
        }
    };
    let (ws, response, wire_close) = match connect(request).await {
        Ok(ok) => ok,
        Err(WsError::Http(resp)) => {
            let status = resp.status();
            println!(
                "handshake failed: HTTP {} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
            if let Some(body) = resp.body() {
                let body = String::from_utf8_lossy(body);
                if !body.trim().is_empty() {
                    println!("{}", body.trim_end());
                }
            }
            exit(1);
        }
        Err(e) => {
            println!("connect failed: {e}");
            exit(1);
        }
    };
    let subprotocol = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none");
    println!("connected (subprotocol: {subprotocol})");

    let (mut sink, mut source) = ws.split();

    // Receiver: prints everything, ends the process on close.
    let receiver = async_std::task::spawn(async move {
        while let Some(item) = source.next().await {
            match item {
                Ok(Message::Text(t)) => println!("< {t}"),
                Ok(Message::Binary(b)) => println!("< [binary {} bytes]", b.len()),
                Ok(Message::Close(frame)) => {
                    let (code, reason) = wire_close.get().unwrap_or_else(|| match frame {
                        Some(f) => (u16::from(f.code), f.reason.to_string()),
                        None => (1005, String::new()),
                    });
                    if reason.is_empty() {
                        println!("closed: {code}");
                    } else {
                        println!("closed: {code} {reason}");
                    }
                    // Let tungstenite flush its answer to the close, then stop.
                    let _ = async_std::future::timeout(Duration::from_secs(1), source.next()).await;
                    exit(0);
                }
                Ok(_) => {}
                Err(e) => {
                    println!("closed: 1006 connection lost: {e}");
                    exit(1);
                }
            }
        }
        println!("closed: 1006 connection lost");
        exit(1);
    });

    // Sender: stdin lines → text messages.
    let mut lines = async_std::io::BufReader::new(async_std::io::stdin()).lines();
    while let Some(line) = lines.next().await {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                eprintln!("client: stdin: {e}");
                break;
            }
        };
        let line = line.strip_suffix('\r').unwrap_or(&line).to_string();
        if sink.send(Message::text(line)).await.is_err() {
            // The connection is gone: the receiver reports how.
            break;
        }
    }
    if !args.linger.is_zero() {
        async_std::task::sleep(args.linger).await;
    }
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = sink.close(Some(frame)).await;
    // The receiver prints the close answer and exits; do not wait forever for it.
    if async_std::future::timeout(Duration::from_secs(5), receiver)
        .await
        .is_err()
    {
        println!("closed: 1006 no answer to our close");
        exit(1);
    }
}
