//! A small chat backend for trying and testing wsgate.
//!
//! ```text
//! cargo run --example chat_server -- [--port 8010] [--name chat-8010] [--bind-ip 127.0.0.1]
//! ```
//!
//! One port serves both WebSocket and plain HTTP:
//!
//! * WebSocket upgrade on any path. Client → server text messages are JSON objects:
//!   `{"join":"lobby"}` (enter a room, leaving the previous one), `{"say":"hi"}` (broadcast to
//!   everyone in the room, the sender included), `{"echo":<any>}` (answered to the sender
//!   only), `{"whoami":true}` (the sender's upgrade request as the server saw it). Several keys
//!   in one object are handled in that order. Every server → client message is a JSON object
//!   carrying `"backend": NAME`:
//!   `{"backend":N,"joined":"lobby"}`, `{"backend":N,"room":"lobby","from":"127.0.0.1:51234","text":"hi"}`,
//!   `{"backend":N,"echo":<same>}`,
//!   `{"backend":N,"whoami":{"id":..,"peer":..,"path":..,"subprotocol":..,"headers":{..}}}`,
//!   `{"backend":N,"error":"..."}`.
//!   Subprotocol: `chat` if the client offers it, else the first one offered.
//! * HTTP: `GET /` (also `/chat`, `/index.html`) → the chat page; `GET /health` → `ok`;
//!   any method on `/echo` → a JSON echo of the request (method, path, headers, body);
//!   anything else → 404. Responses carry `X-Backend: NAME` and close the connection.
//!
//! On start it prints `chat_server NAME listening on ADDR` to stdout.
//!
//! `demo.rs` includes this file as a module and calls [`serve`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_std::future::timeout;
use async_std::net::{Shutdown, TcpListener, TcpStream};
use async_std::task;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::Role;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::WebSocketStream;
use futures::channel::mpsc;
use futures::{AsyncReadExt, AsyncWriteExt, SinkExt, StreamExt};
use log::{debug, warn};
use serde_json::{json, Map, Value};

const CHAT_HTML: &str = include_str!("chat.html");

/// Largest accepted HTTP request head.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest request body `/echo` accepts.
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The whole request head must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued toward one client. Broadcasts to a client whose queue is full are dropped
/// (a slow reader must not stall its room); replies to a client's own requests wait instead.
const QUEUE_LEN: usize = 1024;
const MAX_ROOM_NAME: usize = 128;

const USAGE: &str =
    "usage: chat_server [--port P (8010)] [--name NAME (chat-<port>)] [--bind-ip IP (127.0.0.1)]";

#[async_std::main]
async fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("chat_server: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let addr = SocketAddr::new(args.bind_ip, args.port);
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("chat_server: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let name = match args.name {
        Some(name) => name,
        None => format!(
            "chat-{}",
            listener.local_addr().map_or(args.port, |a| a.port())
        ),
    };
    if let Err(e) = serve(listener, name).await {
        eprintln!("chat_server: {e}");
        std::process::exit(1);
    }
}

struct Args {
    port: u16,
    name: Option<String>,
    bind_ip: IpAddr,
}

/// `Ok(None)` means `--help`.
fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut args = Args {
        port: 8010,
        name: None,
        bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        if key == "-h" || key == "--help" {
            return Ok(None);
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{key} needs a value"))
        };
        match key.as_str() {
            "--port" => {
                let v = value()?;
                args.port = v.parse().map_err(|_| format!("bad --port {v:?}"))?;
            }
            "--name" => args.name = Some(value()?),
            "--bind-ip" => {
                let v = value()?;
                args.bind_ip = v.parse().map_err(|_| format!("bad --bind-ip {v:?}"))?;
            }
            _ => return Err(format!("unknown argument {key:?}")),
        }
    }
    Ok(Some(args))
}

/// Runs the chat server on `listener` until the process ends. Prints the readiness line first.
pub async fn serve(listener: TcpListener, name: String) -> io::Result<()> {
    let local = listener.local_addr()?;
    println!("chat_server {name} listening on {local}");
    let hub = Arc::new(Hub {
        name,
        rooms: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
    });
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let hub = hub.clone();
                task::spawn(async move { handle_connection(stream, peer, hub).await });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                warn!("chat_server {}: accept failed: {e}", hub.name);
                task::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Rooms: room name → (connection id → that connection's outgoing queue).
struct Hub {
    name: String,
    rooms: Mutex<HashMap<String, HashMap<u64, mpsc::Sender<Message>>>>,
    next_id: AtomicU64,
}

impl Hub {
    fn rooms(&self) -> MutexGuard<'_, HashMap<String, HashMap<u64, mpsc::Sender<Message>>>> {
        // Nothing panics while holding the lock, but never let poisoning take the server down.
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn leave(&self, room: &str, id: u64) {
        let mut rooms = self.rooms();
        if let Some(members) = rooms.get_mut(room) {
            members.remove(&id);
            if members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    fn msg(&self, mut fields: Map<String, Value>) -> Message {
        fields.insert("backend".into(), Value::String(self.name.clone()));
        Message::text(Value::Object(fields).to_string())
    }

    fn error(&self, text: impl Into<String>) -> Message {
        self.msg(obj(json!({ "error": text.into() })))
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

async fn handle_connection(mut stream: TcpStream, peer: SocketAddr, hub: Arc<Hub>) {
    let _ = stream.set_nodelay(true);
    let head = match timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(HeadError::TooLarge)) => {
            let _ = respond(
                &mut stream,
                &hub.name,
                431,
                "text/plain",
                &[],
                b"request head too large\n",
                false,
            )
            .await;
            return finish(stream).await;
        }
        Ok(Err(HeadError::Bad(e))) => {
            debug!("{peer}: bad request: {e}");
            let _ = respond(
                &mut stream,
                &hub.name,
                400,
                "text/plain",
                &[],
                b"bad request\n",
                false,
            )
            .await;
            return finish(stream).await;
        }
        Ok(Err(HeadError::Io(e))) => {
            debug!("{peer}: {e}");
            return;
        }
        Err(_) => {
            debug!("{peer}: request head timed out");
            return;
        }
    };
    if head.is_websocket_upgrade() {
        let Some(protocol) = accept_upgrade(&mut stream, &head, &hub.name, "chat").await else {
            return finish(stream).await;
        };
        let ws =
            WebSocketStream::from_partially_read(stream, head.rest.clone(), Role::Server, None)
                .await;
        chat_session(ws, peer, head, protocol, hub).await;
    } else {
        if let Err(e) = serve_http(&mut stream, &head, &hub.name).await {
            debug!("{peer}: {e}");
        }
        finish(stream).await;
    }
}

async fn serve_http(stream: &mut TcpStream, head: &Head, name: &str) -> io::Result<()> {
    let path = head.path.split('?').next().unwrap_or("");
    let get = head.method == "GET" || head.method == "HEAD";
    let head_only = head.method == "HEAD";
    match path {
        "/echo" => {
            let body = match read_body(stream, head).await {
                Ok(body) => body,
                Err((status, why)) => {
                    return respond(
                        stream,
                        name,
                        status,
                        "text/plain",
                        &[],
                        why.as_bytes(),
                        false,
                    )
                    .await
                }
            };
            let reply = json!({
                "backend": name,
                "method": head.method,
                "path": head.path,
                "headers": head.headers_json(),
                "body": String::from_utf8_lossy(&body),
            });
            let body = reply.to_string();
            respond(
                stream,
                name,
                200,
                "application/json",
                &[],
                body.as_bytes(),
                head_only,
            )
            .await
        }
        "/" | "/chat" | "/chat/" | "/index.html" if get => {
            let extra = [("Cache-Control", "no-store")];
            respond(
                stream,
                name,
                200,
                "text/html; charset=utf-8",
                &extra,
                CHAT_HTML.as_bytes(),
                head_only,
            )
            .await
        }
        "/health" if get => respond(stream, name, 200, "text/plain", &[], b"ok", head_only).await,
        "/" | "/chat" | "/chat/" | "/index.html" | "/health" => {
            let extra = [("Allow", "GET, HEAD")];
            respond(
                stream,
                name,
                405,
                "text/plain",
                &extra,
                b"method not allowed\n",
                false,
            )
            .await
        }
        _ => {
            respond(
                stream,
                name,
                404,
                "text/plain",
                &[],
                b"not found\n",
                head_only,
            )
            .await
        }
    }
}

/// One WebSocket client: a reader loop here, a writer task draining the client's queue.
async fn chat_session(
    ws: WebSocketStream<TcpStream>,
    peer: SocketAddr,
    head: Head,
    protocol: Option<String>,
    hub: Arc<Hub>,
) {
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let from = peer.to_string();
    debug!(
        "chat {}: session {id} from {from} on {}",
        hub.name, head.path
    );
    let (mut sink, mut source) = ws.split();
    let (mut tx, mut rx) = mpsc::channel::<Message>(QUEUE_LEN);
    let mut writer = task::spawn(async move {
        while let Some(msg) = rx.next().await {
            if sink.send(msg).await.is_err() {
                break;
            }
        }
    });

    let mut room: Option<String> = None;
    while let Some(item) = source.next().await {
        let msg = match item {
            Ok(msg) => msg,
            Err(e) => {
                debug!("chat {}: session {id}: {e}", hub.name);
                break;
            }
        };
        let replies = match msg {
            Message::Text(text) => handle_text(
                &hub,
                id,
                &from,
                &head,
                &protocol,
                &mut room,
                &tx,
                text.as_str(),
            ),
            Message::Binary(b) => vec![hub.error(format!(
                "binary messages are not supported ({} bytes ignored)",
                b.len()
            ))],
            // Pings are answered and closes acknowledged by tungstenite; keep polling so that
            // the close reply is flushed and the stream ends.
            _ => Vec::new(),
        };
        let mut gone = false;
        for reply in replies {
            // Replies to the client's own requests wait for queue room: no drops, and the
            // client's own pace is the only thing slowed down.
            if tx.send(reply).await.is_err() {
                gone = true;
                break;
            }
        }
        if gone {
            break;
        }
    }

    if let Some(room) = room {
        hub.leave(&room, id);
    }
    drop(tx);
    if timeout(Duration::from_secs(5), &mut writer).await.is_err() {
        writer.cancel().await;
    }
    debug!("chat {}: session {id} from {from} ended", hub.name);
}

/// Handles one text message. Broadcasts go straight into the other members' queues; the
/// returned messages are for the sender (its own copy of a broadcast included, in order).
#[allow(clippy::too_many_arguments)]
fn handle_text(
    hub: &Hub,
    id: u64,
    from: &str,
    head: &Head,
    protocol: &Option<String>,
    room: &mut Option<String>,
    tx: &mpsc::Sender<Message>,
    text: &str,
) -> Vec<Message> {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return vec![hub.error(format!("invalid JSON: {e}"))],
    };
    let Value::Object(req) = value else {
        return vec![hub.error("expected a JSON object: {\"join\":ROOM}, {\"say\":TEXT}, {\"echo\":ANY} or {\"whoami\":true}")];
    };
    let mut out = Vec::new();
    let mut known = false;
    if let Some(join) = req.get("join") {
        known = true;
        match join.as_str() {
            Some(name) if !name.is_empty() && name.len() <= MAX_ROOM_NAME => {
                if let Some(old) = room.take() {
                    hub.leave(&old, id);
                }
                hub.rooms()
                    .entry(name.to_string())
                    .or_default()
                    .insert(id, tx.clone());
                *room = Some(name.to_string());
                out.push(hub.msg(obj(json!({ "joined": name }))));
            }
            _ => out.push(hub.error(format!(
                "join expects a room name: a non-empty string of at most {MAX_ROOM_NAME} bytes"
            ))),
        }
    }
    if let Some(say) = req.get("say") {
        known = true;
        match (say.as_str(), room.as_deref()) {
            (None, _) => out.push(hub.error("say expects a string")),
            (Some(_), None) => out.push(hub.error("join a room first: {\"join\":\"lobby\"}")),
            (Some(text), Some(room)) => {
                let msg = hub.msg(obj(json!({ "room": room, "from": from, "text": text })));
                let mut rooms = hub.rooms();
                for (member, queue) in rooms.get_mut(room).into_iter().flatten() {
                    if *member != id && queue.try_send(msg.clone()).is_err() {
                        // Full (a client that does not read) or closing: drop, never block the room.
                        debug!("chat {}: dropped a message for session {member}", hub.name);
                    }
                }
                out.push(msg);
            }
        }
    }
    if let Some(echo) = req.get("echo") {
        known = true;
        out.push(hub.msg(obj(json!({ "echo": echo }))));
    }
    if req.contains_key("whoami") {
        known = true;
        let whoami = json!({
            "id": from,
            "peer": from,
            "path": head.path,
            "subprotocol": protocol,
            "headers": head.headers_json(),
        });
        out.push(hub.msg(obj(json!({ "whoami": whoami }))));
    }
    if !known {
        out.push(hub.error("unknown message: expected {\"join\":ROOM}, {\"say\":TEXT}, {\"echo\":ANY} or {\"whoami\":true}"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 + WebSocket handshake (the same helpers live in ticker_server.rs: each
// example stays a single self-contained file).

struct Head {
    method: String,
    /// Request target as sent: path and query.
    path: String,
    /// Lower-cased names, in order.
    headers: Vec<(String, String)>,
    /// Bytes read past the head (body start, or early WebSocket frames).
    rest: Vec<u8>,
}

enum HeadError {
    TooLarge,
    Bad(String),
    Io(io::Error),
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Comma-separated tokens of every `name` header, trimmed.
    fn tokens(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect()
    }

    fn is_websocket_upgrade(&self) -> bool {
        self.tokens("upgrade")
            .iter()
            .any(|t| t.eq_ignore_ascii_case("websocket"))
    }

    fn headers_json(&self) -> Value {
        let mut map = Map::new();
        for (n, v) in &self.headers {
            match map.get_mut(n) {
                Some(Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(v);
                }
                _ => {
                    map.insert(n.clone(), Value::String(v.clone()));
                }
            }
        }
        Value::Object(map)
    }
}

async fn read_head(stream: &mut TcpStream) -> Result<Head, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = stream.read(&mut chunk).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf[scan_from..].windows(4).position(|w| w == b"\r\n\r\n") {
            break scan_from + pos + 4;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
    };
    if end > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Bad("incomplete head".into())),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Bad(e.to_string())),
    }
    Ok(Head {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        rest: buf[end..].to_vec(),
    })
}

/// Validates the upgrade request and writes `101 Switching Protocols`, choosing `preferred`
/// among the offered subprotocols, else the first one offered. On a bad request it writes the
/// error response and returns `None`.
async fn accept_upgrade(
    stream: &mut TcpStream,
    head: &Head,
    name: &str,
    preferred: &str,
) -> Option<Option<String>> {
    let fail = if head.method != "GET" {
        Some((405, "WebSocket upgrade needs GET\n"))
    } else if head.header("sec-websocket-version").map(str::trim) != Some("13") {
        Some((426, "Sec-WebSocket-Version 13 required\n"))
    } else if head
        .header("sec-websocket-key")
        .is_none_or(|k| k.trim().is_empty())
    {
        Some((400, "missing Sec-WebSocket-Key\n"))
    } else {
        None
    };
    if let Some((status, why)) = fail {
        let extra = [("Sec-WebSocket-Version", "13")];
        let _ = respond(
            stream,
            name,
            status,
            "text/plain",
            &extra,
            why.as_bytes(),
            false,
        )
        .await;
        return None;
    }
    let key = head.header("sec-websocket-key").unwrap_or_default().trim();
    let offered = head.tokens("sec-websocket-protocol");
    let protocol = offered
        .iter()
        .find(|p| **p == preferred)
        .or(offered.first())
        .map(|p| p.to_string());
    let mut resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nX-Backend: {name}\r\n",
        derive_accept_key(key.as_bytes())
    );
    if let Some(p) = &protocol {
        resp.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    resp.push_str("\r\n");
    stream.write_all(resp.as_bytes()).await.ok()?;
    Some(protocol)
}

/// Reads a `Content-Length` body (chunked bodies are refused).
async fn read_body(stream: &mut TcpStream, head: &Head) -> Result<Vec<u8>, (u16, String)> {
    if head.header("transfer-encoding").is_some() {
        return Err((411, "send the body with Content-Length\n".into()));
    }
    let len: usize = match head.header("content-length") {
        None => 0,
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| (400, "bad Content-Length\n".to_string()))?,
    };
    if len > MAX_BODY_BYTES {
        return Err((413, format!("body over {MAX_BODY_BYTES} bytes\n")));
    }
    let mut body = head.rest.clone();
    body.truncate(len);
    if body.len() < len {
        let start = body.len();
        body.resize(len, 0);
        match timeout(HEAD_TIMEOUT, stream.read_exact(&mut body[start..])).await {
            Ok(Ok(())) => {}
            _ => return Err((400, "incomplete body\n".into())),
        }
    }
    Ok(body)
}

#[allow(clippy::too_many_arguments)]
async fn respond(
    stream: &mut TcpStream,
    name: &str,
    status: u16,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "",
    };
    let mut resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nX-Backend: {name}\r\n",
        body.len()
    );
    for (k, v) in extra {
        resp.push_str(&format!("{k}: {v}\r\n"));
    }
    resp.push_str("\r\n");
    let mut bytes = resp.into_bytes();
    if !head_only {
        bytes.extend_from_slice(body);
    }
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// Ends an HTTP exchange politely: half-close, then drain what the client still sends (briefly),
/// so that unread request bytes do not turn the close into a reset that eats the response.
async fn finish(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut total = 0;
        while let Ok(n) = stream.read(&mut sink).await {
            total += n;
            if n == 0 || total > 1024 * 1024 {
                break;
            }
        }
    };
    let _ = timeout(Duration::from_secs(1), drain).await;
}
